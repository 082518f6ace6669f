"""Batched exact inversion: all samples of a batch through one layer at once.

`invert_layer` (the reference) inverts one sample of one layer through an SVD
(or QR) of W_A and, when W_A is rank-deficient, an LP in its null space. For
a batch, most samples of an expanding layer have a full-column-rank W_A: then
the active equalities alone fix h and no LP is needed. This package solves
those samples together (`preimage.methods.batched.gram` for layers narrower
than SQUARE_MIN_WIDTH, `preimage.methods.batched.square` for wider ones) and
sends the others to `invert_layer`.

Every solved sample then passes, in batch, the checks of `invert_layer` with
its tolerances (rtol times the data's scale): the active equalities within
10 tol, the inactive units below tau + tol, h >= -tol when the input is a
ReLU output, and the forward pass |act(W h + b) - y|_inf <= 10 rtol size
(`preimage.methods.batched.checks.check`: computed from h = max(h0, 0) with a
bound on what the clipping changed, so never more lenient than the
reference). A sample that is rank-deficient (|A| < n), infeasible, or fails
any step or check is handed to `invert_layer`, run over samples in the
thread pool (HiGHS and LAPACK release the GIL).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from preimage.methods.batched import context
from preimage.methods.batched.checks import check
from preimage.methods.batched.context import Context, LayerCache, chunk_size
from preimage.methods.batched.gram import downdate_then_gram, gram_solve, needs_resolution
from preimage.methods.batched.square import solve_square
from preimage.model.layer import Layer
from preimage.model.network import Network
from preimage.results import (
    REPORT_FIELDS,
    Deadline,
    LayerReport,
    LayerResult,
    ProgressCallback,
    SampleFailure,
    isolated,
)
from preimage.solvers.layer import invert_layer

#: The message of a layer solved by the batched path (the same as `invert_layer`'s).
FAST_MESSAGE = (
    "solved the active equalities (full column rank); the active rows have full column rank"
)


@dataclass
class LayerArrays:
    """Per-layer diagnostics of a batch (a `LayerReport`), filled as samples are solved."""

    report: LayerReport
    #: LayerResult of the samples that went through `invert_layer` (by sample index).
    results: dict[int, LayerResult] = field(default_factory=dict)

    @classmethod
    def empty(cls, index: int, batch: int) -> LayerArrays:
        return cls(LayerReport.from_results(index, [None] * batch))

    def record(self, j: int, res: LayerResult) -> None:
        for name in REPORT_FIELDS:
            getattr(self.report, name)[j] = getattr(res, name)
        self.results[j] = res


@dataclass
class FastLayer:
    """What the batched step found for b samples of one layer.

    ok : (b,) bool, the samples solved here ("unique": full column rank, checked);
    h : (b, n) their preimages (rows where ok), n_active : (b,), residual : (b,).
    """

    ok: np.ndarray
    h: np.ndarray
    n_active: np.ndarray
    residual: np.ndarray


def fast_layer(
    layer: Layer, y: np.ndarray, *, nonneg: bool, rtol: float, ctx: Context
) -> FastLayer:
    """Solve the full-column-rank samples of y (b, m) for one layer, in batch."""
    cache = ctx.layer(layer)
    m, n = layer.weight.shape
    b = y.shape[0]
    act = layer.activation
    with np.errstate(all="ignore"):
        target = act.inverse(y) if act.is_bijective else y
    is_finite = np.isfinite(target)
    finite = np.all(is_finite, axis=1)
    if not finite.all():
        target = np.where(is_finite, target, 0.0)
    largest = np.maximum(np.max(target, axis=1), -np.min(target, axis=1))  # max |t_i|
    scale = np.maximum(np.maximum(largest, cache.bias_max), 1e-300)
    if act.is_bijective:
        # (`preimage.solvers.layer.active_set`: a curved activation's rounding, in targets;
        # where it sets the scale the resolution check of `invert_layer` decides)
        with np.errstate(all="ignore"):
            stretched = act.target_scale(y)
        finite &= ~(stretched > scale)
    tau = rtol * scale
    if act.is_bijective:
        active = np.ones((b, m), dtype=bool)
        negative = np.zeros(b, dtype=bool)
    else:
        negative = np.any(y < -tau[:, None], axis=1)
        active = y > tau[:, None]
    n_active = active.sum(axis=1)
    out = FastLayer(np.zeros(b, dtype=bool), np.zeros((b, n)), n_active, np.full(b, np.nan))
    todo = np.flatnonzero(finite & ~negative & (n_active >= n))
    if todo.size == 0:
        return out
    def rows(a: np.ndarray) -> np.ndarray:  # a[todo], without a copy when todo is all
        return a if todo.size == b else a[todo]

    h0, solved = _solve_full_rank(cache, rows(target), rows(active), ctx)
    if not solved.all():
        todo, h0 = todo[solved], h0[solved]
    if todo.size == 0:
        return out
    ok, h, residual = check(layer, cache, h0, rows(y), rows(target), rows(active),
                             rows(scale), rtol, nonneg, ctx)
    out.ok[todo[ok]] = True
    out.h[todo[ok]] = h[ok]
    out.residual[todo[ok]] = residual[ok]
    return out


def _solve_full_rank(
    cache: LayerCache, target: np.ndarray, active: np.ndarray, ctx: Context
) -> tuple[np.ndarray, np.ndarray]:
    """h0 with W_A h0 = target_A - b_A for samples whose W_A has certified full column rank.

    Returns h0 (b, n) and a (b,) mask of the samples certified and solved.
    """
    n = cache.w_np.shape[1]
    if needs_resolution(ctx, n):  # low-precision data: certified at its resolution
        return gram_solve(cache, target, active, ctx)
    if n < context.SQUARE_MIN_WIDTH:
        return downdate_then_gram(cache, target, active, ctx)
    h0, solved = solve_square(cache, target, active, ctx)
    rest = np.flatnonzero(~solved)
    if rest.size:
        h, ok = gram_solve(cache, target[rest], active[rest], ctx)
        h0[rest[ok]] = h[ok]
        solved[rest[ok]] = True
    return h0, solved


def descend_batch(
    net: Network,
    xb: np.ndarray,
    rtol: float,
    ctx: Context,
    *,
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
    deadline: Deadline | None = None,
) -> tuple[np.ndarray, np.ndarray, list[LayerArrays]]:
    """Invert every layer, top down, for a batch xb (B, n_d).

    Returns z (B, k) (NaN rows where a layer had no preimage), reached (B,)
    (whether the sample got through every layer) and one LayerArrays per layer
    (index 0 = latent side). Samples the batched step cannot settle go through
    `invert_layer`, whose LayerResult is kept for the verdict (a failed one,
    with the error, where it raised). Past `deadline` no new chunk starts (its
    samples stay "not_reached" at every layer) and `invert_layer` starts no new
    sample (a failed LayerResult saying so).
    """
    deadline = deadline or Deadline()
    batch = xb.shape[0]
    layers = [LayerArrays.empty(i, batch) for i in range(len(net.layers))]
    z = np.full((batch, net.latent_dim), np.nan)
    reached = np.zeros(batch, dtype=bool)
    step = chunk_size(net, batch, batch_size)
    for start in range(0, batch, step):
        if deadline.expired():
            break
        idx = np.arange(start, min(batch, start + step))
        h = xb[start : start + idx.size]  # a view: the layers only read it
        alive = np.ones(idx.size, dtype=bool)
        for i in range(len(net.layers) - 1, -1, -1):
            live = np.flatnonzero(alive)
            if live.size == 0:
                break
            h = _layer_step(net, i, h, live, alive, idx, rtol, ctx, layers[i], deadline)
        if alive.any():  # then h holds the inputs of layer 0
            reached[idx[alive]] = True
            z[idx[alive]] = h[alive]
        if progress is not None:
            progress(int(idx[-1]) + 1, batch)
    return z, reached, layers


def _layer_step(
    net: Network,
    i: int,
    h: np.ndarray,
    live: np.ndarray,
    alive: np.ndarray,
    idx: np.ndarray,
    rtol: float,
    ctx: Context,
    arrays: LayerArrays,
    deadline: Deadline,
) -> np.ndarray:
    """Layer i for the live samples of a chunk; returns their inputs (NaN where stopped)."""
    layer = net.layers[i]
    nonneg = net.input_nonnegative(i)
    start = time.perf_counter()
    y = h if live.size == h.shape[0] else h[live]
    try:
        fast = fast_layer(layer, y, nonneg=nonneg, rtol=rtol, ctx=ctx)
    except Exception:  # the batched step broke on this chunk: each sample goes alone instead
        fast = FastLayer(np.zeros(live.size, dtype=bool), np.zeros((live.size, layer.in_width)),
                         np.zeros(live.size, dtype=int), np.full(live.size, np.nan))
    share = (time.perf_counter() - start) / live.size
    new_h = np.full((h.shape[0], layer.in_width), np.nan)
    good = live[fast.ok]
    where = idx[good]
    report = arrays.report
    report.status[where] = "unique"
    report.n_active[where] = fast.n_active[fast.ok]
    report.rank[where] = layer.in_width
    report.residual[where] = fast.residual[fast.ok]
    report.time[where] = share
    new_h[good] = fast.h[fast.ok]

    slow = live[~fast.ok]

    def one(j: int) -> LayerResult:
        if deadline.expired():
            return LayerResult.failed(layer.in_width, f"{deadline.note()} before this layer")
        return invert_layer(layer, h[j], nonneg=nonneg, rtol=rtol)

    for j, res in zip(slow, ctx.map(isolated(one), list(slow)), strict=True):
        if isinstance(res, SampleFailure):
            res = LayerResult.failed(layer.in_width, res.message)
        arrays.record(int(idx[j]), res)
        if res.status in ("infeasible", "failed"):
            alive[j] = False
        else:
            new_h[j] = res.h
    return new_h
