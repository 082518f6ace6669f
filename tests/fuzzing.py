"""What the fuzz tests share: generated inputs, and the one check every call passes.

Every public entry point, called with anything, either answers or refuses with a
ValueError / TypeError raised by preimage's own code (never from inside NumPy,
SciPy, HiGHS or torch) whose message names the argument; and the arrays it was
given are unchanged afterwards, byte for byte.

``PREIMAGE_FUZZ_SCALE`` multiplies every test's examples (1 by default; the
closing note of issue 15 counts a run with 25).
"""

from __future__ import annotations

import copy
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import preimage

PACKAGE = Path(preimage.__file__).resolve().parent
SCALE = int(os.environ.get("PREIMAGE_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> Any:
    """Hypothesis settings for a fuzz test of `examples` cases (times SCALE)."""
    return settings(
        max_examples=examples * SCALE, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
    )


def assert_ours(exc: BaseException, names: Sequence[str]) -> None:
    """exc was raised by preimage itself and its message names one of `names`."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = Path(frames[-1].filename).resolve()
    assert PACKAGE in where.parents, (
        f"{type(exc).__name__} raised inside {where}:{frames[-1].lineno}: {exc}"
    )
    text = str(exc)
    assert any(name in text for name in names), f"names none of {list(names)}: {text}"


def attempt(fn: Callable[..., Any], *args: Any, names: Sequence[str], **kwargs: Any) -> Any:
    """fn(*args, **kwargs), or None where it refused (a ValueError / TypeError of ours
    naming one of `names`); any other exception fails the test."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        assert_ours(exc, names)
        return None


# --- inputs unchanged ----------------------------------------------------------------


def _bytes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1).contiguous()
        return (str(value.dtype), tuple(value.shape), value.requires_grad,
                flat.view(torch.uint8).clone() if flat.numel() else None)
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.strides, value.flags.writeable,
                value.tobytes() if value.dtype != object else list(value.flat))
    return copy.deepcopy(value)


def snapshot(*values: Any) -> list[Any]:
    return [_bytes(v) for v in values]


def assert_unchanged(values: Sequence[Any], before: list[Any]) -> None:
    for value, old in zip(values, before, strict=True):
        now = _bytes(value)
        if isinstance(value, torch.Tensor):
            assert now[:3] == old[:3], "a tensor argument was changed"
            assert (now[3] is None and old[3] is None) or torch.equal(now[3], old[3]), (
                "a tensor argument's values were changed"
            )
        else:
            assert _same(now, old), "an argument was changed"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (float, complex)) and isinstance(b, (float, complex)):
        return a == b or (a != a and b != b)  # NaN equals NaN here
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except (ValueError, TypeError):  # array-valued comparison
        return a is b


# --- generated arrays ----------------------------------------------------------------

#: dtypes an array argument is fuzzed with ("object": Python numbers; "text": strings).
DTYPES = ("float64", "float32", "float16", "bfloat16", "bool", "int64", "uint8",
          "complex128", "object", "text")
#: shape variants: the valid ones, then the wrong ones.
SHAPES = ("valid", "valid", "valid", "0d", "3d", "wide", "narrow", "empty", "no_width")
#: value variants on top of a realizable x = G(z) times a power of ten.
VALUES = ("exact", "exact", "exact", "noise", "negative", "nan", "inf", "huge")
LAYOUTS = ("c", "fortran", "strided", "readonly")
CONTAINERS = ("numpy", "numpy", "torch", "list")

_TORCH = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "bool": torch.bool, "int64": torch.int64,
          "uint8": torch.uint8, "complex128": torch.complex64}
#: what a dtype can carry exactly enough for a realizable x to stay realizable
REAL_FLOATS = ("float64", "float32", "float16", "bfloat16")


@dataclass
class Generated:
    """An argument value and what it should get: an answer (``valid``) or a refusal."""

    value: Any
    valid: bool
    realizable: bool  # the values are G(z_true) in the array's own precision
    single: bool
    z_true: np.ndarray | None
    precision: str
    kind: str  # a label for the statistics
    #: valid but for the entries that are not finite or too large (a mask may hide them)
    entries_only: bool = False
    bad_entries: np.ndarray | None = None  # (B, n) where they are


def _cast(values: np.ndarray, dtype: str, container: str) -> Any:
    if container == "torch" and dtype in _TORCH:
        t = torch.tensor(values.astype(np.float64))
        return t.to(_TORCH[dtype]) if dtype != "bool" else t > 0
    if dtype == "object":
        return np.array([float(v) for v in values.flat], dtype=object).reshape(values.shape)
    if dtype == "text":
        return values.astype(str)
    if dtype == "bfloat16":
        return torch.tensor(values).to(torch.bfloat16)
    if dtype == "bool":
        return values > 0
    if dtype in ("int64", "uint8"):
        with np.errstate(invalid="ignore", over="ignore"):
            return np.nan_to_num(values, posinf=0, neginf=0).clip(-1e9, 1e9).astype(dtype)
    with np.errstate(over="ignore"):
        return values.astype(dtype)


def _layout(value: Any, layout: str) -> Any:
    if not isinstance(value, np.ndarray) or value.ndim == 0:
        return value
    if layout == "fortran":
        return np.asfortranarray(value)
    if layout == "strided":
        wide = np.repeat(value, 2, axis=-1)
        return wide[..., ::2]
    if layout == "readonly":
        value = value.copy()
        value.setflags(write=False)
    return value


@st.composite
def observations(draw: Any, net: preimage.Network, *, exact_dtype: bool = False) -> Generated:
    """An x for `net`: mostly G(z) times 10^e (e in -30..30), of any dtype, shape,
    container and memory layout, sometimes noisy, negative, with NaN / inf or huge."""
    n, k = net.output_dim, net.latent_dim
    single = draw(st.booleans())
    batch = 1 if single else draw(st.integers(1, 3))
    shape = draw(st.sampled_from(SHAPES))
    values_kind = draw(st.sampled_from(VALUES))
    dtype = "float64" if exact_dtype else draw(st.sampled_from(DTYPES))
    container = draw(st.sampled_from(CONTAINERS))
    layout = draw(st.sampled_from(LAYOUTS))
    power = draw(st.integers(-30, 30))
    rng = np.random.default_rng(draw(st.integers(0, 2**20)))
    z = rng.standard_normal((batch, k)) * 10.0**power
    x = net.forward(z)
    realizable = values_kind == "exact"
    if values_kind == "noise":
        x = x + 1e-3 * rng.standard_normal(x.shape) * np.max(np.abs(x))
    elif values_kind == "negative":
        x = -np.abs(x) - 10.0**power
    elif values_kind == "nan":
        x[rng.integers(batch), rng.integers(n)] = np.nan
    elif values_kind == "inf":
        x[rng.integers(batch), rng.integers(n)] = -np.inf
    elif values_kind == "huge":
        x = x * 1e150 + 1e150
    values = x[0] if single else x
    ok_shape = shape == "valid"
    if shape == "0d":
        values = np.array(values.flat[0])
    elif shape == "3d":
        values = values.reshape(1, -1, n)
    elif shape == "wide":
        values = np.concatenate([values, values[..., :1]], axis=-1)
    elif shape == "narrow":
        values = values[..., :-1]
    elif shape == "empty":
        values = x[:0]
    elif shape == "no_width":
        values = x[:, :0]
    value = _cast(values, dtype, container)
    if container == "list" and hasattr(value, "tolist"):
        value = value.tolist()
    value = _layout(value, layout)
    as_float = np.asarray(
        value.float().numpy() if isinstance(value, torch.Tensor) and value.is_floating_point()
        else value.numpy() if isinstance(value, torch.Tensor) and not value.is_complex()
        else value if dtype != "text" else np.zeros(1)
    )
    real = dtype not in ("complex128", "text")
    finite = real and bool(np.all(np.isfinite(as_float.astype(np.float64))))
    small = real and finite and bool(np.all(np.abs(as_float.astype(np.float64)) <= 1e100))
    valid = ok_shape and real and finite and small and not (n == 1 and shape == "narrow")
    # (a list keeps the values but not their precision: float32 values in a list are
    # float64 data that is not quite G(z))
    keeps = realizable and valid and (dtype == "float64" or (
        dtype == "float32" and container != "list"))
    precision = dtype if dtype in REAL_FLOATS and container != "list" else "float64"
    kind = f"{shape}/{values_kind}/{dtype}/{container}/{layout}"
    bad = None
    if ok_shape and real and not (finite and small):
        with np.errstate(invalid="ignore"):
            full = as_float.astype(np.float64).reshape(batch, n)
            bad = ~np.isfinite(full) | (np.abs(np.nan_to_num(full)) > 1e100)
    return Generated(value, valid, keeps, single, z if keeps else None, precision, kind,
                     entries_only=bad is not None, bad_entries=bad)
