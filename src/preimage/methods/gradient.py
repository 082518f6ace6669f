"""Gradient-descent baselines under the same result type: one loop, a table of variants.

All minimise the data misfit over the latent code,

    f(z) = ||M G(z) - y||_2^2 + lam ||z||_2^2,

with M the identity or a linear measurement (`preimage.model.operators`),
batched in PyTorch over samples and restarts (on CUDA when available), by
`latent_descent`. `VARIANTS` names the published methods:

- "adam" (CSGM, Bora et al. 2017): Adam from random starts z ~ N(0, I), keeping
  per sample the restart with the lowest loss (CSGM defaults: lr 0.01, 1000
  steps, 10 restarts).
- "clipping" (Lipton and Tripathi 2017): the same with stochastic clipping for
  latents bounded in [-bound, bound]^k: after every step, coordinates that
  left the box are redrawn uniformly inside it.
- "negation" (Hand and Voroninski 2018, Huang et al. 2018): plain
  (sub)gradient descent z <- z~ - s grad f(z~), where z~ = -z when f(-z) < f(z)
  and z otherwise (the negation step escapes the spurious stationary point
  near -z* that the loss of a random ReLU network has); the step s starts at
  ``lr`` and backtracks (Armijo: the paper's constant step depends on the
  network's scale, 0.5 recovers every code of a random 20-100-500 net and
  diverges on the authors' decoder).

Gradient descent proves nothing: the status is "feasible" or "failed", never
"unique" or "infeasible". Without a noise model it is "feasible" when the
relative misfit |G(z) - x|_inf / |x|_inf is at most ``success_rtol``; with a
noise model as in `preimage.methods.noisy` (misfit consistent with
``noise_level``, or always when no level is given).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from preimage.model.network import Network
from preimage.model.operators import Measurement, as_measurement
from preimage.model.torch_io import default_device, torch_dtype
from preimage.model.validation import (
    MEASURED,
    check_choice,
    check_count,
    check_observation,
    check_positive,
)
from preimage.results import (
    Deadline,
    InversionResult,
    ProgressCallback,
    build_result,
    check_noise,
    estimate_rule,
    success_tolerance,
)


@dataclass(frozen=True)
class Variant:
    """One gradient baseline: its optimizer, default step and extra rule."""

    label: str
    optimizer: str  # "adam" or "sgd" (backtracking subgradient steps)
    lr: float
    negation: bool = False
    clipping: bool = False


#: The gradient methods of `preimage.invert`, by name.
VARIANTS: dict[str, Variant] = {
    "adam": Variant("Adam", "adam", 0.01),
    "clipping": Variant("Adam with stochastic clipping", "adam", 0.01, clipping=True),
    "negation": Variant("subgradient descent with negation", "sgd", 0.5, negation=True),
}


@dataclass
class Descent:
    """All restarts of one batched descent: z of shape (R, B, k), loss (R, B)."""

    z: np.ndarray
    loss: np.ndarray
    steps: int

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        pick = np.argmin(np.where(np.isfinite(self.loss), self.loss, np.inf), axis=0)
        cols = np.arange(self.z.shape[1])
        return self.z[pick, cols], self.loss[pick, cols]


def check_descent(net: Network, lr: float, steps: int, restarts: int, lam: float) -> None:
    """Validate the settings every gradient method shares."""
    if not isinstance(net, Network):
        raise TypeError(f"`net` must be a preimage.Network; got {type(net).__name__}.")
    check_positive(lr, "lr")
    check_positive(lam, "lam", allow_zero=True)
    check_count(steps, "steps", 1)
    check_count(restarts, "restarts", 1)


def observations(
    net: Network, x: Any, A: Any
) -> tuple[np.ndarray, bool, Measurement | None]:
    """x as (B, n) observations of G(z), or (B, m) of A G(z) with the measurement A."""
    if A is None:
        xb, single = check_observation(x, net.output_dim)
        return xb, single, None
    meas = as_measurement(A, net.output_dim)
    yb, single = check_observation(x, meas.shape[0], name="y", what=MEASURED)
    return yb, single, meas


def latent_descent(
    net: Network,
    yb: np.ndarray,
    *,
    meas: Measurement | None = None,
    starts: np.ndarray | None = None,
    optimizer: str = "adam",
    lr: float = 0.01,
    steps: int = 1000,
    restarts: int = 10,
    lam: float = 0.0,
    bound: float | None = None,
    negation: bool = False,
    seed: int | None = 0,
    device: Any = None,
    dtype: Any = None,
    progress: ProgressCallback | None = None,
    deadline: Deadline | None = None,
) -> Descent:
    """The batched loop behind every gradient method.

    Parameters
    ----------
    net : Network
    yb : ndarray of shape (B, m)
        Observations (of G(z), or of M G(z) when `meas` is given).
    meas : Mask or MatrixMeasurement, optional
    starts : ndarray of shape (R, B, k), optional
        Start points (default: R = `restarts` draws of z ~ N(0, I), or U[-bound, bound]
        when `bound`, the same R for every sample, so that a sample's answer does not
        depend on the rest of the batch).
    optimizer : "adam" or "sgd"
        "sgd": plain (sub)gradient steps z <- z - s grad f(z), the step s per
        row starting at `lr`, halved when f would not decrease enough (Armijo)
        and grown by 1.5 otherwise.
    bound : float, optional
        Stochastic clipping to [-bound, bound]^k after every step.
    negation : bool
        Take the negation step before every gradient step.
    progress : callable(done, total), optional
        Called after every step with the samples' share of the work done
        (B * step / steps of B).
    deadline : stop after the step during which it passes (`Descent.steps` says
        how many were taken).

    Returns
    -------
    Descent with every restart's final z and loss.
    """
    import torch

    device = device or default_device()
    dtype = torch.float64 if dtype is None else torch_dtype(dtype)
    model = net.to_torch(dtype).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    B, k = yb.shape[0], net.latent_dim
    gen = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
    if starts is None:
        # R starts shared by every sample (row r * B + b is start r of sample b): a
        # sample's answer must not depend on the batch it came in, its size or its place
        R = int(restarts)
        if bound is not None:
            z0 = (torch.rand(R, 1, k, generator=gen, dtype=dtype) * 2 - 1) * bound
        else:
            z0 = torch.randn(R, 1, k, generator=gen, dtype=dtype)
        z0 = z0.repeat(1, B, 1).reshape(R * B, k)
    else:
        R = starts.shape[0]
        z0 = torch.tensor(np.array(starts, dtype=np.float64).reshape(R * B, k), dtype=dtype)
    z = z0.to(device).requires_grad_(True)
    target = torch.as_tensor(yb, dtype=dtype, device=device).repeat(R, 1)
    if meas is None:
        def measure(x: Any) -> Any:
            return x
    else:
        a_t = torch.tensor(np.array(meas.matrix()), dtype=dtype, device=device)

        def measure(x: Any) -> Any:
            return x @ a_t.T

    def loss_of(v: Any) -> Any:
        return ((measure(model(v)) - target) ** 2).sum(dim=1) + lam * (v**2).sum(dim=1)

    opt = torch.optim.Adam([z], lr=lr) if optimizer == "adam" else None
    # Plain descent: a step size per row, halved when it fails to decrease the loss
    # (Armijo backtracking) and grown by 1.5 after a success.
    rate = torch.full((z.shape[0], 1), float(lr), dtype=dtype, device=device)
    taken = 0
    for step in range(int(steps)):
        if deadline is not None and deadline.expired():
            break
        taken = step + 1
        if negation:
            with torch.no_grad():
                flip = loss_of(-z) < loss_of(z)
                z[flip] = -z[flip]
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss_of(z).sum().backward()
            opt.step()
        else:
            z.grad = None
            current = loss_of(z)
            current.sum().backward()
            with torch.no_grad():
                g = z.grad
                trial = z - rate * g
                ok = loss_of(trial) <= current - 1e-4 * rate[:, 0] * (g**2).sum(dim=1)
                z[ok] = trial[ok]
                rate[ok] *= 1.5
                rate[~ok] *= 0.5
        if bound is not None:
            with torch.no_grad():
                out = z.abs() > bound
                # drawn at every step, used or not: the stream must not depend on whether
                # another sample of the batch left the box (one sample's data changed the
                # others' answers)
                fresh = (torch.rand(R, 1, k, generator=gen, dtype=dtype) * 2 - 1) * bound
                z[out] = fresh.repeat(1, B, 1).reshape(R * B, k).to(device)[out]
        if progress is not None:  # in samples: the batch's share of the steps done
            progress(B * (step + 1) // int(steps), B)
    if progress is not None and taken < int(steps):
        progress(B, B)  # cut short: every sample is done with what it has
    with torch.no_grad():
        final = loss_of(z)
    z_np = z.detach().cpu().numpy().astype(np.float64).reshape(R, B, k)
    loss_np = final.cpu().numpy().astype(np.float64).reshape(R, B)
    return Descent(z_np, loss_np, taken)


def gradient_invert(
    net: Network,
    x: Any,
    *,
    method: str = "adam",
    lr: float | None = None,
    steps: int = 1000,
    restarts: int = 10,
    lam: float = 0.0,
    bound: float | None = None,
    success_rtol: float | None = None,
    seed: int | None = 0,
    device: Any = None,
    dtype: Any = None,
    progress: ProgressCallback | None = None,
    A: Any = None,
    noise: str | None = None,
    noise_level: float | None = None,
    time_limit: float | Deadline | None = None,
) -> InversionResult:
    """A gradient baseline (`VARIANTS`) on ||M G(z) - x||^2 (+ lam ||z||^2), with restarts.

    Parameters
    ----------
    net : Network
    x : array-like of shape (n,) or (B, n) (or (m,) / (B, m) with A)
    method : "adam", "clipping" or "negation"
    lr : float, optional
        The step (default: the variant's, 0.01 for Adam, 0.5 for negation).
    steps, restarts : steps per restart and restarts (CSGM: 1000 and 10).
    lam : weight of the ||z||^2 prior term.
    bound : float, optional
        "clipping" only: the box [-bound, bound]^k (default 1, the paper's
        uniform latents; pass a larger bound for Gaussian codes).
    success_rtol : relative misfit under which the answer counts as a preimage (default
        `preimage.results.success_tolerance`: 1e-6, coarser for float32 or float16 data).
    seed : seed of the random starts.
    device, dtype : torch device (default CUDA when available) and dtype
        (default float64).
    progress : callable(done, total), optional
        In samples (the batch's share of the steps done).
    A : array of shape (m, n) or a measurement, optional
        Fit M G(z) to x instead (compressed sensing, partial observation).
    noise, noise_level : the noise model, for the status (module docstring).
    time_limit : seconds (or a `preimage.results.Deadline`): the descent stops
        there and every sample keeps its point so far, its message saying so.

    Returns
    -------
    InversionResult with ``method`` the variant's name; ``residual`` is the
    relative misfit, ``steps`` the gradient steps of all restarts.
    """
    deadline = Deadline.of(time_limit)
    check_choice(method, "method", tuple(VARIANTS))
    variant = VARIANTS[method]
    lr = variant.lr if lr is None else lr
    check_descent(net, lr, steps, restarts, lam)
    if bound is not None and not variant.clipping:
        raise TypeError(f"`bound` is a setting of method 'clipping' only, not of {method!r}.")
    box = check_positive(1.0 if bound is None else bound, "bound") if variant.clipping else None
    level = check_noise(noise, noise_level)
    yb, single, meas = observations(net, x, A)
    success_rtol = success_tolerance(net, x, success_rtol)
    start = time.perf_counter()
    run = latent_descent(
        net, yb, meas=meas, optimizer=variant.optimizer, lr=lr, steps=steps,
        restarts=restarts, lam=lam, bound=box, negation=variant.negation, seed=seed,
        device=device, dtype=dtype, progress=progress, deadline=deadline,
    )
    z, _ = run.best()
    label = f"{variant.label}, {steps} steps x {restarts} restarts"
    if box is not None:
        label += f", box [-{box:g}, {box:g}]"
    if run.steps < int(steps):
        label += f"; {deadline.note()} after {run.steps} steps (the point reached kept)"
    return build_result(
        net, yb, z, estimate_rule(yb, noise, level, success_rtol), [label] * len(yb),
        method=method, rtol=success_rtol, elapsed=time.perf_counter() - start, single=single,
        measure=None if meas is None else meas.apply, noise=noise,
        steps=np.full(len(yb), run.steps * int(restarts)),
    )

