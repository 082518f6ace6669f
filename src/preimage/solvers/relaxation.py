"""The LP relaxation of a ReLU network, alive in HiGHS: domains from the data, bound
tightening, and the mixed-integer program it relaxes (../NOTES-math.md sections 6, 9).

Column layout (`Relaxation`)::

    z (k)  |  per encoded layer i: r_i (outputs)  |  t

The pre-activations a_i = W_i r_{i-1} + b_i (r_{-1} = z) are expressions, not
columns. Rows, per unit of layer i with bounds L <= a <= U::

    r - w r_{i-1} >= b                                (r >= a; on: = b, r = a)
    r - s w r_{i-1} <= s (b - L),  s = U / (U - L)    (unstable: the triangle r <= s (a - L);
                                                       times 1e-3 / s for s < 1e-3: `_row_factor`)
    L - b <= w r_{i-1} <= U - b                       (stable: its interval)
    top, exact:   lo <= W_top r_{top-1} <= hi         (active: y - b +- tol; inactive: <= tau - b)
    top, misfit:  r_out - t <= x,  x - r_out <= t     (l_inf: one t; l_1: one t_j per output)

and r in [max(L, 0), max(U, 0)]. With r >= max(a, 0) the triangle is the
convex hull of one ReLU over [L, U] (it implies a >= L; r <= U implies a <= U).
Deciding a unit is a bound change of the live model (`Relaxation.fix`): on,
the first row becomes r = a (so a >= 0); off, r's upper bound becomes 0 (so a
<= 0), and a branch and bound over units (`preimage.solvers.branch`) changes
bounds of one model only. The same rows with a binary d per unstable unit (r
<= U d, r <= a - L (1 - d)) are the big-M MILP (`Relaxation.milp_arrays`).
Units with L >= 0 or U <= 0 are stable: decided for good. (Against the
earlier layout with a and d as columns, 200 columns on the authors' decoder
against 80: docs/performance.md.)

Bounds come from the data (`data_bounds`), never from a box when the data
imply one: for an exact observation y of layer `top` the last hidden vector
lies in its preimage polyhedron P = {r >= 0 : W_A r + b_A = y_A, W_I r + b_I
<= tau}, so U = max r_j over P (one LP per unit) bounds it, a_j <= relu(a_j) <=
U_j bounds the pre-activations below, layer by layer down to the latent
Z = {z : W_0 z + b_0 <= U_0}. For a misfit below a cutoff t (the projection
of an x off the range), r_out lies within t of x, the same with
P = {r >= 0 : W r + b <= x + t, W_j r + b_j >= x_j - t where x_j > t}. Every z
that could be an answer lies in Z, so a proof over Z holds for every z; only
coordinates along which Z is unbounded get a box |z_j| <= R (``boxed``).
`Relaxation.tighten` then tightens every unstable unit's [L, U] by two LPs
over the relaxation itself (optimisation-based bound tightening), layer by
layer from the latent side, while the bounds shrink.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from preimage.model.layer import Layer
from preimage.model.network import Network
from preimage.model.operators import DenseOperator, dense
from preimage.solvers.highs import LiveLP, LPSolution
from preimage.solvers.layer import ActiveSet

#: A bound from an LP is loosened by this much, relative to 1 + |value|: the LPs' optima
#: are exact only to HiGHS's tolerances.
BOUND_MARGIN = 1e-8

#: A unit whose range reaches past 0 by at most this fraction of its width on one side is
#: decided (its relaxation is exact to that fraction): branching skips it.
NEGLIGIBLE = 1e-6

#: At most this many simplex pivots for one LP of `Relaxation.tighten` (the authors'
#: decoder: 96-110 a bound's LP at the median, 150-190 at the 90th percentile).
TIGHTEN_PIVOTS = 5000

#: `Relaxation.tighten` repeats its passes while the unstable units' total range falls by
#: more than this fraction per pass.
TIGHTEN_GAIN = 0.02


@dataclass
class Domain:
    """Where z can be, and the pre-activation bounds of each encoded layer.

    Attributes
    ----------
    z_lower, z_upper : ndarray (k,)
    lower, upper : list of ndarray, one (n_i,) per encoded layer (L_i, U_i)
    boxed : ndarray of bool (k,)
        Coordinates bounded only by the box |z_j| <= box (Z is unbounded along them).
    box : float
        The box's half-width: on a boxed coordinate, its unbounded side is at -box or +box
        (moved out by box beyond the other side where that side lies past it).
    empty : bool
        The interval bounds over the box already admit no z (proved for the box only:
        without a box `data_bounds` says "infeasible")
    """

    z_lower: np.ndarray
    z_upper: np.ndarray
    lower: list[np.ndarray]
    upper: list[np.ndarray]
    boxed: np.ndarray
    box: float
    empty: bool = False
    #: z is measured in units of this (`balanced`): the box reads box * unit in z's own
    unit: float = 1.0

    def describe(self) -> str:
        """Which z a proof over this domain covers."""
        if not self.boxed.any():
            return "every z (the domain derived from x contains every candidate)"
        coords = np.flatnonzero(self.boxed)
        shown = ", ".join(str(int(j)) for j in coords[:8]) + (", ..." if coords.size > 8 else "")
        return (f"z with |z_j| <= {self.box * self.unit:g} for the {coords.size} coordinate(s) "
                f"along which the domain derived from x is unbounded ({shown}); every z "
                "elsewhere")


@dataclass(frozen=True)
class Top:
    """The block above the encoded layers.

    Exact: rows lo <= W r_last <= hi (the top layer's pre-activations; `exact_top`).
    Misfit: the observation x of the last encoded layer's outputs and the norm.
    """

    weight: np.ndarray | None = None
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    x: np.ndarray | None = None
    norm: str | None = None

    @property
    def misfit(self) -> bool:
        return self.x is not None


def exact_top(net: Network, top: int, cons: ActiveSet, band: float | np.ndarray) -> Top:
    """The top block of an exact observation of layer `top`: the bounds its active set puts
    on the pre-activations (`ActiveSet.pre_activation_bounds`, active units within band),
    each row divided by its norm (unit rows for HiGHS's absolute tolerances)."""
    layer = net.layers[top]
    lo, hi = cons.pre_activation_bounds(layer.bias_or_zero(), band)
    w = dense(layer.weight)
    norm = np.linalg.norm(w, axis=1)
    norm = np.where(norm > 0, norm, 1.0)
    return Top(weight=w / norm[:, None], lo=lo / norm, hi=hi / norm)


def balanced(net: Network, top: int, unit: float = 1.0) -> Network:
    """The same map from z to layer `top`'s pre-activations, its ReLU units below rescaled.

    relu(c t) = c relu(t) for c > 0: unit j of layer i < top becomes h'_ij = h_ij / c_ij
    with c_ij the norm of its row of [W_i diag(c_{i-1}), b_i] (c_{-1} = 1: z is unchanged;
    the bias counted, or a near-zero row with a bias would become a huge constant), so

        W'_i = diag(1 / c_i) W_i diag(c_{i-1}),  b'_i = b_i / c_i,  W'_top = W_top diag(c_{top-1})

    and every hidden variable of the relaxation is of the size of z whatever the
    weights' scales (1e-6 to 1e6 per layer: HiGHS's absolute tolerances otherwise
    decide wrongly). A unit with a zero row and bias keeps c = 1. Layers 0..top-1 ReLU.
    ``unit``: z measured in units of it (z = unit z', c_{-1} = unit), for data whose
    codes are far from 1 in size.
    """
    weights, biases, kinds = [], [], []
    c_prev = np.full(net.latent_dim, float(unit))
    for i, layer in enumerate(net.layers[: top + 1]):
        w = dense(layer.weight) * c_prev[None, :]
        b = layer.bias
        if i < top:
            c = np.hypot(np.linalg.norm(w, axis=1), 0.0 if b is None else b)
            c = np.where(c > 0, c, 1.0)
            w, b = w / c[:, None], (None if b is None else b / c)
            c_prev = c
        weights.append(w)
        biases.append(b)
        kinds.append(layer.activation)
    return Network(tuple(Layer(DenseOperator(w), b, act)
                         for w, b, act in zip(weights, biases, kinds, strict=True)),
                   source_dtype=net.source_dtype, input_shape=net.input_shape)


#: A column without an upper bound gets this one in the LPs with held-back rows (so that
#: they stay bounded); a maximum that reaches it counts as unbounded.
FAR = 1e7


class LazyRows:
    """Rows lo <= A u[cols] <= hi held back from a live LP until a solution violates them.

    The exact top's inactive units (hundreds of pixels of an image generator, a
    few dozen of which ever bind) enter the LP only when a solution crosses
    them: every LP is then a relaxation of the full one, so "infeasible" is still
    a proof, and a solution that violates no held-back row is the full LP's.
    """

    def __init__(self, lp: LiveLP, a: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 cols: np.ndarray) -> None:
        self.lp, self.a, self.lo, self.hi, self.cols = lp, a, lo, hi, cols
        self.pending = np.ones(a.shape[0], dtype=bool)
        self.tol = 1e-9 * (1.0 + np.where(np.isfinite(hi), np.abs(hi), np.abs(lo)))

    def add_violated(self, u: np.ndarray) -> int:
        """Add the held-back rows that u violates; how many."""
        idx = np.flatnonzero(self.pending)
        if idx.size == 0:
            return 0
        v = self.a[idx] @ u[self.cols]
        bad = idx[(v > self.hi[idx] + self.tol[idx]) | (v < self.lo[idx] - self.tol[idx])]
        if bad.size:
            rows = np.zeros((bad.size, self.lp.k))
            rows[:, self.cols] = self.a[bad]
            self.lp.add_rows(rows, self.lo[bad], self.hi[bad])
            self.pending[bad] = False
        return int(bad.size)


def solve_lazy(lp: LiveLP, lazy: LazyRows | None) -> LPSolution:
    """Solve, add the held-back rows the solution violates, again until it violates none."""
    while True:
        sol = lp.solve()
        if not sol.optimal or lazy is None or sol.x is None or lazy.add_violated(sol.x) == 0:
            return sol


def _top_lp(weight: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[LiveLP, LazyRows]:
    """The polyhedron {r >= 0 : lo <= W r <= hi}: equality-like rows at once, the rest lazy."""
    n = weight.shape[1]
    lp = LiveLP(np.zeros(n), 0.0, FAR)
    two = np.isfinite(lo)
    lp.add_rows(weight[two], lo[two], hi[two])
    lazy = LazyRows(lp, weight[~two], lo[~two], hi[~two], np.arange(n))
    return lp, lazy


def _row_lp(a: np.ndarray, lo: np.ndarray, hi: np.ndarray, col_lo: float) -> LiveLP:
    lp = LiveLP(np.zeros(a.shape[1]), col_lo, np.inf)
    lp.add_rows(a, lo, hi)
    return lp


def _extremes(lp: LiveLP, n: int, deadline: float) -> tuple[np.ndarray, np.ndarray, str]:
    """(min u_j, max u_j) over the LP's polyhedron for j < n (inf where unbounded), or the
    status that stopped it ("infeasible", "time_limit")."""
    lower, upper = np.full(n, -np.inf), np.full(n, np.inf)
    for j in range(n):
        for sign in (1.0, -1.0):
            if time.perf_counter() > deadline:
                return lower, upper, "time_limit"
            cost = np.zeros(lp.k)
            cost[j] = sign
            lp.set_cost(cost)
            sol = lp.solve()
            if sol.status == "infeasible":
                return lower, upper, "infeasible"
            if sol.optimal:
                if sign > 0:
                    lower[j] = sol.value
                else:
                    upper[j] = -sol.value
    return lower, upper, "optimal"


def _maxima(lp: LiveLP, n: int, deadline: float,
            lazy: LazyRows | None = None) -> tuple[np.ndarray, str]:
    """max u_j over the LP's polyhedron for j < n (inf where unbounded or at FAR), or a stop
    status."""
    upper = np.full(n, np.inf)
    for j in range(n):
        if time.perf_counter() > deadline:
            return upper, "time_limit"
        cost = np.zeros(lp.k)
        cost[j] = -1.0
        lp.set_cost(cost)
        sol = solve_lazy(lp, lazy)
        if sol.status == "infeasible":
            return upper, "infeasible"
        if sol.optimal and -sol.value < 0.5 * FAR:
            upper[j] = -sol.value
    return upper, "optimal"


def _margin(value: np.ndarray) -> np.ndarray:
    return BOUND_MARGIN * (1.0 + np.abs(value))


def data_bounds(
    net: Network, depth: int, top: Top, *, box: float, deadline: float = np.inf,
) -> Domain | str:
    """The domain of z and the encoded layers' bounds implied by the data (module docstring).

    Layers 0..depth-1 of `net` are the encoded ReLU layers; `top` the block above
    them (exact: rows on layer depth-1's outputs; misfit: x of layer depth-1's
    outputs, whose pre-activations must lie within the cutoff, passed as
    ``top.hi`` = x + t, ``top.lo`` = x - t). Returns "infeasible" when the data
    admit no z (proved), or "time_limit".
    """
    layers = net.layers[:depth]
    k = net.latent_dim
    widths = [layer.out_width for layer in layers]
    upper: list[np.ndarray] = [np.full(n, np.inf) for n in widths]
    lower: list[np.ndarray] = [np.full(n, -np.inf) for n in widths]
    if top.misfit:
        assert top.lo is not None and top.hi is not None
        # the output layer is encoded: its own pre-activations are bounded by the cutoff
        upper[-1] = top.hi.copy()
        lower[-1] = np.where(top.lo > 0, top.lo, -np.inf)
        first = depth - 1
    else:
        assert top.weight is not None and top.lo is not None and top.hi is not None
        lp, lazy = _top_lp(top.weight, top.lo, top.hi)
        hi, status = _maxima(lp, widths[-1], deadline, lazy)
        if status != "optimal":
            return status
        upper[-1] = np.minimum(upper[-1], hi + _margin(hi))
        first = depth - 1
    # a_i <= relu(a_i) = r_i <= U_i: the outputs of layer i-1 satisfy W_i r + b_i <= U_i
    for i in range(first, 0, -1):
        finite = np.isfinite(upper[i])
        if not finite.any():
            continue
        w, b = dense(layers[i].weight), layers[i].bias_or_zero()
        rows_lo = np.where(np.isfinite(lower[i][finite]), lower[i][finite] - b[finite], -np.inf)
        lp = _row_lp(w[finite], rows_lo, upper[i][finite] - b[finite], 0.0)
        hi, status = _maxima(lp, widths[i - 1], deadline)
        if status != "optimal":
            return status
        upper[i - 1] = np.minimum(upper[i - 1], np.maximum(hi + _margin(hi), 0.0))
    # the latent domain Z = {z : L_0 <= W_0 z + b_0 <= U_0}
    w0, b0 = dense(layers[0].weight), layers[0].bias_or_zero()
    rows = np.isfinite(upper[0]) | np.isfinite(lower[0])
    lp = _row_lp(w0[rows], lower[0][rows] - b0[rows], upper[0][rows] - b0[rows], -np.inf)
    z_lo, z_hi, status = _extremes(lp, k, deadline)
    if status != "optimal":
        return status
    boxed = ~(np.isfinite(z_lo) & np.isfinite(z_hi))
    # the data's bounds as they are (even beyond the box); the box only on an unbounded side
    lo_fin, hi_fin = np.isfinite(z_lo), np.isfinite(z_hi)
    z_lo = np.where(lo_fin, z_lo - _margin(z_lo), np.minimum(-box, np.where(hi_fin, z_hi, 0) - box))
    z_hi = np.where(hi_fin, z_hi + _margin(z_hi), np.maximum(box, np.where(lo_fin, z_lo, 0) + box))
    # interval arithmetic up the layers, intersected with the data's bounds
    lo, hi = z_lo, z_hi
    for i, layer in enumerate(layers):
        w, b = dense(layer.weight), layer.bias_or_zero()
        center, radius = (lo + hi) / 2, (hi - lo) / 2
        mid, spread = w @ center + b, np.abs(w) @ radius
        lower[i] = np.maximum(lower[i], mid - spread)
        upper[i] = np.minimum(upper[i], mid + spread)
        if np.any(lower[i] > upper[i] + _margin(upper[i])):
            if boxed.any():  # (the box's intervals: the true z may lie outside it)
                return Domain(z_lo, z_hi, lower, upper, boxed, float(box), empty=True)
            return "infeasible"
        lower[i] = np.minimum(lower[i], upper[i])
        lo, hi = np.maximum(lower[i], 0.0), np.maximum(upper[i], 0.0)
    return Domain(z_lo, z_hi, lower, upper, boxed, float(box))


#: The smallest slope s = U / (U - L) a triangle row is written with as it is; below it
#: the row is multiplied by SMALL_SLOPE / s (`_row_factor`).
SMALL_SLOPE = 1e-3


def _row_factor(slope: np.ndarray) -> np.ndarray:
    """What a triangle row r - s w.prev <= s (b - L) is multiplied by: 1, or SMALL_SLOPE / s
    where s is below SMALL_SLOPE.

    Why: HiGHS drops matrix entries below its small_matrix_value (LiveLP sets 1e-12, its
    least; the default is 1e-9). With U << -L the entries s w fell below it, and the row
    left then cut off true points: a ConvTranspose2d generator whose unit had U = 1e-8
    after tightening, L = -0.25, was called `infeasible` for x = G(z). Scaled, its entries
    are at least SMALL_SLOPE |w_j|, as in the unit's other rows to within that factor.
    (Writing every triangle as r / s - w.prev <= b - L, the same rows, led HiGHS to other
    vertices, whose points lay off the ReLU more often: the misfit search on 5-20-50 then
    needed 4,000-9,000 nodes where it had needed 100.)"""
    slope = np.asarray(slope, dtype=float)
    return np.where((slope > 0) & (slope < SMALL_SLOPE),
                    SMALL_SLOPE / np.where(slope > 0, slope, 1.0), 1.0)


class Relaxation:
    """The LP relaxation (module docstring) of layers 0..depth-1 and a top block, in HiGHS.

    Units are numbered flat over the encoded layers (layer 0's first). `lower`,
    `upper` hold each unit's current pre-activation bounds; `stable` the units
    whose state is fixed by them (-1 unstable, 0 off, 1 on).
    """

    def __init__(self, net: Network, depth: int, domain: Domain, top: Top) -> None:
        self.net, self.depth, self.domain, self.top = net, depth, domain, top
        layers = net.layers[:depth]
        k = net.latent_dim
        self.k = k
        widths = [layer.out_width for layer in layers]
        self.widths = widths
        n_units = int(sum(widths))
        self.n_units = n_units
        offsets = np.concatenate([[0], np.cumsum(widths)]).astype(int)
        self.offsets = offsets
        self.r_col = k + np.arange(n_units)
        # the columns each layer's pre-activations are taken from (z for layer 0)
        self._inputs = [np.arange(k)] + [self.r_col[offsets[i] : offsets[i + 1]]
                                         for i in range(depth - 1)]
        self._weights = [dense(layer.weight) for layer in layers]
        self.bias = np.concatenate([layer.bias_or_zero() for layer in layers]).astype(float)
        n_misfit = 0
        if top.misfit:
            n_misfit = 1 if top.norm == "linf" else widths[-1]
        self.t_col = np.arange(k + n_units, k + n_units + n_misfit)
        n_cols = k + n_units + n_misfit
        self.n_cols = n_cols
        self.lower = np.concatenate(domain.lower).astype(float)
        self.upper = np.concatenate(domain.upper).astype(float)
        if not (np.all(np.isfinite(self.lower)) and np.all(np.isfinite(self.upper))):
            raise ValueError("Every encoded unit needs finite bounds (data_bounds gives them).")
        col_lo, col_hi = np.full(n_cols, -np.inf), np.full(n_cols, np.inf)
        col_lo[:k], col_hi[:k] = domain.z_lower, domain.z_upper
        col_lo[self.t_col], col_hi[self.t_col] = 0.0, np.inf
        self.lp = LiveLP(np.zeros(n_cols), col_lo, col_hi)
        # rows: per unit r - w.prev >= b, then per unit its second row, then the top
        blocks, row_lo, row_hi = [], [], []
        for i in range(depth):
            n, w = widths[i], self._weights[i]
            m = sparse.lil_matrix((n, n_cols))
            m[:, self._inputs[i]] = -w
            m[np.arange(n), self.r_col[offsets[i] : offsets[i + 1]]] = 1.0
            blocks.append(m.tocsr())
        row_lo.append(self.bias)
        row_hi.append(np.full(n_units, np.inf))
        # the second rows as _apply_bounds writes them (it then changes bounds only)
        lo_u, hi_u = self.lower, self.upper
        unstable = (lo_u < 0) & (hi_u > 0)
        self._slope = np.where(unstable, hi_u / np.where(unstable, hi_u - lo_u, 1.0), 0.0)
        factor = _row_factor(self._slope)
        for i in range(depth):
            units = slice(offsets[i], offsets[i + 1])
            m = sparse.lil_matrix((widths[i], n_cols))
            m[:, self._inputs[i]] = np.where(unstable[units], -(factor * self._slope)[units],
                                             1.0)[:, None] * self._weights[i]
            m[np.arange(widths[i]), self.r_col[units]] = np.where(unstable[units],
                                                                  factor[units], 0.0)
            blocks.append(m.tocsr())
        row_lo.append(np.full(n_units, -np.inf))
        row_hi.append(np.full(n_units, np.inf))
        self.lower_row = np.arange(n_units)
        self.upper_row = n_units + np.arange(n_units)
        last = self.r_col[offsets[-2] : offsets[-1]]
        if top.misfit:
            assert top.x is not None
            n_out = widths[-1]
            t = np.full(n_out, self.t_col[0]) if top.norm == "linf" else self.t_col
            j = np.arange(n_out)
            up = sparse.csr_matrix((np.r_[np.ones(n_out), -np.ones(n_out)],
                                    (np.r_[j, j], np.r_[last, t])), shape=(n_out, n_cols))
            down = sparse.csr_matrix((np.r_[-np.ones(n_out), -np.ones(n_out)],
                                      (np.r_[j, j], np.r_[last, t])), shape=(n_out, n_cols))
            blocks += [up, down]
            row_lo += [np.full(n_out, -np.inf), np.full(n_out, -np.inf)]
            row_hi += [top.x, -top.x]
        else:
            assert top.weight is not None and top.lo is not None and top.hi is not None
            two = np.isfinite(top.lo)
            m = sparse.lil_matrix((int(two.sum()), n_cols))
            m[:, last] = top.weight[two]
            blocks.append(m.tocsr())
            row_lo.append(top.lo[two])
            row_hi.append(top.hi[two])
        self.lp.add_rows(sparse.vstack(blocks, format="csr"), np.concatenate(row_lo),
                         np.concatenate(row_hi))
        self.lazy = None
        if not top.misfit:
            self.lazy = LazyRows(self.lp, top.weight[~two], top.lo[~two], top.hi[~two], last)
        self.stable = np.full(n_units, -2, dtype=np.int8)  # (-2: not written yet)
        self.fixed = np.full(n_units, -1, dtype=np.int8)  # branching decisions
        self._apply_bounds(np.arange(n_units))
        self.n_lps = 0
        self._cost: np.ndarray | None = None
        #: every LP stops at this time.perf_counter() value
        self.deadline = np.inf

    # -- bounds ---------------------------------------------------------------------------

    def _unit_row(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """(columns, w_g) of unit g's pre-activation a_g = w_g u[columns] + b_g."""
        i = int(np.searchsorted(self.offsets, g, side="right") - 1)
        return self._inputs[i], self._weights[i][g - self.offsets[i]]

    def _apply_bounds(self, units: np.ndarray) -> None:
        """Write the units' [L, U] into the model: r's column bounds, the second row (the
        triangle r - s w.prev <= s (b - L), s = U / (U - L), of an unstable unit; the
        interval L - b <= w.prev <= U - b of a stable one) and the first row's state (r = a
        for a unit on)."""
        for g in units:
            lo, hi, b = float(self.lower[g]), float(self.upper[g]), float(self.bias[g])
            state = 1 if lo >= 0 else (0 if hi <= 0 else -1)
            slope = hi / (hi - lo) if state < 0 else 0.0
            factor = float(_row_factor(np.array(slope)))
            if slope != self._slope[g]:  # (a coefficient change costs HiGHS its factor)
                cols, w = self._unit_row(g)
                coef = -factor * slope * w if state < 0 else w
                for c, v in zip(cols, coef, strict=True):
                    self.lp.set_coefficient(self.upper_row[g], c, v)
                self.lp.set_coefficient(self.upper_row[g], self.r_col[g],
                                        factor if state < 0 else 0.0)
                self._slope[g] = slope
            if state < 0:
                self.lp.set_row_bounds(self.upper_row[g], -np.inf, factor * slope * (b - lo))
            else:
                self.lp.set_row_bounds(self.upper_row[g], lo - b, hi - b)
            self.stable[g] = state
            self._write_state(g)

    def _write_state(self, g: int) -> None:
        """Unit g's on (r = a) or off (r = 0) or free (r >= max(a, 0)) in the model, from its
        stability or decision."""
        state = self.stable[g] if self.stable[g] >= 0 else self.fixed[g]
        b = float(self.bias[g])
        self.lp.set_row_bounds(self.lower_row[g], b, b if state == 1 else np.inf)
        hi = 0.0 if state == 0 else max(float(self.upper[g]), 0.0)
        self.lp.set_bounds(self.r_col[g], max(float(self.lower[g]), 0.0) if state != 0
                           else 0.0, hi)

    @property
    def unstable(self) -> np.ndarray:
        return np.flatnonzero(self.stable < 0)

    def undecided(self) -> np.ndarray:
        """Unstable units not fixed by a decision and not negligibly unstable (NEGLIGIBLE)."""
        lo, hi = self.lower, self.upper
        open_ = (self.stable < 0) & (self.fixed < 0)
        open_ &= np.minimum(hi, -lo) > NEGLIGIBLE * (hi - lo)
        return np.flatnonzero(open_)

    def adopt(self, lower: np.ndarray, upper: np.ndarray) -> int:
        """Take the units' bounds [lower, upper] where they are tighter than the current
        ones (bounds valid for every z of the domain: another relaxation's tightening);
        how many units changed."""
        changed = np.flatnonzero((lower > self.lower) | (upper < self.upper))
        if changed.size:
            self.lower[changed] = np.maximum(self.lower[changed], lower[changed])
            self.upper[changed] = np.minimum(self.upper[changed], upper[changed])
            self.lower[changed] = np.minimum(self.lower[changed], self.upper[changed])
            self._apply_bounds(changed)
        return int(changed.size)

    def contradicts(self, decisions: np.ndarray) -> bool:
        """Whether a decision goes against a unit's state that its bounds now fix (on where
        U <= 0, off where L >= 0: bounds tightened since the decision was taken)."""
        decided = (self.stable >= 0) & (decisions >= 0)
        return bool(np.any(decisions[decided] != self.stable[decided]))

    def fix(self, decisions: np.ndarray) -> None:
        """Set the branching decisions: decisions[g] = 1 on, 0 off, -1 free (unstable units
        only; stable units keep their state)."""
        changed = np.flatnonzero((decisions != self.fixed) & (self.stable < 0))
        self.fixed[changed] = decisions[changed]
        for g in changed:
            self._write_state(int(g))

    def pre(self, u: np.ndarray) -> np.ndarray:
        """(n_units,) every unit's pre-activation a = W prev + b at an LP point u."""
        return np.concatenate([w @ u[cols] for w, cols in zip(self._weights, self._inputs,
                                                               strict=True)]) + self.bias

    def solve(self, cost: np.ndarray | None = None) -> LPSolution:
        """The relaxation's LP under the current bounds and decisions (zero cost by default)."""
        cost = np.zeros(self.n_cols) if cost is None else np.asarray(cost, dtype=float)
        if self._cost is None or not np.array_equal(cost, self._cost):
            self.lp.set_cost(cost)  # (a cost change costs HiGHS its dual feasibility)
            self._cost = cost
        self.n_lps += 1
        if np.isfinite(self.deadline):  # (one stalled LP must not overrun the budget)
            self.lp.set_time_limit(self.deadline - time.perf_counter())
        return solve_lazy(self.lp, self.lazy)

    def misfit_cost(self) -> np.ndarray:
        cost = np.zeros(self.n_cols)
        cost[self.t_col] = 1.0
        return cost

    def set_cutoff(self, value: float) -> None:
        """Only points with misfit at most `value` (each t_j, and their sum for l_1)."""
        self.lp.set_bounds(self.t_col, 0.0, float(value))
        if self.top.norm == "l1" and not hasattr(self, "_sum_row"):
            row = np.zeros((1, self.n_cols))
            row[0, self.t_col] = 1.0
            self.lp.add_rows(row, -np.inf, float(value))
            self._sum_row = self.lp.rows - 1
        elif self.top.norm == "l1":
            self.lp.set_row_bounds(self._sum_row, -np.inf, float(value))

    def tighten(self, *, deadline: float, max_passes: int = 20,
                stop: Callable[[], bool] | None = None,
                publish: Callable[[np.ndarray, np.ndarray], None] | None = None) -> str:
        """Optimisation-based bound tightening of every unstable unit (module docstring).

        Layer by layer from the latent side, min and max of each unstable unit's
        pre-activation over the current relaxation (the branching decisions
        included: at a node it tightens that node), written back at once so that
        the next LP sees it: every unit's minimum first, then every maximum (the
        next LP's optimum then lies nearer the last one's). Passes repeat while the
        unstable units' total range falls by more than TIGHTEN_GAIN. Primal
        simplex: each LP changes only the cost, so the last basis stays primal
        feasible (the dual simplex took twice as long). ``stop``: a callable; when it
        returns True the tightening ends as at the deadline. ``publish(lower, upper)``:
        called with the units' bounds after each pass. Returns "optimal",
        "infeasible" (no point satisfies the relaxation: proved) or "time_limit".
        """
        # (a bound's LP past TIGHTEN_PIVOTS pivots is skipped: the primal simplex has
        # stalled on exact equality rows elsewhere, 21,000 pivots on one LP)
        self.lp.set_primal(True, TIGHTEN_PIVOTS)
        try:
            return self._tighten_passes(deadline, max_passes, stop, publish)
        finally:
            self.lp.set_primal(False)

    def _tighten_passes(self, deadline: float, max_passes: int,
                        stop: Callable[[], bool] | None,
                        publish: Callable[[np.ndarray, np.ndarray], None] | None) -> str:
        for _ in range(max_passes):
            units = self.unstable
            units = units[self.fixed[units] < 0]
            if units.size == 0:
                return "optimal"
            before = float(np.sum(self.upper[units] - self.lower[units]))
            # nearest to stable first: those decide most per LP when time is short
            units = units[np.argsort(np.minimum(self.upper[units], -self.lower[units]))]
            for sign in (1.0, -1.0):
                for g in units:
                    if self.stable[g] >= 0:
                        continue
                    cols, w = self._unit_row(int(g))
                    if time.perf_counter() > deadline or (stop is not None and stop()):
                        return "time_limit"
                    cost = np.zeros(self.n_cols)
                    cost[cols] = sign * w
                    sol = self.solve(cost)
                    if sol.status == "infeasible":
                        return "infeasible"
                    if not sol.optimal:
                        continue
                    value = sol.value + sign * self.bias[g]  # min (sign a_g)
                    if sign > 0:
                        new = value - _margin(np.asarray(value))
                        if new > self.lower[g]:
                            self.lower[g] = min(float(new), self.upper[g])
                            self._apply_bounds(np.array([g]))
                    else:
                        new = -value + _margin(np.asarray(value))
                        if new < self.upper[g]:
                            self.upper[g] = max(float(new), self.lower[g])
                            self._apply_bounds(np.array([g]))
            if publish is not None:
                publish(self.lower, self.upper)
            after = float(np.sum(np.where(self.stable[units] < 0,
                                          self.upper[units] - self.lower[units], 0.0)))
            if after > (1 - TIGHTEN_GAIN) * before:
                return "optimal"
        return "optimal"

    def milp_arrays(self) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray, np.ndarray,
                                   np.ndarray, np.ndarray, np.ndarray]:
        """The big-M MILP this LP relaxes, for a generic solver: (A, row_lo, row_hi, col_lo,
        col_hi, integrality, binary), the held-back rows included and one binary column
        d_g per unstable unit appended (`binary`: their indices, in `unstable`'s order):

            r_g - U_g d_g <= 0,   r_g - w_g.prev - L_g d_g <= b_g - L_g

        (d_g = 1: r_g = a_g; d_g = 0: r_g = 0 >= a_g >= L_g)."""
        lp = self.lp.model()
        m = self.lp.matrix()
        row_lo, row_hi = np.array(lp.row_lower_), np.array(lp.row_upper_)
        if self.lazy is not None and self.lazy.pending.any():
            pend = np.flatnonzero(self.lazy.pending)
            rows = np.zeros((pend.size, self.n_cols))
            rows[:, self.lazy.cols] = self.lazy.a[pend]
            m = sparse.vstack([m, sparse.csr_matrix(rows)], format="csr")
            row_lo = np.r_[row_lo, self.lazy.lo[pend]]
            row_hi = np.r_[row_hi, self.lazy.hi[pend]]
        units = self.unstable
        n_bin = units.size
        binary = self.n_cols + np.arange(n_bin)
        extra = sparse.lil_matrix((2 * n_bin, self.n_cols + n_bin))
        bound_hi = np.zeros(2 * n_bin)
        for j, g in enumerate(units):
            cols, w = self._unit_row(int(g))
            extra[j, self.r_col[g]], extra[j, binary[j]] = 1.0, -self.upper[g]
            extra[n_bin + j, self.r_col[g]] = 1.0
            extra[n_bin + j, cols] = -w
            extra[n_bin + j, binary[j]] = -self.lower[g]
            bound_hi[n_bin + j] = self.bias[g] - self.lower[g]
        m = sparse.vstack([sparse.hstack([m, sparse.csr_matrix((m.shape[0], n_bin))]),
                           extra.tocsr()], format="csr")
        row_lo = np.r_[row_lo, np.full(2 * n_bin, -np.inf)]
        row_hi = np.r_[row_hi, bound_hi]
        col_lo = np.r_[np.array(lp.col_lower_), np.zeros(n_bin)]
        col_hi = np.r_[np.array(lp.col_upper_), np.ones(n_bin)]
        integrality = np.zeros(self.n_cols + n_bin)
        integrality[binary] = 1
        return m, row_lo, row_hi, col_lo, col_hi, integrality, binary

    # -- reading a solution ---------------------------------------------------------------

    def split(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(z, a, r) of an LP point u."""
        return u[: self.k], self.pre(u), u[self.r_col]

    def patterns(self, on: np.ndarray) -> list[np.ndarray]:
        """A flat on/off vector over the units, cut into layers."""
        return [on[self.offsets[i] : self.offsets[i + 1]] for i in range(self.depth)]
