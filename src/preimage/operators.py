"""Linear operators: the affine part of a layer.

A layer's weight is used in two ways: applied to whole batches (forward pass,
gradient baselines) and read row by row (the per-layer linear programs need
the rows of the active and inactive units explicitly). `LinearOperator` names
exactly those needs, so a sparse matrix or a matrix-free convolution can slot
in later by implementing the same few methods. `DenseOperator` is the one
implementation today.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class LinearOperator(Protocol):
    """What the solvers need from a layer's weight W of shape (m, n)."""

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

    def matrix(self) -> np.ndarray:
        """W as a dense (m, n) array."""
        ...


class DenseOperator:
    """A dense weight matrix W of shape (m, n), stored as float64.

    The array is copied and made read-only, so nothing a caller does to the
    array it passed in can change the network afterwards, and vice versa.
    """

    def __init__(self, matrix: np.ndarray) -> None:
        w = np.array(matrix, dtype=np.float64, copy=True)
        if w.ndim != 2:
            raise ValueError(f"A weight matrix must be 2-D; got an array of shape {w.shape}.")
        if not np.all(np.isfinite(w)):
            raise ValueError("A weight matrix contains NaN or inf.")
        w.setflags(write=False)
        self._w = w

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

    def __repr__(self) -> str:
        m, n = self.shape
        return f"DenseOperator({m}x{n})"
