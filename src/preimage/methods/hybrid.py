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
from preimage.methods.layerwise import invert_exact, layerwise_obstacle
from preimage.methods.noisy import invert_noisy
from preimage.methods.search import GlobalSettings, cell_walk
from preimage.methods.sensing import pgd_invert
from preimage.model.network import Network
from preimage.model.operators import Measurement
from preimage.model.validation import check_count, check_positive
from preimage.results import (
    OUT_OF_TIME,
    SUCCESS,
    Deadline,
    InversionResult,
    ProgressCallback,
    SampleFailure,
    build_result,
    check_noise,
    estimate_status,
    given_rtol,
    per_sample,
    success_tolerance,
    vector_norm,
)
from preimage.solvers.cell import piecewise_linear


def _lp_start(
    net: Network,
    yb: np.ndarray,
    meas: Measurement | None,
    noise: str | None,
    rtol: float,
    fallback: GlobalSettings | None,
    deadline: Deadline,
) -> tuple[np.ndarray, InversionResult | None, np.ndarray, np.ndarray]:
    """Stage 1: (z estimate, the exact inversion or None, output tau, LPs)."""
    B = yb.shape[0]
    if meas is not None:
        res = pgd_invert(net, yb, meas, noise=noise, time_limit=deadline)
        return res.z, None, np.zeros(B), res.steps
    scale = np.max(np.abs(yb), axis=1)
    if noise is None:
        exact = invert_exact(net, yb, single=False, rtol=rtol, fallback=fallback,
                             time_limit=deadline)
        z = np.array(exact.z, copy=True)
        lps = np.array(exact.steps, dtype=int)
        missing = ~np.all(np.isfinite(z), axis=1)
        if missing.any():
            est = invert_noisy(net, yb[missing], norm="linf", time_limit=deadline)
            z[missing] = est.z
            lps[missing] += est.steps
        return z, exact, rtol * scale, lps
    est = invert_noisy(net, yb, norm=noise, time_limit=deadline)
    tau = np.nan_to_num(est.layers[-1].tau, nan=0.0)
    return est.z, None, tau, est.steps


def hybrid_invert(
    net: Network,
    x: Any,
    *,
    noise: str | None = None,
    noise_level: float | None = None,
    lr: float | None = None,
    steps: int | None = None,
    restarts: int | None = None,
    lam: float = 0.0,
    max_lps: int = 60,
    seconds: float = np.inf,
    success_rtol: float | None = None,
    rtol: float | None = None,
    fallback: GlobalSettings | None = None,
    reason: str | None = None,
    seed: int | None = 0,
    device: Any = None,
    dtype: Any = None,
    progress: ProgressCallback | None = None,
    A: Any = None,
    time_limit: float | Deadline | None = None,
) -> InversionResult:
    """The LP estimate, gradient descent from it, and the reverse polish (module docstring).

    Parameters as in `preimage.methods.gradient.gradient_invert`, and
    ``max_lps`` (LP budget of each walk), ``rtol`` (of the exact inversion;
    default by the precision of x and of the network) and ``fallback`` (its
    search settings). ``reason``: why the layer-wise method cannot run on this
    network (default: `preimage.methods.layerwise.layerwise_obstacle`, None where
    it can); the LP estimate is then skipped and gradient descent searches from
    random starts (default lr 0.01, 1000 steps, 3 restarts instead of 1e-3, 300,
    1), each restart's answer walked until one is exact. ``seconds``: time budget of
    each sample's walks; ``time_limit`` (seconds or a `preimage.results.Deadline`): the whole
    call's, every stage stopping there with its best point so far.

    Returns
    -------
    InversionResult with method "hybrid"; ``steps`` counts gradient steps and LPs.
    """
    if reason is None:
        # Called as method="hybrid" on a network the layer-wise LPs cannot take (an image
        # generator): its LP start would be one LP over every unit of the wide layer, which
        # ran for more than 19 minutes on the shipped convolutional decoder and does not
        # see the deadline inside HiGHS; search from random starts, as `invert` routes it.
        reason = layerwise_obstacle(net) if isinstance(net, Network) else None  # (checked below)
    searching = reason is not None
    lr = (0.01 if searching else 1e-3) if lr is None else lr
    steps = (1000 if searching else 300) if steps is None else int(steps)
    restarts = (3 if searching else 1) if restarts is None else int(restarts)
    check_descent(net, lr, steps, restarts, lam)
    level = check_noise(noise, noise_level)
    max_lps = check_count(max_lps, "max_lps", 1)
    seconds = np.inf if seconds == np.inf else check_positive(seconds, "seconds", allow_zero=True)
    deadline = Deadline.of(time_limit)
    own_rtol = given_rtol(net, x, rtol)
    success_rtol = success_tolerance(net, x, success_rtol, own_rtol)
    yb, single, meas = observations(net, x, A)
    start = time.perf_counter()
    B, k = yb.shape[0], net.latent_dim
    scale = np.maximum(np.max(np.abs(yb), axis=1), 1e-300)
    if searching:
        z_lp, exact, tau, lps = np.full((B, k), np.nan), None, own_rtol * scale, np.zeros(B, int)
    else:
        z_lp, exact, tau, lps = _lp_start(net, yb, meas, noise, own_rtol, fallback, deadline)
    exact_status = None if exact is None else exact.status
    settled = (
        np.isin(exact_status, SUCCESS) if exact_status is not None else np.zeros(B, dtype=bool)
    )
    rng = np.random.default_rng(seed)
    # the same starts for every sample: a sample's answer must not depend on its batch
    starts = np.repeat(rng.standard_normal((restarts, 1, k)), B, axis=1)
    finite = np.all(np.isfinite(z_lp), axis=1)
    starts[0, finite] = z_lp[finite]
    run = latent_descent(
        net, yb, meas=meas, starts=starts, lr=lr, steps=steps, lam=lam, seed=seed,
        device=device, dtype=dtype, progress=progress, deadline=deadline,
    )

    def misfit_of(z: np.ndarray, b: int) -> float:
        if not np.all(np.isfinite(z)):
            return np.inf
        fx = net.forward(z[None])
        pred = fx if meas is None else meas.apply(fx)
        return float(vector_norm(pred - yb[b : b + 1], noise)[0])

    walkable = piecewise_linear(net, output=meas is not None)
    walkable_output = piecewise_linear(net, output=True)
    # With noise the walk is the projection's cell descent in the noise norm; without,
    # the search for an exact preimage (y's own active set decides).
    walk_norm = noise if noise is not None else "linf"
    a_mat = None if meas is None else meas.matrix()
    z = np.array(z_lp, copy=True)
    walked_lps = np.zeros(B, dtype=int)
    label = "hybrid (" + ("" if searching else "LP estimate, ") + f"Adam {steps} steps x " \
        f"{restarts}, cell walk)"
    if run.steps < steps:
        label += f"; {deadline.note()} after {run.steps} Adam steps"

    def one(b: int) -> str:
        """Sample b's walks (z[b], walked_lps[b] filled in); its message."""
        if settled[b]:
            return f"settled by the exact layer-wise inversion: {exact.message[b]}"
        until = deadline.within(seconds)
        named = ([("the LP estimate", z_lp[b])] if finite[b] else []) + [
            (f"Adam's restart {r + 1}", run.z[r, b]) for r in np.argsort(run.loss[:, b])
        ]
        best, best_misfit, best_name = named[0][1], misfit_of(named[0][1], b), named[0][0]
        target = 1e-12 * scale[b] if noise is None else 0.0
        cut = ""
        for name, candidate in named:
            misfit = misfit_of(candidate, b)
            if misfit < best_misfit:
                best, best_misfit, best_name = candidate, misfit, name
            if not walkable or not np.all(np.isfinite(candidate)):
                continue
            if time.perf_counter() >= until:
                cut = (f"; {deadline.note()}" if deadline.expired() else
                       f"; {OUT_OF_TIME}: its {seconds:g} s per sample ran out")
                continue  # (the other candidates are still scored)
            fit = cell_walk(net, yb[b], candidate, A=a_mat, norm=walk_norm, tau=float(tau[b]),
                            target=target, max_lps=max_lps, deadline=until,
                            output_cell=noise is not None and walkable_output)
            walked_lps[b] += fit.n_lps
            walked = misfit_of(fit.z, b)
            if walked < best_misfit:
                best, best_misfit, best_name = fit.z, walked, f"the walk from {name}"
            if fit.misfit <= target:
                break  # exact in its cell: no other start can do better
        z[b] = best
        return f"{label}, best: {best_name}{cut}" + (f"; {reason}" if searching else "")

    messages = [f"{m.message}; z is the best point found before it"
                if isinstance(m, SampleFailure) else m for m in per_sample(one, B)]
    witness = np.full_like(z, np.nan)
    if exact is not None:
        witness[settled] = exact.witness[settled]

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
        steps=steps * restarts + lps + walked_lps,
    )
