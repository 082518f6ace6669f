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
   polyhedron, each fitted down the layers below (`preimage.noisy`), and the
   restarts of gradient descent on the observed pixels;
2. from each, `preimage.patterns.pattern_walk`: the LP of the start's
   activation cell, then neighbouring cells, until the observed misfit is 0
   (an exact preimage, checked by a forward pass) or the LP budget is spent.

A preimage found this way is reported "feasible": it reproduces every observed
coordinate, but other preimages may exist (with few observations they do).
Adding candidate generators (more polyhedron vertices, a mixed-integer
fallback) means adding start points to `candidate_starts`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from preimage._results import build_result
from preimage._validation import _to_float_array, check_observation, input_precision
from preimage.invert import DEFAULT_RTOL, InversionResult, invert
from preimage.layer_inversion import invert_layer
from preimage.measurements import Mask
from preimage.network import Layer, Network
from preimage.noisy import invert_noisy_one
from preimage.operators import DenseOperator
from preimage.patterns import pattern_walk, supports_patterns


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
    arr = _to_float_array(y, "x")
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
    from preimage.baselines import latent_descent

    starts: list[np.ndarray] = []
    top = net.layers[-1]
    nonneg = len(net.layers) > 1 and net.layers[-2].activation.output_nonnegative
    if len(net.layers) > 1 and not top.activation.is_bijective:
        below = Network(net.layers[:-1], source_dtype=net.source_dtype)
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

    Returns
    -------
    (z or None, LPs solved, message)
    """
    if not supports_patterns(net, output=False):
        return None, 0, "the cell search needs piecewise-linear hidden layers"
    scale = max(float(np.max(np.abs(y))), 1e-300)
    lps = 0
    starts = candidate_starts(net, y, restarts=restarts, steps=steps, rtol=rtol, seed=seed)
    for i, z0 in enumerate(starts):
        # Aim at the LPs' own precision; accept within the caller's tolerance.
        fit = pattern_walk(
            net, y, z0, norm="linf", tau=rtol * scale, target=min(rtol, 1e-9) * scale,
            max_lps=max_lps,
        )
        lps += fit.n_lps
        if not np.all(np.isfinite(fit.z)):
            continue
        err = float(np.max(np.abs(net.forward(fit.z[None])[0] - y)))
        if err <= 10 * rtol * scale:
            return fit.z, lps, (
                f"found by the cell search from start {i + 1} of {len(starts)} ({lps} LPs); "
                "it reproduces every observed value, uniqueness unsettled"
            )
    return None, lps, f"the cell search found no preimage ({len(starts)} starts, {lps} LPs)"


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
    progress: Callable[[int, int], None] | None = None,
) -> InversionResult:
    """Exact inversion of y = G(z)[mask] (the `invert(..., observe=mask)` path).

    The layer-wise method on the restricted network (`restrict_output`); where
    it ends "failed", `search_preimage` (``restarts``, ``steps``, ``max_lps``;
    ``max_lps=0`` turns it off), which accepts a z only when it reproduces y
    within 10 ``rtol`` relative (default by the precision of y: 1e-9 for
    float64, 1e-5 for float32). Samples it settles become "feasible".

    Returns
    -------
    InversionResult (``misfit``: ||G(z)[mask] - y||_2, ``steps``: LPs of the search).
    """
    sub = restrict_output(net, mask)
    yb, single = observed_values(y, mask)
    start = time.perf_counter()
    res = invert(sub, yb, rtol=rtol, progress=progress)
    # The search's answers come from no layer-wise chain: accept them at the precision
    # of the observation itself (float64 data: 1e-9), not the model's.
    search_rtol = rtol if rtol is not None else DEFAULT_RTOL[input_precision(y)]
    z = np.array(res.z, copy=True)
    status = np.array(res.status, dtype=object)
    messages = list(res.message)
    residual = np.array(res.residual, dtype=float)
    steps_taken = np.zeros(len(yb), dtype=int)
    if max_lps > 0:
        for b in np.flatnonzero(status == "failed"):
            found, lps, why = search_preimage(
                sub, yb[b], restarts=restarts, steps=steps, max_lps=max_lps, rtol=search_rtol,
                seed=seed,
            )
            steps_taken[b] = lps
            if found is None:
                messages[b] += f"; {why}"
                continue
            z[b], status[b], messages[b] = found, "feasible", why
            fx = sub.forward(found[None])[0]
            residual[b] = np.max(np.abs(fx - yb[b])) / max(np.max(np.abs(yb[b])), 1e-300)
    finite = np.all(np.isfinite(z), axis=1)
    misfit = np.full(len(yb), np.inf)
    if finite.any():
        misfit[finite] = np.linalg.norm(sub.forward(z[finite]) - yb[finite], axis=1)
    return build_result(
        z=z, status=status, messages=messages, residual=residual, method="exact",
        rtol=res.rtol, elapsed=time.perf_counter() - start, single=single, misfit=misfit,
        steps=steps_taken, layers=res.layers, witness=np.asarray(res.witness),
    )
