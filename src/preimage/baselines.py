"""Gradient-descent baselines and the hybrid, under the same result type.

All minimise the data misfit over the latent code,

    f(z) = ||M G(z) - y||_2^2 + lam ||z||_2^2,

with M the identity or a linear measurement (`preimage.measurements`), batched
in PyTorch over samples and restarts (on CUDA when available):

- `gradient_invert` ("adam"; CSGM, Bora et al. 2017): Adam from random starts
  z ~ N(0, I), keeping per sample the restart with the lowest loss (CSGM
  defaults: lr 0.01, 1000 steps, 10 restarts).
- `clipping_invert` ("clipping"; Lipton and Tripathi 2017): the same with
  stochastic clipping for latents bounded in [-bound, bound]^k: after every
  step, coordinates that left the box are redrawn uniformly inside it.
- `negation_invert` ("negation"; Hand and Voroninski 2018, Huang et al. 2018):
  plain (sub)gradient descent z <- z~ - lr grad f(z~), where z~ = -z when
  f(-z) < f(z) and z otherwise (the negation step escapes the spurious
  stationary point near -z* that the loss of a random ReLU network has).
- `hybrid_invert` ("hybrid"): the LP estimate (exact layer-wise inversion, or
  the noisy LP), gradient descent started from it, and the reverse polish: the
  activation pattern of the descent's answer fixes a linear program in z
  (`preimage.patterns.pattern_walk`) that turns a near miss into an exact
  answer (or the best fit in its cell). The lowest misfit wins.

- `paper_layerwise_lp`: the paper's method as published, the reference the
  benchmark and the partial-observation comparison measure against: one
  feasibility LP per layer (`scipy.optimize.linprog`), no objective, no
  null space, no certificate.

Gradient descent proves nothing: the status is "feasible" or "failed", never
"unique" or "infeasible". Without a noise model it is "feasible" when the
relative misfit |G(z) - x|_inf / |x|_inf is at most ``success_rtol``; with a
noise model as in `preimage.noisy` (misfit within ``CONSISTENCY`` times
``noise_level``, or always when no level is given).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from preimage._results import build_result, estimate_status, relative_residual, vector_norm
from preimage._torch import default_device
from preimage._validation import check_observation, check_positive
from preimage.invert import InversionResult
from preimage.measurements import Measurement, as_measurement
from preimage.network import Network
from preimage.noisy import NORMS

Progress = Callable[[int, int], None]


@dataclass
class _Descent:
    """All restarts of one batched descent: z of shape (R, B, k), loss (R, B)."""

    z: np.ndarray
    loss: np.ndarray
    steps: int

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        pick = np.argmin(np.where(np.isfinite(self.loss), self.loss, np.inf), axis=0)
        cols = np.arange(self.z.shape[1])
        return self.z[pick, cols], self.loss[pick, cols]


def _check_common(net: Network, lr: float, steps: int, restarts: int, lam: float) -> None:
    if not isinstance(net, Network):
        raise TypeError(f"`net` must be a preimage.Network; got {type(net).__name__}.")
    check_positive(lr, "lr")
    check_positive(lam, "lam", allow_zero=True)
    if int(steps) < 1 or int(restarts) < 1:
        raise ValueError(f"`steps` and `restarts` must be >= 1; got {steps} and {restarts}.")


def _check_noise(noise: str | None, noise_level: float | None) -> None:
    if noise is not None and noise not in NORMS:
        raise ValueError(f"`noise` must be one of {NORMS} or None; got {noise!r}.")
    if noise_level is not None:
        if noise is None:
            raise ValueError("`noise_level` needs a noise model: pass noise='linf', 'l1' or 'l2'.")
        check_positive(noise_level, "noise_level", allow_zero=True)


def _observations(
    net: Network, x: Any, A: Any
) -> tuple[np.ndarray, bool, Measurement | None]:
    if A is None:
        xb, single = check_observation(x, net.output_dim)
        return xb, single, None
    meas = as_measurement(A, net.output_dim)
    yb, single = check_observation(x, meas.shape[0], name="y")
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
    progress: Progress | None = None,
) -> _Descent:
    """The batched loop behind every gradient method.

    Parameters
    ----------
    net : Network
    yb : ndarray of shape (B, m)
        Observations (of G(z), or of M G(z) when `meas` is given).
    meas : Mask or MatrixMeasurement, optional
    starts : ndarray of shape (R, B, k), optional
        Start points (default: z ~ N(0, I), or U[-bound, bound] when `bound`).
    optimizer : "adam" or "sgd"
        "sgd": plain (sub)gradient steps z <- z - s grad f(z), the step s per
        row starting at `lr`, halved when f would not decrease enough (Armijo)
        and grown by 1.5 otherwise.
    bound : float, optional
        Stochastic clipping to [-bound, bound]^k after every step.
    negation : bool
        Take the negation step before every gradient step.

    Returns
    -------
    _Descent with every restart's final z and loss.
    """
    import torch

    device = device or default_device()
    dtype = dtype or torch.float64
    model = net.to_torch(dtype).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    B, k = yb.shape[0], net.latent_dim
    gen = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
    if starts is None:
        R = int(restarts)
        if bound is not None:
            z0 = (torch.rand(R * B, k, generator=gen, dtype=dtype) * 2 - 1) * bound
        else:
            z0 = torch.randn(R * B, k, generator=gen, dtype=dtype)
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
    for step in range(int(steps)):
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
                if out.any():
                    fresh = (torch.rand(z.shape, generator=gen, dtype=dtype) * 2 - 1) * bound
                    z[out] = fresh.to(device)[out]
        if progress is not None:
            progress(step + 1, int(steps))
    with torch.no_grad():
        final = loss_of(z)
    z_np = z.detach().cpu().numpy().astype(np.float64).reshape(R, B, k)
    loss_np = final.cpu().numpy().astype(np.float64).reshape(R, B)
    return _Descent(z_np, loss_np, int(steps))


def _finish(
    net: Network,
    yb: np.ndarray,
    meas: Measurement | None,
    z: np.ndarray,
    *,
    method: str,
    label: str,
    single: bool,
    steps: np.ndarray,
    success_rtol: float,
    noise: str | None,
    noise_level: float | None,
    start: float,
) -> InversionResult:
    fx = net.forward(z)
    pred = fx if meas is None else meas.apply(fx)
    residual = relative_residual(pred, yb)
    misfit = vector_norm(pred - yb, noise)
    status = estimate_status(
        residual, misfit, yb, noise=noise, noise_level=noise_level, success_rtol=success_rtol
    )
    messages = [f"{label}: relative misfit {r:.3g}" for r in residual]
    return build_result(
        z=z, status=status, messages=messages, residual=residual, method=method,
        rtol=success_rtol, elapsed=time.perf_counter() - start, single=single, misfit=misfit,
        steps=steps, noise=noise,
    )


def gradient_invert(
    net: Network,
    x: Any,
    *,
    lr: float = 0.01,
    steps: int = 1000,
    restarts: int = 10,
    lam: float = 0.0,
    success_rtol: float = 1e-6,
    seed: int | None = 0,
    device: Any = None,
    dtype: Any = None,
    progress: Progress | None = None,
    A: Any = None,
    noise: str | None = None,
    noise_level: float | None = None,
) -> InversionResult:
    """Adam on ||G(z) - x||^2 (+ lam ||z||^2) with random restarts (CSGM).

    Parameters
    ----------
    net : Network
    x : array-like of shape (n,) or (B, n) (or (m,) / (B, m) with A)
    lr, steps, restarts : Adam's learning rate, steps per restart, restarts
        (CSGM defaults: 0.01, 1000, 10).
    lam : weight of the ||z||^2 prior term.
    success_rtol : relative misfit under which the answer counts as a preimage.
    seed : seed of the random starts.
    device, dtype : torch device (default CUDA when available) and dtype
        (default float64).
    progress : callable(step, steps), optional
    A : array of shape (m, n) or a measurement, optional
        Fit M G(z) to x instead (compressed sensing, partial observation).
    noise, noise_level : the noise model, for the status (module docstring).

    Returns
    -------
    InversionResult with method "adam"; `residual` is the relative misfit.
    """
    _check_common(net, lr, steps, restarts, lam)
    _check_noise(noise, noise_level)
    yb, single, meas = _observations(net, x, A)
    start = time.perf_counter()
    run = latent_descent(
        net, yb, meas=meas, lr=lr, steps=steps, restarts=restarts, lam=lam, seed=seed,
        device=device, dtype=dtype, progress=progress,
    )
    z, _ = run.best()
    return _finish(
        net, yb, meas, z, method="adam", label=f"Adam, {steps} steps x {restarts} restarts",
        single=single, steps=np.full(len(yb), int(steps) * int(restarts)),
        success_rtol=success_rtol, noise=noise, noise_level=noise_level, start=start,
    )


def clipping_invert(
    net: Network,
    x: Any,
    *,
    bound: float = 1.0,
    lr: float = 0.01,
    steps: int = 1000,
    restarts: int = 10,
    lam: float = 0.0,
    success_rtol: float = 1e-6,
    seed: int | None = 0,
    device: Any = None,
    dtype: Any = None,
    progress: Progress | None = None,
    A: Any = None,
    noise: str | None = None,
    noise_level: float | None = None,
) -> InversionResult:
    """Adam with stochastic clipping to [-bound, bound]^k (Lipton and Tripathi 2017).

    After every step, each coordinate with |z_j| > bound is redrawn from
    U[-bound, bound]; starts are drawn from the same box. The paper's latents
    are uniform on [-1, 1]^k (bound 1); for Gaussian codes pass a larger bound.
    Other parameters as in `gradient_invert`.

    Returns
    -------
    InversionResult with method "clipping".
    """
    _check_common(net, lr, steps, restarts, lam)
    bound = check_positive(bound, "bound")
    _check_noise(noise, noise_level)
    yb, single, meas = _observations(net, x, A)
    start = time.perf_counter()
    run = latent_descent(
        net, yb, meas=meas, lr=lr, steps=steps, restarts=restarts, lam=lam, bound=bound,
        seed=seed, device=device, dtype=dtype, progress=progress,
    )
    z, _ = run.best()
    return _finish(
        net, yb, meas, z, method="clipping",
        label=f"Adam with stochastic clipping to [-{bound:g}, {bound:g}], {steps} steps x "
        f"{restarts} restarts",
        single=single, steps=np.full(len(yb), int(steps) * int(restarts)),
        success_rtol=success_rtol, noise=noise, noise_level=noise_level, start=start,
    )


def negation_invert(
    net: Network,
    x: Any,
    *,
    lr: float = 0.5,
    steps: int = 1000,
    restarts: int = 10,
    lam: float = 0.0,
    success_rtol: float = 1e-6,
    seed: int | None = 0,
    device: Any = None,
    dtype: Any = None,
    progress: Progress | None = None,
    A: Any = None,
    noise: str | None = None,
    noise_level: float | None = None,
) -> InversionResult:
    """Subgradient descent with the negation step (Hand and Voroninski 2018).

    Each iteration: z~ = -z if f(-z) < f(z) else z, then z <- z~ - s grad f(z~).
    The step s starts at ``lr`` and backtracks (Armijo; the paper's constant
    step depends on the network's scale: 0.5 recovers every code of a random
    20-100-500 net and diverges on the authors' decoder). Other parameters as
    in `gradient_invert`.

    Returns
    -------
    InversionResult with method "negation".
    """
    _check_common(net, lr, steps, restarts, lam)
    _check_noise(noise, noise_level)
    yb, single, meas = _observations(net, x, A)
    start = time.perf_counter()
    run = latent_descent(
        net, yb, meas=meas, optimizer="sgd", lr=lr, steps=steps, restarts=restarts, lam=lam,
        negation=True, seed=seed, device=device, dtype=dtype, progress=progress,
    )
    z, _ = run.best()
    return _finish(
        net, yb, meas, z, method="negation",
        label=f"subgradient descent with negation, {steps} steps x {restarts} restarts",
        single=single, steps=np.full(len(yb), int(steps) * int(restarts)),
        success_rtol=success_rtol, noise=noise, noise_level=noise_level, start=start,
    )


def _lp_start(
    net: Network,
    yb: np.ndarray,
    meas: Measurement | None,
    noise: str | None,
    rtol: float | None,
) -> tuple[np.ndarray, InversionResult | None, np.ndarray, np.ndarray]:
    """Stage 1 of the hybrid: (z estimate, the exact inversion or None, output tau, LPs)."""
    from preimage.invert import invert
    from preimage.noisy import invert_noisy

    B = yb.shape[0]
    if meas is not None:
        from preimage.sensing import pgd_invert

        res = pgd_invert(net, yb, meas, noise=noise)
        return np.asarray(res.z), None, np.zeros(B), np.asarray(res.steps)
    scale = np.max(np.abs(yb), axis=1)
    if noise is None:
        exact = invert(net, yb, rtol=rtol)
        z = np.array(exact.z, copy=True)
        lps = np.ones(B, dtype=int) * len(net.layers)
        missing = ~np.all(np.isfinite(z), axis=1)
        if missing.any():
            est = invert_noisy(net, yb[missing], norm="linf")
            z[missing] = est.z
            lps[missing] += est.steps
        return z, exact, exact.rtol * scale, lps
    est = invert_noisy(net, yb, norm=noise)
    tau = np.nan_to_num(est.layers[-1].tau, nan=0.0)
    return np.asarray(est.z), None, tau, np.asarray(est.steps)


def hybrid_invert(
    net: Network,
    x: Any,
    *,
    noise: str | None = None,
    noise_level: float | None = None,
    lr: float = 1e-3,
    steps: int = 300,
    restarts: int = 1,
    lam: float = 0.0,
    max_lps: int = 60,
    success_rtol: float = 1e-6,
    rtol: float | None = None,
    seed: int | None = 0,
    device: Any = None,
    dtype: Any = None,
    progress: Progress | None = None,
    A: Any = None,
) -> InversionResult:
    """The LP estimate, gradient descent from it, and the reverse polish.

    1. LP estimate: the exact layer-wise inversion (`preimage.invert`) without a
       noise model, where it fails the l_inf noisy LP; the noisy LP in the noise
       norm with one; PGD with the LP projection with a measurement A.
       Samples the exact inversion settles ("unique", "non_unique", "feasible")
       keep its answer and verdict.
    2. Adam from the estimate (``restarts - 1`` further random starts), with a
       small learning rate: it only has to correct, not to search.
    3. Reverse polish: `pattern_walk` from both the estimate and the descent's
       answer (the LP inside the activation cell, then neighbouring cells), at
       most ``max_lps`` LPs each.

    The candidate with the lowest misfit is returned; the status follows the
    rule of the module docstring. Parameters as in `gradient_invert`.

    Returns
    -------
    InversionResult with method "hybrid"; ``steps`` counts gradient steps and LPs.
    """
    from preimage.patterns import pattern_walk, supports_patterns

    _check_common(net, lr, steps, restarts, lam)
    _check_noise(noise, noise_level)
    check_positive(max_lps, "max_lps")
    yb, single, meas = _observations(net, x, A)
    start = time.perf_counter()
    B, k = yb.shape[0], net.latent_dim
    z_lp, exact, tau, lps = _lp_start(net, yb, meas, noise, rtol)
    exact_status = None if exact is None else np.asarray(exact.status, dtype=object)
    settled = (
        np.isin(exact_status, ("unique", "non_unique", "feasible"))
        if exact_status is not None
        else np.zeros(B, dtype=bool)
    )
    rng = np.random.default_rng(seed)
    starts = rng.standard_normal((int(restarts), B, k))
    finite = np.all(np.isfinite(z_lp), axis=1)
    starts[0, finite] = z_lp[finite]
    run = latent_descent(
        net, yb, meas=meas, starts=starts, lr=lr, steps=steps, lam=lam, seed=seed,
        device=device, dtype=dtype, progress=progress,
    )
    z_gd, _ = run.best()

    def misfit_of(z: np.ndarray) -> np.ndarray:
        fx = net.forward(z)
        pred = fx if meas is None else meas.apply(fx)
        return vector_norm(pred - yb, noise)

    candidates = [z_lp if finite.all() else np.where(finite[:, None], z_lp, z_gd), z_gd]
    walkable = supports_patterns(net, output=meas is not None)
    walk_norm = "l1" if noise == "l1" else "linf"
    a_mat = None if meas is None else meas.matrix()
    walked_lps = np.zeros(B, dtype=int)
    if walkable:
        for source in list(candidates):
            walked = np.array(source, copy=True)
            for b in range(B):
                if settled[b] or not np.all(np.isfinite(source[b])):
                    continue
                scale = float(np.max(np.abs(yb[b])))
                fit = pattern_walk(
                    net, yb[b], source[b], A=a_mat, norm=walk_norm, tau=float(tau[b]),
                    target=1e-12 * scale if noise is None else 0.0, max_lps=max_lps,
                )
                walked_lps[b] += fit.n_lps
                if np.all(np.isfinite(fit.z)):
                    walked[b] = fit.z
            candidates.append(walked)
    stack = np.stack(candidates)  # (C, B, k)
    scores = np.stack([misfit_of(c) for c in candidates])
    scores = np.where(np.isfinite(scores), scores, np.inf)
    pick = np.argmin(scores, axis=0)
    z = stack[pick, np.arange(B)]
    z[settled] = z_lp[settled]
    result = _finish(
        net, yb, meas, z, method="hybrid",
        label=f"hybrid (LP estimate, Adam {steps} steps, pattern walk)",
        single=False, steps=int(steps) * int(restarts) + lps + walked_lps,
        success_rtol=success_rtol, noise=noise, noise_level=noise_level, start=start,
    )
    if exact is not None and exact_status is not None and settled.any():
        result.status[settled] = exact_status[settled]
        result.success[settled] = True
        result.witness[settled] = np.asarray(exact.witness)[settled]
        for b in np.flatnonzero(settled):
            result.message[b] = f"settled by the exact layer-wise inversion: {exact.message[b]}"
    names = ["LP estimate", "gradient descent", "walk from the LP estimate", "walk from descent"]
    for b in np.flatnonzero(~settled):
        result.message[b] += f" (best: {names[pick[b]]})"
    if single:
        return build_result(
            z=result.z, status=result.status, messages=result.message,
            residual=result.residual, method="hybrid", rtol=success_rtol,
            elapsed=time.perf_counter() - start, single=True, misfit=result.misfit,
            steps=result.steps, noise=noise, witness=result.witness,
        )
    result.time = time.perf_counter() - start
    return result


def paper_layerwise_lp(
    net: Network,
    x: np.ndarray,
    *,
    rtol: float = 1e-9,
    floor: float = 0.0,
    time_limit: float | None = None,
) -> tuple[np.ndarray | None, bool]:
    """Lei et al.'s layer-wise inversion as published, for one sample x (n,).

    Top down, one `linprog` per layer finds any point of
    {W_A h + b_A = y_A, W_I h + b_I <= 0, h >= 0 below the top layer}, with
    A = {i : y_i > rtol max(|y|_inf, floor)} (a LP's answer is exact only to
    HiGHS' tolerance, so the next layer needs a threshold); bijective
    activations are undone elementwise, every unit active.

    Returns (z or None, timed_out): None when a layer's LP had no answer;
    timed_out when `time_limit` seconds (for the whole sample) ran out.
    """
    from scipy.optimize import linprog

    start = time.perf_counter()
    h = np.asarray(x, dtype=float)
    for i in range(len(net.layers) - 1, -1, -1):
        layer = net.layers[i]
        w, b = layer.weight.matrix(), layer.bias_or_zero()
        nonneg = i > 0 and net.layers[i - 1].activation.output_nonnegative
        if layer.activation.is_bijective:
            target, active = layer.activation.inverse(h), np.ones(h.size, dtype=bool)
        else:
            target, active = h, h > rtol * max(float(np.max(np.abs(h))), floor)
        options: dict[str, float] = {}
        if time_limit is not None:
            left = time_limit - (time.perf_counter() - start)
            if left <= 0:
                return None, True
            options["time_limit"] = left
        res = linprog(
            np.zeros(w.shape[1]),
            A_ub=w[~active] if (~active).any() else None,
            b_ub=-b[~active] if (~active).any() else None,
            A_eq=w[active],
            b_eq=target[active] - b[active],
            bounds=(0, None) if nonneg else (None, None),
            method="highs",
            options=options,
        )
        if res.status != 0:
            return None, res.status == 1
        h = res.x
    return h, False
