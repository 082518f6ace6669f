"""Batched exact inversion: all samples of a batch through one layer at once.

`invert_layer` (the reference) inverts one sample of one layer through an SVD
(or QR) of W_A and, when W_A is rank-deficient, an LP in its null space. For
a batch, most samples of an expanding layer have a full-column-rank W_A: then
the active equalities alone fix h and no LP is needed. This module solves those
samples together and sends the others to `invert_layer`.

**Layers narrower than SQUARE_MIN_WIDTH: normal equations.** For every sample,
G = W_A^T W_A = sum over active rows of w_i w_i^T, for the whole batch in one
matrix product (mask (B, m) times the m packed outer products w_i w_i^T) or,
when that costs more or the table would not fit in memory, in batched
products of each sample's gathered active rows (an MNIST decoder's pixels:
few active).
A Cholesky factorisation of G - delta I with delta = 1e-11 trace(G) succeeds in
floating point only when lambda_min(G) > delta - O(n eps trace G) > 0; it
certifies full column rank with sigma_min(W_A) >= ~3e-6 sigma_max(W_A), many
orders of magnitude above the SVD rank threshold of `invert_layer`
(sigma > sigma_max max(|A|, n) eps), so both paths take the same decision.
h is the least-squares solution of the active equalities, like the
reference's: the shifted factor preconditions iterative refinement on
W_A^T (r_A - W_A h) computed in float64 (two steps).

**Downdates (CPU, before the normal equations).** Over the rows R most often
active in the batch (about 1.25 n active per sample), a sample's Gram matrix
is the shared W_R^T W_R minus its few inactive rows of R: when those are at
most n / 2 on average, each sample factors only the small Woodbury capacitance
matrix of its inactive rows, gathered from one shared projector
(`_downdate_solve`; 20-100-500: the 500-wide layer's samples each factor a
35 x 35 matrix instead of forming and factoring a 100 x 100 Gram matrix, 2x
faster end to end; errors of z 5e-16 median, 5e-14 at most, against 3e-16
and 7e-16 with all rows: fewer rows, a less well-conditioned system). A
certified W_{A and R} certifies W_A; the samples it does not settle take the
normal equations over all rows.

**Wider layers: a square subset.** The Gram matrix costs |A| n^2 per sample;
instead S = the first n active rows in a fixed pseudo-random order, and all
W_S h = y_S - b_S (n x n) are solved by LU (float32 LAPACK per subset on the
CPU, over the thread pool; float64 torch, batched, on CUDA), refined in
float64 until the estimated error left is at the rounding floor. Two samples
with at least n active rows in common share one subset and so one
factorisation (`_pair_up`): in a layer four times wider than its input, where
units are active half the time, most samples find such a partner, halving
the factorisations. Two fixed random probe right-hand sides v give
max ||W_S^{-1} v|| / ||v||, an estimate of 1 / sigma_min(W_S) from below (a
1000-fold underestimate has probability about 1e-5 for n ~ 1000). A subset is
accepted when ``kappa = ||W_S^{-1}|| ||W_S||_F / sqrt(n) <= min(KAPPA_PER_WIDTH n,
KAPPA_MAX_F32)``: since sigma_min(W_A) >= sigma_min(W_S), W_A has full column
rank with a wide margin. This certificate is probabilistic, unlike the
Cholesky one. Rejected samples retry alone with the first, then the last n
active rows of that order, then go to the normal equations. Using n rows
instead of all |A| makes h less accurate: its error is about kappa(W_S) eps
(1e-14..1e-12 measured) instead of kappa(W_A) eps.

Every solved sample then passes, in batch, the checks of `invert_layer` with
its tolerances (rtol times the data's scale): the active equalities within
10 tol, the inactive units below tau + tol, h >= -tol when the input is a
ReLU output, and the forward pass |act(W h + b) - y|_inf <= 10 rtol size
(`_check`: computed from h = max(h0, 0) with a bound on what the clipping
changed, so never more lenient than the reference). A sample that is
rank-deficient (|A| < n), infeasible, or fails any step or check is handed
to `invert_layer`, run over samples in a thread pool (HiGHS and LAPACK
release the GIL; OpenBLAS is limited to one thread per worker, as several
threads each running a multi-threaded BLAS on two cores were measured to be
up to 100x slower).

The batch is split into chunks whose working memory stays under a budget.
On CUDA torch does the batched algebra. On the CPU the normal equations and
downdates run piece by piece over the thread pool, each piece of a few
hundred samples from product to refined h in one worker, so that its
matrices stay in cache (1.2x faster end to end than whole-chunk steps, which
wrote and re-read each chunk's factors from memory): NumPy's batched Cholesky
and torch's batched triangular solves for small matrices, LAPACK's packed
dpptrf / dpptrs on the packed Gram rows from n >= PACKED_MIN_WIDTH (about
2.5x faster than torch's batched Cholesky and triangular solves for n ~ 100
on the machine measured).
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from preimage.invert import REPORT_FIELDS, LayerReport
from preimage.layer_inversion import LayerResult, invert_layer
from preimage.network import Layer, Network

#: Layers at least this wide are solved through a square subset of the active
#: rows (LU) instead of the normal equations of all of them.
SQUARE_MIN_WIDTH = 512
#: Accept a square subset when its estimated condition number is at most
#: KAPPA_PER_WIDTH * n (the median for a Gaussian n x n matrix is about 2 n, and
#: about 3% of them exceed 30 n) ...
KAPPA_PER_WIDTH = 30.0
#: Samples are paired (to share a factorisation) within blocks of this many.
PAIR_BLOCK = 256
#: ... and at most this, so that float64 refinement of a float32 LU converges.
KAPPA_MAX_F32 = 1e5
#: Maximum float64 refinement steps after a float32 factorisation.
MAX_REFINE = 30
#: Accept a refined solution when its last correction is below this (relative).
REFINE_RTOL = 1e-10
#: Stop refining once the error left in h (the last correction times its ratio
#: to the one before) is below this: about the rounding floor kappa(W_S) eps of
#: the square system, where further steps only stir the last digits.
REFINE_FLOOR = 1e-13
#: The Gram matrix is shifted by GRAM_SHIFT * n * eps * trace(G) before its Cholesky
#: factorisation (the rounding error of that factorisation is about n eps trace G).
GRAM_SHIFT = 10.0
#: Accept the normal-equation solution when its refinement step is below this
#: (relative): the shift then costs less than 1e-14 of accuracy after the step.
GRAM_RTOL = 1e-7
#: Working-memory budget of a chunk of samples, in bytes (chunks of a few MB per
#: array reuse freed memory; on the VM measured, fresh pages cost more than the math).
DEFAULT_MEMORY = 128 * 2**20
#: Working memory of one piece of the normal-equation solves on CUDA (the CPU's
#: pieces: GRAM_MEMORY, DOWNDATE_MEMORY).
PIECE_MEMORY = 32 * 2**20
#: Memory of one (piece, m) array of the batched checks on the CPU (stays in cache).
CHECK_MEMORY = 2 * 2**20
#: Working memory of one piece of the square-subset solves (batched LU on CUDA).
SQUARE_MEMORY = 512 * 2**20
#: The normal equations first use the rows most often active in the batch, as
#: few as give this many times n active rows per sample on average ...
FREQUENT_ROWS = 1.25
#: Downdate one shared factorisation when the samples' inactive rows among those
#: are at most this fraction of n on average (its cost grows as their cube) ...
DOWNDATE_MAX = 0.5
#: ... grouping the samples by their number of inactive rows rounded up to this.
DOWNDATE_PAD = 8
#: Bytes of the capacitance matrices of one piece of downdates (it stays in cache
#: from gather to solve), but at least DOWNDATE_PIECE_MIN samples per piece.
DOWNDATE_MEMORY = 2 * 2**20
DOWNDATE_PIECE_MIN = 64
#: Bytes of one piece of Gram matrices on the CPU, but at least GRAM_PIECE_MIN samples.
GRAM_MEMORY = 4 * 2**20
GRAM_PIECE_MIN = 32
#: Gather a piece's active rows for its Gram matrices (|A| n^2 flops per sample)
#: when GATHER_COST |A| n^2 < m n (n + 1) / 2, the flops of the packed product (small
#: products of gathered rows were measured at about half the speed of one large one).
GATHER_COST = 2.0
#: From this width on, the CPU factors the Gram matrices with LAPACK's packed
#: routines per sample; narrower ones go through NumPy's batched Cholesky (one C
#: loop), as the per-call overhead would dominate (20 x 20: 0.13 -> 0.09 s per 10k).
PACKED_MIN_WIDTH = 32
#: Largest table of packed outer products w_i w_i^T kept for the Gram matrices.
PACKED_MEMORY = 256 * 2**20

#: The message of a layer solved by the batched path (the same as `invert_layer`'s).
FAST_MESSAGE = (
    "solved the active equalities (full column rank); the active rows have full column rank"
)


@dataclass
class LayerArrays:
    """Per-layer diagnostics of a batch (a `LayerReport`), filled as samples are solved."""

    report: LayerReport
    #: LayerResult of the samples that went through `invert_layer` (by sample index).
    results: dict[int, LayerResult] = field(default_factory=dict)

    @classmethod
    def empty(cls, index: int, batch: int) -> LayerArrays:
        return cls(LayerReport.from_results(index, [None] * batch))

    def record(self, j: int, res: LayerResult) -> None:
        for name in REPORT_FIELDS:
            getattr(self.report, name)[j] = getattr(res, name)
        self.results[j] = res


@dataclass
class _LayerCache:
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
_CACHES: dict[tuple[int, str], tuple[weakref.ref[Layer], _LayerCache]] = {}


class Context:
    """Device, thread pool and per-layer caches for one batched call."""

    def __init__(self, device: Any, n_jobs: int) -> None:
        import torch

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

    def layer(self, layer: Layer) -> _LayerCache:
        """The layer's constants on this context's device (kept while the layer lives)."""
        key = (id(layer), str(self.device))
        entry = _CACHES.get(key)
        if entry is not None and entry[0]() is layer:
            return entry[1]
        cache = self._build(layer)
        _CACHES[key] = (weakref.ref(layer, lambda _, key=key: _CACHES.pop(key, None)), cache)
        return cache

    def _build(self, layer: Layer) -> _LayerCache:
        torch = self.torch
        w_np = np.array(layer.weight.matrix(), dtype=np.float64)  # writable, for torch
        m, n = w_np.shape
        b_np = np.array(layer.bias_or_zero(), dtype=np.float64)
        w = torch.as_tensor(w_np, device=self.device)
        rng = np.random.default_rng(20190917 + m * 7919 + n)
        packed = None
        if n < SQUARE_MIN_WIDTH and 8 * m * n * (n + 1) // 2 <= PACKED_MEMORY:
            # row j of the lower triangle of w_i w_i^T: w_ij * w_i[0..j]
            packed = torch.cat([w[:, j : j + 1] * w[:, : j + 1] for j in range(n)], dim=1)
        return _LayerCache(
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


# --- activations in torch (the same formulas as `Activation`) -------------------------


def _activate(layer: Layer, pre: Any) -> Any:
    torch = _torch()
    act = layer.activation
    if act.kind == "relu":
        return torch.clamp(pre, min=0.0)
    if act.kind == "leaky_relu":
        return torch.where(pre >= 0, pre, act.negative_slope * pre)
    if act.kind == "tanh":
        return torch.tanh(pre)
    if act.kind == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-pre))
    return pre


def _torch() -> Any:
    import torch

    return torch


# --- one layer, a batch of samples -------------------------------------------------


@dataclass
class FastLayer:
    """What the batched step found for b samples of one layer.

    ok : (b,) bool, the samples solved here ("unique": full column rank, checked);
    h : (b, n) their preimages (rows where ok), n_active : (b,), residual : (b,).
    """

    ok: np.ndarray
    h: np.ndarray
    n_active: np.ndarray
    residual: np.ndarray


def fast_layer(
    layer: Layer, y: np.ndarray, *, nonneg: bool, rtol: float, ctx: Context
) -> FastLayer:
    """Solve the full-column-rank samples of y (b, m) for one layer, in batch."""
    cache = ctx.layer(layer)
    m, n = layer.weight.shape
    b = y.shape[0]
    act = layer.activation
    with np.errstate(all="ignore"):
        target = act.inverse(y) if act.is_bijective else y
    is_finite = np.isfinite(target)
    finite = np.all(is_finite, axis=1)
    if not finite.all():
        target = np.where(is_finite, target, 0.0)
    largest = np.maximum(np.max(target, axis=1), -np.min(target, axis=1))  # max |t_i|
    scale = np.maximum(np.maximum(largest, cache.bias_max), 1e-300)
    tau = rtol * scale
    if act.is_bijective:
        active = np.ones((b, m), dtype=bool)
        negative = np.zeros(b, dtype=bool)
    else:
        negative = np.any(y < -tau[:, None], axis=1)
        active = y > tau[:, None]
    n_active = active.sum(axis=1)
    out = FastLayer(np.zeros(b, dtype=bool), np.zeros((b, n)), n_active, np.full(b, np.nan))
    todo = np.flatnonzero(finite & ~negative & (n_active >= n))
    if todo.size == 0:
        return out
    def rows(a: np.ndarray) -> np.ndarray:  # a[todo], without a copy when todo is all
        return a if todo.size == b else a[todo]

    h0, solved = _solve_full_rank(cache, rows(target), rows(active), ctx)
    if not solved.all():
        todo, h0 = todo[solved], h0[solved]
    if todo.size == 0:
        return out
    ok, h, residual = _check(layer, cache, h0, rows(y), rows(target), rows(active),
                             rows(scale), rtol, nonneg, ctx)
    out.ok[todo[ok]] = True
    out.h[todo[ok]] = h[ok]
    out.residual[todo[ok]] = residual[ok]
    return out


def _solve_full_rank(
    cache: _LayerCache, target: np.ndarray, active: np.ndarray, ctx: Context
) -> tuple[np.ndarray, np.ndarray]:
    """h0 with W_A h0 = target_A - b_A for samples whose W_A has certified full column rank.

    Returns h0 (b, n) and a (b,) mask of the samples certified and solved.
    """
    b = target.shape[0]
    n = cache.w_np.shape[1]
    if n < SQUARE_MIN_WIDTH:
        return _downdate_then_gram(cache, target, active, ctx)
    h0 = np.zeros((b, n))
    solved = np.zeros(b, dtype=bool)
    ranked = active[:, cache.order]  # active flags in the fixed order of the rows
    n_active = ranked.sum(axis=1)
    for tier in ("pair", "first", "last"):
        todo = np.flatnonzero(~solved)
        if tier == "last":
            todo = todo[n_active[todo] > n]  # a different subset exists
        if tier == "pair":
            pairs = _pair_up(ranked[todo], n)
            todo = todo[pairs.ravel()]  # (a_0, b_0, a_1, b_1, ...)
            group = np.repeat(np.arange(pairs.shape[0]), 2)
            pick = ranked[todo[0::2]] & ranked[todo[1::2]]  # rows active in both
            last = False
        else:
            group = np.arange(todo.size)
            pick = ranked[todo]
            last = tier == "last"
        if todo.size == 0:
            continue
        rows = cache.order[_take_n(pick, n, last=last)]  # (groups, n) row indices
        rhs = np.take_along_axis(target[todo], rows[group], axis=1) - cache.bias_np[rows[group]]
        h, ok = _square_solve(cache, rows, group, rhs, ctx)
        h0[todo[ok]] = h[ok]
        solved[todo[ok]] = True
    rest = np.flatnonzero(~solved)
    if rest.size:
        h, ok = _gram_solve(cache, target[rest], active[rest], ctx)
        h0[rest[ok]] = h[ok]
        solved[rest[ok]] = True
    return h0, solved


def _take_n(pick: np.ndarray, n: int, *, last: bool) -> np.ndarray:
    """Column indices (g, n) of the first (or last) n True entries of each row of pick."""
    position = np.cumsum(pick, axis=1, dtype=np.int32)
    low = (position[:, -1] - n)[:, None] if last else 0  # skip this many first
    keep = pick & (position > low) & (position <= low + n)
    return np.nonzero(keep)[1].reshape(pick.shape[0], n)


def _pair_up(ranked: np.ndarray, n: int) -> np.ndarray:
    """Disjoint pairs of samples (q, 2) that have at least n active rows in common.

    Two such samples share one square subset, so one factorisation serves
    both. In a layer m >= 4n wide whose units are active half the time, two
    samples share about m / 4 >= n rows (more when their inputs are both
    non-negative, which correlates their activation patterns): most samples
    find a partner. Greedy, largest overlap first, within blocks of PAIR_BLOCK
    samples (the candidates grow as the square of the block).
    """
    pairs = []
    for lo in range(0, ranked.shape[0] - 1, PAIR_BLOCK):
        flags = ranked[lo : lo + PAIR_BLOCK].astype(np.float32)
        common = flags @ flags.T  # exact: counts below 2^24
        i, j = np.nonzero(np.triu(common >= n, k=1))
        order = np.argsort(-common[i, j], kind="stable")
        taken = np.zeros(flags.shape[0], dtype=bool)
        for a, c in zip(i[order].tolist(), j[order].tolist(), strict=True):
            if not taken[a] and not taken[c]:
                taken[a] = taken[c] = True
                pairs.append((lo + a, lo + c))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _square_solve(
    cache: _LayerCache, rows: np.ndarray, group: np.ndarray, rhs: np.ndarray, ctx: Context
) -> tuple[np.ndarray, np.ndarray]:
    """Solve W_S h_j = rhs_j with S = rows[group[j]] (rows: (g, n) row subsets); (h, accepted).

    A subset is accepted when its estimated condition number (probes, see the
    module docstring) is at most min(KAPPA_PER_WIDTH n, KAPPA_MAX_F32) and the
    float64 refinement of each of its samples converged.
    """
    if ctx.on_cpu:
        return _square_solve_cpu(cache, rows, group, rhs, ctx)
    t, n = rhs.shape
    rows = rows[group]
    h_all = np.zeros((t, n))
    ok_all = np.zeros(t, dtype=bool)
    piece = max(1, SQUARE_MEMORY // (8 * 3 * n * n))
    for lo in range(0, t, piece):
        sl = slice(lo, min(t, lo + piece))
        x, fro, ok = _lu_solve(cache, rows[sl], rhs[sl], ctx)
        with np.errstate(invalid="ignore"):
            ok &= _kappa(cache, x[:, :, 1:], fro) <= KAPPA_PER_WIDTH * n
            ok &= np.all(np.isfinite(x[:, :, 0]), axis=1)
        h_all[sl] = x[:, :, 0]
        ok_all[sl] = ok
    return h_all, ok_all


def _kappa(cache: _LayerCache, probe_x: np.ndarray, fro: np.ndarray) -> np.ndarray:
    """Estimated kappa = ||W_S^{-1}|| ||W_S||_F / sqrt(n) from the probe solutions (..., n, 2)."""
    n = probe_x.shape[-2]
    inv_norm = np.max(np.linalg.norm(probe_x, axis=-2) / np.linalg.norm(cache.probes, axis=0),
                      axis=-1)
    kappa = inv_norm * fro / math.sqrt(n)
    return np.where(np.isfinite(kappa), kappa, np.inf)


def _lu_solve(
    cache: _LayerCache, rows: np.ndarray, rhs: np.ndarray, ctx: Context
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched float64 LU of the W_S in torch, one refinement step (CUDA).

    Returns x (t, n, 3) (h, then the two probe solutions), ||W_S||_F (t,) and
    ok (t,): factored.
    """
    torch = ctx.torch
    dev = ctx.device
    w_s = cache.w[torch.as_tensor(rows, device=dev)]  # (t, n, n)
    r = torch.as_tensor(rhs, device=dev)
    t, n = rows.shape
    probes = torch.as_tensor(cache.probes, device=dev).expand(t, n, 2)
    lu, piv, info = torch.linalg.lu_factor_ex(w_s)
    x = torch.linalg.lu_solve(lu, piv, torch.cat([r[:, :, None], probes], dim=2))
    resid = r - torch.bmm(w_s, x[:, :, :1])[:, :, 0]
    x[:, :, 0] += torch.linalg.lu_solve(lu, piv, resid[:, :, None])[:, :, 0]
    fro = torch.linalg.matrix_norm(w_s)
    return x.cpu().numpy(), fro.cpu().numpy(), (info == 0).cpu().numpy()


def _square_solve_cpu(
    cache: _LayerCache, rows: np.ndarray, group: np.ndarray, rhs: np.ndarray, ctx: Context
) -> tuple[np.ndarray, np.ndarray]:
    """`_square_solve` on the CPU: float32 LAPACK LU per subset, float64 refinement in batch.

    Each subset's W_S is gathered in float32 in row order, which is W_S^T in
    Fortran order: LAPACK factors it in place (no copy; 1.3x faster than
    SciPy's `lu_factor` on a C-ordered matrix) and solves with W_S = (W_S^T)^T.
    The factorisations run over the thread pool (torch 2.13's batched CPU LU
    returns wrong pivots for n >= ~200 with more than one thread). The float64
    residuals of all samples of a piece come from one matrix product with W.
    """
    from scipy.linalg.lapack import sgetrf, sgetrs

    g, n = rows.shape
    t = rhs.shape[0]
    sizes = np.bincount(group, minlength=g)
    members = np.split(np.argsort(group, kind="stable"), np.cumsum(sizes)[:-1])
    fro = np.sqrt(cache.row_norm2[rows].sum(axis=1))  # ||W_S||_F of each subset
    kappa_max = min(KAPPA_PER_WIDTH * n, KAPPA_MAX_F32)
    h = np.zeros((t, n))
    ok = np.zeros(t, dtype=bool)
    piece = max(1, SQUARE_MEMORY // (4 * n * n))  # the float32 factors of a piece
    for lo in range(0, g, piece):
        groups = list(range(lo, min(g, lo + piece)))

        def factor(k: int) -> tuple[Any, Any, np.ndarray] | None:
            w_t = cache.w32[rows[k]].T  # W_S^T, Fortran-ordered
            lu, piv, info = sgetrf(w_t, overwrite_a=1)
            if info != 0:
                return None
            full = np.column_stack([rhs[members[k]].T, cache.probes]).astype(np.float32)
            x, info = sgetrs(lu, piv, full, trans=1)
            return (lu, piv, x.astype(np.float64)) if info == 0 else None

        factors = ctx.map(factor, groups)
        accepted = []
        for k, fac in zip(groups, factors, strict=True):
            if fac is None or not np.all(np.isfinite(fac[2])):
                continue
            k_members = members[k]
            if _kappa(cache, fac[2][:, k_members.size :], fro[k]) > kappa_max:
                continue
            h[k_members] = fac[2][:, : k_members.size].T
            accepted.append(k)
        if accepted:
            done = np.concatenate([members[k] for k in accepted])
            ok[done] = _refine(cache, rows, group, rhs, h, done,
                               {k: factors[k - lo] for k in accepted}, ctx)
    return h, ok


def _refine(
    cache: _LayerCache,
    rows: np.ndarray,
    group: np.ndarray,
    rhs: np.ndarray,
    h: np.ndarray,
    samples: np.ndarray,
    factors: dict[int, tuple[Any, Any, np.ndarray]],
    ctx: Context,
) -> np.ndarray:
    """Iterative refinement of h[samples] in place; returns (len(samples),) converged.

    Each round computes the float64 residuals rhs - W_S h of the samples still
    refining (one product with W for all of them) and corrects h with the
    float32 factors (each step shrinks the error of h by about
    kappa(W_S) eps_32, ~1e-3). A sample stops once the error left, estimated
    as the last correction times its ratio to the one before, is below
    REFINE_FLOOR, or once the correction no longer shrinks (it has reached the
    rounding of W_S h); it is accepted if that error is below REFINE_RTOL
    (relative to h).
    """
    from scipy.linalg.lapack import sgetrs

    last = np.full(samples.size, math.inf)  # size of the previous correction
    error = np.full(samples.size, math.inf)  # estimated error left in h
    going = np.ones(samples.size, dtype=bool)
    for _ in range(MAX_REFINE):
        where = np.flatnonzero(going)
        if where.size == 0:
            break
        sel = samples[where]
        pre = (ctx.torch.from_numpy(h[sel]) @ cache.w.T).numpy()  # (s, m) float64, torch threads
        resid = rhs[sel] - np.take_along_axis(pre, rows[group[sel]], axis=1)
        by_group: dict[int, list[int]] = {}
        for pos, j in enumerate(sel):
            by_group.setdefault(int(group[j]), []).append(pos)

        def correct(
            item: tuple[int, list[int]], resid: np.ndarray = resid
        ) -> tuple[list[int], np.ndarray]:
            k, pos = item
            lu, piv, _ = factors[k]
            step, _ = sgetrs(lu, piv, resid[pos].T.astype(np.float32), trans=1)
            return pos, step.T.astype(np.float64)

        step = np.empty_like(resid)
        for pos, s in ctx.map(correct, list(by_group.items())):
            step[pos] = s
        with np.errstate(invalid="ignore", divide="ignore"):
            size = np.max(np.abs(step), axis=1) / np.maximum(np.max(np.abs(h[sel]), axis=1), 1e-300)
        h[sel] += step
        size = np.where(np.isfinite(size), size, np.inf)
        prev = last[where]
        first = ~np.isfinite(prev)  # no ratio yet: the error left is at most this step
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.where(first, 0.0, size / prev)
        shrinking = first | (rate <= 0.5)
        error[where] = np.where(first | ~shrinking, size, size * rate)
        going[where[~shrinking | (error[where] <= REFINE_FLOOR)]] = False
        last[where] = np.minimum(prev, size)
    return (error <= REFINE_RTOL) & np.all(np.isfinite(h[samples]), axis=1)


def _downdate_then_gram(
    cache: _LayerCache, target: np.ndarray, active: np.ndarray, ctx: Context
) -> tuple[np.ndarray, np.ndarray]:
    """The normal equations as downdates over the most often active rows, then all rows.

    R = the rows most often active in the batch, as few as give FREQUENT_ROWS n
    active rows per sample on average. When the samples' inactive rows in R
    are few (at most DOWNDATE_MAX n on average), each sample's
    factorisation is a downdate of the shared one of W_R^T W_R
    (`_downdate_solve`): a sample whose W_{A and R} is certified to have full
    column rank has a full-column-rank W_A (which contains those rows), and h
    solves its equalities on A and R, which the checks then verify on all of
    A. The samples it does not settle (too few active rows in R, a failed
    factorisation), and every sample when the downdates would not pay, get
    their own Gram matrix over all rows (`_gram_solve`), as do all samples on
    CUDA. In the 100 -> 500 layer of 20-100-500, R is 160 rows, 35 of them
    inactive per sample on average.
    """
    if not ctx.on_cpu:
        return _gram_solve(cache, target, active, ctx)
    b, m = active.shape
    n = cache.w_np.shape[1]
    count = active.sum(axis=0)
    by_count = np.argsort(-count, kind="stable")
    enough = np.cumsum(count[by_count]) >= FREQUENT_ROWS * n * b
    r = int(np.argmax(enough)) + 1 if enough.any() else m
    rows = np.sort(by_count[:r])
    sub_active = active[:, rows]
    on_r = sub_active.sum(axis=1)
    todo = np.flatnonzero(on_r >= n)
    h = np.zeros((b, n))
    ok = np.zeros(b, dtype=bool)
    if todo.size and r - on_r[todo].mean() <= DOWNDATE_MAX * n:
        if todo.size < b:
            sub_active = sub_active[todo]
        h[todo], ok[todo] = _downdate_solve(
            cache.w_np[rows], cache.bias_np[rows], target[np.ix_(todo, rows)], sub_active, ctx
        )
    rest = np.flatnonzero(~ok)
    if rest.size:
        h[rest], ok[rest] = _gram_solve(cache, target[rest], active[rest], ctx)
    return h, ok


def _downdate_solve(
    w: np.ndarray, bias: np.ndarray, target: np.ndarray, active: np.ndarray, ctx: Context
) -> tuple[np.ndarray, np.ndarray]:
    """The normal equations of each sample as a downdate of one shared factorisation.

    w (r, n) = W_R and bias (r,) are the rows R of a layer, target and active
    (b, r) the samples' values and active flags on them. With G_R = W_R^T W_R
    and E = R - A a sample's inactive rows (Woodbury; a Schur complement for
    the last line):

        G_A = W_A^T W_A = G_R - W_E^T W_E,
        G_A^-1 = G_R^-1 + G_R^-1 W_E^T C^-1 W_E G_R^-1,   C = I - P[E, E],
        G_A is positive definite  iff  C is,              P = W_R G_R^-1 W_R^T.

    G_R^-1 and P are computed once; each sample gathers its |E| x |E| block of
    P and factors C - delta I: |E|^3 / 3 flops where its own Gram matrix and
    Cholesky factor cost r n^2 + n^3 / 3. P is an orthogonal projector
    (|P_ij| <= 1) whose computed entries are off by at most about
    n eps kappa(G_R), so its |E| x |E| block is off by at most about
    |E| n eps kappa in norm: delta = GRAM_SHIFT |E| (n + 1) eps kappa covers
    that and the factorisation's own rounding (about |E| eps). Success
    certifies lambda_min(C) > 0 with a margin of about delta, hence full column
    rank: lambda_min(G_A) >= lambda_min(G_R) min(1, lambda_min(C)). h is
    refined once on the float64 residual and accepted as in `_gram_solve`. On
    the CPU only (the triangular solves are torch's, the factorisations
    NumPy's over the pool). Returns (h (b, n), ok (b,)).
    """
    from scipy.linalg import cho_solve, solve_triangular

    torch = ctx.torch
    r, n = w.shape
    b = target.shape[0]
    h_all = np.zeros((b, n))
    ok_all = np.zeros(b, dtype=bool)
    gram = w.T @ w
    lam = np.linalg.eigvalsh(gram)
    if not (np.isfinite(lam).all() and lam[0] > 1e-8 * lam[-1]):
        return h_all, ok_all  # W_R itself is (nearly) rank-deficient: not a usable base
    kappa = 2.0 * lam[-1] / lam[0]  # eigvalsh is backward stable: a safe bound
    chol = np.linalg.cholesky(gram)
    y = solve_triangular(chol, w.T, lower=True).T  # W_R L^-T: P = y y^T
    proj = np.zeros((r + 1, r + 1))  # P with a zero row and column for padding
    proj[:r, :r] = y @ y.T
    minus_proj = -proj
    z = w @ cho_solve((chol, True), np.eye(n))  # W_R G_R^-1
    w_rows = np.ascontiguousarray(w.T)  # (n, r): h @ w_rows = W_R h for each sample

    # Samples sorted by |E| rounded up to DOWNDATE_PAD (E padded with the index
    # r, a zero row and column of P): each padded size is one slice, cut into
    # pieces that each worker takes from start to end while they stay in cache.
    size = r - active.sum(axis=1)
    padded = -(-size // DOWNDATE_PAD) * DOWNDATE_PAD
    order = np.argsort(padded, kind="stable")
    padded = padded[order]
    pieces = []  # (lo, hi, e): the samples order[lo:hi] have |E| padded to e
    for e in np.unique(padded):
        lo, hi = np.searchsorted(padded, e), np.searchsorted(padded, e, side="right")
        fits = max(DOWNDATE_PIECE_MIN, DOWNDATE_MEMORY // (8 * max(int(e), 1) ** 2))
        step = max(1, min(fits, -(-(hi - lo) // ctx.n_jobs)))  # one piece per worker at least
        pieces += [(a, min(hi, a + step), int(e)) for a in range(lo, hi, step)]

    def run(piece: tuple[int, int, int]) -> None:
        lo, hi, e = piece
        idx = order[lo:hi]
        act = active[idx]
        v = (target[idx] - bias) * act  # r_A on R, zero on E
        if e:
            cols = np.argsort(act, axis=1, kind="stable")[:, :e]  # the inactive rows first
            cols[np.arange(e) >= size[idx, None]] = r
            c = minus_proj[cols[:, :, None], cols[:, None, :]]  # -P[E, E]
            diag = np.arange(e)
            c[:, diag, diag] += 1.0 - _shift(kappa, e * (n + 1))
            factor, factored = _cholesky_batch(c)
            factor[~factored] = np.eye(e)  # (rejected: any invertible factor keeps it finite)
            lower = torch.from_numpy(factor)
        else:  # every row of R active: G_A = G_R
            factored = np.ones(hi - lo, dtype=bool)
        spread = np.zeros((hi - lo, r + 1))

        def solve(rhs: np.ndarray) -> np.ndarray:  # G_A^-1 W_R^T rhs, rhs zero on E
            # = G_R^-1 W_R^T (rhs + s), s = C^-1 (P rhs)_E on E (Woodbury: W_E G_R^-1 W_R^T = P_E)
            spread[:, :r] = rhs
            if e:
                u_e = np.take_along_axis(rhs @ proj[:r], cols, axis=1)  # (P rhs)_E, 0 on pads
                s_e = torch.linalg.solve_triangular(
                    lower, torch.from_numpy(u_e[:, :, None]), upper=False)
                s_e = torch.linalg.solve_triangular(lower.mT, s_e, upper=True)
                np.put_along_axis(spread, cols, s_e[:, :, 0].numpy(), axis=1)
            return spread[:, :r] @ z

        h = solve(v)
        step = solve((v - h @ w_rows) * act)
        h += step
        with np.errstate(invalid="ignore", divide="ignore"):
            change = np.max(np.abs(step), axis=1) / np.maximum(np.max(np.abs(h), axis=1), 1e-300)
        h_all[idx] = h
        ok_all[idx] = factored & (change <= GRAM_RTOL) & np.all(np.isfinite(h), axis=1)

    ctx.map(run, pieces)
    return h_all, ok_all


def _gram_solve_cpu(
    cache: _LayerCache, target: np.ndarray, active: np.ndarray, ctx: Context
) -> tuple[np.ndarray, np.ndarray]:
    """`_gram_solve` on the CPU: each piece of samples from Gram matrix to h in one worker.

    Samples are sorted by |A| and cut into pieces of about GRAM_MEMORY bytes,
    which stay in cache from the product to the solves. A piece forms its
    Gram matrices either from the packed table (mask @ packed: m n (n + 1) / 2
    per sample) or from its samples' gathered active rows, padded to the
    piece's largest |A| (|A| n^2 per sample), whichever costs fewer flops: in
    a layer where few units are active (an MNIST decoder's pixels) gathering
    skips the inactive rows. Factorisation: NumPy's batched Cholesky, or
    LAPACK's packed dpptrf / dpptrs per sample from n >= PACKED_MIN_WIDTH
    (torch's batched triangular solves cost more there); NumPy products with
    one BLAS thread per worker.
    """
    torch = ctx.torch
    m, n = cache.w_np.shape
    b = target.shape[0]
    w, bias = cache.w_np, cache.bias_np
    packed = None if cache.packed is None else cache.packed.numpy()
    h_all = np.zeros((b, n))
    ok_all = np.zeros(b, dtype=bool)
    count = active.sum(axis=1)
    order = np.argsort(count, kind="stable")
    per_sample = 8 * (2 * n * n + 6 * m + int(count.max(initial=0)) * n)  # gathered W_A too
    step = max(GRAM_PIECE_MIN, GRAM_MEMORY // per_sample)
    step = max(1, min(step, -(-b // ctx.n_jobs)))  # one piece per worker at least
    diag_packed = np.arange(n) * (np.arange(n) + 3) // 2  # where G_jj sits in a packed row
    lower_flat = np.flatnonzero(np.tri(n, dtype=bool))

    def run(lo: int) -> None:
        idx = order[lo : lo + step]
        act = active[idx]
        mask = act.astype(np.float64)
        r = (target[idx] - bias) * mask  # r_A, 0 elsewhere
        width = int(count[idx[-1]])
        p = idx.size
        use_packed = packed is not None and m * (n + 1) <= 2 * GATHER_COST * width * n
        if use_packed and n >= PACKED_MIN_WIDTH:
            from scipy.linalg.lapack import dpptrf, dpptrs

            g = mask @ packed  # (p, n (n + 1) / 2): the packed upper triangles (column-major)
            g[:, diag_packed] -= _shift(g[:, diag_packed].sum(axis=1, keepdims=True), n)
            ok = np.zeros(p, dtype=bool)
            for k in range(p):
                ok[k] = dpptrf(n, g[k], lower=0, overwrite_ap=1)[1] == 0

            def solve(rhs: np.ndarray) -> np.ndarray:
                out = np.zeros_like(rhs)
                for k in np.flatnonzero(ok):
                    out[k] = dpptrs(n, g[k], rhs[k], lower=0)[0]
                return out
        else:
            if use_packed:
                dense = np.zeros((p, n * n))
                dense[:, lower_flat] = mask @ packed  # the lower triangles
                dense = dense.reshape(p, n, n)
            else:
                rows = np.argsort(~act, axis=1, kind="stable")[:, :width]  # active rows first
                w_a = w[rows]
                w_a[np.arange(width) >= count[idx, None]] = 0.0
                dense = np.matmul(w_a.transpose(0, 2, 1), w_a)
            diag = np.arange(n)
            trace = dense[:, diag, diag].sum(axis=1)
            dense[:, diag, diag] -= _shift(trace, n)[:, None]
            chol, ok = _cholesky_batch(dense)
            chol[~ok] = np.eye(n)
            lower = torch.from_numpy(chol)

            def solve(rhs: np.ndarray) -> np.ndarray:
                y = torch.linalg.solve_triangular(lower, torch.from_numpy(rhs[:, :, None]),
                                                  upper=False)
                return torch.linalg.solve_triangular(lower.mT, y, upper=True)[:, :, 0].numpy()

        # h from the shifted factor, then one step of refinement on the float64
        # residual W_A^T (r_A - W_A h): it converges at the rate delta / lambda_min.
        h = solve(r @ w)
        step_h = solve(((r - h @ w.T) * mask) @ w)
        h += step_h
        with np.errstate(invalid="ignore", divide="ignore"):
            size = np.max(np.abs(step_h), axis=1) / np.maximum(np.max(np.abs(h), axis=1), 1e-300)
        h_all[idx] = h
        ok_all[idx] = ok & (size <= GRAM_RTOL) & np.all(np.isfinite(h), axis=1)

    ctx.map(run, list(range(0, b, step)))
    return h_all, ok_all


def _gram_solve(
    cache: _LayerCache, target: np.ndarray, active: np.ndarray, ctx: Context
) -> tuple[np.ndarray, np.ndarray]:
    """Least squares over all active rows by the normal equations; (h (b, n), ok (b,)).

    Full column rank is certified by the Cholesky factorisation of G - delta I
    (`_gram_solve_cpu` on the CPU; `_factor_dense`, batched in torch, on CUDA).
    """
    if ctx.on_cpu:
        return _gram_solve_cpu(cache, target, active, ctx)
    torch = ctx.torch
    dev = ctx.device
    m, n = cache.w_np.shape
    b = target.shape[0]
    h_all = np.zeros((b, n))
    ok_all = np.zeros(b, dtype=bool)
    factor = _factor_dense
    per_sample = 8 * (4 * n * n + 6 * m + (0 if cache.packed is not None else m * n))
    piece = max(1, min(b, PIECE_MEMORY // per_sample))
    for lo in range(0, b, piece):
        sl = slice(lo, min(b, lo + piece))
        mask = torch.as_tensor(active[sl], device=dev, dtype=torch.float64)  # (p, m)
        r = (torch.as_tensor(target[sl], device=dev) - cache.bias) * mask  # r_A, 0 elsewhere
        ok, solve = factor(cache, mask, ctx)
        # h from the shifted factor, then one step of refinement on the float64
        # residual W_A^T (r_A - W_A h): it converges at the rate delta / lambda_min.
        h = solve(r @ cache.w)
        step = solve(((r - h @ cache.w.T) * mask) @ cache.w)
        h = h + step
        size = step.abs().amax(dim=1) / h.abs().amax(dim=1).clamp_min(1e-300)
        ok &= (size <= GRAM_RTOL) & torch.isfinite(h).all(dim=1)
        h_all[sl] = h.cpu().numpy()
        ok_all[sl] = ok.cpu().numpy()
    return h_all, ok_all


def _shift(trace: Any, n: int) -> Any:
    """delta: Cholesky of G - delta I succeeds only if lambda_min(G) > delta - O(n eps tr G) > 0."""
    return GRAM_SHIFT * n * float(np.finfo(np.float64).eps) * trace


def _factor_dense(cache: _LayerCache, mask: Any, ctx: Context) -> tuple[Any, Callable[[Any], Any]]:
    """Cholesky factors of G - delta I (p, n, n) in torch; (ok (p,), solve (p, n) -> (p, n)).

    The CUDA path (the CPU's is `_gram_solve_cpu`).
    """
    torch = ctx.torch
    n = cache.w_np.shape[1]
    g = _gram(cache, mask, ctx)  # lower triangle only
    diag = torch.diagonal(g, dim1=1, dim2=2)
    diag -= _shift(diag.sum(dim=1, keepdim=True), n)
    chol, info = torch.linalg.cholesky_ex(g + torch.tril(g, diagonal=-1).mT)
    ok = info == 0
    if not bool(ok.all()):
        chol[~ok] = torch.eye(n, dtype=torch.float64, device=ctx.device)

    def solve(rhs: Any) -> Any:
        y = torch.linalg.solve_triangular(chol, rhs[:, :, None], upper=False)
        return torch.linalg.solve_triangular(chol.mT, y, upper=True)[:, :, 0]

    return ok, solve


def _gram(cache: _LayerCache, mask: Any, ctx: Context) -> Any:
    """G = W^T diag(mask) W for each row of mask (p, m): (p, n, n), lower triangle only."""
    torch = ctx.torch
    n = cache.w_np.shape[1]
    if cache.packed is not None:
        lower = mask @ cache.packed  # (p, n (n + 1) / 2): one matrix product for the batch
        g = torch.zeros(mask.shape[0], n * n, dtype=torch.float64, device=ctx.device)
        g[:, cache.lower_flat] = lower  # the packed columns, row by row, into the lower triangle
        return g.view(-1, n, n)
    # Gather each sample's active rows (padded with a zero row): |A| n^2 per sample.
    count = mask.sum(dim=1).long()
    width = int(count.max())
    order = torch.argsort(mask, dim=1, descending=True, stable=True)[:, :width]
    keep = torch.arange(width, device=ctx.device)[None, :] < count[:, None]
    w_a = cache.w[order] * keep[:, :, None]
    return w_a.mT @ w_a


def _cholesky_batch(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy's Cholesky factors of a (p, n, n) (lower triangles read) and success flags."""
    try:
        return np.linalg.cholesky(a), np.ones(a.shape[0], dtype=bool)
    except np.linalg.LinAlgError:  # one failure fails the whole call: redo one by one
        out, ok = np.zeros_like(a), np.zeros(a.shape[0], dtype=bool)
        for k, one in enumerate(a):
            try:
                out[k] = np.linalg.cholesky(one)
                ok[k] = True
            except np.linalg.LinAlgError:
                pass
        return out, ok


def _check(
    layer: Layer,
    cache: _LayerCache,
    h0_np: np.ndarray,
    y_np: np.ndarray,
    target_np: np.ndarray,
    active_np: np.ndarray,
    scale_np: np.ndarray,
    rtol: float,
    nonneg: bool,
    ctx: Context,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The checks of `invert_layer` for a full-rank h0, in batch; (ok, h, residual).

    `invert_layer` checks h0 (the equalities within 10 tol, the inactive units
    below tau + tol, h0 >= -tol, with tol = rtol (scale + max_i |w_i| |h0|)),
    then the forward pass of h = max(h0, 0) (within 10 rtol size, size =
    scale + max_i |w_i| |h|). Here everything comes from one product W h, where
    the reference has four with W or |W|: with nu = max_j max(-h0_j, 0),
    |w_i (h - h0)| <= nu max_i |w_i|_1 =: slack; and tol and size use
    max_i |w_i h|, which is at most max_i |w_i| |h| <= max_i |w_i| |h0| (up to
    sqrt(n) times smaller for random signs: still 1e6 times the rounding
    error of w_i h at rtol = 1e-9). So requiring each check on h with the
    slack added, and nu <= tol(h), accepts only samples `invert_layer`
    accepts. In pieces of about CHECK_MEMORY bytes per (piece, m) array on the
    CPU: the temporaries stay in cache and reuse their memory.
    """
    torch = ctx.torch
    dev = ctx.device
    b, m = y_np.shape
    rows = b if not ctx.on_cpu else max(64, CHECK_MEMORY // (8 * m))
    ok = np.zeros(b, dtype=bool)
    h_np = np.maximum(h0_np, 0.0) if nonneg else h0_np
    residual_np = np.zeros(b)
    for lo in range(0, b, rows):
        sl = slice(lo, min(b, lo + rows))
        h = torch.as_tensor(h_np[sl], device=dev)
        target = torch.as_tensor(target_np[sl], device=dev)
        active = torch.as_tensor(active_np[sl], device=dev)
        scale = torch.as_tensor(scale_np[sl], device=dev)
        pre = torch.addmm(cache.bias, h, cache.w.T)
        size = scale + (pre - cache.bias).abs_().amax(dim=1)  # max_i |w_i h| <= max_i |w_i| |h|
        tol = rtol * size  # the rounding of w_i h + b_i
        if nonneg:
            nu = torch.as_tensor(np.maximum(-h0_np[sl].min(axis=1), 0.0), device=dev)
            slack = nu * cache.row_l1_max
        else:
            nu = slack = torch.zeros_like(tol)
        # max over units of (|w_i h + b_i - t_i| - 10 tol) on A and (w_i h + b_i - tau - tol)
        # off A: <= -slack exactly when every unit passes its check with the slack.
        on_a = (pre - target).abs_().sub_(10 * tol[:, None])
        off_a = pre - (rtol * scale + tol)[:, None]
        excess = torch.where(active, on_a, off_a, out=on_a).amax(dim=1)
        y = torch.as_tensor(y_np[sl], device=dev)
        residual = (_activate(layer, pre) - y).abs_().amax(dim=1)
        good = (excess + slack <= 0) & (nu <= tol) & (residual <= 10 * rtol * size)
        ok[sl] = good.cpu().numpy()
        residual_np[sl] = residual.cpu().numpy()
    return ok, h_np, residual_np


# --- the layer-wise descent over a batch -------------------------------------------


def _nonneg_input(net: Network, i: int) -> bool:
    return i > 0 and net.layers[i - 1].activation.output_nonnegative


def descend_batch(
    net: Network,
    xb: np.ndarray,
    rtol: float,
    ctx: Context,
    *,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[LayerArrays]]:
    """Invert every layer, top down, for a batch xb (B, n_d).

    Returns z (B, k) (NaN rows where a layer had no preimage), reached (B,)
    (whether the sample got through every layer) and one LayerArrays per layer
    (index 0 = latent side). Samples the batched step cannot settle go through
    `invert_layer`, whose LayerResult is kept for the verdict.
    """
    batch = xb.shape[0]
    layers = [LayerArrays.empty(i, batch) for i in range(len(net.layers))]
    z = np.full((batch, net.latent_dim), np.nan)
    reached = np.zeros(batch, dtype=bool)
    step = chunk_size(net, batch, batch_size)
    for start in range(0, batch, step):
        idx = np.arange(start, min(batch, start + step))
        h = xb[start : start + idx.size]  # a view: the layers only read it
        alive = np.ones(idx.size, dtype=bool)
        for i in range(len(net.layers) - 1, -1, -1):
            live = np.flatnonzero(alive)
            if live.size == 0:
                break
            h = _layer_step(net, i, h, live, alive, idx, rtol, ctx, layers[i])
        if alive.any():  # then h holds the inputs of layer 0
            reached[idx[alive]] = True
            z[idx[alive]] = h[alive]
        if progress is not None:
            progress(int(idx[-1]) + 1, batch)
    return z, reached, layers


def _layer_step(
    net: Network,
    i: int,
    h: np.ndarray,
    live: np.ndarray,
    alive: np.ndarray,
    idx: np.ndarray,
    rtol: float,
    ctx: Context,
    arrays: LayerArrays,
) -> np.ndarray:
    """Layer i for the live samples of a chunk; returns their inputs (NaN where stopped)."""
    layer = net.layers[i]
    nonneg = _nonneg_input(net, i)
    start = time.perf_counter()
    fast = fast_layer(layer, h if live.size == h.shape[0] else h[live], nonneg=nonneg,
                      rtol=rtol, ctx=ctx)
    share = (time.perf_counter() - start) / live.size
    new_h = np.full((h.shape[0], layer.in_width), np.nan)
    good = live[fast.ok]
    where = idx[good]
    report = arrays.report
    report.status[where] = "unique"
    report.n_active[where] = fast.n_active[fast.ok]
    report.rank[where] = layer.in_width
    report.residual[where] = fast.residual[fast.ok]
    report.time[where] = share
    new_h[good] = fast.h[fast.ok]

    slow = live[~fast.ok]

    def one(j: int) -> LayerResult:
        return invert_layer(layer, h[j], nonneg=nonneg, rtol=rtol)

    for j, res in zip(slow, ctx.map(one, list(slow)), strict=True):
        arrays.record(int(idx[j]), res)
        if res.status in ("infeasible", "failed"):
            alive[j] = False
        else:
            new_h[j] = res.h
    return new_h
