"""The layer-wise driver: invert a deep network from the output down.

x_d = x is the observation; for i = d, ..., 1 the preimage of x_i under
layer i (an LP, `invert_layer`) becomes the observation of layer i - 1, and
x_0 = z. The per-layer verdicts compose into one verdict per sample:

- every layer "unique"                     -> "unique" (the chain is forced);
- the output layer (or a layer below only
  unique ones) has no preimage             -> "infeasible": x is not in the
                                              range of G, proved;
- a layer has no preimage after a layer
  above picked one point of many           -> "failed": the pick may have
                                              been poor, x may be in range;
- a layer has several preimages and the
  witness maps back to a second z          -> "non_unique" (with that z);
- otherwise                                -> "feasible" (a checked preimage,
                                              uniqueness unsettled).

By default a batch is inverted together (`preimage.methods.batched`): the samples
whose layers have full-column-rank active rows are solved in batch and only
the others go through `invert_layer`; `_compose` gives every sample its
verdict from its per-layer results on both paths.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from preimage.methods.batched import context as batched_context
from preimage.methods.batched.descend import LayerArrays, descend_batch
from preimage.methods.search import GlobalSettings, invert_below
from preimage.model.network import Network
from preimage.model.torch_io import default_device
from preimage.results import (
    RANK_RTOL,
    SUCCESS,
    Deadline,
    InversionResult,
    LayerReport,
    LayerResult,
    PoolMap,
    ProgressCallback,
    SampleFailure,
    build_result,
    per_sample,
    relative_residual,
)
from preimage.solvers.cell import cell_least_squares, piecewise_linear
from preimage.solvers.layer import invert_layer


@dataclass
class _SampleOutcome:
    z: np.ndarray
    status: str
    message: str
    witness: np.ndarray
    layers: list[LayerResult | None]
    #: the global search's proof domain ("" where it did not run) and whether it ran out of time
    domain: str = ""
    out_of_time: bool = False

    @property
    def distance(self) -> float:
        """Where "infeasible": the distance from the range that its layer measured (NaN
        where the global search proved it)."""
        if self.status != "infeasible":
            return np.nan
        return next((r.misfit for r in self.layers if r is not None and r.status == "infeasible"),
                    np.nan)


def _descend(
    net: Network, y: np.ndarray, top: int, rtol: float
) -> tuple[np.ndarray | None, list[LayerResult | None]]:
    """Invert layers top, top-1, ..., 0 starting from observation y of layer `top`."""
    results: list[LayerResult | None] = [None] * len(net.layers)
    h = y
    for i in range(top, -1, -1):
        res = invert_layer(net.layers[i], h, nonneg=net.input_nonnegative(i), rtol=rtol)
        results[i] = res
        if res.status in ("infeasible", "failed"):
            return None, results
        h = res.h
    return h, results


def _invert_one(net: Network, x: np.ndarray, rtol: float) -> _SampleOutcome:
    """The reference path: one sample, layer by layer through `invert_layer`."""
    z, results = _descend(net, x, len(net.layers) - 1, rtol)
    return _compose(net, z, results, rtol)


def observation_spread(
    net: Network, results: Sequence[LayerResult | None], bad: int
) -> float:
    """How far (l2) layer `bad`'s observation, computed by the unique layers above it, may
    lie from the true one: inf where a bound is unknown.

    Layer i's answer reproduces its observation within ``tol`` (l_inf) per unit; an
    observation off by s (l2) moves the unique solution of its active equalities by
    at most (s + sqrt(m) tol) / sigma_min(W_A) times the activation's largest inverse
    slope. A "proof" that layer `bad` has no preimage is one only when its distance
    from the range exceeds this: float32 data through a layer that keeps little of
    it (a sigmoid's outputs at 0.5 to float32) fixes the layer below only loosely.
    Unknown (inf) for a layer solved in batch (no sigma_min kept), pinned by its
    inequalities alone (rank 0), or with a curved activation.
    """
    spread = 0.0
    for i in range(len(net.layers) - 1, bad, -1):
        r = results[i]
        act = net.layers[i].activation
        if r is None or r.status != "unique" or not (r.sigma_min > 0) or r.rank <= 0:
            return np.inf
        if act.kind in ("relu", "identity"):
            slope = 1.0
        elif act.kind == "leaky_relu":
            slope = 1.0 / min(act.negative_slope, 1.0)
        else:
            return np.inf
        spread = slope * (spread + np.sqrt(net.layers[i].out_width) * r.tol) / r.sigma_min
    return float(spread)


def _compose(
    net: Network, z: np.ndarray | None, results: Sequence[LayerResult | None], rtol: float
) -> _SampleOutcome:
    """One sample's verdict from its per-layer results (see the module docstring).

    Shared by the per-sample and the batched paths. `z` is None when a layer
    had no preimage; `results[i]` is None for layers not reached.
    """
    k = net.latent_dim
    nan = np.full(k, np.nan)
    top = len(net.layers) - 1
    results = list(results)
    reached = [r for r in results if r is not None]
    if z is None:
        bad = min(i for i, r in enumerate(results) if r is not None)
        last = results[bad]
        assert last is not None
        above = [results[i] for i in range(bad + 1, top + 1)]
        forced = all(r is not None and r.status == "unique" for r in above)
        if last.status == "infeasible" and forced and bad < top:
            spread = observation_spread(net, results, bad)
            if not last.misfit > spread:
                return _SampleOutcome(nan, "failed", (
                    f"layer {bad}: {last.message}; but the layers above, though unique, fix "
                    f"its observation only to within {spread:.3g} at the data's precision "
                    "(nothing proved)"), nan, results)
        if last.status == "infeasible" and forced:
            where = "the output layer" if bad == top else f"layer {bad} (all layers above unique)"
            return _SampleOutcome(
                nan, "infeasible", f"x is not in the range of G: {where}: {last.message}",
                nan, results,
            )
        return _SampleOutcome(
            nan,
            "failed",
            f"layer {bad}: {last.message}"
            + ("" if forced else " (after a layer above chose one of several preimages)"),
            nan,
            results,
        )
    coarse = [i for i, r in enumerate(results) if i > 0 and r is not None and r.stretched]
    if all(r.status == "unique" for r in reached) and not coarse:
        return _SampleOutcome(z, "unique", "every layer's preimage is unique", nan, results)
    if all(r.status == "unique" for r in reached):
        return _SampleOutcome(z, "feasible", (
            f"every layer's preimage is unique, but layer {coarse[0]}'s curved outputs fix "
            "its input only to their rounding, coarser than the tolerance of the layers "
            "below: uniqueness unsettled"), nan, results)
    # Look for a second z: a layer's witness, carried down the layers below it
    # (the lowest such layer first: fewest layers for the witness to survive).
    for i in range(len(results)):
        r = results[i]
        if r is None or r.status != "non_unique" or r.witness is None:
            continue
        if i == 0:
            return _SampleOutcome(
                z, "non_unique", f"layer 0: {r.message}", r.witness.copy(), results
            )
        z2, _ = _descend(net, r.witness, i - 1, rtol)
        if z2 is not None:
            return _SampleOutcome(
                z,
                "non_unique",
                f"layer {i} has a second preimage that maps back to a second z",
                z2,
                results,
            )
    unsettled = [i for i, r in enumerate(results) if r is not None and r.status != "unique"]
    several = [i for i in unsettled if results[i].status == "non_unique"]  # type: ignore[union-attr]
    detail = (
        f"; layer(s) {several} have other preimages, but their witnesses are not in the "
        "range of the layers below (z may still be unique)" if several else ""
    )
    return _SampleOutcome(
        z,
        "feasible",
        f"a preimage of x; uniqueness unsettled at layer(s) {unsettled}{detail}",
        nan,
        results,
    )


def _settle_globally(
    net: Network, x: np.ndarray, outcome: _SampleOutcome, rtol: float, settings: GlobalSettings,
    deadline: Deadline,
) -> _SampleOutcome:
    """Retry a "failed" or "feasible" sample below its first non-unique layer.

    The layers above that layer were unique, so its observation is forced and
    what the search finds holds for the whole network. The search stops at
    `deadline` too; the sample then keeps its layer-wise result.
    """
    if deadline.expired():
        note = f"; no search below the first non-unique layer: {deadline.note()}"
        return _SampleOutcome(
            outcome.z, outcome.status, outcome.message + note, outcome.witness, outcome.layers
        )
    top = len(net.layers) - 1
    j, y = top, x
    while j >= 0 and outcome.layers[j] is not None and outcome.layers[j].status == "unique":
        layer_result = outcome.layers[j]
        assert layer_result is not None
        y, j = layer_result.h, j - 1
    if j < 1 or outcome.layers[j] is None:
        return outcome
    if outcome.status == "feasible" and settings.search == "cells":
        return outcome  # only the global search can add a verdict to a checked preimage
    try:
        found = invert_below(net, j, y, rtol=rtol, settings=settings, start=outcome.z,
                             deadline=deadline)
    except Exception as err:  # one sample's solver failure must not cost the batch
        note = f"; the global search below layer {j} failed: {type(err).__name__}: {err}"
        return _SampleOutcome(outcome.z, outcome.status, outcome.message + note,
                              outcome.witness, outcome.layers)
    nan = np.full(net.latent_dim, np.nan)
    extra = {"domain": found.domain or "", "out_of_time": found.out_of_time}
    if found.verdict == "infeasible" and j < top:
        # y is the layers above's estimate of layer j's output, correct only to their
        # rounding, which the search's band does not cover (stressed nets: a wrong proof)
        note = (f"; the global search below layer {j} found no z for the estimate of layer "
                f"{j}'s output the layers above gave, which proves nothing: that estimate is "
                f"only as exact as their rounding ({found.message})")
        return _SampleOutcome(outcome.z, outcome.status, outcome.message + note,
                              outcome.witness, outcome.layers, **extra)
    if found.verdict == "infeasible":
        return _SampleOutcome(nan, "infeasible", f"x is not in the range of G: {found.message}",
                              nan, outcome.layers, **extra)
    if found.z is None:
        note = f"; {found.message}"
        return _SampleOutcome(
            outcome.z, outcome.status, outcome.message + note, outcome.witness, outcome.layers,
            **extra,
        )
    if found.verdict == "non_unique" and found.witness is not None:
        return _SampleOutcome(found.z, "non_unique", found.message, found.witness,
                              outcome.layers, **extra)
    if found.verdict == "unique":
        return _SampleOutcome(found.z, "unique", found.message, nan, outcome.layers, **extra)
    return _SampleOutcome(found.z, "feasible", found.message, nan, outcome.layers, **extra)


#: Every answer must reproduce x end to end within this many rtol (relative), and a
#: witness too: each layer checks its own step, and their tolerances can compound.
ANSWER_RTOL = 1000.0

#: A latent unit on by at most this many rtol (of its layer's largest output) may be an
#: inactive one lifted by rounding: a `unique` verdict must hold without it.
WEAK_BAND = 10.0

#: Answers to data of this relative precision or worse are polished in their cells.
POLISH_RTOL = 1e-7
POLISH_STEPS = 3

#: The layer-wise method solves each layer with dense linear algebra on its weight:
#: beyond this many entries (an image generator's convolutions) it does not run ...
DENSE_MAX_ENTRIES = 2**24
#: ... nor where a layer has this many more inputs than outputs: no layer-wise pick can
#: be unique there, and its null-space LP grows with the difference.
MAX_NULLITY = 256


def layerwise_obstacle(net: Network) -> str | None:
    """Why the layer-wise method cannot run on `net` (then `invert` runs the hybrid), or None."""
    for i, layer in enumerate(net.layers):
        m, n = layer.weight.shape
        if n - m > MAX_NULLITY:
            return (
                f"the layer-wise method cannot settle layer {i}, which contracts ({n} inputs, "
                f"{m} outputs): the hybrid ran instead"
            )
        if m * n > DENSE_MAX_ENTRIES:
            return (
                f"layer {i} has {m} x {n} weights, beyond the layer-wise method's dense solves "
                f"({DENSE_MAX_ENTRIES} entries): the hybrid ran instead"
            )
    return None


def invert_exact(
    net: Network,
    xb: np.ndarray,
    *,
    single: bool,
    rtol: float,
    fallback: GlobalSettings | None = None,
    progress: ProgressCallback | None = None,
    batched: bool = True,
    batch_size: int | None = None,
    device: Any = None,
    n_jobs: int | None = None,
    time_limit: float | Deadline | None = None,
) -> InversionResult:
    """The layer-wise method on validated observations xb (B, n); see `preimage.invert`.

    Samples the layer-wise method leaves "failed" or "feasible" (the latter unless
    ``fallback.search`` is "cells") go to the search below their first non-unique layer
    (`preimage.methods.search.invert_below`). A sample whose solver raises ends
    "failed" with the error in its message; past ``time_limit`` (seconds, or a
    `Deadline`) no new sample (batched: chunk) starts, those not started end
    "failed" saying so, and searches stop with the sample's layer-wise result.
    """
    start = time.perf_counter()
    deadline = Deadline.of(time_limit)
    settings = fallback if fallback is not None else GlobalSettings()
    if batched:
        return _invert_batched(
            net, xb, single, rtol, start, settings, deadline,
            progress=progress, batch_size=batch_size, device=device, n_jobs=n_jobs,
        )

    def one(b: int) -> _SampleOutcome:
        outcome = _invert_one(net, xb[b], rtol)
        if _searched(outcome.status, settings):
            outcome = _settle_globally(net, xb[b], outcome, rtol, settings, deadline)
        return outcome

    outcomes = [_failed_if(net, o) for o in per_sample(one, xb.shape[0], deadline=deadline,
                                                        progress=progress)]
    return _collect(net, xb, outcomes, single, rtol, time.perf_counter() - start)


def _failed_if(net: Network, outcome: _SampleOutcome | SampleFailure) -> _SampleOutcome:
    """The outcome, or a "failed" one for a sample whose work raised or never started."""
    if isinstance(outcome, _SampleOutcome):
        return outcome
    nan = np.full(net.latent_dim, np.nan)
    return _SampleOutcome(nan, "failed", outcome.message, nan, [None] * len(net.layers))


def _searched(status: str, settings: GlobalSettings) -> bool:
    """Whether the search below a non-unique layer runs for a sample of this status."""
    return settings.enabled and (
        status == "failed" or (status == "feasible" and settings.search != "cells"))


def _invert_batched(
    net: Network,
    xb: np.ndarray,
    single: bool,
    rtol: float,
    start: float,
    settings: GlobalSettings,
    deadline: Deadline,
    *,
    progress: ProgressCallback | None,
    batch_size: int | None,
    device: Any,
    n_jobs: int | None,
) -> InversionResult:
    """The batched path: `descend_batch`, then `_compose` per sample."""
    ctx = batched_context.Context(
        default_device() if device is None else device,
        batched_context.default_jobs() if n_jobs is None else n_jobs,
        resolution=RANK_RTOL * rtol,
    )
    # NumPy/SciPy's OpenBLAS gets one thread for the whole call: torch does the
    # large products with its own threads, and OpenBLAS threads spinning after
    # each call were measured to slow everything else by up to 1.5x on 2 cores.
    with ctx.one_blas_thread():
        try:
            z, reached, arrays = descend_batch(
                net, xb, rtol, ctx, batch_size=batch_size, progress=progress, deadline=deadline
            )
            chunk = batched_context.chunk_size(net, xb.shape[0], batch_size)
            return _verdicts(
                net, xb, z, reached, arrays, single, rtol, start, settings, deadline, ctx.map, chunk
            )
        finally:
            ctx.close()


def _verdicts(
    net: Network,
    xb: np.ndarray,
    z: np.ndarray,
    reached: np.ndarray,
    arrays: list[LayerArrays],
    single: bool,
    rtol: float,
    start: float,
    settings: GlobalSettings,
    deadline: Deadline,
    pool_map: PoolMap,
    chunk: int,
) -> InversionResult:
    """Each sample's verdict from the batched descent (`_compose`), searches where asked.

    A sample no layer reached was in a chunk the deadline kept from starting.
    pool_map runs the final residuals' pieces (`_assemble`) over the batch's threads;
    `chunk`: the descent's chunk size (`_assemble` keeps to its chunks).
    """
    batch = xb.shape[0]
    status = np.empty(batch, dtype=object)
    witness = np.full_like(z, np.nan)
    distance = np.full(batch, np.nan)
    domains = np.full(batch, "", dtype=object)
    timed = np.zeros(batch, dtype=bool)
    messages: list[str] = [""] * batch
    # Samples solved in batch at every layer all get the same verdict: compose it once.
    in_batch = reached.copy()
    for arr in arrays:
        in_batch[list(arr.results)] = False
    if in_batch.any():
        template = _compose(net, z[in_batch][0], [_BATCH_SOLVED] * len(arrays), rtol)
        status[in_batch] = template.status
        for b in np.flatnonzero(in_batch):
            messages[b] = template.message
    def one(b: int) -> _SampleOutcome | SampleFailure:
        results: list[LayerResult | None] = []
        for arr in arrays:
            if b in arr.results:
                results.append(arr.results[b])
            elif arr.report.status[b] == "not_reached":
                results.append(None)
            else:
                results.append(_BATCH_SOLVED)
        if all(r is None for r in results):
            return SampleFailure(f"{deadline.note()} before this sample was started")
        stop = next((i for i, r in enumerate(results) if r is not None), 0)
        if not reached[b] and results[stop] is not None and results[stop].status == "infeasible" \
                and stop < len(results) - 1:
            # a proof below the top rests on the layers above (`observation_spread`), whose
            # sigma_min the batch did not keep: this sample through the reference path
            outcome = reference = _invert_one(net, xb[b], rtol)
        else:
            outcome, reference = _compose(net, z[b] if reached[b] else None, results, rtol), None
        if _searched(outcome.status, settings):
            # The search needs every layer's point, which the batch did not keep:
            # redo this sample through the reference path first (only where the
            # search will run: a "feasible" sample is searched only by the global search).
            if reference is None and not deadline.expired():
                reference = _invert_one(net, xb[b], rtol)
            outcome = _settle_globally(net, xb[b], reference or outcome, rtol, settings,
                                       deadline)
        return outcome

    others = np.flatnonzero(~in_batch)
    for b, found in zip(others, per_sample(one, others), strict=True):
        outcome = _failed_if(net, found)
        z[b] = outcome.z
        status[b] = outcome.status
        witness[b] = outcome.witness
        messages[b] = outcome.message
        distance[b] = outcome.distance
        domains[b], timed[b] = outcome.domain, outcome.out_of_time
    reports = tuple(arr.report for arr in arrays)
    return _assemble(
        net, xb, z, status, witness, messages, reports, single, rtol,
        time.perf_counter() - start, distance, pool_map=pool_map, chunk=chunk,
        domains=domains, timed=timed,
    )


#: Stands for a layer that the batched path solved ("unique", full column rank)
#: in `_compose`, which reads only status, message and witness.
_BATCH_SOLVED = LayerResult(
    h=np.empty(0),
    status="unique",
    message="solved the active equalities (full column rank); the active rows have full "
    "column rank",
    n_active=-1,
    rank=-1,
    sigma_min=np.nan,
    residual=np.nan,
)


def _collect(
    net: Network,
    xb: np.ndarray,
    outcomes: list[_SampleOutcome],
    single: bool,
    rtol: float,
    elapsed: float,
) -> InversionResult:
    z = np.stack([o.z for o in outcomes])
    witness = np.stack([o.witness for o in outcomes])
    reports = tuple(
        LayerReport.from_results(i, [o.layers[i] for o in outcomes])
        for i in range(len(net.layers))
    )
    return _assemble(
        net, xb, z, [o.status for o in outcomes], witness, [o.message for o in outcomes],
        reports, single, rtol, elapsed, np.array([o.distance for o in outcomes]),
        domains=np.array([o.domain for o in outcomes], dtype=object),
        timed=np.array([o.out_of_time for o in outcomes], dtype=bool),
    )


def _assemble(
    net: Network,
    xb: np.ndarray,
    z: np.ndarray,
    status: Sequence[str] | np.ndarray,
    witness: np.ndarray,
    messages: list[str],
    reports: tuple[LayerReport, ...],
    single: bool,
    rtol: float,
    elapsed: float,
    distance: np.ndarray,
    pool_map: PoolMap | None = None,
    chunk: int | None = None,
    domains: np.ndarray | None = None,
    timed: np.ndarray | None = None,
) -> InversionResult:
    """The exact method's InversionResult (``steps``: the LPs its layers solved;
    ``proof_domain`` and ``out_of_time`` from the global search, `domains`, `timed`).

    For data of low precision (rtol >= POLISH_RTOL: float32 data or networks), each
    answer is first polished end to end: the least-squares fit inside its own
    activation cell (`preimage.solvers.cell.cell_least_squares`), kept where it
    lowers the residual, and again from the cell it reached (POLISH_STEPS in
    all). Each layer's least-squares point fits that layer's rounding errors,
    and the next layer inherits them; the cell's fit spreads them over the
    whole network instead (the shipped
    LeakyReLU decoder as a float32 module: relative residual 9e-5 -> 5e-7,
    the true code's own). Verdicts are unchanged: they rest on the layers'
    structure, and the polished z is a preimage in the same cell.

    `chunk` (the batched descent's chunk size): the polish and the residuals run
    chunk by chunk, so that each chunk's answers are those of inverting it alone.
    """
    if rtol >= POLISH_RTOL and piecewise_linear(net, output=False):
        good = np.isin(np.asarray(status), SUCCESS) & np.all(np.isfinite(z), axis=1)
        step = z.shape[0] if chunk is None else chunk
        for first in range(0, z.shape[0], step):
            _polish(net, xb, z, first + np.flatnonzero(good[first : first + step]), rtol)
    lps = np.sum([report.used_lp for report in reports], axis=0) if reports else None
    status = np.array(status, dtype=object)
    messages = list(messages)
    limit = ANSWER_RTOL * rtol
    second = np.flatnonzero(status == "non_unique")
    if second.size:  # a witness is a second preimage of x itself, end to end
        misses = ~(relative_residual(net.forward(witness[second]), xb[second]) <= limit)
        for b in second[misses]:
            status[b], witness[b] = "feasible", np.nan
            messages[b] += (f"; its second preimage does not reproduce x within {ANSWER_RTOL:g} "
                            "rtol, so uniqueness is unsettled")

    for b in _pinned_by_weak_units(net, z, status, rtol):
        status[b] = "feasible"
        messages[b] += (f"; but the latent layer's unique preimage rests on units active by "
                        f"less than {WEAK_BAND:g} rtol (the data's rounding, carried up "
                        "from the layers above, may have lifted an inactive one): "
                        "uniqueness unsettled")

    def verified(residual: np.ndarray, misfit: np.ndarray) -> np.ndarray:
        """Each answer checked end to end: one whose G(z) misses x by more than
        ANSWER_RTOL rtol (the layers' tolerances compounded) keeps z, but no verdict.
        (`build_result` measures the residuals and applies this rule before it reads
        `messages`, so the notes added here are kept.)"""
        off = np.isin(status, SUCCESS) & ~(residual <= limit)
        for b in np.flatnonzero(off):
            messages[b] += (f"; but G(z) misses x by {residual[b]:.2g} (relative), beyond "
                            f"{ANSWER_RTOL:g} rtol: nothing proved")
        return np.where(off, "failed", status).astype(object)

    result = build_result(
        net, xb, z, verified, messages, method="exact", rtol=rtol, elapsed=elapsed,
        single=single, layers=reports, witness=witness, steps=lps, distance=distance,
        pool_map=pool_map, chunk=chunk,
    )
    batch = xb.shape[0]
    domains = np.full(batch, "", dtype=object) if domains is None else domains
    timed = np.zeros(batch, dtype=bool) if timed is None else timed
    result.proof_domain = str(domains[0]) if single else domains
    result.out_of_time = bool(timed[0]) if single else timed
    return result


def _pinned_by_weak_units(net: Network, z: np.ndarray, status: np.ndarray,
                          rtol: float) -> np.ndarray:
    """The `unique` samples whose latent layer (a ReLU one) is pinned only with units
    barely on: at the answer z, the units with 0 < a_j <= WEAK_BAND rtol max relu(a) left
    out, the other active rows of W_0 no longer have full column rank.

    Why: the latent layer's observation is recovered from the layers above, whose
    rounding it carries; an inactive unit lifted to 1e-5 by float32 data counts as an
    equality, and with it a layer that is not injective there looks so (a float32
    generator's x = G(z0), preimages a segment through z0: "unique", 0.43 from z0).
    """
    first = net.layers[0]
    unique = np.flatnonzero(np.asarray(status) == "unique")
    # (alone, the layer sees x itself: its threshold already covers the data's rounding)
    if unique.size == 0 or first.activation.kind != "relu" or len(net.layers) == 1:
        return unique[:0]
    pre = first.preactivation(np.nan_to_num(z[unique]))
    band = WEAK_BAND * rtol * np.maximum(np.max(pre, axis=1, keepdims=True), 1e-300)
    strong = pre > band
    weak = (pre > 0) & ~strong
    out = []
    k = first.in_width
    for i in np.flatnonzero(weak.any(axis=1)):
        rows = np.flatnonzero(strong[i])
        if rows.size < k or np.linalg.matrix_rank(first.weight.rows(rows)) < k:
            out.append(unique[i])
    return np.array(out, dtype=int)


def _polish(net: Network, xb: np.ndarray, z: np.ndarray, ok: np.ndarray, rtol: float) -> None:
    """`_assemble`'s polish of the answers z[ok] (in place), POLISH_STEPS cells' fits."""
    if ok.size == 0:
        return
    scale = np.maximum(np.max(np.abs(xb[ok]), axis=1), 1e-300)
    before = relative_residual(net.forward(z[ok]), xb[ok])
    for _ in range(POLISH_STEPS):  # Gauss-Newton over cells: each step a cell's fit
        if ok.size == 0:
            break
        z_new, _ = cell_least_squares(net, xb[ok], z[ok], rtol * scale)
        after = relative_residual(net.forward(z_new), xb[ok])
        better = after < before
        z[ok[better]] = z_new[better]
        ok, scale, before = ok[better], scale[better], after[better]
