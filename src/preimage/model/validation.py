"""Input checks shared by every public entry point.

Each function converts (copying, so the caller's array is never modified),
then checks, and raises an error that names the argument and the rule.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

#: The largest magnitude accepted in data and weights. Beyond it the float64
#: arithmetic of the solvers (squares in norms and Gram matrices, products of
#: the layers' scales) overflows: 1e100 squared is 1e200, still finite.
MAX_MAGNITUDE = 1e100

#: The smallest largest magnitude of an observation (unless it is all zero): its
#: relative tolerances stay far above float64's subnormals (1e-308).
MIN_SCALE = 1e-100

#: NumPy dtype kinds that hold real numbers: bool, signed and unsigned int, float.
_REAL_KINDS = "biuf"


def to_float_array(value: Any, name: str) -> np.ndarray:
    """`value` (array-like or torch tensor of real numbers) as a new float64 array.

    Booleans, integers and floats of any precision (float16, bfloat16 tensors)
    convert; complex numbers, strings, None and other objects raise a TypeError
    naming `name` (NumPy would drop the imaginary part or parse the strings).
    The result never shares memory with `value`.
    """
    if value is None:
        raise TypeError(f"`{name}` must be an array of real numbers; got None.")
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = _tensor_values(value, name)
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"`{name}` must be an array of real numbers with one shape (a nested list of equal "
            f"lengths); got a {type(value).__name__} NumPy cannot read as one "
            f"({str(exc).splitlines()[0][:80]})."
        ) from exc
    kind = arr.dtype.kind
    if kind == "O":
        for v in arr.flat:
            if not _is_real_number(v):
                raise TypeError(
                    f"`{name}` must be an array of real numbers; it holds a {type(v).__name__} "
                    f"({v!r:.40})."
                )
    elif kind not in _REAL_KINDS:
        what = {"c": "complex numbers", "U": "strings", "S": "bytes", "M": "dates",
                "m": "time spans", "V": "structured records"}.get(kind, f"dtype {arr.dtype}")
        raise TypeError(
            f"`{name}` must be an array of real numbers; got {what} (dtype {arr.dtype})."
        )
    return np.array(arr, dtype=np.float64, copy=True)


def _tensor_values(t: Any, name: str) -> np.ndarray:
    """A torch tensor's values as a NumPy array (bfloat16 and float16 widened first)."""
    if t.is_complex():
        raise TypeError(
            f"`{name}` must be a tensor of real numbers; got complex numbers ({t.dtype})."
        )
    if getattr(t, "is_meta", False):
        raise TypeError(f"`{name}` is a tensor on the meta device: it holds no values.")
    t = t.detach().cpu()
    if t.is_floating_point() and t.element_size() < 4:  # float16 / bfloat16 / float8
        t = t.float()
    try:
        return t.numpy()
    except (TypeError, RuntimeError) as exc:  # a dtype NumPy lacks (quantized, ...)
        raise TypeError(
            f"`{name}` must be a tensor of real numbers NumPy can hold; got {t.dtype}."
        ) from exc


def _is_real_number(v: Any) -> bool:
    return isinstance(v, (numbers.Real, np.bool_))


def input_precision(value: Any) -> str:
    """The floating-point precision the caller's array holds: "float64" (also for
    integers, lists and anything else), "float32", "float16" or "bfloat16"."""
    return precision_of(getattr(value, "dtype", None))


#: The floating-point precisions preimage tells apart, most precise first.
PRECISIONS: tuple[str, ...] = ("float64", "float32", "float16", "bfloat16")


def precision_of(dtype: Any) -> str:
    """"float32", "float16" or "bfloat16" for those dtypes (NumPy, torch or their
    names), else "float64"."""
    name = str(dtype).replace("torch.", "") if dtype is not None else "float64"
    aliases = {"half": "float16", "float": "float32", "single": "float32"}
    name = aliases.get(name, name)
    return name if name in ("float32", "float16", "bfloat16") else "float64"


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
            f"`{name}` has {batch.shape[1]} entries per sample but {what} has width "
            f"{width}; expected shape ({width},) or (batch, {width})."
        )
    check_finite(batch, name, rows="sample")
    return batch, single


def check_finite(arr: np.ndarray, name: str, *, rows: str | None = None) -> None:
    """A ValueError naming `name` where arr holds NaN, inf or magnitudes above MAX_MAGNITUDE.

    ``rows``: what the first axis counts ("sample"), to say where.
    """
    bad = ~np.isfinite(arr)
    large = np.abs(np.where(bad, 0.0, arr)) > MAX_MAGNITUDE

    def where(hit: np.ndarray) -> str:
        if rows is None or arr.ndim == 0:
            return ""
        return f" (in {rows}(s) {np.unique(np.nonzero(hit)[0])[:5].tolist()})"

    if bad.any():
        # each kind with its own samples: an inf is not reported as NaN beside one
        found = [f"{kind}{where(hit)}" for kind, hit in
                 (("NaN", np.isnan(arr)), ("inf", np.isinf(arr))) if hit.any()]
        raise ValueError(f"`{name}` contains {' and '.join(found)}.")
    if not large.any():
        return
    raise ValueError(
        f"`{name}` has entries of magnitude up to {float(np.max(np.abs(arr))):.3g}"
        f"{where(large)}; "
        f"preimage accepts magnitudes up to {MAX_MAGNITUDE:g} (rescale the data)."
    )


def check_latent(z: Any, width: int, name: str = "z") -> tuple[np.ndarray, bool]:
    """z as a float64 (B, k) copy, and whether the caller passed one sample."""
    return _check_batch(to_float_array(z, name), width, name, "the network's latent layer")


def refused_samples(batch: np.ndarray, name: str = "x") -> dict[int, str]:
    """{b: why} for the samples of a (B, n) batch that `check_observation` refuses (each
    alone: NaN or inf, magnitudes beyond MAX_MAGNITUDE, or a scale below MIN_SCALE)."""
    flat = np.asarray(batch, dtype=np.float64).reshape(len(batch), -1)
    scale = np.max(np.abs(flat), axis=1, initial=0.0)  # (NaN where x is: caught below)
    odd = ~np.all(np.isfinite(flat), axis=1) | (scale > MAX_MAGNITUDE) | _tiny(scale)
    why = {}
    for b in np.flatnonzero(odd):
        try:
            check_finite(flat[b], name)
        except ValueError as exc:
            why[int(b)] = str(exc)
            continue
        why[int(b)] = f"`{name}` has largest magnitude {float(scale[b]):.3g}; {SCALE_RULE}"
    return why


#: What `check_observation` accepts of a sample's largest magnitude.
SCALE_RULE = (f"preimage accepts samples of magnitude {MIN_SCALE:g} to {MAX_MAGNITUDE:g}, or "
              "all zero (rescale the data).")


def _tiny(scale: np.ndarray) -> np.ndarray:
    """Samples of largest magnitude not 0 but below MIN_SCALE."""
    return (scale > 0) & (scale < MIN_SCALE)


#: Whose width measurements y = A G(z) must have, in `check_observation`'s message.
MEASURED = "the measurement A's output (its number of rows)"


def check_observation(x: Any, width: int, name: str = "x",
                      what: str = "the network's output layer") -> tuple[np.ndarray, bool]:
    """x as a float64 (B, n) copy, and whether the caller passed one sample (``what``:
    whose width n is, for the message: "the measurement A's output" for y = A G(z)).

    A sample whose largest magnitude is not 0 but below MIN_SCALE is refused as well: the
    checks' tolerances are relative to it, and near float64's subnormals a forward pass
    rounds such an x to 0 (x of 1e-308 was "unique" with z = 0, a 100% misfit)."""
    batch, single = _check_batch(to_float_array(x, name), width, name, what)
    scale = np.max(np.abs(batch), axis=1)
    tiny = np.flatnonzero(_tiny(scale))
    if tiny.size:
        raise ValueError(
            f"`{name}` has sample(s) {tiny[:5].tolist()} of largest magnitude "
            f"{float(scale[tiny[0]]):.3g}; {SCALE_RULE}"
        )
    return batch, single


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """A finite positive float, or a ValueError saying so."""
    real = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not real and not (isinstance(value, np.ndarray) and value.ndim == 0
                         and value.dtype.kind in "iuf"):
        raise TypeError(f"`{name}` must be a number; got {type(value).__name__} {value!r:.40}.")
    v = float(value)
    ok = np.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        rule = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number {rule}; got {value!r}.")
    return v


#: The largest relative tolerance accepted: at rtol ~ 1, G(z) = 0 "reproduces" any x to
#: within its tolerance (the random 10-40-200 net then called z = 0 `unique` for every x).
MAX_RTOL = 0.1

#: The machine epsilon of each precision: below it a tolerance asks for more digits
#: than the data hold (float64 x = G(z) was called `infeasible` at rtol = 1e-16).
EPSILON: dict[str, float] = {
    "float64": float(np.finfo(np.float64).eps), "float32": float(np.finfo(np.float32).eps),
    "float16": float(np.finfo(np.float16).eps), "bfloat16": 2.0 ** -7,
}


def coarsest(*precisions: str) -> str:
    """The least precise of `precision_of` names (a float32 model and float64 x: float32)."""
    return max(precisions, key=PRECISIONS.index)


def check_rtol(value: Any, precision: str = "float64") -> float:
    """A relative tolerance in [EPSILON[precision], MAX_RTOL], or a TypeError /
    ValueError naming ``rtol`` and the rule. ``precision``: that of the observations
    (not of the weights: a float32 model's G(z) computed in float64 holds float64's
    digits, and the authors' float32 decoder is inverted at 1e-9 that way)."""
    v = check_positive(value, "rtol")
    floor = EPSILON[precision]
    if not floor <= v <= MAX_RTOL:
        raise ValueError(
            f"`rtol` must lie between {floor:.3g} ({precision}'s machine epsilon: the data "
            f"hold no more digits) and {MAX_RTOL:g} (beyond it G(z) = 0 fits any x to "
            f"within its tolerance); got {value!r}."
        )
    return v


def check_count(value: Any, name: str, minimum: int = 0) -> int:
    """An integer >= `minimum` (an int, a NumPy integer or a float with an integer
    value), or a TypeError / ValueError naming `name` and the rule."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be an integer >= {minimum}; got {value!r:.40}.")
    # an int is exact as it is: through float, one above 2**53 would seem fractional
    whole = isinstance(value, (int, np.integer)) or (
        np.isfinite(float(value)) and float(value) == int(value))
    if not (whole and value >= minimum):
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value!r:.40}.")
    return int(value)


def check_callback(value: Any, name: str) -> None:
    """None or a callable(done, total), else a TypeError naming `name`."""
    if value is not None and not callable(value):
        raise TypeError(f"`{name}` must be a callable(done, total); got {value!r:.40}.")


def check_choice(value: Any, name: str, choices: Sequence[str], *, optional: bool = False) -> Any:
    """`value` if it is one of the strings `choices` (or None when `optional`), else a
    ValueError (TypeError for a non-string) naming `name` and listing them."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise TypeError(
            f"`{name}` must be one of {tuple(choices)}{' or None' if optional else ''}; got a "
            f"{type(value).__name__}."
        )
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {tuple(choices)}{' or None' if optional else ''}; got "
            f"{value!r:.40}."
        )
    return value


#: The torch device types the torch routes run on.
DEVICE_TYPES = ("cpu", "cuda")


def check_device(device: Any, name: str = "device") -> Any:
    """`device` (None, a string such as "cuda:0" or a torch.device) as a torch.device this
    process can use, or None (the default: CUDA when available); else a ValueError
    naming `name` and the rule (torch's own error would be an assertion inside it)."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError, ValueError):
        raise ValueError(
            f"`{name}` must be a torch device such as 'cpu' or 'cuda'; got {device!r:.40}."
        ) from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"`{name}` must be a device of type {' or '.join(DEVICE_TYPES)}; got "
                         f"{device!r:.40}.")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"`{name}` is {device!r:.40}, but this torch ({torch.__version__}) "
                             "sees no CUDA device; pass 'cpu' or None (CUDA when available).")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"`{name}` is {device!r:.40}, but this torch sees {count} CUDA "
                             f"device(s) (0 to {count - 1}).")
    return dev
