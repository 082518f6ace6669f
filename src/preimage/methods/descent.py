"""Projection onto the range: min_z ||G(z) - x||, solved exactly cell by cell.

Real observations are never exactly G(z). On an activation cell (every unit's
on/off state fixed, the output's too) G is affine, G(z) = M z + c, and the
cell is a polyhedron, so min ||M z + c - x|| over it is a convex QP (l_2) or an
LP (l_1, l_inf): `preimage.solvers.cell.cell_lp`. The descent
(`preimage.methods.search.cell_walk`) moves to a neighbouring cell across a
tight wall while that lowers the misfit strictly, and ends at a point with a
certificate: the cell's optimality and no improving wall (../NOTES-math.md
section 8; ``result.local_minimum``, ``result.tight_walls``).

Starts, for each sample (`project`): the codes given (``starts``; an
encoder's output), a batched gradient descent from random codes (Adam,
``adam_steps`` x ``restarts``), and optionally the layer-wise noisy LP's
estimate; the best ``descents`` of them, by their own misfit, are descended
and the lowest end kept. Since every descent starts in its start's cell, whose
optimum is no worse than the start, the answer is never worse than any start
it descended from: a polish of Adam's answer (``starts=adam.z, restarts=0``)
never increases Adam's misfit.

With a measurement (``A``: y = A G(z) + e, a sensing matrix or a mask's rows)
the same: A G(z) is affine on a cell too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from preimage.methods.gradient import latent_descent, observations
from preimage.methods.noisy import error_bound, invert_noisy_one
from preimage.methods.search import cell_walk
from preimage.model.network import Network, flatten_samples
from preimage.model.validation import check_count, check_finite, check_positive, to_float_array
from preimage.results import (
    OUT_OF_TIME,
    Deadline,
    InversionResult,
    ProgressCallback,
    SampleFailure,
    build_result,
    check_noise,
    data_floor,
    estimate_rule,
    isolated,
    per_sample,
    success_tolerance,
    vector_norm,
)
from preimage.solvers.cell import piecewise_linear

#: Adam's step size for the kicks out of a corner (the CSGM runs' 0.01 jumps cells away).
KICK_LR = 1e-3


def _given_starts(net: Network, starts: Any, batch: int) -> np.ndarray:
    """Starts (S, B, k) from None, (B, k), (S, B, k) or (B, *input_shape), checked."""
    k = net.latent_dim
    if starts is None:
        return np.zeros((0, batch, k))
    arr = to_float_array(flatten_samples(starts, net.input_shape, "starts"), "starts")
    if arr.ndim == 1 and batch == 1:
        arr = arr[None]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (batch, k):
        raise ValueError(
            f"`starts` must have shape ({batch}, {k}) or (S, {batch}, {k}): one code per "
            f"sample (or S of them); got an array of shape {tuple(np.shape(starts))}."
        )
    check_finite(arr, "starts")
    return arr


def _encoder_starts(net: Network, encoder: Any, xb: np.ndarray) -> np.ndarray:
    """The encoder's codes for the observations, (1, B, k), checked."""
    if encoder is None:
        return np.zeros((0, xb.shape[0], net.latent_dim))
    if not callable(encoder):
        raise TypeError(
            f"`encoder` must be a callable from observations (B, n) to codes (B, k); got "
            f"{type(encoder).__name__}."
        )
    codes = to_float_array(encoder(xb.copy()), "the codes `encoder` returned")
    if codes.shape != (xb.shape[0], net.latent_dim):
        raise ValueError(
            f"`encoder` returned codes of shape {codes.shape}; the network needs "
            f"({xb.shape[0]}, {net.latent_dim}): one code of width {net.latent_dim} per sample."
        )
    check_finite(codes, "the codes `encoder` returned")
    return codes[None]


def project(
    net: Network,
    x: Any,
    *,
    norm: str = "l2",
    noise_level: float | None = None,
    A: Any = None,
    starts: Any = None,
    encoder: Callable[[np.ndarray], Any] | None = None,
    adam_steps: int = 500,
    restarts: int = 10,
    layerwise_start: bool = True,
    descents: int = 2,
    max_lps: int = 150,
    kicks: int = 2,
    kick_steps: int = 50,
    seconds: float = np.inf,
    success_rtol: float | None = None,
    seed: int | None = 0,
    device: Any = None,
    progress: ProgressCallback | None = None,
    time_limit: float | Deadline | None = None,
) -> InversionResult:
    """The z whose G(z) is nearest to x (or A G(z) to y), by the cell descent.

    Parameters
    ----------
    net : Network
        Piecewise-linear activations (ReLU, LeakyReLU, identity), the output's too.
    x : array-like of shape (n,) or (B, n) (with A: (m,) or (B, m))
    norm : "l2", "l1" or "linf"
        The misfit minimised (and the norm of ``noise_level``).
    noise_level : float, optional
        A known bound on the noise: the status is "feasible" when the misfit is
        consistent with it (`preimage.results.consistent_misfit`), and
        ``z_error_bound`` bounds ||z - z_true||_2 (`preimage.methods.noisy.error_bound`).
    A : array of shape (m, n) or a measurement, optional
    starts : array of shape (B, k) or (S, B, k), optional
        Codes to descend from (Adam's answers, the user's own).
    encoder : callable, optional
        Observations (B, n) -> codes (B, k), e.g. a VAE's encoder mean: one more start.
    adam_steps, restarts : the batched Adam starts (lr 0.01; ``restarts=0``: none).
    layerwise_start : bool
        Also start from the layer-wise noisy estimate (`preimage.methods.noisy`, its
        l_2 fits): near the range (noisy codes) it starts in or next to the right cell.
    descents : int
        How many of the best starts of each sample are descended.
    max_lps : int
        LP / QP budget of each descent.
    kicks, kick_steps : int
        Samples whose descent ends without a certificate (at a corner of several
        cells) take ``kick_steps`` Adam steps (lr `KICK_LR`) from there and descend
        again, up to ``kicks`` times; the lower end is kept.
    seconds : float
        Time budget per sample for its descents (a sample out of time keeps its
        best point, and its message says so).
    time_limit : seconds (or a `preimage.results.Deadline`) for the whole call:
        Adam stops there, and the descents; every sample keeps its best point.

    Returns
    -------
    InversionResult with method "descent"; ``misfit`` in ``norm``,
    ``local_minimum`` and ``tight_walls`` per sample, ``steps`` the LPs / QPs.
    """
    if not isinstance(net, Network):
        raise TypeError(f"`net` must be a preimage.Network; got {type(net).__name__}.")
    level = check_noise(norm, noise_level)
    if not piecewise_linear(net, output=True):
        raise ValueError(
            "The cell descent needs piecewise-linear activations (ReLU, LeakyReLU, identity) "
            f"in every layer, the output's too; this network has {net}."
        )
    deadline = Deadline.of(time_limit)
    for name, value in (("adam_steps", adam_steps), ("restarts", restarts),
                        ("descents", descents), ("max_lps", max_lps), ("kicks", kicks),
                        ("kick_steps", kick_steps)):
        check_count(value, name, 1 if name == "descents" else 0)
    seconds = np.inf if seconds == np.inf else check_positive(seconds, "seconds", allow_zero=True)
    yb, single, meas = observations(net, x, A)
    success_rtol = success_tolerance(net, x, success_rtol)
    batch, k = yb.shape[0], net.latent_dim
    start = time.perf_counter()
    candidates = [_given_starts(net, starts, batch), _encoder_starts(net, encoder, yb)]
    if restarts and adam_steps:
        run = latent_descent(net, yb, meas=meas, steps=int(adam_steps), restarts=int(restarts),
                             seed=seed, device=device, deadline=deadline)
        candidates.append(run.z)
    if layerwise_start and meas is None:
        # (its l_2 fits: active-set least squares, a few ms a layer; l_inf / l_1 LPs cost
        # tens to hundreds of ms on an MNIST decoder's pixels)
        fit = isolated(lambda y: invert_noisy_one(net, y, norm="l2").z)
        layerwise = np.stack([np.full(k, np.nan) if isinstance(f, SampleFailure) else f
                              for f in map(fit, yb)])
        candidates.append(np.where(np.isfinite(layerwise), layerwise, 0.0)[None])
    pool = np.concatenate(candidates)  # (S, B, k)
    if pool.shape[0] == 0:
        raise ValueError("No start: give `starts`, an `encoder`, or restarts >= 1.")
    a_mat = None if meas is None else meas.matrix()
    # l_2: the output's pattern is part of the cell and the QP's value is the misfit itself.
    # l_inf / l_1 with a fixed output pattern would be ruled by the brightest pixel of a unit
    # that is off (a constant of the cell): there, as in the layer-wise noisy fits, the
    # units above the noise floor tau are fitted two-sidedly and the rest one-sidedly, an
    # upper bound of the misfit that the walk lowers (the answer is scored by the true one),
    # then a walk on the misfit itself (the output's pattern fixed) from its end certifies.
    exact_misfit = norm == "l2" or meas is not None
    tau = 2.0 * np.maximum(-np.min(yb, axis=1), 0.0)

    scores = np.stack([_misfits(net, meas, c, yb, norm) for c in pool])  # (S, B)
    order = np.argsort(scores, axis=0)
    z = pool[order[0], np.arange(batch)].copy()
    best = scores[order[0], np.arange(batch)].copy()
    local = np.zeros(batch, dtype=bool)
    tight = np.full(batch, -1)
    lps = np.zeros(batch, dtype=int)
    messages = ["the best start"] * batch
    out_of_time = np.zeros(batch, dtype=bool)

    def descend(b: int, z0: np.ndarray, until: float) -> None:
        """Walk sample b from z0 until `until`; keep the end if its misfit is no higher."""
        fit = cell_walk(net, yb[b], z0, A=a_mat, norm=norm, max_lps=int(max_lps),
                        deadline=until, output_cell=exact_misfit, tau=float(tau[b]))
        lps[b] += fit.n_lps
        if not np.all(np.isfinite(fit.z)):
            return
        if not exact_misfit:
            # then on the misfit itself from there (the output's pattern part of the cell):
            # it can only lower the misfit, and its certificate is of the misfit, not of the
            # surrogate (a "local minimum" of the surrogate fell linearly along a line)
            exact = cell_walk(net, yb[b], fit.z, norm=norm, max_lps=int(max_lps),
                              deadline=until, output_cell=True)
            lps[b] += exact.n_lps
            if np.all(np.isfinite(exact.z)):
                fit = exact
        misfit = float(_misfits(net, meas, fit.z[None], yb[b : b + 1], norm)[0])
        if misfit <= best[b]:
            z[b], best[b] = fit.z, misfit
            local[b], tight[b] = fit.local_minimum, fit.n_tight
            messages[b] = fit.message

    def one(b: int) -> None:
        """Sample b's descents from its best starts (z[b], best[b], ... filled in)."""
        until = deadline.within(seconds)
        for s in order[:descents, b]:
            if time.perf_counter() >= until:
                out_of_time[b] = True
                break
            descend(b, pool[s, b], until)

    failures = per_sample(one, batch, progress=progress)
    kicked = 0
    for _ in range(int(kicks)):
        # A walk can stop at a corner of several cells where no single flip and no flip
        # of all its pushing walls lowers the misfit (no certificate). A few small Adam
        # steps from there cross into one of the cells around it; walk again from there.
        stuck = np.flatnonzero(~local & ~out_of_time & np.isfinite(best))
        if stuck.size == 0 or kick_steps == 0 or deadline.expired():
            break
        run = latent_descent(net, yb[stuck], meas=meas, starts=z[stuck][None],
                             steps=int(kick_steps), restarts=1, lr=KICK_LR, seed=seed,
                             device=device, deadline=deadline)
        kicked += int(kick_steps)
        per_sample(lambda i, run=run, stuck=stuck: descend(int(stuck[i]), run.z[0, i],
                                                           deadline.within(seconds)),
                   stuck.size)
    for b, failure in enumerate(failures):
        if isinstance(failure, SampleFailure):  # (its descent raised: it keeps its best point)
            messages[b] = f"{failure.message}; z is the best point found before it"
        elif out_of_time[b]:
            messages[b] += (f" ({deadline.note()})" if deadline.expired() else
                            f" ({OUT_OF_TIME}: its {seconds:g} s per sample ran out)")
    bounds = None
    if level is not None and meas is None:
        floor = data_floor(net, x, yb)
        bounds = np.array([error_bound(net, yb[b], z[b], norm, level, float(floor[b]))
                           for b in range(batch)])
    result = build_result(
        net, yb, z, estimate_rule(yb, norm, level, success_rtol), messages, method="descent",
        rtol=success_rtol, elapsed=time.perf_counter() - start, single=single,
        measure=None if meas is None else meas.apply, noise=norm, z_error_bound=bounds,
        steps=lps + (int(adam_steps) * int(restarts) if restarts else 0) + kicked,
    )
    result.local_minimum = bool(local[0]) if single else local
    result.tight_walls = int(tight[0]) if single else tight
    return result


def _misfits(net: Network, meas: Any, z: np.ndarray, yb: np.ndarray, norm: str) -> np.ndarray:
    """||M G(z_b) - y_b|| per row b (inf where z is not finite)."""
    out = np.full(len(z), np.inf)
    ok = np.all(np.isfinite(z), axis=1)
    if ok.any():
        pred = net.forward(z[ok])
        if meas is not None:
            pred = meas.apply(pred)
        out[ok] = vector_norm(pred - yb[ok], norm)
    return out
