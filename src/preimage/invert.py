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

By default a batch is inverted together (`preimage._batched`): the samples
whose layers have full-column-rank active rows are solved in batch and only
the others go through `invert_layer`; `_compose` gives every sample its
verdict from its per-layer results on both paths.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from preimage._validation import check_observation, check_positive, input_precision
from preimage.global_search import GlobalSettings, invert_below
from preimage.layer_inversion import STATUSES, LayerResult, invert_layer
from preimage.network import Network

if TYPE_CHECKING:
    from preimage._batched import LayerArrays

ProgressCallback = Callable[[int, int], None]
#: fn over items, possibly in threads: `_batched.Context.map`.
PoolMap = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]

#: Default relative tolerance by the precision of the observation.
DEFAULT_RTOL = {"float64": 1e-9, "float32": 1e-5}


#: The per-sample fields a LayerReport shares with `LayerResult`: (value where a
#: sample did not reach the layer, dtype).
REPORT_FIELDS: dict[str, tuple[Any, type]] = {
    "status": ("not_reached", object),
    "n_active": (-1, int),
    "rank": (-1, int),
    "sigma_min": (np.nan, float),
    "residual": (np.nan, float),
    "used_lp": (False, bool),
    "time": (0.0, float),
}


@dataclass
class LayerReport:
    """Per-layer diagnostics over the batch (arrays of shape (B,)).

    A sample whose inversion stopped at a layer above has status "not_reached".
    """

    index: int
    status: np.ndarray
    n_active: np.ndarray
    rank: np.ndarray
    sigma_min: np.ndarray
    residual: np.ndarray
    used_lp: np.ndarray
    time: np.ndarray
    # Noisy inversion only (None otherwise), arrays of shape (B,):
    #: the on/off threshold used,
    tau: np.ndarray | None = None
    #: the layer LP's optimal misfit,
    misfit: np.ndarray | None = None
    #: bound on ||input_hat - input||_2 of this layer (layer 0: on ||z_hat - z||_2).
    error_bound: np.ndarray | None = None

    @classmethod
    def from_results(cls, index: int, results: Sequence[Any], **columns: np.ndarray) -> LayerReport:
        """The report of layer `index` from one per-layer result per sample.

        `results[b]` is anything with the attributes of `LayerResult` (None where
        sample b did not reach the layer); `columns` replace or add fields.
        """

        fields = dict(columns)
        reached = [b for b, r in enumerate(results) if r is not None]
        for name, (missing, dtype) in REPORT_FIELDS.items():
            if name not in fields:
                column = np.full(len(results), missing, dtype=dtype)
                for b in reached:
                    column[b] = getattr(results[b], name)
                fields[name] = column
        return cls(index=index, **fields)


@dataclass
class InversionResult:
    """What `invert` found.

    Attributes
    ----------
    z : ndarray of shape (k,) or (B, k)
        The recovered codes (NaN rows where no preimage was found).
    status : str or ndarray of str of shape (B,)
        One of "unique", "non_unique", "feasible", "infeasible", "failed".
    success : bool or ndarray of bool
        True where z is a checked preimage (unique, non_unique or feasible).
    residual : float or ndarray
        |G(z) - x|_inf / max(|x|_inf, tiny): relative misfit of the answer.
    witness : ndarray like z
        A second preimage z' != z where status is "non_unique", else NaN.
    message : str or list of str
        Why each sample ended as it did.
    layers : tuple of LayerReport
        Per-layer diagnostics, `layers[i]` for network layer i (0 = latent side).
    method : str
    rtol : float
    time : float
        Wall-clock seconds for the whole call.
    misfit : float or ndarray, optional
        ||G(z) - x|| in the noise norm (l_2 when no noise model is given; on the
        observed coordinates / measurements for partial observations). Set by the
        noisy, partial, sensing and gradient methods.
    z_error_bound : float or ndarray, optional
        A proved bound on ||z - z_true||_2 when `noise_level` was given (inf where
        none could be computed); see `preimage.noisy`.
    steps : int or ndarray, optional
        Iterations taken (gradient steps, PGD iterations, LPs solved).
    noise : str, optional
        The noise model ("linf", "l1", "l2") the result was computed under.
    """

    z: np.ndarray
    status: Any
    success: Any
    residual: Any
    witness: np.ndarray
    message: Any
    layers: tuple[LayerReport, ...]
    method: str
    rtol: float
    time: float
    misfit: Any = None
    z_error_bound: Any = None
    steps: Any = None
    noise: str | None = None

    def counts(self) -> dict[str, int]:
        """How many samples ended in each status."""
        status = np.atleast_1d(np.asarray(self.status))
        return {s: int(np.sum(status == s)) for s in STATUSES if np.any(status == s)}

    def __repr__(self) -> str:
        n = int(np.atleast_1d(np.asarray(self.status)).size)
        return (
            f"InversionResult(method={self.method!r}, samples={n}, counts={self.counts()}, "
            f"time={self.time:.3g}s)"
        )


@dataclass
class _SampleOutcome:
    z: np.ndarray
    status: str
    message: str
    witness: np.ndarray
    layers: list[LayerResult | None]


def _nonneg_input(net: Network, i: int) -> bool:
    """Whether layer i's input is a ReLU (or sigmoid) output, hence >= 0."""
    return i > 0 and net.layers[i - 1].activation.output_nonnegative


def _descend(
    net: Network, y: np.ndarray, top: int, rtol: float
) -> tuple[np.ndarray | None, list[LayerResult | None]]:
    """Invert layers top, top-1, ..., 0 starting from observation y of layer `top`."""
    results: list[LayerResult | None] = [None] * len(net.layers)
    h = y
    for i in range(top, -1, -1):
        res = invert_layer(net.layers[i], h, nonneg=_nonneg_input(net, i), rtol=rtol)
        results[i] = res
        if res.status in ("infeasible", "failed"):
            return None, results
        h = res.h
    return h, results


def _invert_one(net: Network, x: np.ndarray, rtol: float) -> _SampleOutcome:
    """The reference path: one sample, layer by layer through `invert_layer`."""
    z, results = _descend(net, x, len(net.layers) - 1, rtol)
    return _compose(net, z, results, rtol)


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
    if all(r.status == "unique" for r in reached):
        return _SampleOutcome(z, "unique", "every layer's preimage is unique", nan, results)
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
    net: Network, x: np.ndarray, outcome: _SampleOutcome, rtol: float, settings: GlobalSettings
) -> _SampleOutcome:
    """Retry a "failed" or "feasible" sample below its first non-unique layer.

    The layers above that layer were unique, so its observation is forced and
    what the search finds holds for the whole network.
    """
    top = len(net.layers) - 1
    j, y = top, x
    while j >= 0 and outcome.layers[j] is not None and outcome.layers[j].status == "unique":
        layer_result = outcome.layers[j]
        assert layer_result is not None
        y, j = layer_result.h, j - 1
    if j < 1 or outcome.layers[j] is None:
        return outcome
    if outcome.status == "feasible" and not settings.milp:
        return outcome  # only the MILP can add a verdict to a checked preimage
    found = invert_below(net, j, y, rtol=rtol, settings=settings, start=outcome.z)
    nan = np.full(net.latent_dim, np.nan)
    if found.z is None:
        note = f"; global search below layer {j}: {found.message}"
        return _SampleOutcome(
            outcome.z, outcome.status, outcome.message + note, outcome.witness, outcome.layers
        )
    if found.verdict == "non_unique" and found.witness is not None:
        return _SampleOutcome(found.z, "non_unique", found.message, found.witness, outcome.layers)
    if found.verdict == "unique":
        return _SampleOutcome(found.z, "unique", found.message, nan, outcome.layers)
    return _SampleOutcome(found.z, "feasible", found.message, nan, outcome.layers)


#: The methods `invert` accepts.
METHODS: tuple[str, ...] = ("exact", "adam", "clipping", "negation", "hybrid")


def invert(
    net: Network,
    x: Any,
    *,
    method: str = "exact",
    rtol: float | None = None,
    fallback: GlobalSettings | None = None,
    progress: ProgressCallback | None = None,
    batched: bool = True,
    batch_size: int | None = None,
    device: Any = None,
    n_jobs: int | None = None,
    noise: str | None = None,
    noise_level: float | None = None,
    observe: Any = None,
    A: Any = None,
    options: dict[str, Any] | None = None,
) -> InversionResult:
    """Find z with G(z) = x, layer by layer, and say whether it is unique.

    Parameters
    ----------
    net : Network
        The generator G.
    x : array-like of shape (n,) or (B, n)
        Observations (NumPy array or torch tensor; never modified). With
        ``observe``: the full output (unobserved entries ignored, may be NaN)
        or the observed entries only; with ``A``: the m measurements.
    method : "exact", "adam", "clipping", "negation" or "hybrid"
        "exact": the layer-wise LP method of Lei et al. (2019) (with ``noise``:
        the error-bounded noisy LPs, `preimage.noisy`; with ``A``: projected
        gradient descent with the LP inversion as projection,
        `preimage.sensing`). The others are the gradient baselines and the
        hybrid of `preimage.baselines`.
    rtol : float, optional
        Relative tolerance for the activation threshold and the checks
        (see `preimage.layer_inversion`). Default 1e-9 for float64 x, 1e-5 for
        float32 (or half precision) x. A float64 x that was computed in float32
        needs ``rtol=1e-5``: otherwise its rounding errors make it "infeasible".
    fallback : GlobalSettings, optional
        The search below the first non-unique layer for samples the layer-wise
        method leaves "failed" or "feasible" (`preimage.global_search`):
        pattern search by default, the MILP with ``GlobalSettings(milp=True)``,
        nothing with ``GlobalSettings(enabled=False)``.
    progress : callable(done, total), optional
        Called as samples finish (after each chunk when batched, after each
        sample otherwise).
    batched : bool, default True
        Solve the samples together (`preimage._batched`): the samples whose
        active rows have full column rank are solved and checked in batch, with
        PyTorch, and only the others go through `invert_layer` (the LP), in
        parallel. The verdicts are the same as with ``batched=False``, which
        inverts one sample at a time through `invert_layer` (the reference).
        Where the batched path solved a layer, ``layers[i].sigma_min`` is NaN
        (it factors a square subset of W_A, not W_A itself).
    batch_size : int, optional
        Samples per chunk of the batched path. Default: as many as fit a
        working-memory budget of 128 MiB (the widest layer decides); the
        per-sample matrices are formed in smaller pieces within a chunk.
    device : torch device or str, optional
        Where the batched algebra runs; default CUDA when available, else CPU.
    n_jobs : int, optional
        Threads for the per-sample LPs and the CPU solves; default the number
        of CPUs this process may use.
        Called after each sample (each step for the gradient methods).
    noise : "linf", "l1" or "l2", optional
        x = G(z) + e: fit in this norm instead of solving G(z) = x exactly.
        Noisy results are estimates: "feasible" or "failed", never "unique".
    noise_level : float >= 0, optional
        A known bound ||e||_noise <= noise_level: the result then carries proved
        error bounds (``z_error_bound``, ``layers[i].error_bound``) and is
        "feasible" only when its misfit is consistent with the level.
    observe : bool array of shape (n,) or `preimage.measurements.Mask`, optional
        Only these output coordinates are seen (inpainting).
    A : array of shape (m, n) or a measurement, optional
        x = A G(z) + e (compressed sensing), e.g. `GaussianMatrix(m, n)`.
    options : dict, optional
        Settings of the method, passed as keyword arguments to the function
        that runs it, e.g. ``{"steps": 300, "restarts": 5}`` for "adam":
        "exact" with noise: `noisy.invert_noisy` (``tau``); with ``observe``:
        `partial.invert_observed` (``restarts``, ``steps``, ``max_lps``,
        ``seed`` of the cell search); with ``A``: `sensing.pgd_invert`
        (``projection``, ``step``, ``iterations``, ``max_lps``); the others:
        `baselines.gradient_invert`, `clipping_invert`, `negation_invert`,
        `hybrid_invert`. Unknown names raise a TypeError listing the valid ones.

    Returns
    -------
    InversionResult
    """
    if not isinstance(net, Network):
        raise TypeError(f"`net` must be a preimage.Network; got {type(net).__name__}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")
    if (
        method != "exact" or noise is not None or noise_level is not None
        or observe is not None or A is not None or options
    ):
        from preimage._dispatch import dispatch

        return dispatch(
            net, x, method=method, rtol=rtol, progress=progress, noise=noise,
            noise_level=noise_level, observe=observe, A=A, options=options,
        )
    if rtol is None:
        rtol = DEFAULT_RTOL[input_precision(x)]
    rtol = check_positive(rtol, "rtol")
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"`batch_size` must be an integer >= 1; got {batch_size!r}.")
    if n_jobs is not None and (int(n_jobs) != n_jobs or n_jobs < 1):
        raise ValueError(f"`n_jobs` must be an integer >= 1; got {n_jobs!r}.")
    xb, single = check_observation(x, net.output_dim)
    start = time.perf_counter()

    settings = fallback if fallback is not None else GlobalSettings()
    if batched:
        return _invert_batched(
            net, xb, single, rtol, start, settings,
            progress=progress, batch_size=batch_size, device=device, n_jobs=n_jobs,
        )
    outcomes = []
    for b in range(xb.shape[0]):
        outcome = _invert_one(net, xb[b], rtol)
        if settings.enabled and outcome.status in ("failed", "feasible"):
            outcome = _settle_globally(net, xb[b], outcome, rtol, settings)
        outcomes.append(outcome)
        if progress is not None:
            progress(b + 1, xb.shape[0])
    return _collect(net, xb, outcomes, single, "exact", rtol, time.perf_counter() - start)


def _invert_batched(
    net: Network,
    xb: np.ndarray,
    single: bool,
    rtol: float,
    start: float,
    settings: GlobalSettings,
    *,
    progress: ProgressCallback | None,
    batch_size: int | None,
    device: Any,
    n_jobs: int | None,
) -> InversionResult:
    """The batched path: `_batched.descend_batch`, then `_compose` per sample."""
    from preimage import _batched
    from preimage._torch import default_device

    ctx = _batched.Context(
        default_device() if device is None else device,
        _batched.default_jobs() if n_jobs is None else n_jobs,
    )
    # NumPy/SciPy's OpenBLAS gets one thread for the whole call: torch does the
    # large products with its own threads, and OpenBLAS threads spinning after
    # each call were measured to slow everything else by up to 1.5x on 2 cores.
    with ctx.one_blas_thread():
        try:
            z, reached, arrays = _batched.descend_batch(
                net, xb, rtol, ctx, batch_size=batch_size, progress=progress
            )
            return _verdicts(
                net, xb, z, reached, arrays, single, rtol, start, settings, ctx.map
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
    pool_map: PoolMap,
) -> InversionResult:
    """Each sample's verdict from the batched descent (`_compose`), searches where asked.

    pool_map runs the final residuals' pieces (`_assemble`) over the batch's threads.
    """
    batch = xb.shape[0]
    status = np.empty(batch, dtype=object)
    witness = np.full_like(z, np.nan)
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
    for b in np.flatnonzero(~in_batch):
        results: list[LayerResult | None] = []
        for arr in arrays:
            if b in arr.results:
                results.append(arr.results[b])
            elif arr.report.status[b] == "not_reached":
                results.append(None)
            else:
                results.append(_BATCH_SOLVED)
        outcome = _compose(net, z[b] if reached[b] else None, results, rtol)
        if settings.enabled and (
            outcome.status == "failed" or (outcome.status == "feasible" and settings.milp)
        ):
            # The search needs every layer's point, which the batch did not keep:
            # redo this sample through the reference path first (only where the
            # search will run: a "feasible" sample is searched by the MILP alone).
            outcome = _settle_globally(
                net, xb[b], _invert_one(net, xb[b], rtol), rtol, settings
            )
        z[b] = outcome.z
        status[b] = outcome.status
        witness[b] = outcome.witness
        messages[b] = outcome.message
    reports = tuple(arr.report for arr in arrays)
    return _assemble(
        net, xb, z, status, witness, messages, reports, single, "exact", rtol,
        time.perf_counter() - start, pool_map=pool_map,
    )


#: Samples per piece of the final forward pass that measures each residual.
RESIDUAL_ROWS = 1024

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
    method: str,
    rtol: float,
    elapsed: float,
) -> InversionResult:
    z = np.stack([o.z for o in outcomes])
    witness = np.stack([o.witness for o in outcomes])
    status = np.array([o.status for o in outcomes], dtype=object)
    reports = [
        LayerReport.from_results(i, [o.layers[i] for o in outcomes])
        for i in range(len(net.layers))
    ]
    messages = [o.message for o in outcomes]
    return _assemble(
        net, xb, z, status, witness, messages, tuple(reports), single, method, rtol, elapsed
    )


def _assemble(
    net: Network,
    xb: np.ndarray,
    z: np.ndarray,
    status: np.ndarray,
    witness: np.ndarray,
    messages: list[str],
    reports: tuple[LayerReport, ...],
    single: bool,
    method: str,
    rtol: float,
    elapsed: float,
    pool_map: PoolMap | None = None,
) -> InversionResult:
    """The InversionResult from per-sample arrays (shared by both paths).

    pool_map: how to run the residuals' pieces (the batched path passes its
    threads, which run NumPy with one BLAS thread each); in turn by default.
    """
    success = np.isin(status, ("unique", "non_unique", "feasible"))
    residual = np.full(len(status), np.nan)
    done = np.flatnonzero(success)
    # In pieces of RESIDUAL_ROWS samples: arrays of a few MB reuse freed memory,
    # where one (B, n_d) array at a time touches new pages (measured 5x slower).
    def measure(part: np.ndarray) -> None:
        x_part = xb[part]
        scale = np.maximum(np.maximum(x_part.max(axis=1), -x_part.min(axis=1)), 1e-300)
        residual[part] = np.max(np.abs(net.forward(z[part]) - x_part), axis=1) / scale

    parts = [done[lo : lo + RESIDUAL_ROWS] for lo in range(0, done.size, RESIDUAL_ROWS)]
    if pool_map is None:
        for part in parts:
            measure(part)
    else:
        pool_map(measure, parts)
    if single:
        return InversionResult(
            z[0], str(status[0]), bool(success[0]), float(residual[0]), witness[0], messages[0],
            reports, method, rtol, elapsed,
        )
    return InversionResult(
        z, status, success, residual, witness, messages, reports, method, rtol, elapsed
    )
