"""Linear operators: the weights of a layer and the measurements of an observation.

One family. A layer's weight W (m, n) and a measurement A (m, n) of the output
are both used in two ways: applied to whole batches (forward passes, gradient
steps) and read as constraint rows (the linear programs need the rows of the
active and inactive units, or all of A, explicitly). `LinearOperator` names
exactly those needs:

- ``apply`` (h -> W h) and ``adjoint`` (y -> W^T y), on batches of rows;
- ``rows(index)``: W[index] as a dense array, for the LP rows of some units;
- ``matrix()``: the whole of W in the form the operator stores it (a dense
  array here; a ``scipy.sparse`` matrix for operators that are sparse), where
  an LP or a factorisation needs every row.

The solvers see a weight only through these methods. Implementations:

- `DenseOperator`: a dense weight matrix (copied, read-only);
- `MatrixMeasurement`: a dense measurement matrix A, whose ``apply`` and
  ``adjoint`` also take one vector and check the width;
- `GaussianMatrix`: compressed sensing, i.i.d. N(0, 1/m) entries (so that
  E ||A x||^2 = ||x||^2 and a gradient step of size about 1 is stable);
- `Mask`: inpainting, only the coordinates where ``observed`` is True are seen.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from preimage.model.validation import check_count, check_finite, to_float_array


@runtime_checkable
class LinearOperator(Protocol):
    """What the solvers need from a linear map W of shape (m, n)."""

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n): output width, input width."""
        ...

    def apply(self, h: np.ndarray) -> np.ndarray:
        """W h for a batch: h of shape (B, n) -> (B, m)."""
        ...

    def adjoint(self, y: np.ndarray) -> np.ndarray:
        """W^T y for a batch: y of shape (B, m) -> (B, n)."""
        ...

    def rows(self, index: np.ndarray) -> np.ndarray:
        """The rows W[index] as a dense array of shape (len(index), n)."""
        ...

    def matrix(self) -> Any:
        """W as an (m, n) dense array or ``scipy.sparse`` matrix (read-only)."""
        ...


def dense(op: LinearOperator) -> np.ndarray:
    """The operator's matrix as a dense float64 array (a copy where it is stored sparse).

    For the solvers that factor or loop over whole dense rows (the noisy layer
    fits, the MILP, the batched path): the layer-wise routes, which only run on
    layers small enough for dense algebra (`preimage.methods.layerwise`).
    """
    matrix = op.matrix()
    return matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)


def _dense_matrix(matrix: Any, name: str) -> np.ndarray:
    """A read-only float64 copy of a 2-D finite matrix, or an error naming `name`."""
    a = to_float_array(matrix, name)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"`{name}` must be a non-empty 2-D array; got shape {a.shape}.")
    check_finite(a, name)
    a.setflags(write=False)
    return a


class DenseOperator:
    """A dense weight matrix W of shape (m, n), stored as float64.

    The array is copied and made read-only, so nothing a caller does to the
    array it passed in can change the network afterwards, and vice versa.
    """

    def __init__(self, matrix: Any, *, name: str = "weight") -> None:
        self._w = _dense_matrix(matrix, name)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self._w.shape[0]), int(self._w.shape[1]))

    def apply(self, h: np.ndarray) -> np.ndarray:
        return h @ self._w.T

    def adjoint(self, y: np.ndarray) -> np.ndarray:
        return y @ self._w

    def rows(self, index: np.ndarray) -> np.ndarray:
        return self._w[index]

    def matrix(self) -> np.ndarray:
        return self._w

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (self.shape[1],)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.shape[0],)

    def torch_module(self) -> Any:
        """An ``nn.Linear`` without bias computing h -> W h (float64)."""
        import torch
        from torch import nn

        m, n = self.shape
        lin = nn.Linear(n, m, bias=False).to(torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.array(self._w)))
        return lin

    def __repr__(self) -> str:
        m, n = self.shape
        return f"{type(self).__name__}({m}x{n})"


def _batch(v: Any, width: int, name: str, method: str) -> np.ndarray:
    arr = np.asarray(v, dtype=np.float64)
    if arr.ndim not in (1, 2) or arr.shape[-1] != width:
        raise ValueError(
            f"`{method}` takes `{name}` of shape ({width},) or (batch, {width}); "
            f"got shape {arr.shape}."
        )
    return arr


class MatrixMeasurement(DenseOperator):
    """y = A x for a dense matrix A of shape (m, n) (copied, read-only).

    ``apply`` and ``adjoint`` take one vector or a batch (rows).
    """

    def __init__(self, matrix: Any) -> None:
        super().__init__(matrix, name="A")

    def apply(self, x: Any) -> np.ndarray:
        """A x: x of shape (n,) or (B, n) -> (m,) or (B, m)."""
        return _batch(x, self.shape[1], "x", "apply") @ self._w.T

    def adjoint(self, y: Any) -> np.ndarray:
        """A^T y: y of shape (m,) or (B, m) -> (n,) or (B, n)."""
        return _batch(y, self.shape[0], "y", "adjoint") @ self._w


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
        m, n = check_count(m, "m", 1), check_count(n, "n", 1)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        super().__init__(rng.standard_normal((m, n)) / np.sqrt(m))


class Mask:
    """Observe only some coordinates: y = x[observed].

    Parameters
    ----------
    observed : bool array-like of shape (n,)
        True where the coordinate is seen (copied).
    """

    def __init__(self, observed: Any) -> None:
        if hasattr(observed, "detach"):  # a torch tensor
            observed = observed.detach().cpu().numpy()
        try:
            arr = np.asarray(observed)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"`observe` must be a 1-D boolean mask; got a {type(observed).__name__} NumPy "
                "cannot read as one array."
            ) from exc
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
    def index(self) -> np.ndarray:
        """The observed coordinates, increasing."""
        return self._index

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

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Rows of the selection matrix: unit vectors at the observed coordinates `index`."""
        out = np.zeros((len(np.atleast_1d(index)), self.shape[1]))
        out[np.arange(out.shape[0]), self._index[index]] = 1.0
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

    Accepts a measurement object, any `LinearOperator` (read through ``matrix()``)
    or a 2-D array (wrapped in `MatrixMeasurement`).
    """
    if isinstance(A, (MatrixMeasurement, Mask)):
        op = A
    elif isinstance(A, LinearOperator):
        matrix = A.matrix()
        op = MatrixMeasurement(matrix.toarray() if hasattr(matrix, "toarray") else matrix)
    else:
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
