"""``invert(..., method="global")``: every sample settled, or bounded, for certain.

Without noise: the layer-wise method (`preimage.methods.layerwise`) settles
the samples whose layers it can, and every sample it leaves "failed" or
"feasible" goes to the global search below its first non-unique layer
(`preimage.solvers.exhaustive.settle`): a proof that z is the only preimage,
a second preimage, or a proof that there is none. The layers above that one
are unique, so its observation is forced and the verdict holds for G.

With ``noise="linf"`` or ``"l1"`` (x off the range): the cell descent
(`preimage.methods.descent.project`) gives an incumbent, and the branch and
bound (`preimage.solvers.exhaustive.global_projection`) proves the global
minimum of ||G(z) - x|| to a relative gap of ``gap``, or says it ran out of
time with the best z and the bound reached (``misfit_bound``).

Each sample's budget is ``fallback.seconds`` (`GlobalSettings`); a sample that
runs out keeps its best z and says so (``out_of_time``) and every other sample
keeps its answer. ``proof_domain`` says which z each verdict covers.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from preimage.methods.descent import project
from preimage.methods.layerwise import invert_exact
from preimage.methods.search import GlobalSettings
from preimage.model.network import Network
from preimage.model.validation import check_observation
from preimage.results import (
    Deadline,
    InversionResult,
    ProgressCallback,
    build_result,
    check_noise,
    default_rtol,
    estimate_rule,
)
from preimage.solvers.exhaustive import global_projection


def invert_global(
    net: Network,
    x: Any,
    *,
    noise: str | None = None,
    noise_level: float | None = None,
    rtol: float | None = None,
    fallback: GlobalSettings | None = None,
    gap: float = 1e-6,
    A: Any = None,
    progress: ProgressCallback | None = None,
    time_limit: float | Deadline | None = None,
) -> InversionResult:
    """The global method on observations x (n,) or (B, n); see the module docstring.

    Parameters
    ----------
    net : Network; ReLU layers below the first non-unique one (with noise: every layer)
    x : array-like (n,) or (B, n)
    noise : None, "linf" or "l1"
    noise_level : with noise: a bound on ||e||, for the status rule of the estimates
    rtol : exact data: the tolerance (default by precision, as for "exact")
    fallback : GlobalSettings (``seconds`` per sample, ``latent_bound``, ``tighten`` for
        exact data only, ``search``); default GlobalSettings()
    gap : with noise: the relative gap at which the minimum counts as proved
    time_limit : seconds (or a `Deadline`) for the whole call: no sample's search starts
        past it and a running one stops at it ("out of time", its best point kept)

    Returns
    -------
    InversionResult with method "global"; ``proof_domain``, ``out_of_time`` and (with
    noise) ``misfit_bound`` per sample.
    """
    if A is not None:
        raise ValueError("method='global' does not take a measurement `A`; use `observe` "
                         "for a mask, or method='exact' for compressed sensing.")
    deadline = Deadline.of(time_limit)
    settings = GlobalSettings() if fallback is None else fallback
    if settings.search == "cells":
        raise ValueError("method='global' needs GlobalSettings(search='branch' or 'milp').")
    level = check_noise(noise, noise_level)
    if noise is None:
        xb, single = check_observation(x, net.output_dim)
        own_rtol = default_rtol(net, x) if rtol is None else rtol
        result = invert_exact(net, xb, single=single, rtol=own_rtol, fallback=settings,
                              progress=progress, time_limit=deadline)
        result.method = "global"
        return result
    if noise not in ("linf", "l1"):
        raise ValueError(f"method='global' fits x in the 'linf' or 'l1' norm (LPs); got "
                         f"noise={noise!r}. For 'l2' use method='exact' (the cell descent).")
    if rtol is not None:
        raise TypeError("`rtol` is not used by method 'global' with a noise model.")
    if not all(layer.activation.kind == "relu" for layer in net.layers):
        raise ValueError("method='global' with noise needs ReLU layers only, the output's too.")
    start = time.perf_counter()
    xb, single = check_observation(x, net.output_dim)
    local = project(net, xb, norm=noise, restarts=2, adam_steps=200, descents=2,
                    time_limit=deadline)
    batch = xb.shape[0]
    z = np.array(local.z, copy=True).reshape(batch, net.latent_dim)
    bound = np.zeros(batch)
    domains = np.full(batch, "", dtype=object)
    timed = np.zeros(batch, dtype=bool)
    messages = []
    for b in range(batch):
        seconds = min(settings.seconds, deadline.remaining())
        if seconds <= 0:
            messages.append(f"{deadline.note()} before this sample's global projection; the "
                            "cell descent's point is kept")
            timed[b] = True
            continue
        try:
            found = global_projection(net, xb[b], norm=noise, start=z[b],
                                      seconds=seconds, box=settings.latent_bound,
                                      rel_gap=gap)
        except Exception as err:  # one sample's solver failure must not cost the batch
            messages.append(f"the global projection failed: {type(err).__name__}: {err}; "
                            "the cell descent's point is kept")
            continue
        if found.z is not None:
            z[b] = found.z
        bound[b], domains[b], timed[b] = found.bound, found.domain, found.out_of_time
        messages.append(found.message)
        if progress is not None:
            progress(b + 1, batch)
    result = build_result(
        net, xb, z, estimate_rule(xb, noise, level, 1e-6), messages, method="global",
        rtol=1e-6, elapsed=time.perf_counter() - start, single=single, noise=noise,
    )
    result.proof_domain = str(domains[0]) if single else domains
    result.out_of_time = bool(timed[0]) if single else timed
    result.misfit_bound = float(bound[0]) if single else bound
    return result
