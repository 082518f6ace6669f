"""Building `InversionResult`s for the estimating methods (noisy, gradient, sensing).

One place that turns per-sample arrays into the result object, so every method
reports the same fields with the same shapes: (B, ...) arrays for a batch, scalars
when the caller passed one sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from preimage.invert import InversionResult, LayerReport

#: Statuses that mean "z is an answer" (a preimage, or an estimate consistent with the noise).
SUCCESS = ("unique", "non_unique", "feasible")


def vector_norm(v: np.ndarray, norm: str | None) -> np.ndarray:
    """Norm of each row of v (B, n): "linf", "l1", or "l2" (also for None)."""
    if norm == "linf":
        return np.max(np.abs(v), axis=-1, initial=0.0)
    if norm == "l1":
        return np.sum(np.abs(v), axis=-1)
    return np.linalg.norm(v, axis=-1)


def relative_residual(fx: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """|G(z) - x|_inf / max(|x|_inf, tiny), row by row (NaN rows stay NaN)."""
    scale = np.maximum(np.max(np.abs(xb), axis=1), 1e-300)
    return np.max(np.abs(fx - xb), axis=1) / scale


def build_result(
    *,
    z: np.ndarray,
    status: np.ndarray,
    messages: list[str],
    residual: np.ndarray,
    method: str,
    rtol: float,
    elapsed: float,
    single: bool,
    misfit: np.ndarray,
    steps: np.ndarray,
    layers: tuple[LayerReport, ...] = (),
    witness: np.ndarray | None = None,
    z_error_bound: np.ndarray | None = None,
    noise: str | None = None,
) -> InversionResult:
    """An `InversionResult` from per-sample arrays of length B."""
    status = np.asarray(status, dtype=object)
    success = np.isin(status, SUCCESS)
    if witness is None:
        witness = np.full_like(z, np.nan)
    if single:
        first: Callable[[Any], Any] = lambda a: None if a is None else a[0]  # noqa: E731
        return InversionResult(
            z[0], str(status[0]), bool(success[0]), float(residual[0]), witness[0], messages[0],
            layers, method, rtol, elapsed,
            misfit=float(misfit[0]),
            z_error_bound=None if z_error_bound is None else float(first(z_error_bound)),
            steps=int(steps[0]),
            noise=noise,
        )
    return InversionResult(
        z, status, success, residual, witness, messages, layers, method, rtol, elapsed,
        misfit=misfit, z_error_bound=z_error_bound, steps=steps, noise=noise,
    )


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
    with it (`preimage.noisy.consistent_misfit`, per row of the observations yb).
    """
    from preimage.noisy import consistent_misfit

    finite = np.isfinite(misfit)
    if noise is None:
        ok = finite & (residual <= success_rtol)
    elif noise_level is None:
        ok = finite
    else:
        limit = np.array([consistent_misfit(noise_level, y, noise) for y in yb])
        ok = finite & (misfit <= limit)
    return np.where(ok, "feasible", "failed").astype(object)
