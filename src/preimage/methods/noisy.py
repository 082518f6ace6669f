"""Noisy observations: error-bounded layer-wise inversion (Lei et al. 2019).

x = G(z) + e. From the output down, each layer's noisy fit
(`preimage.solvers.noisy_layer.invert_layer_noisy`: an l_inf or l_1 LP or the
l_2 QP, with its threshold tau chosen from the data) becomes the observation
of the layer below, and its error bound (`propagate_bound`) the next layer's
noise bound, down to z.

A noisy inversion never claims "unique" (z_hat is an estimate, not a
preimage). It is "feasible" when every layer's fit was consistent with its
split and, when ``noise_level`` is given, the final misfit ||G(z_hat) - x||
(in the noise norm) is consistent with it (`preimage.results.consistent_misfit`);
otherwise "failed" (z still holds the estimate).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from preimage.model.network import Network
from preimage.model.validation import check_observation, check_positive
from preimage.results import (
    CONSISTENCY,
    Deadline,
    InversionResult,
    LayerReport,
    ProgressCallback,
    SampleFailure,
    build_result,
    consistent_misfit,
    data_floor,
    per_sample,
    vector_norm,
)
from preimage.solvers.noisy_layer import (
    NoiseBound,
    NoisyLayerResult,
    invert_layer_noisy,
    propagate_bound,
)


@dataclass
class NoisyOutcome:
    """One sample of `invert_noisy_one`: the estimate, per-layer fits and bounds."""

    z: np.ndarray
    status: str
    message: str
    layers: list[NoisyLayerResult | None]
    bounds: list[float]  # bounds[i]: bound on ||x_i_hat - x_i||_2 (input of layer i)
    misfit: float


def invert_noisy_one(
    net: Network,
    x: np.ndarray,
    *,
    norm: str = "linf",
    noise_level: float | None = None,
    tau: float | None = None,
    rtol: float = 1e-9,
    keep_rank: bool = False,
    floor: float = 0.0,
) -> NoisyOutcome:
    """Layer-wise noisy inversion of one observation x of shape (n,); see `invert`
    (``floor``: the data's own error per coordinate, `data_floor`)."""
    d = len(net.layers)
    layers: list[NoisyLayerResult | None] = [None] * d
    bounds = [np.inf] * d
    bound = (
        NoiseBound.from_level(norm, noise_level, net.output_dim, floor)
        if noise_level is not None
        else NoiseBound.unbounded(net.output_dim)
    )
    h = x
    for i in range(d - 1, -1, -1):
        res = invert_layer_noisy(
            net.layers[i], h, norm=norm, tau=tau, nonneg=net.input_nonnegative(i), rtol=rtol,
            keep_rank=keep_rank,
        )
        layers[i] = res
        if not np.all(np.isfinite(res.h)):
            nan = np.full(net.latent_dim, np.nan)
            return NoisyOutcome(
                nan, "failed", f"layer {i}: {res.message}", layers, bounds, np.inf
            )
        bound = propagate_bound(net.layers[i], h, res.h, bound)
        bounds[i] = bound.l2
        h = res.h
    z = h
    misfit = float(vector_norm(net.forward(z[None])[0] - x, norm))
    bad = [i for i, r in enumerate(layers) if r is not None and r.status != "feasible"]
    if bad:
        status, message = "failed", f"layer(s) {bad}: no consistent tau; {layers[bad[0]].message}"
    elif noise_level is not None and misfit > consistent_misfit(noise_level, x, norm):
        status = "failed"
        message = (
            f"misfit ||G(z) - x||_{norm[1:]} = {misfit:.3g} exceeds {CONSISTENCY:g} x "
            f"noise_level = {CONSISTENCY * noise_level:.3g}"
        )
    else:
        status = "feasible"
        message = f"estimate with misfit ||G(z) - x||_{norm[1:]} = {misfit:.3g}"
    return NoisyOutcome(z, status, message, layers, bounds, misfit)


def invert_noisy(
    net: Network,
    x: Any,
    *,
    norm: str = "linf",
    noise_level: float | None = None,
    tau: float | None = None,
    rtol: float = 1e-9,
    progress: ProgressCallback | None = None,
    time_limit: float | Deadline | None = None,
) -> InversionResult:
    """Layer-wise noisy inversion of x = G(z) + e (the `invert(..., noise=...)` path).

    Parameters
    ----------
    net : Network
    x : array-like of shape (n,) or (B, n)
    norm : "linf", "l1" or "l2"
        The misfit each layer minimises (and the norm of `noise_level`).
    noise_level : float, optional
        A known bound ||e||_norm <= noise_level: enables the error bounds and
        decides the status (module docstring).
    tau : float, optional
        A fixed on/off threshold for every ReLU layer instead of the ladder.
    rtol : float
        Relative floor of the ladder.
    progress : callable(done, total), optional
    time_limit : seconds (or a `preimage.results.Deadline`) for the call: no sample
        starts after it ("failed", out of time); a sample whose fits raise ends
        "failed" with the error.

    Returns
    -------
    InversionResult with method "noisy", ``noise=norm``, per-layer ``tau``,
    ``misfit`` and ``error_bound`` in `layers`, overall ``misfit`` and
    ``z_error_bound``, and ``steps`` = LPs / QPs solved.
    """
    deadline = Deadline.of(time_limit)
    xb, single = check_observation(x, net.output_dim)
    if tau is not None:  # (checked per layer too; here once, before any sample fails on it)
        tau = check_positive(tau, "tau", allow_zero=True)
    start = time.perf_counter()
    d = len(net.layers)
    floor = data_floor(net, x, xb)
    outcomes = [
        NoisyOutcome(np.full(net.latent_dim, np.nan), "failed", o.message, [None] * d,
                     [np.inf] * d, np.inf) if isinstance(o, SampleFailure) else o
        for o in per_sample(
            lambda b: invert_noisy_one(net, xb[b], norm=norm, noise_level=noise_level, tau=tau,
                                       rtol=rtol, floor=float(floor[b])),
            xb.shape[0], deadline=deadline, progress=progress,
        )
    ]
    z = np.stack([o.z for o in outcomes])
    reports = []
    for i in range(len(net.layers)):
        rs = [o.layers[i] for o in outcomes]
        reports.append(
            LayerReport.from_results(
                i,
                rs,
                used_lp=np.array([r is not None for r in rs]),
                tau=np.array([np.nan if r is None else r.tau for r in rs], dtype=float),
                misfit=np.array([np.nan if r is None else r.misfit for r in rs], dtype=float),
                error_bound=np.array([o.bounds[i] for o in outcomes], dtype=float),
            )
        )
    steps = np.array([sum(r.n_solves for r in o.layers if r is not None) for o in outcomes])
    bound = None if noise_level is None else np.array([o.bounds[0] for o in outcomes])
    return build_result(
        net, xb, z, [o.status for o in outcomes], [o.message for o in outcomes],
        method="noisy", rtol=rtol, elapsed=time.perf_counter() - start, single=single,
        noise=norm, layers=tuple(reports), z_error_bound=bound, steps=steps,
    )


def error_bound(net: Network, x: np.ndarray, z: np.ndarray, norm: str, noise_level: float,
                floor: float = 0.0) -> float:
    """A proved bound on ||z - z_true||_2 for any estimate z of x = G(z_true) + e, ||e|| <= level
    (and |e_i| <= level + floor per coordinate: the data's own rounding, `data_floor`).

    `propagate_bound` holds for any estimate of a layer's input: applied down the
    layers to z's own activations (G's layer outputs at z), it bounds the error of
    an end-to-end estimate (the cell descent's) as it does the layer-wise one's.
    """
    if not np.all(np.isfinite(z)):
        return np.inf
    outputs = net.forward_all(z[None])
    bound = NoiseBound.from_level(norm, noise_level, net.output_dim, floor)
    y = x
    for i in range(len(net.layers) - 1, -1, -1):
        h = outputs[i][0]
        bound = propagate_bound(net.layers[i], y, h, bound)
        y = h
    return float(bound.l2)
