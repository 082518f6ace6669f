"""The LP of one activation cell: with every unit's on/off state fixed, G is affine in z.

Fix the on/off pattern of every piecewise-linear unit (on: pre > 0, the one
convention of the package; `activation_pattern`). With D_i = diag(1 on,
a off) (a = 0 for ReLU, the slope for LeakyReLU, 1 for identity),

    pre_0 = W_0 z + b_0,   pre_{i+1} = W_{i+1} D_i pre_i + b_{i+1},

so pre_i = P_i z + q_i (`affine_chain`). The cell of the pattern is the
polyhedron {z : pre_i >= 0 on, <= 0 off} and inside it G(z) is exactly affine
(../NOTES-math.md section 8). `cell_lp` minimises the misfit to an
observation y over the cell:

    minimise    ||r||  (l_inf: t;  l_1: sum of slacks)
    subject to  walls: P_i[on] z + q_i[on] >= 0,  P_i[off] z + q_i[off] <= 0  (hidden layers)
                fit rows, without a measurement (output pattern free):
                  y_j > tau:  |pre_j - y_j| <= t    (bijective outputs, every row:
                                                     s_j |pre_j - act^-1(y_j)| <= t, s_j the
                                                     slope of act there)
                  y_j <= tau:  pre_j - y_j <= t     (a ReLU unit seen off)
                or with a measurement A (the output's pattern fixed too):
                  |A_j G(z) - y_j| <= t.

Variables u = (z, t) (l_inf) or (z, s) (l_1), z scaled by max |y| (by the biases'
offsets where y = 0) so that HiGHS's absolute tolerances are relative ones. A
misfit of 0 is an exact preimage. With ``walls=False`` and a trust region |z - center|_inf <= radius
the same LP is one step of sequential linear programming on the linearised
misfit (`preimage.methods.search`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

from preimage.model.network import Network
from preimage.results import LP_TOL
from preimage.solvers.highs import solve_lp, solve_qp

#: With a reference point, the cell LP starts from the walls nearest to it (this many).
WALLS_FIRST = 400
#: ... and, for l_inf through a bijective output's inverse, from the fit rows of the
#: largest misfit there (this many): a sigmoid output fits all its pixels two-sidedly
#: (1,568 dense rows for 784). 1.8-2.4x for the hybrid on the shipped convolutional
#: decoder; on a ReLU output's own cell (the projection) the extra rounds cost more than
#: the smaller LPs save (12% slower on the shipped ReLU decoder), so not there.
FIT_FIRST = 200


@dataclass
class CellFit:
    """The best z inside one activation cell.

    Attributes
    ----------
    z : ndarray of shape (k,), NaN when the cell LP failed or is empty
    misfit : float
        The LP's optimal value (absolute, in the units of y); inf when it failed.
    message : str
    wall_duals : list of ndarray, optional
        Per constrained layer, the multipliers (>= 0) of its walls: large where
        the cell's wall blocks a better fit.
    n_lps : int
        LPs solved (row generation and walk steps included).
    steps : int
        Cells moved to (`preimage.methods.search.cell_walk`).
    """

    z: np.ndarray
    misfit: float
    message: str
    wall_duals: list[np.ndarray] | None = None
    n_lps: int = 1
    steps: int = 0
    status: str = field(default="optimal")
    #: The cell's affine chain (`affine_chain`), for its neighbours to reuse.
    chain: Chain = field(default_factory=list, repr=False)
    #: After a descent (`preimage.methods.search.cell_walk`): walls tight at z, and
    #: whether z is certified a local minimum.
    n_tight: int = -1
    local_minimum: bool = False


def activation_pattern(net: Network, z: np.ndarray, depth: int | None = None) -> list[np.ndarray]:
    """The on/off pattern (pre-activation > 0) of layers 0..depth-1 at z of shape (k,)."""
    h = np.asarray(z, dtype=np.float64)[None]
    out = []
    for layer in net.layers[: len(net.layers) if depth is None else depth]:
        pre = layer.preactivation(h)
        out.append(pre[0] > 0)
        h = layer.activation(pre)
    return out


def piecewise_linear(net: Network, *, output: bool) -> bool:
    """Whether every hidden layer (and the output layer when `output`) is piecewise linear."""
    layers = net.layers if output else net.layers[:-1]
    return all(layer.activation.is_piecewise_linear for layer in layers)


Chain = list[tuple[np.ndarray, np.ndarray]]


def affine_chain(
    net: Network, patterns: list[np.ndarray], depth: int, known: Chain = ()
) -> Chain:
    """(P_i, q_i) for i < depth: pre_i = P_i z + q_i under the patterns of layers < depth - 1.

    `known`: the first entries, where the patterns they depend on are unchanged
    (pre_i depends on the patterns of layers < i only): a walk that flips a unit
    of layer i reuses pre_0..pre_i.
    """
    k = net.latent_dim
    chain = list(known[:depth])
    if chain:
        p, q = chain[-1]
    else:
        p, q = np.eye(k), np.zeros(k)
    for i in range(len(chain), depth):
        if i:
            gain = net.layers[i - 1].activation.gain(patterns[i - 1])
            p, q = gain[:, None] * p, gain * q
        layer = net.layers[i]
        p, q = layer.weight.apply(p.T).T, layer.preactivation(q[None])[0]
        chain.append((p, q))
    return chain


@dataclass
class _CellSystem:
    """The cell LP's data, scaled by `scale` (z' = z / scale).

    walls z' <= wall_rhs;  fit rows: f_j(z') = fit[j] z' - r[j], two-sided where
    `two`, one-sided (f_j <= slack) elsewhere.
    """

    walls: np.ndarray
    wall_rhs: np.ndarray
    wall_sizes: list[int]
    fit: np.ndarray
    r: np.ndarray
    two: np.ndarray
    scale: float
    chain: Chain
    inverse_fit: bool = False


def _cell_system(
    net: Network, y: np.ndarray, patterns: list[np.ndarray], A: np.ndarray | None, tau: float,
    known: Chain = (), output_cell: bool = False,
) -> _CellSystem:
    d = len(net.layers)
    k = net.latent_dim
    chain = affine_chain(net, patterns, d, known)
    output_cell = output_cell or A is not None
    last = net.layers[-1].activation
    fixed_output = output_cell and last.is_piecewise_linear
    # Walls:  -P_on z <= q_on,  P_off z <= -q_off.
    rows, rhs = [], []
    for i in range(d if fixed_output else d - 1):
        p, q = chain[i]
        sign = np.where(patterns[i], -1.0, 1.0)
        rows.append(sign[:, None] * p)
        rhs.append(-sign * q)
    p_out, q_out = chain[-1]
    if fixed_output:  # the output's pattern is part of the cell: G(z) = D (P z + q) there
        gain = last.gain(patterns[-1])
        fit, fit_q = gain[:, None] * p_out, gain * q_out
        if A is not None:
            fit, fit_q = A @ fit, A @ fit_q
        target, two = y, np.ones(len(y), dtype=bool)
    elif A is None or last.is_bijective:
        fit, fit_q = p_out, q_out
        if last.is_bijective:
            # act^-1(y), each row weighted by the slope there: misfits in the units of y
            # (a unit near saturation, whose pre-activation y hardly fixes, counts little).
            two = np.ones(len(y), dtype=bool)
            target = last.clipped_inverse(y)
            slope = last.slope(y)
            fit, fit_q, target = slope[:, None] * fit, slope * fit_q, slope * target
        else:
            two = y > tau
            target = y
        if A is not None:  # a measurement of a smooth output: its linearisation at y
            raise ValueError("A measurement of a non-piecewise-linear output is not supported.")
    # the data's size, or where y is 0 (a blank image, background pixels only) the
    # offsets' (a scale of 1e-300 put the walls at 1e299: no LP, no descent)
    scale = float(np.max(np.abs(y), initial=0.0))
    if scale == 0.0:
        scale = max((float(np.max(np.abs(v), initial=0.0)) for v in (*rhs, fit_q)),
                    default=0.0)
    scale = scale if scale > 0.0 else 1.0
    return _CellSystem(
        np.vstack(rows) if rows else np.zeros((0, k)),
        np.concatenate(rhs) / scale if rhs else np.zeros(0),
        [len(r) for r in rhs],
        fit,
        (target - fit_q) / scale,
        two,
        scale,
        chain,
        inverse_fit=not fixed_output and last.is_bijective,
    )


def _solve_cell(
    sys: _CellSystem,
    rows: np.ndarray,
    norm: str,
    kept: np.ndarray,
    box: tuple[np.ndarray, float] | None,
) -> tuple[np.ndarray | None, float, np.ndarray | None, str]:
    """The cell LP over the fit rows `rows` and the walls `kept` (indices);
    (z', value, duals of the kept walls, status).

    Variables u = (z', t) for l_inf, (z', s) for l_1 (one slack per fit row); l_2: z'
    only, a convex QP (min ||f_two||^2 + ||max(f_one, 0)||^2 needs the one-sided rows
    as slacks: min ||f_two||^2 + ||s||^2 with f_one <= s, s >= 0), value the norm.
    """
    k = sys.walls.shape[1]
    c = kept.size
    two = rows[sys.two[rows]]
    one = rows[~sys.two[rows]]
    f2, f1 = sys.fit[two], sys.fit[one]
    m2, m1 = len(two), len(one)
    wall_rows = sys.walls[kept]
    if norm == "l2":
        return _solve_cell_l2(sys, two, one, kept, box)
    if norm == "linf":
        a_ub: np.ndarray | sparse.csr_matrix = np.vstack(
            [
                np.hstack([f2, -np.ones((m2, 1))]),
                np.hstack([-f2, -np.ones((m2, 1))]),
                np.hstack([f1, -np.ones((m1, 1))]),
                np.hstack([wall_rows, np.zeros((c, 1))]),
            ]
        )
        cost = np.r_[np.zeros(k), 1.0]
        n_slack = 1
    else:
        n_slack = m2 + m1
        s_two = sparse.hstack([sparse.eye(m2), sparse.csr_matrix((m2, m1))])
        s_one = sparse.hstack([sparse.csr_matrix((m1, m2)), sparse.eye(m1)])
        a_ub = sparse.vstack(
            [
                sparse.hstack([sparse.csr_matrix(f2), -s_two]),
                sparse.hstack([sparse.csr_matrix(-f2), -s_two]),
                sparse.hstack([sparse.csr_matrix(f1), -s_one]),
                sparse.hstack([sparse.csr_matrix(wall_rows), sparse.csr_matrix((c, n_slack))]),
            ],
            format="csr",
        )
        cost = np.r_[np.zeros(k), np.ones(n_slack)]
    if box is None:
        z_bounds = [(None, None)] * k
    else:
        center, radius = box
        z_bounds = [(float(lo), float(hi)) for lo, hi in zip(center - radius, center + radius,
                                                              strict=True)]
    bounds = z_bounds + [(0.0, None)] * n_slack
    b_ub = np.concatenate([sys.r[two], -sys.r[two], sys.r[one], sys.wall_rhs[kept]])
    solution = solve_lp(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, tolerance=LP_TOL)
    if solution.x is None:
        return None, np.inf, None, solution.status
    duals = None
    if solution.ineq_duals is not None:
        duals = solution.ineq_duals[len(b_ub) - c :]
    return solution.x[:k], solution.value, duals, solution.status


def _solve_cell_l2(
    sys: _CellSystem, two: np.ndarray, one: np.ndarray, kept: np.ndarray,
    box: tuple[np.ndarray, float] | None,
) -> tuple[np.ndarray | None, float, np.ndarray | None, str]:
    """The l_2 cell problem as a QP in u = (z', s): 1/2 u^T H u + c^T u over the walls."""
    k = sys.walls.shape[1]
    f2, r2 = sys.fit[two], sys.r[two]
    f1, r1 = sys.fit[one], sys.r[one]
    m1 = len(one)
    hessian = np.zeros((k + m1, k + m1))
    hessian[:k, :k] = 2.0 * f2.T @ f2
    hessian[k:, k:] = 2.0 * np.eye(m1)
    linear = np.concatenate([-2.0 * f2.T @ r2, np.zeros(m1)])
    rows = np.vstack([np.hstack([sys.walls[kept], np.zeros((kept.size, m1))]),
                      np.hstack([f1, -np.eye(m1)])])
    rhs = np.concatenate([sys.wall_rhs[kept], r1])
    lower = np.full(k + m1, -np.inf)
    upper = np.full(k + m1, np.inf)
    lower[k:] = 0.0
    if box is not None:
        center, radius = box
        lower[:k], upper[:k] = center - radius, center + radius
    solution = solve_qp(hessian, linear, A_ub=rows, b_ub=rhs, lower=lower, upper=upper,
                        tolerance=LP_TOL)
    if solution.x is None:
        return None, np.inf, None, solution.status
    value = float(np.sqrt(max(solution.value + float(r2 @ r2), 0.0)))
    duals = solution.ineq_duals[: kept.size] if solution.ineq_duals is not None else None
    return solution.x[:k], value, duals, solution.status


def _row_misfit(sys: _CellSystem, z: np.ndarray) -> np.ndarray:
    """Per fit row: |f_j| (two-sided) or max(f_j, 0) (one-sided), at z' (scaled)."""
    f = sys.fit @ z - sys.r
    return np.where(sys.two, np.abs(f), np.maximum(f, 0.0))


def cell_lp(
    net: Network,
    y: np.ndarray,
    patterns: list[np.ndarray],
    *,
    A: np.ndarray | None = None,
    norm: str = "linf",
    tau: float = 0.0,
    z_ref: np.ndarray | None = None,
    walls: bool = True,
    trust: tuple[np.ndarray, float] | None = None,
    known: Chain = (),
    output_cell: bool = False,
) -> CellFit:
    """The best fit to y inside the activation cell given by `patterns`.

    Parameters
    ----------
    net : Network
        Hidden activations must be ReLU, LeakyReLU or identity.
    y : ndarray of shape (n,) (or (m,) with A)
        The observation.
    patterns : list of bool ndarray
        ``patterns[i]`` of shape (n_i,): the on units of layer i, for the hidden
        layers (and for the output layer too when A is given).
    A : ndarray of shape (m, n), optional
        A linear measurement of the output: y ~ A G(z).
    norm : "linf" or "l1"
    tau : float
        Without A: output units with y_j > tau are fitted two-sidedly, the rest
        one-sidedly (pre_j <= y_j + slack).
    z_ref : ndarray of shape (k,), optional
        A point near the answer. The one-sided rows and the walls far from
        binding there (for l_inf through a bijective output, also the fit rows
        beyond the `FIT_FIRST` of largest misfit) are left out of the first LP
        and added back only if the answer violates them (row generation: the
        same optimum, a smaller LP; an image generator's cell has tens of
        thousands of walls, a few hundred of which come near).
    walls : bool
        Keep z inside the cell (False: the linearisation of the misfit at this
        cell, over all of z; with `trust`, one SLP step).
    trust : (center (k,), radius), optional
        Also keep |z - center|_inf <= radius.
    known : list of (P_i, q_i), optional
        The first entries of the cell's `affine_chain`, already computed (a
        neighbouring cell's, up to the layer of the flipped unit).

    Returns
    -------
    CellFit
    """
    if norm not in ("linf", "l1", "l2"):
        raise ValueError(f"`norm` must be 'linf', 'l1' or 'l2' for the cell problem; got {norm!r}.")
    y = np.asarray(y, dtype=np.float64)
    sys = _cell_system(net, y, patterns, A, tau, known, output_cell)
    k = net.latent_dim
    nan = np.full(k, np.nan)
    n_fit = len(sys.r)
    box = None if trust is None else (trust[0] / sys.scale, trust[1] / sys.scale)
    if z_ref is None:
        rows = np.arange(n_fit)
    else:
        f = sys.fit @ (np.asarray(z_ref, dtype=np.float64) / sys.scale) - sys.r
        rows = np.flatnonzero(sys.two | (f > -0.1))
        if norm == "linf" and sys.inverse_fit and rows.size > FIT_FIRST:
            # l_inf: only the rows of the largest misfit bind (k + 1 of them at a vertex);
            # through an output's inverse every row is two-sided
            rows = np.sort(rows[np.argsort(-np.abs(f[rows]))[:FIT_FIRST]])
    n_walls = sys.walls.shape[0] if walls else 0
    if z_ref is None or n_walls <= WALLS_FIRST:
        kept = np.arange(n_walls)
    else:
        slack = sys.wall_rhs - sys.walls @ (np.asarray(z_ref, dtype=np.float64) / sys.scale)
        kept = np.sort(np.argsort(slack)[:WALLS_FIRST])
    n_lps = 0
    while True:
        z, value, duals, status = _solve_cell(sys, rows, norm, kept, box)
        n_lps += 1
        if z is None:
            message = (
                "the activation cell is empty" if status == "infeasible"
                else f"HiGHS did not solve the cell LP ({status})"
            )
            return CellFit(nan, np.inf, message, n_lps=n_lps, status=status, chain=sys.chain)
        per_row = _row_misfit(sys, z)
        level = value if norm == "linf" else 0.0  # (l_1, l_2: any left-out row's misfit counts)
        left_out = np.setdiff1d(np.arange(n_fit), rows)
        violated = left_out[per_row[left_out] > level + 10 * LP_TOL]
        crossed = np.setdiff1d(np.arange(n_walls), kept)
        crossed = crossed[sys.walls[crossed] @ z > sys.wall_rhs[crossed] + 10 * LP_TOL]
        if violated.size == 0 and crossed.size == 0:
            break
        rows = np.union1d(rows, violated)
        kept = np.union1d(kept, crossed)
    total = float(np.max(per_row, initial=0.0) if norm == "linf" else np.sum(per_row)
                  if norm == "l1" else np.linalg.norm(per_row))
    split = np.cumsum(sys.wall_sizes)[:-1]
    wall_duals = None
    if walls and duals is not None:
        every = np.zeros(n_walls)
        every[kept] = duals  # the walls left out are slack: multiplier 0
        wall_duals = np.split(every, split)
    return CellFit(z * sys.scale, total * sys.scale, "cell LP solved", wall_duals, n_lps=n_lps,
                   chain=sys.chain)


def equality_rank(
    net: Network, y: np.ndarray, patterns: list[np.ndarray], tau: float
) -> int:
    """Rank of the two-sided fit rows of the cell: k means they fix z (one point per cell)."""
    sys = _cell_system(net, np.asarray(y, dtype=np.float64), patterns, None, tau)
    fit = sys.fit[sys.two]
    return int(np.linalg.matrix_rank(fit)) if fit.size else 0


def cell_least_squares(
    net: Network, yb: np.ndarray, zb: np.ndarray, tau: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each sample, the least-squares fit to y inside the cell of its z; (z', same cell).

    With the pattern of z fixed, G(z') = act(P z' + q) on the cell, so

        z' = argmin  sum_j s_j^2 (p_j z' + q_j - t_j)^2

    over the output units fitted two-sidedly (y_j > tau, every unit for a
    bijective output with t_j = act^-1(y_j) and s_j its slope; a ReLU unit seen
    off is left to the check), one small weighted least-squares problem per
    sample (k unknowns). z' counts only where it keeps z's whole activation
    pattern (`same`), where it is the least-squares point of the cell itself.
    Batched: each layer's chain P_i for all samples is one `apply` of the
    layer's operator to the stacked k columns. Hidden layers must be piecewise
    linear. Shapes: yb (B, n), zb (B, k), tau (B,); returns (B, k), (B,).
    """
    b, k = zb.shape
    patterns: list[np.ndarray] = []
    p = np.broadcast_to(np.eye(k), (b, k, k)).reshape(b * k, k)  # rows: (sample, column)
    q = np.zeros((b, k))  # G's affine part at z = 0 on the cell
    h = zb
    for i, layer in enumerate(net.layers):
        pre = layer.preactivation(h)
        q_pre = layer.preactivation(q)
        p_pre = layer.weight.apply(p)  # (b k, n_i): W applied to each sample's columns
        if i + 1 < len(net.layers):
            on = pre > 0
            patterns.append(on)
            gain = layer.activation.gain(on)
            p = p_pre * np.repeat(gain, k, axis=0)
            q = q_pre * gain
            h = layer.activation(pre)
    last = net.layers[-1].activation
    m = p_pre.shape[1]
    fit = p_pre.reshape(b, k, m).transpose(0, 2, 1)  # (b, m, k)
    if last.is_bijective:
        rows = np.ones((b, m), dtype=bool)
        weight = last.slope(yb)
        target = last.clipped_inverse(yb)
    else:
        rows = yb > tau[:, None]
        weight = np.ones_like(yb)
        target = yb
    w = np.where(rows, weight, 0.0)
    a = fit * w[:, :, None]
    r = (target - q_pre) * w
    gram = np.einsum("bmk,bml->bkl", a, a)
    rhs = np.einsum("bmk,bm->bk", a, r)
    z_new = np.array(zb, copy=True)
    solvable = np.linalg.matrix_rank(gram) == k
    if solvable.any():
        z_new[solvable] = np.linalg.solve(gram[solvable], rhs[solvable][:, :, None])[:, :, 0]
    same = solvable & np.all(np.isfinite(z_new), axis=1)
    h = z_new
    for layer, on in zip(net.layers[:-1], patterns, strict=False):
        pre = layer.preactivation(h)
        same &= np.all((pre > 0) == on, axis=1)
        h = layer.activation(pre)
    return np.where(same[:, None], z_new, zb), same


def active_jacobian(
    net: Network, patterns: list[np.ndarray], rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(P, q) of the last layer's pre-activations on the rows `rows` (bool (n,)) in the cell
    of `patterns` (hidden layers): pre[rows] = P z + q there."""
    p, q = affine_chain(net, patterns, len(net.layers))[-1]
    return p[rows], q[rows]


def newton_refine(
    net: Network, target: np.ndarray, rows: np.ndarray, z: np.ndarray, *, steps: int = 3
) -> np.ndarray:
    """Gauss-Newton on pre[rows](z) = target[rows], each step in the cell of the current z.

    Inside a cell the last layer's pre-activations are affine, pre = P z + q, so
    one least-squares step (minimum norm: P may have a null space) lands on the
    cell's set {P z + q = target} exactly when z's cell is the right one; a
    point an LP found to 1e-7 is refined to rounding level. Returns the last z
    (the caller checks it by a forward pass).
    """
    z = np.asarray(z, dtype=np.float64).copy()
    depth = len(net.layers) - 1
    for _ in range(steps):
        p, q = active_jacobian(net, activation_pattern(net, z, depth), rows)
        r = target[rows] - (p @ z + q)
        if not np.all(np.isfinite(r)):
            break
        step = np.linalg.lstsq(p, r, rcond=None)[0]
        z = z + step
        if float(np.max(np.abs(step), initial=0.0)) <= 1e-15 * (1.0 + float(np.max(np.abs(z)))):
            break
    return z


def null_directions(
    net: Network, patterns: list[np.ndarray], rows: np.ndarray, *, rtol: float = 1e-10
) -> np.ndarray:
    """An orthonormal basis (k, m) of the directions that keep the last layer's `rows`
    unchanged in the cell of `patterns` (m = 0: the rows fix z in the cell)."""
    p, _ = active_jacobian(net, patterns, rows)
    k = net.latent_dim
    if p.shape[0] == 0:
        return np.eye(k)
    _, s, vt = np.linalg.svd(p, full_matrices=True)
    rank = int(np.sum(s > rtol * max(float(s[0]) if s.size else 0.0, 1e-300) * max(p.shape)))
    return vt[rank:].T


def top_preactivation(net: Network, z: np.ndarray) -> np.ndarray:
    """(n,) the last layer's pre-activations at z (k,)."""
    return net.layers[-1].preactivation(net.below(len(net.layers) - 1).forward(z[None]))[0]


def local_preimage(
    net: Network, lo: np.ndarray, hi: np.ndarray, z: np.ndarray, *, iterations: int = 60,
    damping: float = 1e-3,
) -> np.ndarray:
    """Levenberg-Marquardt on the observation's constraints lo <= pre(z) <= hi.

    pre(z) (n,) are the last layer's pre-activations; the residual of row j is
    e_j = pre_j - clip(pre_j, lo_j, hi_j) (active units: lo = hi = the target,
    or a band; units seen off: pre_j <= tau), and in z's cell pre = P z + q, so
    one step solves (P_V^T P_V + mu I) dz = -P_V^T e_V on the violated rows V,
    crossing cell walls as it goes (unlike `newton_refine`, which stays on the
    active rows of one cell). mu grows on a step that does not lower ||e||_2
    and shrinks on one that does. A local method: from a poor start it ends in
    a local minimum of ||e|| above 0. Returns the last z (the caller checks it).
    """
    z = np.asarray(z, dtype=np.float64).copy()
    k = net.latent_dim
    depth = len(net.layers) - 1

    def residual(z: np.ndarray) -> np.ndarray:
        pre = top_preactivation(net, z)
        return pre - np.clip(pre, lo, hi)

    e = residual(z)
    if not np.all(np.isfinite(e)):
        return z
    value = float(e @ e)
    mu = damping
    for _ in range(iterations):
        if value == 0.0:
            break
        rows = e != 0
        p = active_jacobian(net, activation_pattern(net, z, depth), rows)[0]
        gram, grad = p.T @ p, p.T @ e[rows]
        ridge = 1.0 + float(np.trace(gram)) / k
        improved = False
        while mu <= 1e8:
            try:
                step = -np.linalg.solve(gram + mu * ridge * np.eye(k), grad)
            except np.linalg.LinAlgError:
                mu *= 10.0
                continue
            e_new = residual(z + step)
            new = float(e_new @ e_new) if np.all(np.isfinite(e_new)) else np.inf
            if new < value:
                z, e, improved = z + step, e_new, True
                shrink = value - new
                value, mu = new, max(mu / 3.0, 1e-12)
                break
            mu *= 4.0
        if not improved or shrink <= 1e-30 * (1.0 + value):
            break
    return z
