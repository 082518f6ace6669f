"""Wide layers (n >= SQUARE_MIN_WIDTH): a square subset of the active rows, by LU.

The Gram matrix costs |A| n^2 per sample; instead S = the first n active rows
in a fixed pseudo-random order, and all W_S h = y_S - b_S (n x n) are solved by
LU (float32 LAPACK per subset on the CPU, over the thread pool; float64 torch,
batched, on CUDA), refined in float64 until the estimated error left is at
the rounding floor. Two samples with at least n active rows in common share
one subset and so one factorisation (`pair_up`): in a layer four times wider
than its input, where units are active half the time, most samples find such
a partner, halving the factorisations. Two fixed random probe right-hand
sides v give max ||W_S^{-1} v|| / ||v||, an estimate of 1 / sigma_min(W_S)
from below (a 1000-fold underestimate has probability about 1e-5 for
n ~ 1000). A subset is accepted when ``kappa = ||W_S^{-1}|| ||W_S||_F / sqrt(n)
<= min(KAPPA_PER_WIDTH n, KAPPA_MAX_F32)``: since sigma_min(W_A) >=
sigma_min(W_S), W_A has full column rank with a wide margin. This certificate
is probabilistic, unlike the Cholesky one. Rejected samples retry alone with
the first, then the last n active rows of that order (`solve_square`), then
go to the normal equations. Using n rows instead of all |A| makes h less
accurate: its error is about kappa(W_S) eps (1e-14..1e-12 measured) instead of
kappa(W_A) eps.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from preimage.methods.batched.context import Context, LayerCache

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
#: Working memory of one piece of the square-subset solves (batched LU on CUDA).
SQUARE_MEMORY = 512 * 2**20


def solve_square(
    cache: LayerCache, target: np.ndarray, active: np.ndarray, ctx: Context
) -> tuple[np.ndarray, np.ndarray]:
    """h0 with W_S h0 = target_S - b_S for the samples whose square subsets are accepted.

    Tiers: pairs of samples sharing n active rows, then each sample's first,
    then its last n active rows in the fixed order. Returns h0 (b, n) and the
    (b,) mask of the samples solved.
    """
    b = target.shape[0]
    n = cache.w_np.shape[1]
    h0 = np.zeros((b, n))
    solved = np.zeros(b, dtype=bool)
    ranked = active[:, cache.order]  # active flags in the fixed order of the rows
    n_active = ranked.sum(axis=1)
    for tier in ("pair", "first", "last"):
        todo = np.flatnonzero(~solved)
        if tier == "last":
            todo = todo[n_active[todo] > n]  # a different subset exists
        if tier == "pair":
            pairs = pair_up(ranked[todo], n)
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
    return h0, solved


def _take_n(pick: np.ndarray, n: int, *, last: bool) -> np.ndarray:
    """Column indices (g, n) of the first (or last) n True entries of each row of pick."""
    position = np.cumsum(pick, axis=1, dtype=np.int32)
    low = (position[:, -1] - n)[:, None] if last else 0  # skip this many first
    keep = pick & (position > low) & (position <= low + n)
    return np.nonzero(keep)[1].reshape(pick.shape[0], n)


def pair_up(ranked: np.ndarray, n: int) -> np.ndarray:
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
    cache: LayerCache, rows: np.ndarray, group: np.ndarray, rhs: np.ndarray, ctx: Context
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


def _kappa(cache: LayerCache, probe_x: np.ndarray, fro: np.ndarray) -> np.ndarray:
    """Estimated kappa = ||W_S^{-1}|| ||W_S||_F / sqrt(n) from the probe solutions (..., n, 2)."""
    n = probe_x.shape[-2]
    inv_norm = np.max(np.linalg.norm(probe_x, axis=-2) / np.linalg.norm(cache.probes, axis=0),
                      axis=-1)
    kappa = inv_norm * fro / math.sqrt(n)
    return np.where(np.isfinite(kappa), kappa, np.inf)


def _lu_solve(
    cache: LayerCache, rows: np.ndarray, rhs: np.ndarray, ctx: Context
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
    cache: LayerCache, rows: np.ndarray, group: np.ndarray, rhs: np.ndarray, ctx: Context
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
    cache: LayerCache,
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
