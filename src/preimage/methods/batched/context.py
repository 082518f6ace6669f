"""Device, thread pool, chunking and per-layer caches of one batched call.

The batch is split into chunks whose working memory stays under a budget
(`chunk_size`). On CUDA torch does the batched algebra; on the CPU the
per-sample work runs piece by piece over a thread pool (`Context.map`), each
piece of a few hundred samples in one worker, with OpenBLAS limited to one
thread per worker (several threads each running a multi-threaded BLAS on two
cores were measured to be up to 100x slower). A layer's constants (its weight
on the device, a fixed pseudo-random row order, probe vectors, the packed
outer products of its rows) are built once per layer and device and kept
while the layer lives.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from preimage.model.layer import Layer
from preimage.model.network import Network
from preimage.model.operators import dense

#: Layers at least this wide are solved through a square subset of the active
#: rows (LU) instead of the normal equations of all of them.
SQUARE_MIN_WIDTH = 512
#: Working-memory budget of a chunk of samples, in bytes (chunks of a few MB per
#: array reuse freed memory; on the VM measured, fresh pages cost more than the math).
DEFAULT_MEMORY = 128 * 2**20
#: Largest table of packed outer products w_i w_i^T kept for the Gram matrices.
PACKED_MEMORY = 256 * 2**20


@dataclass
class LayerCache:
    """A layer's constants on the working device, built once per call."""

    w: Any  # torch (m, n) float64
    bias: Any  # torch (m,) float64
    w_np: np.ndarray
    bias_np: np.ndarray
    bias_max: float
    order: np.ndarray  # (m,) the fixed pseudo-random order of the rows
    probes: np.ndarray  # (n, 2) fixed random right-hand sides
    w32: np.ndarray  # (m, n) float32, C order: the square subsets are gathered from it
    row_norm2: np.ndarray  # (m,) squared norms of the rows
    row_l1_max: float  # max_i sum_j |w_ij|
    #: torch (m, n (n + 1) / 2): row i holds the lower triangle of w_i w_i^T, or None.
    packed: Any = None
    #: torch (n (n + 1) / 2,): where the packed columns go in a flattened n x n matrix.
    lower_flat: Any = None


#: Per-layer constants by (id(layer), device), dropped when the layer is collected.
_CACHES: dict[tuple[int, str], tuple[weakref.ref[Layer], LayerCache]] = {}


class Context:
    """Device, thread pool and per-layer caches for one batched call."""

    def __init__(self, device: Any, n_jobs: int, resolution: float = 0.0) -> None:
        import torch

        #: the smallest sigma_min / sigma_max of W_A the data resolve (RANK_RTOL rtol): the
        #: batched certificates of full column rank must show at least that
        self.resolution = float(resolution)
        self.torch = torch
        self.device = torch.device(device)
        self.n_jobs = max(1, int(n_jobs))
        self.pool = ThreadPoolExecutor(self.n_jobs) if self.n_jobs > 1 else None
        self._controller: Any = None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def one_blas_thread(self) -> AbstractContextManager[Any]:
        """Limit OpenBLAS (NumPy/SciPy) to one thread while our own threads run."""
        if self._controller is None:
            try:
                from threadpoolctl import ThreadpoolController

                self._controller = ThreadpoolController()
            except ImportError:  # optional: without it BLAS keeps its own threads
                self._controller = False
        if not self._controller:
            return nullcontext()
        return self._controller.limit(limits=1, user_api="blas")

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """fn over items (NumPy/SciPy work), in the thread pool when there is one.

        OpenBLAS gets one thread per worker either way: the items are small
        problems, and nested threads on few cores were measured to be up to 100x
        slower than one.
        """
        with self.one_blas_thread():
            if self.pool is None or len(items) < 2:
                return [fn(item) for item in items]
            return list(self.pool.map(fn, items))

    def layer(self, layer: Layer) -> LayerCache:
        """The layer's constants on this context's device (kept while the layer lives)."""
        key = (id(layer), str(self.device))
        entry = _CACHES.get(key)
        if entry is not None and entry[0]() is layer:
            return entry[1]
        cache = self._build(layer)
        _CACHES[key] = (weakref.ref(layer, lambda _, key=key: _CACHES.pop(key, None)), cache)
        return cache

    def _build(self, layer: Layer) -> LayerCache:
        torch = self.torch
        w_np = np.array(dense(layer.weight), dtype=np.float64)  # writable, for torch
        m, n = w_np.shape
        b_np = np.array(layer.bias_or_zero(), dtype=np.float64)
        w = torch.as_tensor(w_np, device=self.device)
        rng = np.random.default_rng(20190917 + m * 7919 + n)
        packed = None
        if n < SQUARE_MIN_WIDTH and 8 * m * n * (n + 1) // 2 <= PACKED_MEMORY:
            # row j of the lower triangle of w_i w_i^T: w_ij * w_i[0..j]
            packed = torch.cat([w[:, j : j + 1] * w[:, : j + 1] for j in range(n)], dim=1)
        return LayerCache(
            w=w,
            bias=torch.as_tensor(b_np, device=self.device),
            w_np=w_np,
            bias_np=b_np,
            bias_max=float(np.max(np.abs(b_np), initial=0.0)),
            order=rng.permutation(m),
            probes=rng.standard_normal((n, 2)),
            w32=w_np.astype(np.float32),
            row_norm2=np.einsum("ij,ij->i", w_np, w_np),
            row_l1_max=float(np.max(np.abs(w_np).sum(axis=1), initial=0.0)),
            packed=packed,
            lower_flat=torch.as_tensor(
                np.flatnonzero(np.tri(n, dtype=bool)), device=self.device
            ),
        )

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"


def bytes_per_sample(net: Network) -> int:
    """Working memory of one sample of a chunk, in bytes: its (m,)-wide arrays.

    The per-sample matrices (Gram matrices, square subsets) are formed in
    smaller pieces inside each step, with their own budget.
    """
    return max(8 * (12 * layer.out_width + 4 * layer.in_width) for layer in net.layers)


def chunk_size(net: Network, batch: int, batch_size: int | None) -> int:
    if batch_size is not None:
        return max(1, min(int(batch_size), batch))
    return max(1, min(batch, DEFAULT_MEMORY // bytes_per_sample(net)))


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
