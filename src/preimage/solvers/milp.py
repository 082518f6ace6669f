"""The mixed-integer program below a layer: complete within a latent box.

../NOTES-math.md section 6. Each hidden ReLU unit u of layers 0..top-1 has
pre-activation a = w_u h_prev + b_u with bounds L <= a <= U from interval
arithmetic on the latent box |z|_inf <= R, output r and a binary delta:

    r >= a,   r >= 0,   r <= a - L (1 - delta),   r <= U delta

(units with U <= 0 or L >= 0 need no binary). Layer top's own activation
pattern is known from its observation y (`preimage.solvers.layer.active_set`),
so its rows are plain equalities (within the data's tolerance) and
inequalities.

The MILP's point is then polished: with its activation pattern fixed, G is
affine in z and the cell LP (`preimage.solvers.cell.cell_lp`) gives z to full
accuracy, checked by a forward pass. A no-good cut on the pattern and a second
MILP decide uniqueness: no other pattern feasible and the fixed-pattern
equalities of full rank prove that z is the only preimage *within the box*; a
second pattern gives a second z (a witness).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint

from preimage.model.network import Network
from preimage.model.operators import dense
from preimage.results import SearchOutcome
from preimage.solvers.cell import cell_lp, equality_rank
from preimage.solvers.highs import solve_milp
from preimage.solvers.layer import active_set


@dataclass
class _Block:
    """Column offsets of one hidden layer's variables (outputs r, binaries delta)."""

    r: int
    delta: int
    width: int
    lower: np.ndarray
    upper: np.ndarray


def interval_bounds(net: Network, top: int, bound: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pre-activation bounds (L, U) of layers 0..top-1 over |z|_inf <= bound."""
    lo, hi = np.full(net.latent_dim, -bound), np.full(net.latent_dim, bound)
    out = []
    for layer in net.layers[:top]:
        center, radius = (lo + hi) / 2, (hi - lo) / 2
        mid = layer.preactivation(center[None])[0]
        spread = abs(layer.weight.matrix()) @ radius
        pre_lo, pre_hi = mid - spread, mid + spread
        out.append((pre_lo, pre_hi))
        lo, hi = np.maximum(pre_lo, 0.0), np.maximum(pre_hi, 0.0)
    return out


@dataclass
class _Model:
    """A MILP under construction: variables (z, then per ReLU layer r and delta), rows."""

    n_vars: int
    lb: np.ndarray
    ub: np.ndarray
    integrality: np.ndarray
    blocks: list[_Block]
    out_cols: np.ndarray
    rows: list[np.ndarray]
    row_lo: list[float]
    row_hi: list[float]

    def add(self, coef: np.ndarray, low: float, high: float) -> None:
        self.rows.append(coef)
        self.row_lo.append(low)
        self.row_hi.append(high)

    def constraints(self) -> list[LinearConstraint]:
        return [LinearConstraint(np.array(self.rows), np.array(self.row_lo),
                                 np.array(self.row_hi))]


def _encode_relus(net: Network, depth: int, bound: float, extra: int = 0) -> _Model:
    """z in the box and the ReLU units of layers 0..depth-1 as big-M rows (module docstring);
    `extra` more continuous variables at the end (free)."""
    k = net.latent_dim
    pre_bounds = interval_bounds(net, depth, bound)
    blocks: list[_Block] = []
    n_vars = k
    for (lo, hi), layer in zip(pre_bounds, net.layers[:depth], strict=True):
        blocks.append(_Block(n_vars, n_vars + layer.out_width, layer.out_width, lo, hi))
        n_vars += 2 * layer.out_width
    n_vars += extra
    lb, ub = np.full(n_vars, -np.inf), np.full(n_vars, np.inf)
    lb[:k], ub[:k] = -bound, bound
    model = _Model(n_vars, lb, ub, np.zeros(n_vars), blocks, np.arange(k), [], [], [])
    prev_cols = np.arange(k)
    for blk, layer in zip(blocks, net.layers[:depth], strict=True):
        w, b = dense(layer.weight), layer.bias_or_zero()
        r_cols = np.arange(blk.r, blk.r + blk.width)
        d_cols = np.arange(blk.delta, blk.delta + blk.width)
        lb[r_cols], ub[r_cols] = 0.0, np.maximum(blk.upper, 0.0)
        lb[d_cols], ub[d_cols] = 0.0, 1.0
        model.integrality[d_cols] = 1
        for u in range(blk.width):
            lo_u, hi_u = blk.lower[u], blk.upper[u]
            if hi_u <= 0:  # always off
                ub[r_cols[u]] = 0.0
                ub[d_cols[u]] = 0.0
                continue
            coef = np.zeros(n_vars)
            coef[r_cols[u]] = 1.0
            coef[prev_cols] = -w[u]
            if lo_u >= 0:  # always on: r = a
                lb[d_cols[u]] = 1.0
                model.add(coef, b[u], b[u])
                continue
            model.add(coef, b[u], np.inf)  # r - w.prev >= b   (r >= a)
            c2 = coef.copy()
            c2[d_cols[u]] = -lo_u
            model.add(c2, -np.inf, b[u] - lo_u)  # r <= a - L (1 - delta)
            c3 = np.zeros(n_vars)
            c3[r_cols[u]] = 1.0
            c3[d_cols[u]] = -hi_u
            model.add(c3, -np.inf, 0.0)  # r <= U delta
        prev_cols = r_cols
    model.out_cols = prev_cols
    return model


def _build(
    net: Network, top: int, y: np.ndarray, rtol: float, bound: float
) -> tuple[np.ndarray, list[LinearConstraint], Bounds, list[_Block]] | None:
    """The MILP of a preimage of layer top's observation y, ReLU layers below."""
    top_layer = net.layers[top]
    cons = active_set(top_layer, y, rtol)
    if isinstance(cons, str):
        return None
    model = _encode_relus(net, top, bound)
    w, b = dense(top_layer.weight), top_layer.bias_or_zero()
    tol = rtol * (cons.scale + float(np.max(np.abs(w), initial=0.0)) * bound)
    lo, hi = cons.pre_activation_bounds(b, tol)
    for i in range(top_layer.out_width):
        coef = np.zeros(model.n_vars)
        coef[model.out_cols] = w[i]
        model.add(coef, lo[i], hi[i])
    return model.integrality, model.constraints(), Bounds(model.lb, model.ub), model.blocks


@dataclass(frozen=True)
class Projection:
    """The MILP's global minimum of the misfit over the box: z, its value, a proved bound."""

    z: np.ndarray | None
    value: float
    bound: float
    status: str
    message: str


def milp_projection(
    net: Network, x: np.ndarray, *, norm: str = "linf", latent_bound: float = 6.0,
    time_limit: float = 60.0, below: float | None = None,
) -> Projection:
    """min over |z|_inf <= latent_bound of ||G(z) - x|| (l_inf or l_1), globally.

    Every ReLU unit, the output's too, is a binary (big-M from interval bounds
    on the box); the misfit enters as t >= |r_j - x_j| (l_inf: one t; l_1: one
    per output). HiGHS's branch and cut returns the optimum, or at its time
    limit the best point and a proved lower bound (the gap). ReLU layers only.

    ``below``: a misfit already reached (the cell descent's): only points under
    it are sought, which prunes the search; status "infeasible" then proves that
    no z in the box does better (value and bound are ``below``).
    """
    if norm not in ("linf", "l1"):
        raise ValueError(f"`norm` must be 'linf' or 'l1' for the MILP; got {norm!r}.")
    if not all(layer.activation.kind == "relu" for layer in net.layers):
        raise ValueError("The projection MILP needs ReLU layers only.")
    n = net.output_dim
    extra = 1 if norm == "linf" else n
    model = _encode_relus(net, len(net.layers), latent_bound, extra=extra)
    t_cols = np.arange(model.n_vars - extra, model.n_vars)
    model.lb[t_cols] = 0.0
    for j in range(n):
        t = t_cols[0] if norm == "linf" else t_cols[j]
        up = np.zeros(model.n_vars)
        up[model.out_cols[j]], up[t] = 1.0, -1.0
        model.add(up, -np.inf, float(x[j]))  # r_j - x_j <= t
        down = np.zeros(model.n_vars)
        down[model.out_cols[j]], down[t] = -1.0, -1.0
        model.add(down, -np.inf, -float(x[j]))  # x_j - r_j <= t
    cost = np.zeros(model.n_vars)
    cost[t_cols] = 1.0
    if below is not None:
        model.add(cost.copy(), -np.inf, float(below) * (1 - 1e-7))
    solution = solve_milp(cost, integrality=model.integrality, constraints=model.constraints(),
                          bounds=Bounds(model.lb, model.ub), time_limit=time_limit)
    z = None if solution.x is None else solution.x[: net.latent_dim]
    if below is not None and solution.status == "infeasible":
        return Projection(None, float(below), float(below), "infeasible",
                          f"no z in the box reaches a misfit below {below:.6g}: it is the minimum")
    return Projection(z, solution.value, solution.bound, solution.status, solution.message)


def _pattern(x: np.ndarray, blocks: list[_Block]) -> list[np.ndarray]:
    return [x[b.delta : b.delta + b.width] > 0.5 for b in blocks]




def milp_search(
    net: Network,
    top: int,
    y: np.ndarray,
    *,
    rtol: float,
    latent_bound: float,
    time_limit: float,
) -> SearchOutcome:
    """The MILP: a preimage within |z|_inf <= latent_bound and, if it can, a verdict.

    Layers 0..top-1 must be ReLU layers; y is layer top's observation.
    """
    built = _build(net, top, y, rtol, latent_bound)
    if built is None:
        return SearchOutcome(None, "none", None, "layer observation out of range")
    integrality, constraints, bounds, blocks = built
    n_vars = len(integrality)
    cost = np.zeros(n_vars)
    first = solve_milp(
        cost, integrality=integrality, bounds=bounds, constraints=constraints,
        time_limit=time_limit,
    )
    box = f"|z|_inf <= {latent_bound:g}"
    if first.status == "infeasible":
        return SearchOutcome(None, "none", None, f"MILP: no preimage with {box}")
    if first.x is None:
        return SearchOutcome(None, "none", None, f"MILP gave no point: {first.message}")
    pattern = _pattern(first.x, blocks)
    z, rank = polish(net, top, y, rtol, pattern)
    if z is None:
        return SearchOutcome(None, "none", None, "MILP point could not be polished to a preimage")

    # No-good cut: some unit with a binary must change state.
    cut = np.zeros(n_vars)
    ones = 0
    for blk, on in zip(blocks, pattern, strict=True):
        cols = np.arange(blk.delta, blk.delta + blk.width)
        free = bounds.lb[cols] != bounds.ub[cols]
        cut[cols[free & on]] = -1.0
        cut[cols[free & ~on]] = 1.0
        ones += int(np.sum(free & on))
    second = solve_milp(
        cost, integrality=integrality, bounds=bounds,
        constraints=[*constraints, LinearConstraint(cut[None], 1 - ones, np.inf)],
        time_limit=time_limit,
    )
    if second.status == "infeasible" and rank == net.latent_dim:
        return SearchOutcome(
            z, "unique", None,
            f"MILP: the only preimage with {box} (no other activation pattern is feasible)",
        )
    if second.x is not None:
        z2, _ = polish(net, top, y, rtol, _pattern(second.x, blocks))
        if z2 is not None and np.linalg.norm(z2 - z) > 1e-6 * max(np.linalg.norm(z), 1.0):
            return SearchOutcome(
                z, "non_unique", z2, "MILP: a second activation pattern gives a second preimage"
            )
    return SearchOutcome(z, "feasible", None, "MILP found a preimage; uniqueness unsettled")


def reproduces(net: Network, top: int, y: np.ndarray, z: np.ndarray, rtol: float) -> bool:
    """Whether layers 0..top map z to y within 10 rtol max|y| (l_inf): the tolerance of the
    layer-wise checks, whose terms |w_i h| are of the size of y here."""
    h = z[None]
    for layer in net.layers[: top + 1]:
        h = layer.forward(h)
    scale = max(float(np.max(np.abs(y))), 1e-300)
    return float(np.max(np.abs(h[0] - y))) <= 10 * rtol * scale


def polish(
    net: Network, top: int, y: np.ndarray, rtol: float, pattern: list[np.ndarray]
) -> tuple[np.ndarray | None, int]:
    """z from the cell LP of the hidden pattern of layers 0..top-1, checked; and the rank of
    the cell's equalities (k: the cell holds one preimage at most).

    None when the cell holds no z that reproduces y (`reproduces`).
    """
    cons = active_set(net.layers[top], y, rtol)
    if isinstance(cons, str):
        return None, 0
    upper = net.below(top + 1)
    fit = cell_lp(upper, y, pattern, tau=cons.tau)
    if not np.all(np.isfinite(fit.z)) or not reproduces(net, top, y, fit.z, rtol):
        return None, 0
    return fit.z, equality_rank(upper, y, pattern, cons.tau)
