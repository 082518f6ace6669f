"""`preimage.invert`: one entry point, its validation and one routing table.

`invert` validates the network, the method name and the shared arguments,
picks the route of `ROUTES` that fits (method, noise, observe, A) and calls its
function. Every shared argument a route does not use, when passed, raises a
TypeError naming the argument and the method (as unknown ``options`` do):
nothing is silently ignored.

| route | when | runs |
| --- | --- | --- |
| exact | "exact" / "layerwise", x fully observed, no noise, no A | `layerwise.invert_exact` |
| descent | "exact" with ``noise`` (piecewise-linear nets; A, observe too) | `descent.project` |
| noisy | "layerwise" with ``noise`` ("exact" on smooth outputs) | `noisy.invert_noisy` |
| partial | "exact", ``observe``, no noise | `partial.invert_observed` |
| pgd | "exact" with ``A``, no noise | `sensing.pgd_invert` |
| gradient | "adam", "clipping", "negation" | `gradient.gradient_invert` |
| hybrid | "hybrid" | `hybrid.hybrid_invert` |
| global | "global" (exact data, or ``noise`` "linf" / "l1") | `global_search.invert_global` |

(functions of `preimage.methods`)

With ``observe`` and any other method (or a noise model), the route is taken
on the network restricted to the observed rows (`partial.restrict_output`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from preimage.methods.descent import project
from preimage.methods.global_search import invert_global
from preimage.methods.gradient import VARIANTS, gradient_invert
from preimage.methods.hybrid import hybrid_invert
from preimage.methods.layerwise import invert_exact, layerwise_obstacle
from preimage.methods.noisy import invert_noisy
from preimage.methods.partial import invert_observed, observed_values, restrict_output
from preimage.methods.search import GlobalSettings
from preimage.methods.sensing import pgd_invert
from preimage.model.network import Network, flatten_samples
from preimage.model.operators import Mask, as_mask, as_measurement
from preimage.model.torch_io import default_device
from preimage.model.validation import (
    check_callback,
    check_choice,
    check_count,
    check_device,
    check_observation,
    check_rtol,
    input_precision,
)
from preimage.results import (
    Deadline,
    InversionResult,
    ProgressCallback,
    check_noise,
    default_rtol,
)
from preimage.solvers.cell import piecewise_linear

#: The methods `invert` accepts.
METHODS: tuple[str, ...] = ("exact", "layerwise", *VARIANTS, "hybrid", "global")

#: The arguments of `invert` that some routes take and others do not.
SHARED: tuple[str, ...] = (
    "rtol", "fallback", "batched", "batch_size", "device", "n_jobs", "time_limit",
)


@dataclass(frozen=True)
class Route:
    """How one kind of call runs: its function and the shared arguments it takes."""

    function: Callable[..., InversionResult]
    takes: frozenset[str]


ROUTES: dict[str, Route] = {
    "exact": Route(invert_exact, frozenset(SHARED)),
    "noisy": Route(invert_noisy, frozenset({"rtol", "time_limit"})),
    "descent": Route(project, frozenset({"device", "time_limit"})),
    "partial": Route(invert_observed, frozenset(SHARED)),
    "pgd": Route(pgd_invert, frozenset({"rtol", "time_limit"})),
    "gradient": Route(gradient_invert, frozenset({"device", "time_limit"})),
    "hybrid": Route(hybrid_invert, frozenset({"rtol", "fallback", "device", "time_limit"})),
    "global": Route(invert_global, frozenset({"rtol", "fallback", "time_limit"})),
}


def _route(method: str, noise: str | None, observe: Any, A: Any, net: Network) -> str:
    if method in VARIANTS:
        return "gradient"
    if method in ("hybrid", "global"):
        return method
    if noise is not None and method == "exact" and piecewise_linear(net, output=True):
        return "descent"  # the projection onto the range, end to end
    if A is not None:
        return "pgd"
    if noise is not None:
        return "noisy"
    return "partial" if observe is not None else "exact"


def route_arguments(
    net: Network, *, method: str = "exact", noise: str | None = None, observe: Any = None,
    A: Any = None,
) -> frozenset[str]:
    """The shared arguments (`SHARED`) that `invert` takes with these settings.

    E.g. whether ``batch_size`` sets the chunks of the batched exact method
    (`preimage.jobs` streams in chunks of that size).
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")
    return ROUTES[_route(method, noise, observe, A, net)].takes


def _call(route: str, label: str, shared: dict[str, Any], options: Mapping[str, Any],
          *args: Any, **kwargs: Any) -> InversionResult:
    """The route's function on args, with the shared arguments it takes and ``options``.

    A shared argument the route does not take, or an option the function does
    not have, raises a TypeError naming it.
    """
    spec = ROUTES[route]
    fn = spec.function
    unused = sorted(name for name, value in shared.items() if value is not None
                    and name not in spec.takes)
    if unused:
        raise TypeError(
            f"{', '.join(f'`{u}`' for u in unused)} "
            f"{'is' if len(unused) == 1 else 'are'} not used by method {label!r} here "
            f"({fn.__module__}.{fn.__name__}); it takes {sorted(spec.takes) or 'none of'} "
            f"of {list(SHARED)}."
        )
    params = inspect.signature(fn).parameters
    accepted = {
        name for name, p in params.items()
        if p.kind is p.KEYWORD_ONLY and name not in (*SHARED, *kwargs)
    }
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(options) - accepted) if not open_ended else [
        name for name in options if name in kwargs or name in SHARED
    ]
    if unknown:
        takes = f"it takes {sorted(accepted)}" if accepted else "it takes no options"
        raise TypeError(
            f"`options` {unknown} are not settings of method {label!r} "
            f"({fn.__module__}.{fn.__name__}); {takes}."
        )
    given = {name: value for name, value in shared.items() if value is not None}
    return fn(*args, **kwargs, **given, **options)


def invert(
    net: Network,
    x: Any,
    *,
    method: str = "exact",
    rtol: float | None = None,
    fallback: GlobalSettings | None = None,
    progress: ProgressCallback | None = None,
    batched: bool | None = None,
    batch_size: int | None = None,
    device: Any = None,
    n_jobs: int | None = None,
    noise: str | None = None,
    noise_level: float | None = None,
    observe: Any = None,
    A: Any = None,
    options: dict[str, Any] | None = None,
    time_limit: float | None = None,
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
    method : "exact", "layerwise", "adam", "clipping", "negation", "hybrid" or "global"
        "exact": the layer-wise LP method of Lei et al. (2019); with ``noise``:
        the projection onto the range by the cell descent, end to end
        (`preimage.methods.descent`); with ``A`` and no noise: projected
        gradient descent with the LP inversion as projection
        (`preimage.methods.sensing`). "layerwise" with ``noise``: the paper's
        error-bounded per-layer noisy LPs (`preimage.methods.noisy`). The
        others are the gradient baselines of `preimage.methods.gradient` and
        the hybrid of `preimage.methods.hybrid`. "global": every sample settled for
        certain on small ReLU networks (`preimage.methods.global_search`): unique,
        a second preimage, or none; with ``noise`` "linf" / "l1" the proved global
        minimum of the misfit (``misfit_bound``); ``fallback.seconds`` per sample.
    rtol : float, optional
        Relative tolerance for the activation threshold and the checks (see
        `preimage.solvers.layer`). Default by the less precise of x and the
        network's weights (`preimage.results.DEFAULT_RTOL`): 1e-9 for float64,
        1e-5 for float32, 1e-3 for float16, 1e-2 for bfloat16. A float64 x that
        was computed in float32 needs ``rtol=1e-5``: otherwise its rounding
        errors make it "infeasible". It must lie between the machine epsilon of
        x's dtype and 0.1 (`preimage.model.validation.check_rtol`).
        Exact, noisy, partial, PGD, hybrid and global routes.
    fallback : GlobalSettings, optional
        The search below the first non-unique layer for samples the layer-wise
        method leaves "failed" or "feasible" (`preimage.methods.search`): by
        default the global search of `preimage.solvers.exhaustive` (ReLU layers
        below, at most ``max_binaries`` units: unique / non_unique / infeasible,
        proved; ``seconds`` per sample), the cell search with
        ``GlobalSettings(search="cells")`` or where the global one cannot run,
        nothing with ``GlobalSettings(enabled=False)``. Exact, partial, hybrid
        and global routes.
    progress : callable(done, total), optional
        Called as samples finish (after each chunk when batched, after each
        sample otherwise; the gradient methods report the batch's share of
        their steps, in samples).
    batched : bool, default True
        Solve the samples together (`preimage.methods.batched`): the samples
        whose active rows have full column rank are solved and checked in
        batch, with PyTorch, and only the others go through `invert_layer` (the
        LP), in parallel. The verdicts are the same as with ``batched=False``,
        which inverts one sample at a time through `invert_layer` (the
        reference). Where the batched path solved a layer,
        ``layers[i].sigma_min`` is NaN. Exact and partial routes, as are
        ``batch_size`` (samples per chunk; default: a 128 MiB working-memory
        budget), ``device`` (torch device; default CUDA when available; also
        the gradient and hybrid routes) and ``n_jobs`` (threads for the LPs and
        CPU solves; default the CPUs this process may use; the answers do not
        depend on it).
    noise : "linf", "l1" or "l2", optional
        x = G(z) + e: fit in this norm instead of solving G(z) = x exactly.
        Noisy results are estimates: "feasible" or "failed", never "unique".
    noise_level : float >= 0, optional
        A known bound ||e||_noise <= noise_level: the result then carries proved
        error bounds (``z_error_bound``, ``layers[i].error_bound``) and is
        "feasible" only when its misfit is consistent with the level.
    observe : bool array of shape (n,) or `Mask`, optional
        Only these output coordinates are seen (inpainting).
    A : array of shape (m, n) or a measurement, optional
        x = A G(z) + e (compressed sensing), e.g. `GaussianMatrix(m, n)`.
    options : dict, optional
        Settings of the method, passed as keyword arguments to the function
        that runs it (module docstring), e.g. ``{"steps": 300, "restarts": 5}``
        for "adam". Unknown names raise a TypeError listing the valid ones.
    time_limit : float >= 0, optional
        Seconds for the whole call (every route; torch's one-time import by the first
        call of a process comes before it). Past it no new sample (batched:
        chunk) starts and the searches stop; a sample cut short ends with its best
        estimate ("failed" where it has none) and "out of time" in its message,
        and every sample finished before keeps its result. The searches' own
        per-sample budgets: ``GlobalSettings(seconds=..., time_limit=...)``, and
        the option ``seconds`` of the descent, partial, PGD and hybrid routes.

    A sample whose solver raises ends "failed" with the error in its message;
    the other samples keep their answers.

    Returns
    -------
    InversionResult
        Per-sample fields are arrays over the batch for x of shape (B, n),
        scalars for x of shape (n,). ``method`` names the method that ran.
    """
    # torch is imported on first use (1-1.4 s, once a process): before the clock starts, or
    # the first call spent a budget of 0.5 s on it and answered every sample "out of time".
    default_device()
    deadline = Deadline.of(time_limit)  # then: validation counts against the budget
    if not isinstance(net, Network):
        raise TypeError(f"`net` must be a preimage.Network; got {type(net).__name__}.")
    check_choice(method, "method", METHODS)
    level = check_noise(noise, noise_level)
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(
            f"`options` must be a dict of method settings; got {type(options).__name__}."
        )
    if rtol is not None:
        rtol = check_rtol(rtol, input_precision(x))
    if batch_size is not None:
        batch_size = check_count(batch_size, "batch_size", 1)
    device = check_device(device)
    if n_jobs is not None:
        n_jobs = check_count(n_jobs, "n_jobs", 1)
    if batched is not None and not isinstance(batched, (bool, np.bool_)):
        raise TypeError(f"`batched` must be True or False; got {batched!r:.40}.")
    check_callback(progress, "progress")
    if fallback is not None and not isinstance(fallback, GlobalSettings):
        raise TypeError(f"`fallback` must be a GlobalSettings; got {type(fallback).__name__}.")
    if observe is not None and A is not None:
        raise ValueError("Pass either `observe` (a mask) or `A` (a measurement matrix), not both.")
    if isinstance(A, Mask):
        observe, A = A, None
    shared = {"rtol": rtol, "fallback": fallback, "batched": batched, "batch_size": batch_size,
              "device": device, "n_jobs": n_jobs,
              "time_limit": deadline if time_limit is not None else None}
    model = net
    x = flatten_samples(x, net.output_shape, "x")
    route = _route(method, noise, observe, A, net)
    if observe is not None:
        mask = as_mask(flatten_samples(observe, net.output_shape, "observe"), net.output_dim)
        sub = restrict_output(net, mask)
        if route == "partial" and layerwise_obstacle(sub) is None:
            return _shaped(model, _call(route, method, shared, options, net, x, mask,
                                        progress=progress))
        yb, single = observed_values(x, mask)
        net, x = sub, yb[0] if single else yb
        route = "exact" if route == "partial" else route
    obstacle = (layerwise_obstacle(net) if method in ("exact", "layerwise")
                and route not in ("descent", "gradient", "hybrid") else None)
    if obstacle is not None:
        # The layer-wise method cannot run here (a contracting image generator): the
        # hybrid searches instead, and its messages say why.
        shared = {name: value for name, value in shared.items()
                  if name in ROUTES["hybrid"].takes}
        extra = {"A": as_measurement(A, net.output_dim)} if A is not None else {}
        return _shaped(model, _call("hybrid", method, shared, options, net, x, noise=noise,
                                    noise_level=level, progress=progress, reason=obstacle,
                                    **extra))
    return _shaped(model, _run(route, method, shared, options, net, x, noise, level, A, progress))


def _run(route: str, method: str, shared: dict[str, Any], options: Mapping[str, Any],
         net: Network, x: Any, noise: str | None, level: float | None, A: Any,
         progress: ProgressCallback | None) -> InversionResult:
    """The route on observations of the (restricted) network's flat output."""
    if route == "exact":
        xb, single = check_observation(x, net.output_dim)
        if shared["rtol"] is None:
            shared["rtol"] = default_rtol(net, x)
        return _call(route, method, shared, options, net, xb, single=single, progress=progress)
    if route == "noisy":
        return _call(route, method, shared, options, net, x, norm=noise, noise_level=level,
                     progress=progress)
    if route == "descent":
        extra = {"A": as_measurement(A, net.output_dim)} if A is not None else {}
        return _call(route, method, shared, options, net, x, norm=noise, noise_level=level,
                     progress=progress, **extra)
    if route == "pgd":
        meas = as_measurement(A, net.output_dim)
        return _call(route, method, shared, options, net, x, meas, noise=noise,
                     noise_level=level, progress=progress)
    extra: dict[str, Any] = {"method": method} if route == "gradient" else {}
    if A is not None:
        extra["A"] = as_measurement(A, net.output_dim)
    return _call(route, method, shared, options, net, x, noise=noise, noise_level=level,
                 progress=progress, **extra)


def _shaped(net: Network, result: InversionResult) -> InversionResult:
    """The result's codes in the model's own input shape ((B, nz, 1, 1) for a DCGAN)."""
    if len(net.input_shape) > 1:
        result.z = net.shape_codes(result.z)
        result.witness = net.shape_codes(result.witness)
    return result
