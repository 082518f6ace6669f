"""The vocabulary every layer of the package shares: statuses, tolerances, result types.

- `STATUSES` and what each means (the README's table);
- the default tolerances (`DEFAULT_RTOL` by precision, `TIGHT_RTOL`, `LP_TOL`);
- `LayerResult` (one layer, one sample), `LayerReport` (one layer, a batch) and
  `InversionResult` (what `preimage.invert` returns);
- the noise norms and the consistency rule of a noisy estimate;
- the one residual (`relative_residual`) and the one result builder
  (`build_result`), used by every method, so every result reports the same
  fields with the same types: arrays of shape (B,) (or (B, k)) when the caller
  passed a batch, scalars (or (k,)) when one sample;
- `combine_results`: the result over consecutive batches from theirs (the
  chunks of a streamed job, `preimage.jobs`).
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from preimage.model.network import Network
from preimage.model.validation import (
    check_choice,
    check_positive,
    check_rtol,
    input_precision,
    precision_of,
)

#: The statuses a layer (and a whole inversion) can end with.
STATUSES: tuple[str, ...] = ("unique", "non_unique", "feasible", "infeasible", "failed")

#: Statuses that mean "z is an answer" (a preimage, or an estimate consistent with the noise).
SUCCESS: tuple[str, ...] = ("unique", "non_unique", "feasible")

#: What each status means (the CLI prints these).
STATUS_MEANING: dict[str, str] = {
    "unique": "z is the only preimage (certified)",
    "non_unique": "z is a preimage; another one is in `witness`",
    "feasible": "z is a preimage (or, with noise, fits within it); uniqueness not settled",
    "infeasible": "proved: x is not in the range of G",
    "failed": "no z found, nothing proved",
}

#: Default relative tolerance by the precision of the observation or of the weights:
#: about 170 unit roundoffs (float32: 6e-8; float16: 4.9e-4; bfloat16: 3.9e-3), so
#: that an x computed in that precision is accepted (`tests/test_stress.py`).
DEFAULT_RTOL: dict[str, float] = {
    "float64": 1e-9, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2,
}


def default_rtol(net: Network, x: Any) -> float:
    """DEFAULT_RTOL of the less precise of the network's weights and the observation x.

    A float32 model's outputs are only defined to float32 rounding, whatever
    dtype they are handed over in (``module(z).double().numpy()``).
    """
    return max(DEFAULT_RTOL[precision_of(net.source_dtype)], DEFAULT_RTOL[input_precision(x)])


#: The relative residual under which an estimate (gradient descent, PGD, the hybrid)
#: counts as a preimage of float64 data: its iterations end near, not at, G(z) = x.
SUCCESS_RTOL = 1e-6


def given_rtol(net: Network, x: Any, rtol: Any) -> float:
    """A caller's ``rtol`` checked against the precision of x (`check_rtol`), or
    `default_rtol` where it is None."""
    return default_rtol(net, x) if rtol is None else check_rtol(rtol, input_precision(x))


def success_tolerance(net: Network, x: Any, success_rtol: Any = None,
                      rtol: float | None = None) -> float:
    """The residual |G(z) - x|_inf / |x|_inf under which an estimate is "feasible": the
    caller's ``success_rtol`` (checked), else SUCCESS_RTOL, or the tolerance of the data
    (``rtol``, by default `default_rtol`) where that is coarser: float16 measurements of a
    preimage miss by about 1e-4."""
    if success_rtol is not None:
        return check_positive(success_rtol, "success_rtol")
    return max(SUCCESS_RTOL, default_rtol(net, x) if rtol is None else rtol)


def data_floor(net: Network, x: Any, xb: np.ndarray) -> np.ndarray:
    """(B,) the error a noise bound must allow in every coordinate of each sample of xb
    beyond the noise itself: float32 (or coarser) data or models define x only to
    `default_rtol` of its scale (a float32 G(z) with noise_level 0 put the true code
    outside z_error_bound); 0 for float64, whose rounding the bounds carry already."""
    rtol = default_rtol(net, x)
    if rtol <= DEFAULT_RTOL["float64"]:
        return np.zeros(xb.shape[0])
    return rtol * np.max(np.abs(xb), axis=1, initial=0.0)


#: Relative tolerance for "this constraint is tight at h" (float64 solve accuracy).
TIGHT_RTOL = 1e-8

#: A direction of a layer's active rows W_A counts as resolved by the data only where
#: its singular value is at least RANK_RTOL * rtol * sigma_max(W_A): along a weaker one
#: h moves by |h| while W_A h moves by less than the data's tolerance (float32 data of a
#: W_A with condition number 1e13 gave z 40% off). Below it "unique" is not claimed.
RANK_RTOL = 10.0

#: A curved activation (tanh, sigmoid, ELU, softplus) stretches its outputs' rounding by
#: |y_i| / slope in pre-activation units (`Activation.target_scale`). Beyond this many
#: times the targets' own scale, that stretch sets the layer's tolerance, and the layer's
#: input is taken as fixed only coarsely (sigmoid outputs at 0.5 +- 1e-3 to float32:
#: 170x; the tolerances' slack covers less).
STRETCH_LIMIT = 10.0

#: HiGHS primal and dual feasibility tolerance, on data scaled to max |y| = 1.
LP_TOL = 1e-9

#: The misfit norms of the noisy fits.
NORMS: tuple[str, ...] = ("linf", "l1", "l2")

#: A noisy estimate is consistent when ||G(z_hat) - x|| <= CONSISTENCY * noise_level.
CONSISTENCY = 3.0

#: Samples per piece of the forward pass that measures the residuals.
RESIDUAL_ROWS = 1024

#: fn over items, possibly in threads (`preimage.methods.batched.context.Context.map`).
PoolMap = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]
#: ``progress(done, total)``: samples finished so far.
ProgressCallback = Callable[[int, int], None]


def check_noise(noise: Any, noise_level: Any) -> float | None:
    """Validate a noise model; returns the level as a float (or None)."""
    check_choice(noise, "noise", NORMS, optional=True)
    if noise_level is None:
        return None
    if noise is None:
        raise ValueError(
            "`noise_level` needs a noise model: pass noise='linf', 'l1' or 'l2' (the norm the "
            "level is measured in)."
        )
    return check_positive(noise_level, "noise_level", allow_zero=True)


def vector_norm(v: np.ndarray, norm: str | None) -> np.ndarray:
    """Norm of each row of v (B, n): "linf", "l1", or "l2" (also for None)."""
    if norm == "linf":
        return np.max(np.abs(v), axis=-1, initial=0.0)
    if norm == "l1":
        return np.sum(np.abs(v), axis=-1)
    return np.linalg.norm(v, axis=-1)


def relative_residual(fx: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """|G(z) - x|_inf / max(|x|_inf, tiny), row by row (NaN rows stay NaN)."""
    scale = np.maximum(np.max(np.abs(xb), axis=-1), 1e-300)
    return np.max(np.abs(fx - xb), axis=-1) / scale


def consistent_misfit(noise_level: float, x: np.ndarray, norm: str | None) -> float:
    """The largest misfit consistent with the noise level: CONSISTENCY times it, plus
    the LPs' rounding (LP_TOL relative to ||x||), so that noise_level = 0 works."""
    return CONSISTENCY * noise_level + LP_TOL * float(vector_norm(np.asarray(x), norm))


def estimate_status(
    residual: np.ndarray,
    misfit: np.ndarray,
    yb: np.ndarray,
    *,
    noise: str | None,
    noise_level: float | None,
    success_rtol: float,
) -> np.ndarray:
    """"feasible" / "failed" for an estimate, by the rule of the noise model.

    No noise model: feasible when the relative residual is at most `success_rtol`
    (z is a preimage up to rounding). A noise model without a level: feasible
    wherever z is finite. With a level: feasible when the misfit is consistent
    with it (`consistent_misfit`, per row of the observations yb).
    """
    finite = np.isfinite(misfit)
    if noise is None:
        ok = finite & (residual <= success_rtol)
    elif noise_level is None:
        ok = finite
    else:
        limit = np.array([consistent_misfit(noise_level, y, noise) for y in yb])
        ok = finite & (misfit <= limit)
    return np.where(ok, "feasible", "failed").astype(object)


def estimate_rule(
    yb: np.ndarray, noise: str | None, noise_level: float | None, success_rtol: float
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """`estimate_status` as the status rule of `build_result` for the observations yb."""

    def rule(residual: np.ndarray, misfit: np.ndarray) -> np.ndarray:
        return estimate_status(
            residual, misfit, yb, noise=noise, noise_level=noise_level, success_rtol=success_rtol
        )

    return rule


# --- time budgets and failures of one sample -----------------------------------------

#: Every message of a sample cut short by a call's time limit contains this phrase.
OUT_OF_TIME = "out of time"


@dataclass(frozen=True)
class Deadline:
    """When a call's time budget ends: ``invert(..., time_limit=seconds)``.

    ``at`` is a `time.perf_counter()` value (inf: no limit), ``seconds`` the
    budget as given (for messages). Built once where the call starts and
    passed down, so every step below shares one clock: a method takes
    ``time_limit`` as seconds or as a Deadline (`Deadline.of`).
    """

    at: float = math.inf
    seconds: float = math.inf

    @classmethod
    def of(cls, time_limit: float | Deadline | None, name: str = "time_limit") -> Deadline:
        """A Deadline from seconds from now (>= 0), an existing Deadline, or None (none)."""
        if isinstance(time_limit, Deadline):
            return time_limit
        if time_limit is None:
            return cls()
        if isinstance(time_limit, bool):
            raise TypeError(f"`{name}` must be a number of seconds; got {time_limit!r}.")
        seconds = check_positive(time_limit, name, allow_zero=True)
        return cls(time.perf_counter() + seconds, seconds)

    @property
    def limited(self) -> bool:
        return math.isfinite(self.at)

    def remaining(self) -> float:
        """Seconds left (inf without a limit, 0 once past it)."""
        return max(0.0, self.at - time.perf_counter()) if self.limited else math.inf

    def expired(self) -> bool:
        return self.limited and time.perf_counter() >= self.at

    def within(self, seconds: float) -> float:
        """The `time.perf_counter()` deadline of a step allowed `seconds` of its own: the
        earlier of that and this one."""
        return min(self.at, time.perf_counter() + seconds)

    def note(self) -> str:
        """What a message says of a sample the limit cut short."""
        return f"{OUT_OF_TIME}: the call's time_limit of {self.seconds:g} s ran out"


@dataclass(frozen=True)
class SampleFailure:
    """A sample without an answer from its own work: that work raised, or the call's time
    ran out before it started. ``message`` says which (the error's type, text and
    place)."""

    message: str

    @classmethod
    def from_error(cls, exc: BaseException) -> SampleFailure:
        text = (str(exc).splitlines() or [""])[0][:300]
        frames = traceback.extract_tb(exc.__traceback__)
        place = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        return cls(f"error: the solver raised {type(exc).__name__}{place}: {text}")


T = TypeVar("T")


def isolated(fn: Callable[[Any], T]) -> Callable[[Any], T | SampleFailure]:
    """fn, with an exception it raises returned as a `SampleFailure` (one sample's work:
    its failure never costs the other samples their results)."""

    def run(item: Any) -> T | SampleFailure:
        try:
            return fn(item)
        except Exception as exc:  # any error of one sample's solve: reported, not raised
            return SampleFailure.from_error(exc)

    return run


def per_sample(
    fn: Callable[[int], T],
    samples: Sequence[int] | int,
    *,
    deadline: Deadline | None = None,
    progress: ProgressCallback | None = None,
) -> list[T | SampleFailure]:
    """fn(b) for each sample b, in turn: where every method hands out its samples.

    Each call is `isolated`; once `deadline` has passed, the samples not started
    get a `SampleFailure` saying so (those finished keep their results).
    ``progress(done, total)`` after each. ``samples``: indices, or a count.
    """
    items = list(range(samples)) if isinstance(samples, int) else list(samples)
    run = isolated(fn)
    out: list[T | SampleFailure] = []
    for done, b in enumerate(items, start=1):
        if deadline is not None and deadline.expired():
            out.append(SampleFailure(f"{deadline.note()} before this sample was started"))
        else:
            out.append(run(b))
        if progress is not None:
            progress(done, len(items))
    return out


@dataclass
class LayerResult:
    """The outcome of inverting one layer for one sample.

    Attributes
    ----------
    h : ndarray of shape (n,)
        The chosen preimage (NaN when infeasible or failed).
    status : one of STATUSES
        "unique": h is proved to be the only preimage; "non_unique": `witness`
        is a second one; "feasible": h is a preimage, uniqueness unsettled;
        "infeasible": y has no preimage under this layer; "failed": the
        solver gave no usable answer (see `message`).
    message : str
    n_active : number of units taken as equalities
    rank : rank of W_A
    sigma_min : smallest nonzero singular value of W_A (for error bounds)
    residual : |act(W h + b) - y|_inf (NaN when there is no h)
    used_lp : whether an LP was solved (the rank-deficient case)
    witness : ndarray of shape (n,) or None
    time : seconds spent
    misfit : where infeasible, the smallest |act(W h + b) - y|_inf over the layer's
        input domain that an LP found (the distance of y from the layer's range,
        absolute); NaN otherwise
    """

    h: np.ndarray
    status: str
    message: str
    n_active: int
    rank: int
    sigma_min: float
    residual: float
    used_lp: bool = False
    witness: np.ndarray | None = None
    time: float = 0.0
    misfit: float = np.nan
    tol: float = field(default=0.0, repr=False)
    #: a curved activation's outputs fixed the targets only coarsely (their rounding set
    #: the tolerance, `preimage.solvers.layer.active_set`): h is known to that only
    stretched: bool = field(default=False, repr=False)

    @classmethod
    def failed(cls, width: int, message: str) -> LayerResult:
        """A layer of width `width` (its input's) that gave no answer, for `message`."""
        return cls(np.full(width, np.nan), "failed", message, n_active=-1, rank=-1,
                   sigma_min=np.nan, residual=np.nan)


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
    "misfit": (np.nan, float),
}


@dataclass(frozen=True)
class SearchOutcome:
    """What a search below a non-unique layer found for one sample.

    z: a checked preimage or None; verdict: "unique" / "non_unique" / "feasible"
    (with z), "infeasible" (proved: none in the domain) or "none"; witness: a
    second preimage where non_unique.
    """

    z: np.ndarray | None
    verdict: str
    witness: np.ndarray | None
    message: str
    #: the z a global search's proof covers (`preimage.solvers.relaxation.Domain.describe`)
    domain: str | None = None
    #: the search ran out of its time budget
    out_of_time: bool = False


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
    #: the layer LP's optimal misfit (exact method: the distance from the range
    #: where "infeasible", NaN elsewhere),
    misfit: np.ndarray
    # Noisy inversion only (None otherwise), arrays of shape (B,):
    #: the on/off threshold used,
    tau: np.ndarray | None = None
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

    Every per-sample field is an array over the batch when the caller passed a
    batch x of shape (B, n), and a scalar (or a (k,) vector) when one sample x
    of shape (n,).

    Attributes
    ----------
    z : ndarray of shape (B, k) or (k,)
        The recovered codes (NaN rows where no preimage was found).
    status : ndarray of str of shape (B,), or str
        One of "unique", "non_unique", "feasible", "infeasible", "failed".
    success : ndarray of bool (B,), or bool
        True where z is an answer (unique, non_unique or feasible).
    residual : ndarray (B,), or float
        |G(z) - x|_inf / max(|x|_inf, tiny): relative misfit of the answer (NaN without z).
    witness : ndarray like z
        A second preimage z' != z where status is "non_unique", else NaN.
    message : ndarray of str of shape (B,), or str
        Why each sample ended as it did.
    layers : tuple of LayerReport
        Per-layer diagnostics, `layers[i]` for network layer i (0 = latent side).
    method : str
        The method that ran: "exact" (method="layerwise" without noise is the same
        method), "noisy", "descent", "pgd", "adam", "clipping", "negation", "hybrid"
        or "global".
    rtol : float
    time : float
        Wall-clock seconds for the whole call.
    misfit : ndarray (B,), or float
        ||G(z) - x|| in the noise norm (l_2 when there is none), on the observed
        coordinates or the measurements. Without z: where "infeasible", the
        distance that proved it (the smallest l_inf misfit an LP found at the
        layer that has no preimage), else inf.
    z_error_bound : ndarray (B,), or float
        A proved bound on ||z - z_true||_2 (inf where none was computed: it needs
        a noise level, see `preimage.methods.noisy`).
    steps : ndarray of int (B,), or int
        Iterations taken (LP solves, gradient steps, PGD iterations).
    noise : str or None
        The noise model ("linf", "l1", "l2") the result was computed under.
    local_minimum : ndarray of bool (B,), or bool, or None
        The cell descent (`preimage.methods.descent`): z is a certified local
        minimum of the misfit (no tight wall, or every cell around z tried,
        none fitting better). None for the other methods.
    tight_walls : ndarray of int (B,), or int, or None
        The cell descent: walls tight at z (units with pre-activation 0).
    proof_domain : ndarray of str (B,), or str, or None
        The global search (`preimage.solvers.exhaustive`): the z its verdict holds for
        ("every z" where the data bound the domain; a box |z_j| <= R on the coordinates
        they do not bound); "" for samples it did not run on. None for other methods.
    out_of_time : ndarray of bool (B,), or bool, or None
        The global search ran out of its time budget on the sample (which keeps its best
        z and, for a projection, the bound reached).
    misfit_bound : ndarray (B,), or float, or None
        The global projection: a proved lower bound of ||G(z) - x|| over the z of
        ``proof_domain`` (the gap is misfit - misfit_bound; with a box, a z beyond it
        may fit better).
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
    local_minimum: Any = None
    tight_walls: Any = None
    proof_domain: Any = None
    out_of_time: Any = None
    misfit_bound: Any = None

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


def build_result(
    net: Network,
    observed: np.ndarray,
    z: np.ndarray,
    status: Any,
    messages: Sequence[str],
    *,
    method: str,
    rtol: float,
    elapsed: float,
    single: bool,
    measure: Callable[[np.ndarray], np.ndarray] | None = None,
    noise: str | None = None,
    layers: tuple[LayerReport, ...] = (),
    witness: np.ndarray | None = None,
    z_error_bound: np.ndarray | None = None,
    steps: np.ndarray | None = None,
    distance: np.ndarray | None = None,
    pool_map: PoolMap | None = None,
    chunk: int | None = None,
) -> InversionResult:
    """The `InversionResult` of every method, from per-sample arrays of length B.

    Measures each answer: residual and misfit of measure(G(z)) against the
    observations `observed` (B, m) (`measure`: the measurement applied to G(z),
    identity by default), in pieces of RESIDUAL_ROWS samples (arrays of a few
    MB reuse freed memory, where one (B, m) array at a time touches new pages:
    measured 5x slower), over `pool_map` when given (the batched path's
    threads, one BLAS thread each), in turn otherwise. `status` is an array of
    statuses, or a rule ``status(residual, misfit) -> statuses`` applied to the
    measured answers (the estimating methods). `distance`: the misfit of the
    samples without z (a proved distance from the range), inf by default.
    `chunk`: the pieces never straddle a multiple of it, so each chunk of that
    many samples is measured exactly as if it had been inverted alone (the
    rounding of a matrix product depends on its rows: the batched methods
    invert a batch chunk by chunk, and `combine_results` of their chunks is
    then bit for bit the result of the whole batch).
    """
    batch = z.shape[0]
    residual = np.full(batch, np.nan)
    misfit = np.full(batch, np.inf)
    done = np.flatnonzero(np.all(np.isfinite(z), axis=1))

    def measure_part(part: np.ndarray) -> None:
        pred = net.apply(z[part])
        if measure is not None:
            pred = measure(pred)
        residual[part] = relative_residual(pred, observed[part])
        misfit[part] = vector_norm(pred - observed[part], noise)

    step = batch if chunk is None else max(1, int(chunk))
    parts = []
    for first in range(0, batch, step):
        lo, hi = np.searchsorted(done, [first, first + step])
        parts += [done[a : min(hi, a + RESIDUAL_ROWS)] for a in range(lo, hi, RESIDUAL_ROWS)]
    if pool_map is None:
        for part in parts:
            measure_part(part)
    else:
        pool_map(measure_part, parts)
    if distance is not None:
        missing = ~np.isin(np.arange(batch), done)
        misfit[missing] = np.where(np.isnan(distance[missing]), np.inf, distance[missing])
    status = np.asarray(status(residual, misfit) if callable(status) else status, dtype=object)
    success = np.isin(status, SUCCESS)
    witness = np.full_like(z, np.nan) if witness is None else np.asarray(witness)
    bound = np.full(batch, np.inf) if z_error_bound is None else np.asarray(z_error_bound, float)
    steps = np.zeros(batch, dtype=int) if steps is None else np.asarray(steps, dtype=int)
    message = np.array(list(messages), dtype=object)
    if single:
        return InversionResult(
            z[0], str(status[0]), bool(success[0]), float(residual[0]), witness[0],
            str(message[0]), layers, method, rtol, elapsed, misfit=float(misfit[0]),
            z_error_bound=float(bound[0]), steps=int(steps[0]), noise=noise,
        )
    return InversionResult(
        z, status, success, residual, witness, message, layers, method, rtol, elapsed,
        misfit=misfit, z_error_bound=bound, steps=steps, noise=noise,
    )


#: The fields of an `InversionResult` that describe the whole call, not one sample.
RUN_FIELDS: tuple[str, ...] = ("layers", "method", "rtol", "time", "noise")


def _concatenate(name: str, values: Sequence[Any]) -> Any:
    """One per-sample field over consecutive batches: None in all of them, or arrays."""
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise ValueError(f"`{name}` is set in some of the results and not in others.")
    arrays = [np.asarray(v) for v in values]
    if any(a.ndim == 0 for a in arrays):
        raise ValueError(
            f"`{name}` is a scalar: only results over batches (x of shape (B, n)) combine."
        )
    return np.concatenate(arrays, axis=0)


def _spread(column: np.ndarray, kept: np.ndarray, missing: Any = None) -> np.ndarray:
    """(B, ...) from the rows of `column` for kept samples; `missing` (by dtype when None:
    NaN, False, -1, "") in the others."""
    if column.dtype.kind == "U":  # (fixed-width strings would cut the messages written)
        column = column.astype(object)
    if missing is None:
        kind = column.dtype.kind
        missing = {"f": np.nan, "c": np.nan, "b": False, "i": -1, "u": 0}.get(kind, "")
    out = np.full((kept.size, *column.shape[1:]), missing, dtype=column.dtype)
    out[kept] = column[: int(kept.sum())]
    return out


def with_unread_samples(result: InversionResult, kept: np.ndarray,
                        message: str | Sequence[str]) -> InversionResult:
    """The result over a batch of which only the samples ``kept`` (bool (B,)) were inverted
    (`result` is theirs, a batch result; where none is kept, any batch result, for its
    layout): the others "failed" with `message` (one, or one each, in order) and no z."""
    kept = np.asarray(kept, dtype=bool)
    samples: dict[str, Any] = {}
    for f in dataclasses.fields(InversionResult):
        value = getattr(result, f.name)
        if f.name in RUN_FIELDS or value is None:
            continue
        samples[f.name] = _spread(np.asarray(value), kept)
    samples["status"][~kept] = "failed"
    samples["message"][~kept] = message if isinstance(message, str) else list(message)
    layers = tuple(
        dataclasses.replace(report, **{
            f.name: _spread(getattr(report, f.name), kept,
                            REPORT_FIELDS.get(f.name, (None,))[0])
            for f in dataclasses.fields(LayerReport)
            if f.name != "index" and getattr(report, f.name) is not None})
        for report in result.layers
    )
    return dataclasses.replace(result, layers=layers, **samples)


def combine_results(parts: Sequence[InversionResult]) -> InversionResult:
    """The result over consecutive batches x_1, ..., x_c, from their results in order.

    Per-sample fields (arrays over each batch) are concatenated, as are the
    per-layer fields of `layers`; ``method``, ``rtol`` and ``noise`` must agree;
    ``time`` is the sum of the parts' (the compute time). Where every part is
    a chunk of the batched exact method (``batch_size`` samples each, the last
    one shorter), the combined result is that of the whole batch, bit for bit
    in every field but the timings (`build_result`'s ``chunk``).
    """
    parts = list(parts)
    if not parts:
        raise ValueError("`parts` must hold at least one InversionResult.")
    first = parts[0]
    for name in ("method", "rtol", "noise"):
        values = {getattr(p, name) for p in parts}
        if len(values) > 1:
            raise ValueError(f"The results differ in `{name}` ({sorted(map(str, values))}).")
    if len({len(p.layers) for p in parts}) > 1:
        raise ValueError("The results have different numbers of layers.")
    layers = []
    for i, report in enumerate(first.layers):
        reports = [p.layers[i] for p in parts]
        if len({r.index for r in reports}) > 1:
            raise ValueError(f"The results' layer {i} reports are of different layers.")
        columns = {
            f.name: _concatenate(f"layers[{i}].{f.name}", [getattr(r, f.name) for r in reports])
            for f in dataclasses.fields(LayerReport) if f.name != "index"
        }
        layers.append(LayerReport(index=report.index, **columns))
    samples = {
        f.name: _concatenate(f.name, [getattr(p, f.name) for p in parts])
        for f in dataclasses.fields(InversionResult) if f.name not in RUN_FIELDS
    }
    return InversionResult(
        layers=tuple(layers), method=first.method, rtol=first.rtol,
        time=float(sum(p.time for p in parts)), noise=first.noise, **samples,
    )
