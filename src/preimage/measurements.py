"""Linear measurement operators: y = A x + e, for partial observations and sensing.

A measurement is an object with ``shape`` (m, n), ``apply`` (x -> A x),
``adjoint`` (y -> A^T y) and ``matrix()`` (A as a dense array). The solvers only
call those: the LP assembly reads ``matrix()`` (or, for a `Mask`, its observed
rows), the gradient methods call ``apply`` / ``adjoint``.

- `Mask`: inpainting, only the coordinates where ``observed`` is True are seen.
- `MatrixMeasurement`: any dense m x n matrix.
- `GaussianMatrix`: compressed sensing, i.i.d. N(0, 1/m) entries (so that
  E ||A x||^2 = ||x||^2 and a gradient step of size about 1 is stable).

Both ``apply`` and ``adjoint`` take one vector or a batch (rows).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _batch(v: Any, width: int, name: str, method: str) -> np.ndarray:
    arr = np.asarray(v, dtype=np.float64)
    if arr.ndim not in (1, 2) or arr.shape[-1] != width:
        raise ValueError(
            f"`{method}` takes `{name}` of shape ({width},) or (batch, {width}); "
            f"got shape {arr.shape}."
        )
    return arr


class MatrixMeasurement:
    """y = A x for a dense matrix A of shape (m, n) (copied, read-only)."""

    def __init__(self, matrix: Any) -> None:
        try:
            a = np.array(matrix, dtype=np.float64, copy=True)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"`A` must be a 2-D array of real numbers; got {type(matrix).__name__}."
            ) from exc
        if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"`A` must be a non-empty 2-D array; got shape {a.shape}.")
        if not np.all(np.isfinite(a)):
            raise ValueError("`A` contains NaN or inf.")
        a.setflags(write=False)
        self._a = a

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n): number of measurements, signal width."""
        return (int(self._a.shape[0]), int(self._a.shape[1]))

    def apply(self, x: Any) -> np.ndarray:
        """A x: x of shape (n,) or (B, n) -> (m,) or (B, m)."""
        return _batch(x, self.shape[1], "x", "apply") @ self._a.T

    def adjoint(self, y: Any) -> np.ndarray:
        """A^T y: y of shape (m,) or (B, m) -> (n,) or (B, n)."""
        return _batch(y, self.shape[0], "y", "adjoint") @ self._a

    def matrix(self) -> np.ndarray:
        """A as a dense (m, n) array (read-only)."""
        return self._a

    def __repr__(self) -> str:
        m, n = self.shape
        return f"{type(self).__name__}({m}x{n})"


class GaussianMatrix(MatrixMeasurement):
    """A Gaussian sensing matrix with i.i.d. N(0, 1/m) entries.

    Parameters
    ----------
    m : int
        Number of measurements.
    n : int
        Signal width (the network's output width).
    seed : int or numpy Generator
    """

    def __init__(self, m: int, n: int, *, seed: int | np.random.Generator | None = 0) -> None:
        if int(m) < 1 or int(n) < 1:
            raise ValueError(f"`m` and `n` must be >= 1; got m={m}, n={n}.")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        super().__init__(rng.standard_normal((int(m), int(n))) / np.sqrt(int(m)))


class Mask:
    """Observe only some coordinates: y = x[observed].

    Parameters
    ----------
    observed : bool array-like of shape (n,)
        True where the coordinate is seen (copied).
    """

    def __init__(self, observed: Any) -> None:
        arr = np.asarray(observed)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(
                f"`observe` must be a non-empty 1-D boolean mask; got an array of shape "
                f"{arr.shape}."
            )
        if arr.dtype != bool:
            raise TypeError(
                f"`observe` must be a boolean mask (dtype bool); got dtype {arr.dtype}. "
                "Pass e.g. `np.isin(np.arange(n), indices)` for a list of indices."
            )
        if not arr.any():
            raise ValueError("`observe` observes no coordinate: at least one must be True.")
        mask = np.array(arr, dtype=bool, copy=True)
        mask.setflags(write=False)
        self._mask = mask
        self._index = np.flatnonzero(mask)

    @property
    def observed(self) -> np.ndarray:
        """The boolean mask of shape (n,) (read-only)."""
        return self._mask

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n): observed coordinates, signal width."""
        return (int(self._index.size), int(self._mask.size))

    def apply(self, x: Any) -> np.ndarray:
        """x[..., observed]: (n,) or (B, n) -> (m,) or (B, m)."""
        return _batch(x, self.shape[1], "x", "apply")[..., self._index]

    def adjoint(self, y: Any) -> np.ndarray:
        """Zero-fill: (m,) or (B, m) -> (n,) or (B, n) with y at the observed places."""
        arr = _batch(y, self.shape[0], "y", "adjoint")
        out = np.zeros((*arr.shape[:-1], self.shape[1]))
        out[..., self._index] = arr
        return out

    def matrix(self) -> np.ndarray:
        """The (m, n) selection matrix: rows of the identity."""
        return np.eye(self.shape[1])[self._index]

    def __repr__(self) -> str:
        m, n = self.shape
        return f"Mask({m} of {n} observed)"


Measurement = MatrixMeasurement | Mask


def as_measurement(A: Any, width: int, name: str = "A") -> Measurement:
    """A `Mask` or `MatrixMeasurement` whose signal width is the network's output width.

    Accepts a measurement object or a 2-D array (wrapped in `MatrixMeasurement`).
    """
    if isinstance(A, (MatrixMeasurement, Mask)):
        op = A
    elif hasattr(A, "apply") and hasattr(A, "adjoint") and hasattr(A, "matrix"):
        op = MatrixMeasurement(A.matrix())
    else:
        if hasattr(A, "detach") and hasattr(A, "cpu"):  # a torch tensor
            A = A.detach().cpu().numpy()
        op = MatrixMeasurement(A)
    if op.shape[1] != width:
        raise ValueError(
            f"`{name}` has {op.shape[1]} columns but the network's output has width {width}; "
            f"`{name}` must have shape (m, {width})."
        )
    return op


def as_mask(observe: Any, width: int) -> Mask:
    """`observe` (a `Mask` or a boolean array) as a `Mask` over the network's output."""
    mask = observe if isinstance(observe, Mask) else Mask(observe)
    if mask.shape[1] != width:
        raise ValueError(
            f"`observe` has length {mask.shape[1]} but the network's output has width {width}; "
            f"the mask must have shape ({width},)."
        )
    return mask
