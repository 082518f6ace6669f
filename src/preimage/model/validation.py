"""Input checks shared by every public entry point.

Each function converts (copying, so the caller's array is never modified),
then checks, and raises an error that names the argument and the rule.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_float_array(value: Any, name: str) -> np.ndarray:
    """`value` (array-like or torch tensor) as a new float64 array, or a TypeError naming it."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        arr = np.array(value, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"`{name}` must be an array of real numbers; got {type(value).__name__}."
        ) from exc
    return arr


def input_precision(value: Any) -> str:
    """"float32" when the caller's array is single (or half) precision, else "float64"."""
    dtype = getattr(value, "dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else "float64"
    return "float32" if name in ("float32", "float16", "bfloat16") else "float64"


def _check_batch(arr: np.ndarray, width: int, name: str, what: str) -> tuple[np.ndarray, bool]:
    if arr.ndim not in (1, 2):
        raise ValueError(
            f"`{name}` must have shape ({width},) or (batch, {width}); got an array of shape "
            f"{arr.shape}."
        )
    single = arr.ndim == 1
    batch = arr[None, :] if single else arr
    if batch.shape[0] == 0:
        raise ValueError(f"`{name}` is an empty batch: it has shape {arr.shape}.")
    if batch.shape[1] != width:
        raise ValueError(
            f"`{name}` has {batch.shape[1]} entries per sample but the network's {what} has "
            f"width {width}; expected shape ({width},) or (batch, {width})."
        )
    bad = ~np.isfinite(batch)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])[:5].tolist()
        kind = "NaN" if np.isnan(batch).any() else "inf"
        raise ValueError(f"`{name}` contains {kind} (in sample(s) {rows}).")
    return batch, single


def check_latent(z: Any, width: int, name: str = "z") -> tuple[np.ndarray, bool]:
    """z as a float64 (B, k) copy, and whether the caller passed one sample."""
    return _check_batch(to_float_array(z, name), width, name, "latent layer")


def check_observation(x: Any, width: int, name: str = "x") -> tuple[np.ndarray, bool]:
    """x as a float64 (B, n) copy, and whether the caller passed one sample."""
    return _check_batch(to_float_array(x, name), width, name, "output layer")


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """A finite positive float, or a ValueError saying so."""
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"`{name}` must be a number; got {type(value).__name__}.") from exc
    ok = np.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        rule = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number {rule}; got {value!r}.")
    return v
