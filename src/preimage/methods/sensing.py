"""Compressed sensing with a generative prior: y = A G(z) + e, A of shape (m, n).

`pgd_invert`: projected gradient descent with the layer-wise inversion as the
projection onto the range of G (../NOTES-math.md section 7; Shah and Hegde
2018),

    v_t     = x_t + eta A^T (y - A x_t)          (a gradient step on ||y - A x||^2 / 2)
    z_{t+1} = invert_noisy(v_t),  x_{t+1} = G(z_{t+1})   (x_{t+1} = P_G(v_t))

with eta about 1 when A has N(0, 1/m) entries. The projection is the noisy
layer-wise inversion of `preimage.methods.noisy` (v_t is never exactly in the range);
it need only be approximate. The iterate with the smallest measurement misfit
is kept, and PGD stops when the misfit stops decreasing. Then the reverse
polish: the activation pattern of G(z) fixes a linear program in z with the
measurement rows (`preimage.methods.search.cell_walk`), which recovers z exactly
(noise-free) once the pattern is right.

The baseline of Bora et al. (2017), Adam on ||A G(z) - y||^2 over z with
random restarts, is `preimage.methods.gradient.gradient_invert` with ``A``.

Statuses as for the other estimating methods: "feasible" when the relative
measurement misfit |A G(z) - y|_inf / |y|_inf is at most ``success_rtol``
(noise-free) or the misfit is consistent with ``noise_level``; else "failed".
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from preimage.methods.noisy import invert_noisy_one
from preimage.methods.search import cell_walk
from preimage.model.network import Network
from preimage.model.operators import Measurement, as_measurement
from preimage.model.validation import (
    MEASURED,
    check_choice,
    check_count,
    check_observation,
    check_positive,
)
from preimage.results import (
    NORMS,
    OUT_OF_TIME,
    Deadline,
    InversionResult,
    ProgressCallback,
    SampleFailure,
    build_result,
    estimate_rule,
    given_rtol,
    per_sample,
    success_tolerance,
)
from preimage.solvers.cell import activation_pattern, cell_lp, piecewise_linear


def pgd_invert(
    net: Network,
    y: Any,
    A: Any,
    *,
    noise: str | None = None,
    noise_level: float | None = None,
    projection: str = "l2",
    step: float = 0.5,
    iterations: int = 60,
    max_lps: int = 100,
    success_rtol: float | None = None,
    rtol: float | None = None,
    seconds: float = np.inf,
    progress: ProgressCallback | None = None,
    time_limit: float | Deadline | None = None,
) -> InversionResult:
    """Projected gradient descent with the layer-wise inversion as projection.

    Parameters
    ----------
    net : Network
    y : array-like of shape (m,) or (B, m)
        Measurements y = A G(z) + e.
    A : array of shape (m, n) or a measurement (`preimage.model.operators`)
    noise, noise_level : the noise model (status and the polish's norm).
    projection : "linf", "l1" or "l2"
        The norm of the noisy layer fits in the projection. "l2" (the QP,
        solved by active-set least squares) is the fastest; the LPs are the
        paper's.
    step : float
        eta, the gradient step. 0.5: on a random 20-100-500 net with m = 100
        Gaussian measurements it recovered 8 of 10 codes against 5 of 10 with
        eta = 1 (m = 200: all with both).
    iterations : int
        Most PGD iterations.
    max_lps : int
        Budget of the final pattern walk (0: no polish).
    success_rtol : relative misfit under which a noise-free answer counts (default
        `preimage.results.success_tolerance`: 1e-6, or ``rtol`` where that is coarser).
    rtol : float, optional
        Relative floor of the projections' tau ladder; default by the precision of y
        and of the network (`preimage.results.default_rtol`).
    seconds : float
        Time budget per sample (iterations and polish); a sample out of time
        keeps its best point and says so.
    progress : callable(done, total), optional
        Called after each sample.
    time_limit : seconds (or a `preimage.results.Deadline`) for the whole call:
        samples not started by then end "failed"; one running keeps its best point.

    Returns
    -------
    InversionResult with method "pgd", ``steps`` = PGD
    iterations + polish LPs, ``misfit`` = ||A G(z) - y|| in the noise norm.
    """
    if not isinstance(net, Network):
        raise TypeError(f"`net` must be a preimage.Network; got {type(net).__name__}.")
    meas = as_measurement(A, net.output_dim)
    check_choice(projection, "projection", NORMS)
    step = check_positive(step, "step")
    iterations = check_count(iterations, "iterations", 1)
    max_lps = check_count(max_lps, "max_lps", 0)
    seconds = np.inf if seconds == np.inf else check_positive(seconds, "seconds", allow_zero=True)
    rtol = given_rtol(net, y, rtol)
    success_rtol = success_tolerance(net, y, success_rtol, rtol)
    deadline = Deadline.of(time_limit)
    yb, single = check_observation(y, meas.shape[0], name="y", what=MEASURED)
    start = time.perf_counter()
    nan = np.full(net.latent_dim, np.nan)
    outs = [
        (nan, 0, o.message) if isinstance(o, SampleFailure) else o
        for o in per_sample(
            lambda b: _pgd_one(
                net, yb[b], meas, noise=noise, projection=projection, step=step,
                iterations=iterations, max_lps=max_lps, rtol=rtol, seconds=seconds,
                deadline=deadline,
            ),
            yb.shape[0], deadline=deadline, progress=progress,
        )
    ]
    z = np.stack([o[0] for o in outs])
    return build_result(
        net, yb, z, estimate_rule(yb, noise, noise_level, success_rtol), [o[2] for o in outs],
        method="pgd", rtol=success_rtol, elapsed=time.perf_counter() - start, single=single,
        measure=meas.apply, noise=noise, steps=np.array([o[1] for o in outs]),
    )


def _pgd_one(
    net: Network,
    y: np.ndarray,
    meas: Measurement,
    *,
    noise: str | None,
    projection: str,
    step: float,
    iterations: int,
    max_lps: int,
    rtol: float,
    seconds: float,
    deadline: Deadline,
) -> tuple[np.ndarray, int, str]:
    """PGD for one sample: (z, iterations + LPs, message)."""
    until = deadline.within(seconds)
    out_of_time = ""
    k = net.latent_dim
    scale = max(float(np.max(np.abs(y))), 1e-300)
    x = np.zeros(meas.shape[1])
    best_z, best = np.full(k, np.nan), np.inf
    stall = 0
    t = 0
    lps = 0
    exact = False
    last_try = np.inf
    walkable = max_lps > 0 and piecewise_linear(net, output=True)
    for t in range(1, iterations + 1):  # noqa: B007
        if time.perf_counter() >= until:
            out_of_time = (f"; {deadline.note()}" if deadline.expired() else
                           f"; {OUT_OF_TIME}: its {seconds:g} s per sample ran out")
            break
        v = x + step * meas.adjoint(y - meas.apply(x))
        z = invert_noisy_one(net, v, norm=projection, rtol=rtol, keep_rank=True).z
        if not np.all(np.isfinite(z)):
            break
        x = net.forward(z[None])[0]
        r = float(np.max(np.abs(meas.apply(x) - y)))
        if r < best * (1 - 1e-3):
            best_z, best, stall = z, r, 0
        else:
            stall += 1
        if r <= 1e-12 * scale or stall >= 5:
            break
        if walkable and noise is None and r <= 0.1 * last_try and r <= 1e-2 * scale:
            # Close enough that the activation pattern may be right: one cell LP.
            last_try = r
            fit = cell_lp(net, y, activation_pattern(net, z), A=meas.matrix(), z_ref=z)
            lps += fit.n_lps
            if fit.misfit <= 1e-12 * scale:
                best_z, best, exact = fit.z, fit.misfit, True
                break
    message = f"PGD: {t} iterations, relative misfit {best / scale:.3g}"
    if exact:
        message += " (made exact by the LP of its activation cell)"
    message += out_of_time
    if (
        walkable
        and not out_of_time
        and not exact
        and np.all(np.isfinite(best_z))
        and best > 1e-12 * scale
    ):
        fit = cell_walk(
            net, y, best_z, A=meas.matrix(), norm="l1" if noise == "l1" else "linf",
            target=1e-12 * scale if noise is None else 0.0, max_lps=max_lps, deadline=until,
        )
        lps += fit.n_lps
        if np.all(np.isfinite(fit.z)):
            r = float(np.max(np.abs(meas.apply(net.forward(fit.z[None])[0]) - y)))
            if r < best:
                best_z, best = fit.z, r
                message += f"; cell walk ({fit.steps} moves, {lps} LPs) to {r / scale:.3g}"
    return best_z, t + lps, message
