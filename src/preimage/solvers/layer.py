"""Exact inversion of one layer y = act(W h + b).

ReLU (the paper's Theorem: one layer is inverted exactly in polynomial time).
With A = {i : y_i > tau} the active units and I the rest, the preimage is
the polyhedron (../NOTES-math.md section 1)

    P(y) = { h in D :  W_A h + b_A = y_A,     (active: equalities)
                       W_I h + b_I <= 0 }     (inactive: inequalities)

with D = R^n_+ when h is itself a ReLU output, else R^n. Bijective
activations (LeakyReLU, identity, tanh, sigmoid) are undone elementwise and
leave only equalities: the same polyhedron with A = all units.

The equalities are solved first through an SVD of W_A (a QR factorisation
when W_A is wide with full row rank, `_active_equalities`): when W_A has full
column rank they fix h (unique; the inequalities are then only checked).
Otherwise h = h0 + N u with N a basis of null(W_A), and the LP runs over the
k = n - rank(W_A) coordinates u only (`_polyhedron_lp`).

Tolerances: every threshold is ``rtol`` times the scale of the data,
``scale = max(|y|_inf, |b|_inf)``: units with y_i <= rtol * scale count as
inactive, and inactive rows may reach rtol * scale (the observation cannot
tell a pre-activation of 1e-12 from 0). Equalities hold within
``rtol * size``, the size of the rounding
error of w_i h + b_i, size = scale + max_i sum_j |w_ij h_j|. The answer is
accepted only after a forward pass: |act(W h + b) - y|_inf <= 10 rtol size.
Tightness (for the uniqueness certificate) uses TIGHT_RTOL * size instead:
it reflects the accuracy of the float64 solve, not of the data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import solve_triangular, svdvals
from scipy.linalg.lapack import dgeqrf, dormqr

from preimage.model.layer import Layer, check_layer_input
from preimage.results import LP_TOL, RANK_RTOL, STRETCH_LIMIT, TIGHT_RTOL, LayerResult
from preimage.solvers.certificate import certify_unique
from preimage.solvers.highs import RowLP, natural_scale, solve_lp

#: `_polyhedron_lp` starts with the h >= 0 rows of the 2k + NONNEG_MARGIN smallest h0_j.
NONNEG_MARGIN = 40
#: ... and adds the rows its answer violates by more than this (relative to the rows' bounds).
VIOLATION_RTOL = 1e-12
#: `_inner_point_lp` keeps this times max(|h0|, 1) from every inactive unit's boundary:
#: far above the tolerances that call a constraint tight, so that none is.
DEPTH_RTOL = 1e-3
#: A row of the LPs in null-space coordinates whose entries are all below this times
#: what they would be without cancellation is rounding (`_rounding_rows_zeroed`).
NOISE_RTOL = 1e-12


def _polyhedron_lp(
    h0: np.ndarray,
    null_basis: np.ndarray,
    w_ineq: np.ndarray,
    rhs_ineq: np.ndarray,
    *,
    nonneg: bool,
) -> tuple[np.ndarray | None, str, str]:
    """A point of P in null-space coordinates: h = h0 + N u.

        minimise    1^T (h0 + N u)          (only when D = R^n_+: the sparsest
                                              point, NOTES-math section 3)
        subject to  W_I N u <= rhs - W_I h0  (inactive rows)
                    -N u    <= h0            (h >= 0, when D = R^n_+)
                    u free, k variables

    When D = R^n, a point strictly inside the inactive half-spaces first
    (`_inner_point_lp`); this feasibility LP only where P has no such point.

    Solved by row generation on one HiGHS instance (`preimage.solvers.highs.RowLP`:
    each round restarts the dual simplex from the last basis). The first
    relaxation holds the inactive rows that h0 violates and, when D = R^n_+,
    the h >= 0 rows of the 2k + NONNEG_MARGIN smallest coordinates of h0 (the
    sparsest point is 0 where h0 is small; at a realizable layer the inactive
    rows rarely bind). Each round adds the rows the answer violates; an
    unbounded relaxation gets every row. A relaxation that is infeasible
    proves the full LP infeasible; its optimum, once feasible for every row,
    is an optimum of the full LP.

    Returns (h, status, message): status "optimal" (h a point of P),
    "infeasible" (P is proved empty) or "failed" (HiGHS gave no answer; h None).
    """
    k = null_basis.shape[1]
    if not nonneg:
        h = _inner_point_lp(h0, null_basis, w_ineq, rhs_ineq)
        if h is not None:
            return h, "optimal", (
                "LP solved (HiGHS: optimal; a point inside every inactive unit's half-space)"
            )
    # The pool of rows  a u <= b : the inactive units, then (D = R^n_+) h >= 0.
    a_rows, b_rows = [w_ineq @ null_basis], [rhs_ineq - w_ineq @ h0]
    if nonneg:
        a_rows.append(-null_basis)
        b_rows.append(h0)
    sizes = [np.linalg.norm(w_ineq, axis=1)] + ([np.ones(len(h0))] if nonneg else [])
    a_pool = _rounding_rows_zeroed(np.vstack(a_rows), np.concatenate(sizes))
    b_pool = np.concatenate(b_rows)
    keep = b_pool < 0  # rows violated at u = 0
    if nonneg:
        smallest = np.argsort(h0)[: min(h0.size, 2 * k + NONNEG_MARGIN)]
        keep[w_ineq.shape[0] + smallest] = True
    slack_tol = VIOLATION_RTOL * max(float(np.max(np.abs(b_pool), initial=0.0)), 1e-300)
    lp = RowLP(null_basis.sum(axis=0) if nonneg else np.zeros(k),
               scale=natural_scale(a_pool, b_pool, h0))
    lp.add(a_pool[keep], b_pool[keep])
    for _ in range(a_pool.shape[0] + 1):  # every round but the last adds a row
        solution = lp.solve()
        status, u = solution.status, solution.x
        if status in ("unbounded", "infeasible_or_unbounded") and not keep.all():
            lp.add(a_pool[~keep], b_pool[~keep])  # every row: the LP is bounded below
            keep[:] = True
            continue
        if status == "infeasible" or (status == "infeasible_or_unbounded" and keep.all()):
            # (with every row the objective is bounded: 1^T h >= 0, or the cost is 0)
            return None, "infeasible", (
                "the active equalities and inactive inequalities have no common point"
            )
        if u is None:
            return None, "failed", f"HiGHS did not solve the layer LP ({solution.message})"
        # Rows violated by rounding only (the sparsest point is a degenerate
        # vertex: many zero coordinates come out at -1e-14) would cost a round each.
        violated = (a_pool @ u > b_pool + slack_tol) & ~keep
        if not violated.any():
            return h0 + null_basis @ u, "optimal", "LP solved (HiGHS: optimal)"
        lp.add(a_pool[violated], b_pool[violated])
        keep |= violated
    return None, "failed", "row generation did not settle"  # not reached: the pool is finite


def _rounding_rows_zeroed(a: np.ndarray, size: np.ndarray) -> np.ndarray:
    """`a` with the rows whose entries are all below NOISE_RTOL times their `size` (what
    they would be without cancellation: |w_r| for a row w_r N of an orthonormal N, 1 for
    a row of N) set to 0.

    Such a row is rounding (the unit's pre-activation does not move along null(W_A)): its
    constraint is on h0 alone. Left as it is, `RowLP` divides the row by its largest
    entry, and a bound that h0 misses by rounding becomes a demand of 1e11 along it:
    h0_j = -6.6e-6 for a unit whose column of W is not in the null space (its row of N
    of order 1e-17) got h = 7e9 in a zero column of W, which the layer below could reach
    only with |z| = 1e10; the inactive rows v of a fold net (W = [V; -V], the rows -v
    active) got z = 1e15, where G(z) missed x by 0.59."""
    if a.size == 0:
        return a
    noise = np.max(np.abs(a), axis=1) <= NOISE_RTOL * size
    if not noise.any():
        return a
    out = a.copy()
    out[noise] = 0.0
    return out


def _inner_point_lp(
    h0: np.ndarray, null_basis: np.ndarray, w_ineq: np.ndarray, rhs_ineq: np.ndarray
) -> np.ndarray | None:
    """The point of P (D = R^n) nearest h0 at depth d inside every inactive half-space.

        minimise    s                                   (= |u|_inf: h - h0 = N u)
        subject to  a_r u <= b_r - |a_r| d               (a = W_I N, b = rhs - W_I h0)
                    -s <= u_j <= s,   u free,  d = DEPTH_RTOL max(|h0|, 1)

    With no h >= 0 rows every point of P is as good an answer as any other;
    this one lies at distance d within null(W_A) from every inactive unit's
    boundary, so no constraint is tight there and every null direction is a
    second preimage: `certificate.certify_unique` finds one without its
    Stiemke or witness LP. Nearest to h0, the least-norm solution of the
    equalities, so that the answer stays near it (the deepest point of an
    unbounded P lies arbitrarily far out). None when no point of P is that
    deep (P a single point, a flat face, or empty): the feasibility LP then
    decides. One LP with every row (k + 1 variables, m - |A| + 2k rows): a
    free layer is the latent one, whose rows are few.
    """
    k = null_basis.shape[1]
    a = _rounding_rows_zeroed(w_ineq @ null_basis, np.linalg.norm(w_ineq, axis=1))
    slack = rhs_ineq - w_ineq @ h0
    size = natural_scale(a, slack, h0)  # (not 1: the same LP at every scale of the data)
    depth = DEPTH_RTOL * max(float(np.linalg.norm(h0)), size)
    b = slack - np.linalg.norm(a, axis=1) * depth
    lp = RowLP(np.eye(1, k + 1, k)[0], scale=size)  # variables (u, s)
    lp.add(np.column_stack([a, np.zeros(a.shape[0])]), b)
    box = np.hstack([np.vstack([np.eye(k), -np.eye(k)]), -np.ones((2 * k, 1))])
    lp.add(box, np.zeros(2 * k))  # u_j - s <= 0 and -u_j - s <= 0
    us = lp.solve().x
    return None if us is None else h0 + null_basis @ us[:k]


def _active_equalities(
    w_a: np.ndarray, r_a: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int, float, float]:
    """The active equalities W_A h = r_A: (h0, N, rank, sigma_min, sigma_max).

    h0 (n,) is the least-norm (least-squares) solution, N (n, n - rank) an
    orthonormal basis of null(W_A), rank counts the singular values above
    sigma_max max(W_A.shape) eps, and sigma_min is the smallest of those.

    A wide W_A (|A| < n, the rank-deficient case the LP follows) with full
    row rank goes through the QR factorisation W_A^T = Q R: its singular
    values are R's, h0 = Q_1 R^-T r_A and N = Q_2, the last n - |A| columns of
    Q. That costs half the SVD with the full n x n V (16 vs 35 ms for a
    369 x 500 W_A on one core). Otherwise, the SVD of W_A.
    """
    a, n = w_a.shape
    eps = float(np.finfo(float).eps)
    if a == 0:
        return np.zeros(n), np.eye(n), 0, np.nan, np.nan
    if a < n:
        qr, tau, _, info = dgeqrf(np.asfortranarray(w_a.T))
        s = svdvals(np.triu(qr[:a]), check_finite=False) if info == 0 else np.zeros(1)
        if np.all(np.isfinite(s)) and s[-1] > s[0] * n * eps:  # full row rank
            lwork = 64 * n
            y = np.zeros((n, 1), order="F")
            y[:a, 0] = solve_triangular(qr[:a], r_a, trans="T", check_finite=False)
            h0 = dormqr("L", "N", qr, tau, y, lwork=lwork)[0][:, 0]  # Q [y; 0]
            tail = np.zeros((n, n - a), order="F")
            tail[a:] = np.eye(n - a)
            null_basis = dormqr("L", "N", qr, tau, tail, lwork=lwork)[0]  # Q [0; I]
            return h0, null_basis, a, float(s[-1]), float(s[0])
    u_, s, vt = np.linalg.svd(w_a, full_matrices=a < n)
    rank = int(np.sum(s > s[0] * max(a, n) * eps))
    h0 = vt[:rank].T @ ((u_[:, :rank].T @ r_a) / s[:rank])
    return (h0, vt[rank:].T, rank, float(s[rank - 1]) if rank else np.nan,
            float(s[0]) if s.size else np.nan)


def invert_layer(
    layer: Layer, y: np.ndarray, *, nonneg: bool = False, rtol: float = 1e-9
) -> LayerResult:
    """All of P(y) for one layer, summarised by one point and a verdict.

    Parameters
    ----------
    layer : Layer
        y = act(W h + b), W of shape (m, n).
    y : ndarray of shape (m,)
        The observed output of the layer.
    nonneg : bool
        Whether h is known to be >= 0 (it is the output of a ReLU).
    rtol : float
        Relative tolerance, see the module docstring.

    Returns
    -------
    LayerResult
    """
    start = time.perf_counter()
    y, rtol = check_layer_input(layer, y, nonneg, rtol)
    m, n = layer.weight.shape
    b = layer.bias_or_zero()
    active = np.ones(m, dtype=bool)

    def done(h: np.ndarray | None, status: str, message: str, **kw: object) -> LayerResult:
        if h is None:
            h, residual = np.full(n, np.nan), np.nan
        else:
            residual = float(np.max(np.abs(layer.forward(h[None])[0] - y)))
        kw.setdefault("n_active", int(active.sum()))
        kw.setdefault("rank", 0)
        kw.setdefault("sigma_min", np.nan)
        return LayerResult(
            h, status, message, residual=residual, time=time.perf_counter() - start, **kw
        )  # type: ignore[arg-type]

    cons = active_set(layer, y, rtol)
    if isinstance(cons, str):
        distance = range_distance(layer, y)
        return done(None, "infeasible", cons + _rounding_note(distance, rtol, y, b), n_active=0,
                    misfit=distance)
    active, target, tau, scale = cons.active, cons.target, cons.tau, cons.scale
    inactive = ~active
    # The forward checks compare outputs: their scale is the targets' and the bias's plus,
    # where a curved activation's rounding stretched `scale` (pre-activation units),
    # the outputs' own size instead of that stretch.
    unstretched = max(float(np.max(np.abs(target))), float(np.max(np.abs(b), initial=0.0)))
    stretched = scale > max(unstretched, 1e-300)
    out_scale = unstretched + float(np.max(np.abs(y))) if stretched else scale

    def nearest(why: str, **kw: object) -> LayerResult | tuple[np.ndarray, str]:
        """The exact structure found no point: the nearest one within the data's tolerance
        (a preimage at this rtol), or a proof that there is none (with its distance)."""
        h_near, distance, how = nearest_point(layer, y, cons, nonneg=nonneg)
        if h_near is None:
            return done(None, "failed", f"{why}; {how}", **kw)
        size_near = out_scale + float(np.max(abs_product(layer, h_near)))
        miss = float(np.max(np.abs(layer.forward(h_near[None])[0] - y)))
        if miss <= 10 * rtol * size_near:
            return h_near, (
                f"{why}; the nearest point (an LP) reproduces y within the data's tolerance "
                f"(rtol {rtol:g}: |act(Wh+b) - y|_inf = {miss:.3g})"
            )
        if distance <= 10 * tau:  # the LP's point is near, but not near enough: nothing proved
            return done(None, "failed", f"{why}; {how}, and its point misses by {miss:.3g}", **kw)
        if cons.saturated is not None and cons.saturated.any():
            return done(None, "failed", (
                f"{why}; {how}, but {int(cons.saturated.sum())} saturated output(s) were held "
                "at a pre-activation their true one only bounds on one side: nothing proved"
            ), **kw)
        return done(None, "infeasible", f"{why}; {how}" + _rounding_note(distance, rtol, y, b),
                    misfit=distance, **kw)

    # Equalities W_A h = y_A - b_A: least-norm solution, rank, null space.
    w_a = layer.weight.rows(np.flatnonzero(active))
    r_a = target[active] - b[active]
    h0, null_basis, rank, sigma_min, sigma_max = _active_equalities(w_a, r_a)
    info = {"rank": rank, "sigma_min": sigma_min}

    tol = rtol * (scale + float(np.max(abs_product(layer, h0))))
    w_i = layer.weight.rows(np.flatnonzero(inactive))
    rhs_i = tau - b[inactive]  # w_i h + b_i <= tau
    used_lp = False
    feasible_h0 = bool(np.all(w_i @ h0 <= rhs_i + tol)) and (not nonneg or h0.min() >= -tol)
    found: LayerResult | tuple[np.ndarray, str] | None = None
    if w_a.shape[0] and np.max(np.abs(w_a @ h0 - r_a)) > 10 * tol:
        used_lp = True
        found = nearest(
            "the active units' equations W_A h + b_A = y_A have no common solution "
            f"(least-squares residual {np.max(np.abs(w_a @ h0 - r_a)):.3g})", used_lp=True, **info
        )
    elif rank == n or (feasible_h0 and not nonneg):
        # Full column rank: the equalities fix h. Otherwise h0 (the least-norm
        # solution) is as good a pick as any on an unconstrained domain.
        if not feasible_h0:
            used_lp = True
            found = nearest(
                "the unique solution of the active equalities violates an inactive unit "
                "or h >= 0", used_lp=True, **info,
            )
        else:
            h = np.maximum(h0, 0.0) if nonneg else h0
            message = "solved the active equalities (full column rank)" if rank == n else (
                "least-norm solution of the active equalities"
            )
    else:
        used_lp = True
        h_lp, status, message = _polyhedron_lp(h0, null_basis, w_i, rhs_i, nonneg=nonneg)
        if h_lp is None and status == "infeasible":
            found = nearest(message, used_lp=True, **info)
        elif h_lp is None:
            return done(None, status, message, used_lp=True, **info)
        else:
            h = np.maximum(h_lp, 0.0) if nonneg else h_lp
    if isinstance(found, LayerResult):
        return found
    nearest_only = found is not None
    if found is not None:
        h, message = found

    # Rounding in w_i h + b_i is about eps * sum_j |w_ij h_j|: the checks scale with it.
    size = scale + float(np.max(abs_product(layer, h)))
    check_tol = 10 * rtol * (out_scale + float(np.max(abs_product(layer, h))))
    residual = float(np.max(np.abs(layer.forward(h[None])[0] - y)))
    if residual > check_tol:
        return done(
            None,
            "failed",
            f"the computed point does not reproduce y (|act(Wh+b) - y|_inf = {residual:.3g} > "
            f"{check_tol:.3g})",
            used_lp=used_lp,
            **info,
        )
    # "Tight" reflects the float64 solve, not the data's precision: a constraint
    # wrongly called tight could only make the certificate claim "unique" falsely.
    cert = certify_unique(
        layer, y, h, active, null_basis, nonneg=nonneg, tol=TIGHT_RTOL * size,
        check_tol=check_tol,
    )
    verdict, note = cert.verdict, cert.message
    if verdict == "unique" and cons.saturated is not None and cons.saturated.any():
        verdict, note = _saturated_verdict(layer, cons.saturated, note)
    # What the data resolve: singular values above RANK_RTOL rtol sigma_max, or, where a
    # curved activation's rounding set the scale, above RANK_RTOL rtol size / |h|.
    resolution = RANK_RTOL * rtol * (
        size / max(float(np.linalg.norm(h)), 1e-300) if stretched else sigma_max
    )
    if verdict == "unique" and rank and sigma_min < resolution:
        verdict, note = "feasible", (
            f"{note}, but W_A's smallest singular value {sigma_min:.3g} is below what the data "
            f"resolve ({resolution:.3g}): h is not fixed along it at this precision, so "
            "uniqueness is unsettled"
        )
    saturated_held = cons.saturated is not None and bool(cons.saturated.any())
    if verdict == "unique" and nearest_only and (rank < n or saturated_held):
        # (with full column rank, resolved, every point within the tolerance is near h; with
        # fewer the certificate leaned on inequalities at a point outside the structure; with
        # saturated units the LP held them at one point of their half-lines, which bends h
        # wherever another unit's output is too small to object: stress seed 1992)
        verdict, note = "feasible", (
            f"{note} for the structure of y, which no point fits exactly: its preimages "
            "within the tolerance may differ, so uniqueness is unsettled"
        )
    return done(
        h,
        verdict,
        f"{message}; {note}",
        used_lp=used_lp,
        witness=cert.witness,
        tol=check_tol,
        stretched=stretched,
        **info,
    )


def _saturated_verdict(layer: Layer, saturated: np.ndarray, note: str) -> tuple[str, str]:
    """"unique" stands where the unsaturated units alone fix h; else "feasible": a
    saturated unit bounds its pre-activation on one side only."""
    rows = layer.weight.rows(np.flatnonzero(~saturated))
    n = layer.in_width
    if rows.shape[0] >= n and np.linalg.matrix_rank(rows) == n:
        return "unique", f"{note} (by the {rows.shape[0]} unsaturated units alone)"
    return "feasible", (
        f"{int(saturated.sum())} output(s) sit at an end of {layer.activation}'s range "
        "(saturated: their pre-activations are bounded on one side only), so uniqueness is "
        "unsettled"
    )


@dataclass(frozen=True)
class ActiveSet:
    """The linear constraints one observation y puts on a layer's input h.

    Rows in `active` are equalities w_i h + b_i = target_i; the others are
    inequalities w_i h + b_i <= tau (ReLU units observed at 0). For bijective
    activations every row is active and target = act^{-1}(y).
    """

    active: np.ndarray
    target: np.ndarray
    tau: float
    scale: float
    #: bijective activations: the units whose output sits at an end of the range
    #: (tanh(20) == 1.0 in float64), their targets clipped just inside (None: none)
    saturated: np.ndarray | None = None
    #: saturated units' half-lines: pre-activation >= reach (the range's top end, side
    #: +1) or <= reach (its bottom, side -1); reach the pre-activation whose output is one
    #: tolerance (rtol max(|y|, 1), far above the rounding) inside the end: every
    #: pre-activation the rounding allows is on it, every one on it reproduces y
    reach: np.ndarray | None = None
    side: np.ndarray | None = None

    def pre_activation_bounds(
        self, bias: np.ndarray, band: float | np.ndarray = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Bounds lo_i <= w_i h <= hi_i (m,) that y puts on each unit, the bias moved right.

        Active units: target_i - b_i +- band_i; saturated units their half-line
        (w_i h + b_i >= reach_i or <= reach_i); the others w_i h + b_i <= tau.
        """
        lo = np.where(self.active, self.target - bias - band, -np.inf)
        hi = np.where(self.active, self.target - bias + band, self.tau - bias)
        if self.saturated is not None and self.reach is not None and self.side is not None:
            top, bottom = self.saturated & (self.side > 0), self.saturated & (self.side < 0)
            lo[top], hi[top] = self.reach[top] - bias[top], np.inf
            lo[bottom], hi[bottom] = -np.inf, self.reach[bottom] - bias[bottom]
        return lo, hi

    def curved_band(self, layer: Layer, y: np.ndarray, rtol: float) -> np.ndarray:
        """(m,) how far, in pre-activation units, each unsaturated unit's true pre-activation
        may lie from its target: rtol max|y|_inf / slope(y_i) for a curved activation (the
        rounding of y, far below rtol, stretched by the inverse; a point within it
        reproduces y to 10 rtol), 0 for the piecewise-linear ones."""
        act = layer.activation
        if act.is_piecewise_linear:
            return np.zeros(len(y))
        band = rtol * max(float(np.max(np.abs(y))), 1e-300) / act.slope(y)
        return np.where(self.saturated, 0.0, band) if self.saturated is not None else band


#: A saturated unit's target: the pre-activation whose output is this far inside the
#: range (relative to its width): within every tolerance of the saturated value.
SATURATION_MARGIN = 1e-12


def active_set(layer: Layer, y: np.ndarray, rtol: float) -> ActiveSet | str:
    """The constraints of P(y), or a message saying why y is out of range.

    Bijective activations are undone elementwise (every unit active); a ReLU's
    output is its own target, its units active where y > tau = rtol scale,
    scale = max(|target|_inf, |b|_inf). An output of a bijective activation at an
    end of its range, within rtol max(|y|_inf, 1) (a saturated unit: its exact
    preimage is a half-line), gets the target SATURATION_MARGIN inside; only
    outputs beyond that are out of range.
    """
    b = layer.bias_or_zero()
    target = layer.activation.inverse(y) if layer.activation.is_bijective else y
    saturated = None
    if not np.all(np.isfinite(target)):
        lo, hi = layer.activation.range
        near = rtol * max(float(np.max(np.abs(y))), 1.0)
        outside = ~np.isfinite(target)
        at_end = outside & ((np.abs(y - lo) <= near) | (np.abs(y - hi) <= near))
        if (outside & ~at_end).any():
            bad = int(np.sum(outside & ~at_end))
            return f"{bad} output(s) lie outside the range of {layer.activation}"
        target[at_end] = layer.activation.clipped_inverse(y[at_end], SATURATION_MARGIN)
        saturated = at_end
        side = np.where(at_end, np.where(np.abs(y - hi) <= near, 1, -1), 0)
        reach = np.full(len(y), np.nan)
        reach[at_end] = layer.activation.clipped_inverse(y[at_end] - side[at_end] * near,
                                                         SATURATION_MARGIN)
    scale = max(float(np.max(np.abs(target))), float(np.max(np.abs(b), initial=0.0)), 1e-300)
    tau = rtol * scale
    if layer.activation.is_bijective:
        # a curved activation's outputs are known to rtol max|y|: their targets to that over
        # the slope (sigmoid outputs at 0.5 to float64's last digit fix targets of 1e-16
        # only to 4e-16); saturated units aside, they have their own rule
        free = y if saturated is None else y[~saturated]
        stretch = float(layer.activation.target_scale(free)) if free.size else 0.0
        scale = stretch if stretch > STRETCH_LIMIT * scale else scale
        return ActiveSet(np.ones(layer.out_width, dtype=bool), target, rtol * scale, scale,
                         saturated, *((reach, side) if saturated is not None else (None, None)))
    if np.any(y < -tau):
        return "a ReLU output is negative"
    return ActiveSet(y > tau, target, tau, scale)


def abs_product(layer: Layer, h: np.ndarray) -> np.ndarray:
    """|W| |h| (m,): the size of the terms of w_i h, which bounds the rounding of w_i h + b_i."""
    matrix: Any = layer.weight.matrix()
    return abs(matrix) @ np.abs(h)


def range_distance(layer: Layer, y: np.ndarray) -> float:
    """How far y lies outside the closed range of the layer's activation (l_inf)."""
    lo, hi = layer.activation.range
    if not layer.activation.is_bijective:
        lo, hi = 0.0, np.inf
    return float(np.max(np.maximum(lo - y, 0.0) + np.maximum(y - hi, 0.0), initial=0.0))


def _rounding_note(distance: float, rtol: float, y: np.ndarray, b: np.ndarray) -> str:
    """Where an "infeasible" distance is at rounding level: the rtol that would accept it."""
    scale = max(float(np.max(np.abs(y), initial=0.0)), float(np.max(np.abs(b), initial=0.0)),
                1e-300)
    needed = distance / (5 * scale)
    if not np.isfinite(needed) or needed <= rtol or needed > 1e-4:
        return f" (distance {distance:.3g})"
    suggest = 10.0 ** np.ceil(np.log10(needed))
    return (
        f" (distance {distance:.3g}, {needed:.2g} relative: at the rounding level of "
        f"lower-precision data; rtol={suggest:g} would accept it)"
    )


def nearest_point(
    layer: Layer, y: np.ndarray, cons: ActiveSet, *, nonneg: bool
) -> tuple[np.ndarray | None, float, str]:
    """The point h of the input domain nearest to being a preimage of y; (h, distance, how).

        minimise    t
        subject to  |s_i (w_i h + b_i - t_i)| <= t    (units clearly on, y_i > 10 tau:
                                                       t_i = y_i; bijective: every
                                                       unit, t_i = act^-1(y_i), s_i
                                                       its slope there)
                    w_i h + b_i - y_i <= t            (the other ReLU units)
                    h >= 0                            (when h is a ReLU output)

    t is measured in the units of y (the slope s_i turns a pre-activation error
    into an output error). Any h whose |act(W h + b) - y|_inf is at most
    delta <= 10 tau satisfies every row with t = delta (a unit with
    y_i > 10 tau >= delta stays on), so an optimum t* > 10 tau proves that no
    point of the domain reproduces y within 10 tau, up to the LP's tolerance;
    t* is the distance reported. The rows are scaled by the data's scale for
    HiGHS; one LP with n + 1 variables and the layer's rows (sparse where the
    weight is).
    """
    from scipy import sparse

    matrix = layer.weight.matrix()
    n = layer.in_width
    b = layer.bias_or_zero()
    act = layer.activation
    if act.is_bijective:
        two = cons.active
        weight = act.slope(y)
    else:
        two = cons.active & (y > 10 * cons.tau)
        weight = np.ones_like(y)
    s = cons.scale
    # h = (s / omega) v: the rows' entries weight w_ij / omega and their bounds O(1) at
    # every scale of the data and the weights (HiGHS drops entries below 1e-9).
    omega = float(abs(matrix).max()) if np.prod(matrix.shape) else 1.0
    h_scale = s / omega if omega > 0 else s
    rows = sparse.diags(weight / s) @ sparse.csr_matrix(matrix) * h_scale
    rhs = weight * (np.where(two, cons.target, y) - b) / s
    on, off = np.flatnonzero(two), np.flatnonzero(~two)

    def with_t(block: sparse.csr_matrix) -> sparse.csr_matrix:
        return sparse.hstack([block, sparse.csr_matrix(np.full((block.shape[0], 1), -1.0))])

    a_ub = sparse.vstack([with_t(rows[on]), with_t(-rows[on]), with_t(rows[off])], format="csr")
    b_ub = np.concatenate([rhs[on], -rhs[on], rhs[off]])
    cost = np.zeros(n + 1)
    cost[-1] = 1.0
    bounds = [(0.0, None) if nonneg else (None, None)] * n + [(0.0, None)]
    solution = solve_lp(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, tolerance=LP_TOL)
    if solution.x is None:
        return None, np.inf, f"the nearest-point LP ended {solution.status} ({solution.message})"
    h = solution.x[:n] * h_scale
    if nonneg:
        h = np.maximum(h, 0.0)
    distance = float(solution.value) * s
    return h, distance, f"the nearest point (an LP) misses y by {distance:.3g}"
