"""The hybrid: the LP estimate, gradient descent from it, and the reverse polish.

1. LP estimate: the exact layer-wise inversion (`preimage.methods.layerwise`)
   without a noise model, where it fails the l_inf noisy LP; the noisy LP in
   the noise norm with one; PGD with the LP projection with a measurement A.
   Samples the exact inversion settles ("unique", "non_unique", "feasible")
   keep its answer and verdict.
2. Adam from the estimate (``restarts - 1`` further random starts), with a
   small learning rate: it only has to correct, not to search.
3. Reverse polish: `preimage.methods.search.cell_walk` from both the estimate
   and the descent's answer (the LP inside the activation cell, then
   neighbouring cells), at most ``max_lps`` LPs each: the activation pattern
   of a near miss turns into an exact answer when it is right.

The candidate with the lowest misfit is returned; its status follows the
rule of the gradient methods (`preimage.methods.gradient`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from preimage.methods.gradient import check_descent, latent_descent, observations
from preimage.methods.layerwise import invert_exact
from preimage.methods.noisy import invert_noisy
from preimage.methods.search import GlobalSettings, cell_walk
from preimage.methods.sensing import pgd_invert
from preimage.model.network import Network
from preimage.model.operators import Measurement
from preimage.model.validation import check_positive, input_precision
from preimage.results import (
    DEFAULT_RTOL,
    SUCCESS,
    InversionResult,
    ProgressCallback,
    build_result,
    check_noise,
    estimate_status,
    vector_norm,
)
from preimage.solvers.cell import piecewise_linear

#: The candidates of the hybrid, in the order they are scored.
CANDIDATES = ("LP estimate", "gradient descent", "walk from the LP estimate", "walk from descent")


def _lp_start(
    net: Network,
    yb: np.ndarray,
    meas: Measurement | None,
    noise: str | None,
    rtol: float,
    fallback: GlobalSettings | None,
) -> tuple[np.ndarray, InversionResult | None, np.ndarray, np.ndarray]:
    """Stage 1: (z estimate, the exact inversion or None, output tau, LPs)."""
    B = yb.shape[0]
    if meas is not None:
        res = pgd_invert(net, yb, meas, noise=noise)
        return res.z, None, np.zeros(B), res.steps
    scale = np.max(np.abs(yb), axis=1)
    if noise is None:
        exact = invert_exact(net, yb, single=False, rtol=rtol, fallback=fallback)
        z = np.array(exact.z, copy=True)
        lps = np.array(exact.steps, dtype=int)
        missing = ~np.all(np.isfinite(z), axis=1)
        if missing.any():
            est = invert_noisy(net, yb[missing], norm="linf")
            z[missing] = est.z
            lps[missing] += est.steps
        return z, exact, rtol * scale, lps
    est = invert_noisy(net, yb, norm=noise)
    tau = np.nan_to_num(est.layers[-1].tau, nan=0.0)
    return est.z, None, tau, est.steps


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
    fallback: GlobalSettings | None = None,
    seed: int | None = 0,
    device: Any = None,
    dtype: Any = None,
    progress: ProgressCallback | None = None,
    A: Any = None,
) -> InversionResult:
    """The LP estimate, gradient descent from it, and the reverse polish (module docstring).

    Parameters as in `preimage.methods.gradient.gradient_invert`, and
    ``max_lps`` (LP budget of each walk), ``rtol`` (of the exact inversion;
    default by the precision of x) and ``fallback`` (its search settings).

    Returns
    -------
    InversionResult with method "hybrid"; ``steps`` counts gradient steps and LPs.
    """
    check_descent(net, lr, steps, restarts, lam)
    level = check_noise(noise, noise_level)
    check_positive(max_lps, "max_lps")
    own_rtol = DEFAULT_RTOL[input_precision(x)] if rtol is None else check_positive(rtol, "rtol")
    yb, single, meas = observations(net, x, A)
    start = time.perf_counter()
    B, k = yb.shape[0], net.latent_dim
    z_lp, exact, tau, lps = _lp_start(net, yb, meas, noise, own_rtol, fallback)
    exact_status = None if exact is None else exact.status
    settled = (
        np.isin(exact_status, SUCCESS) if exact_status is not None else np.zeros(B, dtype=bool)
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
    walk_norm = "l1" if noise == "l1" else "linf"
    a_mat = None if meas is None else meas.matrix()
    walked_lps = np.zeros(B, dtype=int)
    if piecewise_linear(net, output=meas is not None):
        for source in list(candidates):
            walked = np.array(source, copy=True)
            for b in range(B):
                if settled[b] or not np.all(np.isfinite(source[b])):
                    continue
                scale = float(np.max(np.abs(yb[b])))
                fit = cell_walk(
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
    label = f"hybrid (LP estimate, Adam {steps} steps, cell walk)"
    messages = [f"{label}, best: {CANDIDATES[p]}" for p in pick]
    witness = np.full_like(z, np.nan)
    if exact is not None:
        witness[settled] = exact.witness[settled]
        for b in np.flatnonzero(settled):
            messages[b] = f"settled by the exact layer-wise inversion: {exact.message[b]}"

    def rule(residual: np.ndarray, misfit: np.ndarray) -> np.ndarray:
        status = estimate_status(
            residual, misfit, yb, noise=noise, noise_level=level, success_rtol=success_rtol
        )
        if exact_status is not None:
            status[settled] = exact_status[settled]
        return status

    return build_result(
        net, yb, z, rule, messages, method="hybrid", rtol=success_rtol,
        elapsed=time.perf_counter() - start, single=single,
        measure=None if meas is None else meas.apply, noise=noise, witness=witness,
        steps=int(steps) * int(restarts) + lps + walked_lps,
    )
