"""The observations of a job, read chunk by chunk.

A ``.npy`` file is memory-mapped one chunk at a time: each chunk's rows are
mapped, copied out and unmapped, so the pages read stay in the page cache,
not in the process (a file mapped once and read through would count, page by
page, towards the process's resident memory: 4 GB for a million rows of
500). Any other array-like (a NumPy array, an ``np.memmap``, a CPU torch
tensor) is sliced.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from preimage.model.network import Network


class Rows:
    """The samples of x along its first axis, chunk by chunk.

    Parameters
    ----------
    x : path of a ``.npy`` file, or array-like of shape (B, ...)
        B observations; one observation of the network's output shape (or of
        shape (n,)) is a batch of one.
    net : Network
        Its output shape tells one observation from a batch.
    """

    def __init__(self, x: Any, net: Network) -> None:
        self.path: Path | None = None
        self._array: Any = None
        if isinstance(x, (str, os.PathLike)):
            self.path = Path(x)
            self.shape, self.dtype, self._offset = _npy_header(self.path)
        else:
            if type(x).__module__.split(".")[0] == "torch":
                x = x.detach().cpu().numpy()
            array = x if isinstance(x, np.ndarray) else np.asarray(x)
            if array.dtype.hasobject:
                raise TypeError("`x` must be an array of numbers; got an object array.")
            self._array = array
            self.shape, self.dtype = tuple(array.shape), array.dtype
        self._single = len(self.shape) <= 1 or self.shape == tuple(net.output_shape)
        if len(self.shape) == 0:
            raise ValueError("`x` must hold observations of shape (B, n); got a scalar.")
        self.rows_shape = (1, *self.shape) if self._single else self.shape
        one = self.rows_shape[1:]
        if one not in (tuple(net.output_shape), (net.output_dim,)):
            # (here, with x's own shape: invert, given one row, would name the row's)
            shapes = " or ".join(str(v) for v in dict.fromkeys(
                (tuple(net.output_shape), (net.output_dim,))))
            raise ValueError(f"`x` must hold observations of width {net.output_dim} (shape "
                             f"{shapes}), as (B, ...); got an array of shape {self.shape}.")

    @property
    def count(self) -> int:
        """B, the number of samples."""
        return int(self.rows_shape[0])

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Samples lo..hi-1, as a new C-contiguous array of shape (hi - lo, ...)."""
        if self._single:
            whole = self._read_all() if self.path is not None else np.asarray(self._array)
            return np.array(whole.reshape(self.rows_shape)[lo:hi], order="C")
        if self.path is None:
            return np.array(self._array[lo:hi], order="C")
        cols = int(np.prod(self.shape[1:], dtype=np.int64))
        if hi <= lo:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        start = self._offset + lo * cols * self.dtype.itemsize
        skip = start % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page boundary
        length = skip + (hi - lo) * cols * self.dtype.itemsize
        with self.path.open("rb") as fh, mmap.mmap(
            fh.fileno(), length, offset=start - skip, access=mmap.ACCESS_READ
        ) as window:
            view = np.frombuffer(window, dtype=self.dtype, count=(hi - lo) * cols, offset=skip)
            rows = view.reshape(hi - lo, *self.shape[1:]).copy()
            del view  # the mapping closes (is unmapped) only once no array looks into it
        return rows

    def _read_all(self) -> np.ndarray:
        assert self.path is not None
        return np.load(self.path, allow_pickle=False)

    def describe(self) -> str:
        return str(self.path) if self.path is not None else "an array"


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of a C-order ``.npy`` file of numbers."""
    try:
        with path.open("rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the observations from {path}: {exc}") from exc
    if dtype.hasobject:
        raise ValueError(f"{path} holds Python objects, not numbers (it needs pickle).")
    if fortran and len(shape) > 1:
        raise ValueError(
            f"{path} is stored in Fortran order: its rows are not contiguous; save it with "
            "np.save(path, np.ascontiguousarray(x))."
        )
    size = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if path.stat().st_size < size:
        raise ValueError(f"{path} is truncated: {path.stat().st_size} bytes, expected {size}.")
    return tuple(int(v) for v in shape), dtype, offset
