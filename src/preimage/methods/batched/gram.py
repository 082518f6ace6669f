"""Layers narrower than SQUARE_MIN_WIDTH: the normal equations, certified by Cholesky.

**Normal equations.** For every sample, G = W_A^T W_A = sum over active rows
of w_i w_i^T, for the whole batch in one matrix product (mask (B, m) times the
m packed outer products w_i w_i^T) or, when that costs more or the table
would not fit in memory, in batched products of each sample's gathered active
rows (an MNIST decoder's pixels: few active). A Cholesky factorisation of
G - delta I with delta = GRAM_SHIFT n eps trace(G) succeeds in floating point
only when lambda_min(G) > delta - O(n eps trace G) > 0: it certifies full
column rank many orders of magnitude above the SVD rank threshold of
`invert_layer` (sigma > sigma_max max(|A|, n) eps), so both paths take the
same decision. h is the least-squares solution of the active equalities, like
the reference's: the shifted factor preconditions iterative refinement on
W_A^T (r_A - W_A h) computed in float64.

**Downdates (CPU, first).** Over the rows R most often active in the batch
(about 1.25 n active per sample), a sample's Gram matrix is the shared
W_R^T W_R minus its few inactive rows of R: when those are at most n / 2 on
average, each sample factors only the small Woodbury capacitance matrix of
its inactive rows, gathered from one shared projector (`_downdate_solve`;
20-100-500: the 500-wide layer's samples each factor a 35 x 35 matrix instead
of forming and factoring a 100 x 100 Gram matrix, 2x faster end to end). A
certified W_{A and R} certifies W_A; the samples it does not settle take the
normal equations over all rows.

On the CPU both run piece by piece over the thread pool, each piece from
product to refined h in one worker, so that its matrices stay in cache:
NumPy's batched Cholesky and torch's batched triangular solves for small
matrices, LAPACK's packed dpptrf / dpptrs on the packed Gram rows from
n >= PACKED_MIN_WIDTH.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from preimage.methods.batched.context import Context, LayerCache

#: The Gram matrix is shifted by GRAM_SHIFT * n * eps * trace(G) before its Cholesky
#: factorisation (the rounding error of that factorisation is about n eps trace G).
GRAM_SHIFT = 10.0
#: Accept the normal-equation solution when its refinement step is below this
#: (relative): the shift then costs less than 1e-14 of accuracy after the step.
GRAM_RTOL = 1e-7
#: Working memory of one piece of the normal-equation solves on CUDA (the CPU's
#: pieces: GRAM_MEMORY, DOWNDATE_MEMORY).
PIECE_MEMORY = 32 * 2**20
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
#: A slice of samples is cut into at least this many pieces, so that up to as many
#: threads share a small batch. A constant, not the thread count: the pieces fix the
#: rounding of each sample's answer, which then does not depend on `n_jobs`.
PARALLEL_PIECES = 4
#: Gather a piece's active rows for its Gram matrices (|A| n^2 flops per sample)
#: when GATHER_COST |A| n^2 < m n (n + 1) / 2, the flops of the packed product (small
#: products of gathered rows were measured at about half the speed of one large one).
GATHER_COST = 2.0
#: From this width on, the CPU factors the Gram matrices with LAPACK's packed
#: routines per sample; narrower ones go through NumPy's batched Cholesky (one C
#: loop), as the per-call overhead would dominate (20 x 20: 0.13 -> 0.09 s per 10k).
PACKED_MIN_WIDTH = 32


def downdate_then_gram(
    cache: LayerCache, target: np.ndarray, active: np.ndarray, ctx: Context
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
        return gram_solve(cache, target, active, ctx)
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
        h[rest], ok[rest] = gram_solve(cache, target[rest], active[rest], ctx)
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
    padded = np.minimum(-(-size // DOWNDATE_PAD) * DOWNDATE_PAD, r)  # at most every row of R
    order = np.argsort(padded, kind="stable")
    padded = padded[order]
    pieces = []  # (lo, hi, e): the samples order[lo:hi] have |E| padded to e
    for e in np.unique(padded):
        lo, hi = np.searchsorted(padded, e), np.searchsorted(padded, e, side="right")
        fits = max(DOWNDATE_PIECE_MIN, DOWNDATE_MEMORY // (8 * max(int(e), 1) ** 2))
        step = max(1, min(fits, -(-(hi - lo) // PARALLEL_PIECES)))
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
    cache: LayerCache, target: np.ndarray, active: np.ndarray, ctx: Context
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
    step = max(1, min(step, -(-b // PARALLEL_PIECES)))
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
            g[:, diag_packed] -= _shift(g[:, diag_packed].sum(axis=1, keepdims=True), n,
                                        shift_floor(ctx))
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
            dense[:, diag, diag] -= _shift(trace, n, shift_floor(ctx))[:, None]
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
        ok_all[idx] = ok & (size <= accept_rtol(ctx, n)) & np.all(np.isfinite(h), axis=1)

    ctx.map(run, list(range(0, b, step)))
    return h_all, ok_all


def gram_solve(
    cache: LayerCache, target: np.ndarray, active: np.ndarray, ctx: Context
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
        ok &= (size <= accept_rtol(ctx, n)) & torch.isfinite(h).all(dim=1)
        h_all[sl] = h.cpu().numpy()
        ok_all[sl] = ok.cpu().numpy()
    return h_all, ok_all


def _shift(trace: Any, n: int, floor: float = 0.0) -> Any:
    """delta: Cholesky of G - delta I succeeds only if lambda_min(G) > delta - O(n eps tr G) > 0.

    ``floor``: delta is at least floor tr(G) (the resolution of low-precision data:
    then sigma_min(W_A)^2 > floor tr(G) >= floor sigma_max(W_A)^2, `shift_floor`).
    """
    return max(GRAM_SHIFT * n * float(np.finfo(np.float64).eps), floor) * trace


def shift_floor(ctx: Context) -> float:
    """The relative shift the data's resolution asks of the Cholesky certificate."""
    return ctx.resolution**2


def accept_rtol(ctx: Context, n: int) -> float:
    """The refinement step below which a normal-equation solution is accepted: GRAM_RTOL,
    or where low-precision data set the shift (`needs_resolution`) the resolution itself
    (the larger shift slows the refinement, rate delta / lambda_min; what is left after
    the step is far below the data's tolerance, and the checks verify the answer)."""
    return max(GRAM_RTOL, ctx.resolution) if needs_resolution(ctx, n) else GRAM_RTOL


def needs_resolution(ctx: Context, n: int) -> bool:
    """Whether the data's resolution is coarser than the certificates' own float64 margin
    (float32 or half-precision data): then only the shifted Cholesky certificate of the
    normal equations (`gram_solve`) is used, the one that can show it."""
    return shift_floor(ctx) > GRAM_SHIFT * n * float(np.finfo(np.float64).eps)


def _factor_dense(cache: LayerCache, mask: Any, ctx: Context) -> tuple[Any, Callable[[Any], Any]]:
    """Cholesky factors of G - delta I (p, n, n) in torch; (ok (p,), solve (p, n) -> (p, n)).

    The CUDA path (the CPU's is `_gram_solve_cpu`).
    """
    torch = ctx.torch
    n = cache.w_np.shape[1]
    g = _gram(cache, mask, ctx)  # lower triangle only
    diag = torch.diagonal(g, dim1=1, dim2=2)
    diag -= _shift(diag.sum(dim=1, keepdim=True), n, shift_floor(ctx))
    chol, info = torch.linalg.cholesky_ex(g + torch.tril(g, diagonal=-1).mT)
    ok = info == 0
    if not bool(ok.all()):
        chol[~ok] = torch.eye(n, dtype=torch.float64, device=ctx.device)

    def solve(rhs: Any) -> Any:
        y = torch.linalg.solve_triangular(chol, rhs[:, :, None], upper=False)
        return torch.linalg.solve_triangular(chol.mT, y, upper=True)[:, :, 0]

    return ok, solve


def _gram(cache: LayerCache, mask: Any, ctx: Context) -> Any:
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
