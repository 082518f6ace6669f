"""Partial observations (inpainting): only the coordinates in a mask are seen.

The exact method needs no new theory: an unobserved output unit carries no
constraint, neither an equality (active) nor an inequality (inactive). So the
inversion of y = G(z)[mask] is the inversion of the network whose last layer
keeps only the observed rows (`restrict_output`), and everything else (the
per-layer LPs, the uniqueness certificate, the witness, the descent) is
`preimage.invert` unchanged.

With fewer observed rows the last layer is often rank deficient and its
preimage a polyhedron with many points; the descent passes one (the sparsest)
down and fails when that one is not in the range of the layers below. Then
`search_preimage` tries more candidates before giving up:

1. start points: the sparsest and the witness point of the top layer's
   polyhedron, each fitted down the layers below (`preimage.methods.noisy`), and the
   restarts of gradient descent on the observed pixels;
2. from each, `preimage.methods.search.cell_walk`: the LP of the start's
   activation cell, then neighbouring cells, until the observed misfit is 0
   (an exact preimage, checked by a forward pass) or the LP budget is spent.

A preimage found this way is reported "feasible": it reproduces every observed
coordinate, but other preimages may exist (with few observations they do).
Adding candidate generators (more polyhedron vertices, a mixed-integer
fallback) means adding start points to `candidate_starts`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from preimage.methods.gradient import latent_descent
from preimage.methods.layerwise import invert_exact
from preimage.methods.noisy import invert_noisy_one
from preimage.methods.search import GlobalSettings, cell_search
from preimage.model.layer import Layer
from preimage.model.network import Network
from preimage.model.operators import DenseOperator, Mask
from preimage.model.validation import (
    check_count,
    check_observation,
    check_positive,
    to_float_array,
)
from preimage.results import (
    Deadline,
    InversionResult,
    ProgressCallback,
    SampleFailure,
    build_result,
    default_rtol,
    per_sample,
)
from preimage.solvers.cell import piecewise_linear
from preimage.solvers.layer import invert_layer


def restrict_output(net: Network, mask: Mask) -> Network:
    """The network G(z)[mask]: the last layer with the observed rows only."""
    last = net.layers[-1]
    rows = np.flatnonzero(mask.observed)
    bias = None if last.bias is None else last.bias[rows]
    layer = Layer(DenseOperator(last.weight.rows(rows)), bias, last.activation)
    return Network((*net.layers[:-1], layer), source_dtype=net.source_dtype)


def observed_values(y: Any, mask: Mask) -> tuple[np.ndarray, bool]:
    """y on the observed coordinates as a (B, m) float64 copy, and whether one sample was given.

    Accepts either the full output, shape (n,) or (B, n), whose unobserved
    entries are ignored (they may be NaN), or the observed entries only, shape
    (m,) or (B, m).
    """
    m, n = mask.shape
    arr = to_float_array(y, "x")
    if arr.ndim in (1, 2) and arr.shape[-1] == n and n != m:
        arr = arr[..., mask.observed]
    elif arr.ndim in (1, 2) and arr.shape[-1] != m:
        raise ValueError(
            f"`x` has {arr.shape[-1]} entries per sample but `observe` has {n} coordinates, "
            f"{m} of them observed; pass shape ({n},) (unobserved entries ignored) or ({m},)."
        )
    return check_observation(arr, m)


def candidate_starts(
    net: Network, y: np.ndarray, *, restarts: int, steps: int, rtol: float, seed: int | None
) -> list[np.ndarray]:
    """Start points for `search_preimage` (module docstring), most promising first."""
    starts: list[np.ndarray] = []
    top = net.layers[-1]
    nonneg = net.input_nonnegative(len(net.layers) - 1)
    if len(net.layers) > 1 and not top.activation.is_bijective:
        below = net.below(len(net.layers) - 1)
        res = invert_layer(top, y, nonneg=nonneg, rtol=rtol)
        for h in (res.h, res.witness):
            if h is not None and np.all(np.isfinite(h)):
                z = invert_noisy_one(below, h, norm="linf", rtol=rtol).z
                if np.all(np.isfinite(z)):
                    starts.append(z)
    if restarts > 0:
        run = latent_descent(net, y[None], restarts=restarts, steps=steps, seed=seed)
        order = np.argsort(run.loss[:, 0])
        starts += [run.z[r, 0] for r in order]
    return starts


def search_preimage(
    net: Network,
    y: np.ndarray,
    *,
    restarts: int = 6,
    steps: int = 300,
    max_lps: int = 100,
    rtol: float = 1e-9,
    seed: int | None = 0,
    seconds: float = np.inf,
) -> tuple[np.ndarray | None, int, str]:
    """Look for an exact preimage of y (n,) from several start points.

    Parameters
    ----------
    net : Network
        Hidden activations ReLU, LeakyReLU or identity.
    y : ndarray of shape (n,)
    restarts, steps : gradient-descent start points and their Adam steps.
    max_lps : LP budget of each walk.
    rtol : relative tolerance: units with y_j <= rtol max|y| count as inactive, and
        the answer must reproduce y within 10 rtol (relative) in a forward pass
        (the walk itself aims at min(rtol, 1e-9)).
    seed : seed of the gradient-descent starts.
    seconds : time budget of the cell search.

    Returns
    -------
    (z or None, LPs solved, message)
    """
    if not piecewise_linear(net, output=False):
        return None, 0, "the cell search needs piecewise-linear hidden layers"
    scale = max(float(np.max(np.abs(y))), 1e-300)
    starts = candidate_starts(net, y, restarts=restarts, steps=steps, rtol=rtol, seed=seed)
    # Aim at the LPs' own precision; accept within the caller's tolerance.
    found = cell_search(
        net, y, starts, tau=rtol * scale, tolerance=10 * rtol * scale,
        target=min(rtol, 1e-9) * scale, walk_lps=max_lps, seconds=seconds,
    )
    if found.z is None:
        return None, found.n_lps, found.message
    return found.z, found.n_lps, (
        f"{found.message}; it reproduces every observed value, uniqueness unsettled"
    )


def invert_observed(
    net: Network,
    y: Any,
    mask: Mask,
    *,
    rtol: float | None = None,
    restarts: int = 6,
    steps: int = 300,
    max_lps: int = 100,
    seed: int | None = 0,
    seconds: float = np.inf,
    progress: ProgressCallback | None = None,
    fallback: GlobalSettings | None = None,
    batched: bool = True,
    batch_size: int | None = None,
    device: Any = None,
    n_jobs: int | None = None,
    time_limit: float | Deadline | None = None,
) -> InversionResult:
    """Exact inversion of y = G(z)[mask] (the `invert(..., observe=mask)` path).

    The layer-wise method on the restricted network (`restrict_output`;
    ``fallback``, ``batched``, ``batch_size``, ``device``, ``n_jobs`` as in
    `preimage.methods.layerwise.invert_exact`); where it
    ends "failed", `search_preimage` (``restarts``, ``steps``, ``max_lps``;
    ``max_lps=0`` turns it off), which accepts a z only when it reproduces y
    within 10 ``rtol`` relative (default by the precision of y: 1e-9 for
    float64, 1e-5 for float32). Samples it settles become "feasible". ``seconds``:
    the search's time budget per sample; ``time_limit`` (seconds or a
    `preimage.results.Deadline`): the whole call's, as in `invert_exact`, no
    search starting after it.

    Returns
    -------
    InversionResult (``misfit``: ||G(z)[mask] - y||_2, ``steps``: LPs of the search).
    """
    deadline = Deadline.of(time_limit)
    seconds = np.inf if seconds == np.inf else check_positive(seconds, "seconds", allow_zero=True)
    max_lps = check_count(max_lps, "max_lps", 0)
    sub = restrict_output(net, mask)
    yb, single = observed_values(y, mask)
    start = time.perf_counter()
    # The search's answers come from no layer-wise chain: accept them at the precision
    # of the observation itself (float64 data: 1e-9), not the model's.
    own_rtol = rtol if rtol is not None else default_rtol(net, y)
    res = invert_exact(
        sub, yb, single=False, rtol=own_rtol, fallback=fallback, progress=progress,
        batched=batched, batch_size=batch_size, device=device, n_jobs=n_jobs,
        time_limit=deadline,
    )
    z = np.array(res.z, copy=True)
    status = np.array(res.status, dtype=object)
    messages = list(res.message)
    steps_taken = np.array(res.steps, dtype=int)
    if max_lps > 0:
        failed = np.flatnonzero(status == "failed")
        searches = per_sample(
            lambda b: search_preimage(
                sub, yb[b], restarts=restarts, steps=steps, max_lps=max_lps, rtol=own_rtol,
                seed=seed, seconds=min(seconds, deadline.remaining()),
            ),
            failed, deadline=deadline,
        )
        for b, searched in zip(failed, searches, strict=True):
            if isinstance(searched, SampleFailure):
                messages[b] += f"; the search: {searched.message}"
                continue
            found, lps, why = searched
            steps_taken[b] += lps
            if found is None:
                messages[b] += f"; {why}" + (f" ({deadline.note()})" if deadline.expired() else "")
                continue
            z[b], status[b], messages[b] = found, "feasible", why
    return build_result(
        sub, yb, z, status, messages, method="exact", rtol=res.rtol,
        elapsed=time.perf_counter() - start, single=single, layers=res.layers,
        witness=res.witness, steps=steps_taken,
    )
