"""Inversion with a fixed activation pattern: one linear program in z.

Once the on/off pattern s_i of every ReLU layer is fixed, the network is affine
in z. With D_i = diag(1 on, a off) (a = 0 for ReLU, the slope for LeakyReLU,
1 for identity),

    pre_0 = W_0 z + b_0,   pre_{i+1} = W_{i+1} D_i pre_i + b_{i+1},   x = D_{d-1} pre_{d-1},

so pre_i = P_i z + q_i. The cell of the pattern is {z : pre_i >= 0 on, <= 0 off}
and inside it G(z) = x exactly. `pattern_lp` minimises the misfit to the
observation over that cell:

    minimise    ||r||  (l_inf: t;  l_1: sum of slacks)
    subject to  P_i[on] z + q_i[on] >= 0,  P_i[off] z + q_i[off] <= 0   (hidden layers)
                output rows as in the noisy layer LP (``preimage.noisy``):
                  y_j > tau:  |pre_j - y_j| <= t,   y_j <= tau:  pre_j - y_j <= t
                or, with a measurement A (output pattern fixed too):
                  |A_j x - y_j| <= t.

Variables u = (z, t) (l_inf) or (z, s) (l_1). This is the "reverse polish" of
the hybrid method: the activation pattern of a near miss of gradient descent
turns into an exact answer when the pattern is right (misfit 0), and the best
fit inside the cell otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from preimage.network import Network

#: HiGHS feasibility tolerance on data scaled to max |y| = 1.
LP_TOL = 1e-9

_LINEAR_KINDS = ("relu", "leaky_relu", "identity")


@dataclass
class PatternFit:
    """The best z inside one activation cell.

    Attributes
    ----------
    z : ndarray of shape (k,), NaN when the cell LP failed or is empty
    misfit : float
        The LP's optimal value (absolute, in the units of y); inf when it failed.
    message : str
    cell_duals : list of ndarray, optional
        Per constrained layer, the multipliers (>= 0) of its cell constraints: large
        where the cell's wall blocks a better fit.
    n_lps : int
        LPs solved (row generation and walk steps included).
    steps : int
        Cells moved to (`pattern_walk`).
    """

    z: np.ndarray
    misfit: float
    message: str
    cell_duals: list[np.ndarray] | None = None
    n_lps: int = 1
    steps: int = 0


def activation_pattern(net: Network, z: np.ndarray) -> list[np.ndarray]:
    """The on/off pattern (pre-activation >= 0) of every layer at z of shape (k,)."""
    h = np.asarray(z, dtype=np.float64)[None]
    out = []
    for layer in net.layers:
        pre = layer.preactivation(h)
        out.append(pre[0] >= 0)
        h = layer.activation(pre)
    return out


def supports_patterns(net: Network, *, output: bool) -> bool:
    """Whether every hidden layer (and the output layer when `output`) is piecewise linear."""
    layers = net.layers if output else net.layers[:-1]
    return all(layer.activation.kind in _LINEAR_KINDS for layer in layers)


def _affine_chain(
    net: Network, patterns: list[np.ndarray], depth: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(P_i, q_i) for i < depth: pre_i = P_i z + q_i under the given patterns."""
    k = net.latent_dim
    p, q = np.eye(k), np.zeros(k)
    chain = []
    for i in range(depth):
        layer = net.layers[i]
        w = layer.weight.matrix()
        p, q = w @ p, w @ q + layer.bias_or_zero()
        chain.append((p, q))
        if i + 1 < depth:
            act = layer.activation
            slope = 1.0 if act.kind == "identity" else act.negative_slope
            gain = np.where(patterns[i], 1.0, slope)
            p, q = gain[:, None] * p, gain * q
    return chain


@dataclass
class _CellSystem:
    """The pattern LP's data, scaled by `scale` (z' = z / scale).

    cell z' <= cell_rhs;  fit rows: f_j(z') = fit[j] z' - r[j], two-sided where
    `two`, one-sided (f_j <= slack) elsewhere.
    """

    cell: np.ndarray
    cell_rhs: np.ndarray
    cell_sizes: list[int]
    fit: np.ndarray
    r: np.ndarray
    two: np.ndarray
    scale: float


def _cell_system(
    net: Network, y: np.ndarray, patterns: list[np.ndarray], A: np.ndarray | None, tau: float
) -> _CellSystem:
    d = len(net.layers)
    k = net.latent_dim
    chain = _affine_chain(net, patterns, d)
    scale = max(float(np.max(np.abs(y))), 1e-300)
    # Cell constraints:  -P_on z <= q_on,  P_off z <= -q_off.
    rows, rhs = [], []
    for i in range(d - 1 if A is None else d):
        p, q = chain[i]
        sign = np.where(patterns[i], -1.0, 1.0)
        rows.append(sign[:, None] * p)
        rhs.append(-sign * q)
    p_out, q_out = chain[-1]
    last = net.layers[-1].activation
    if A is None:
        if last.kind == "relu":
            two = y > tau
            target = y
        else:
            two = np.ones(len(y), dtype=bool)
            if last.kind == "tanh":
                y = np.clip(y, -1 + 1e-12, 1 - 1e-12)
            elif last.kind == "sigmoid":
                y = np.clip(y, 1e-12, 1 - 1e-12)
            target = last.inverse(y)
        fit, fit_q = p_out, q_out
    else:
        slope = 1.0 if last.kind == "identity" else last.negative_slope
        gain = np.where(patterns[-1], 1.0, slope)
        fit, fit_q, target = A @ (gain[:, None] * p_out), A @ (gain * q_out), y
        two = np.ones(len(y), dtype=bool)
    return _CellSystem(
        np.vstack(rows) if rows else np.zeros((0, k)),
        np.concatenate(rhs) / scale if rhs else np.zeros(0),
        [len(r) for r in rhs],
        fit,
        (target - fit_q) / scale,
        two,
        scale,
    )


def _solve_cell(
    sys: _CellSystem, rows: np.ndarray, norm: str
) -> tuple[np.ndarray | None, float, np.ndarray | None, int]:
    """The pattern LP over the fit rows `rows` (indices); returns (z', value, cell duals, status).

    Variables u = (z', t) for l_inf, (z', s) for l_1 (one slack per fit row).
    """
    k = sys.cell.shape[1]
    c = sys.cell.shape[0]
    two = rows[sys.two[rows]]
    one = rows[~sys.two[rows]]
    f2, f1 = sys.fit[two], sys.fit[one]
    m2, m1 = len(two), len(one)
    if norm == "linf":
        a_ub = np.vstack(
            [
                np.hstack([f2, -np.ones((m2, 1))]),
                np.hstack([-f2, -np.ones((m2, 1))]),
                np.hstack([f1, -np.ones((m1, 1))]),
                np.hstack([sys.cell, np.zeros((c, 1))]),
            ]
        )
        cost = np.r_[np.zeros(k), 1.0]
        bounds = [(None, None)] * k + [(0.0, None)]
    else:
        ns = m2 + m1
        s_two = sparse.hstack([sparse.eye(m2), sparse.csr_matrix((m2, m1))])
        s_one = sparse.hstack([sparse.csr_matrix((m1, m2)), sparse.eye(m1)])
        a_ub = sparse.vstack(
            [
                sparse.hstack([sparse.csr_matrix(f2), -s_two]),
                sparse.hstack([sparse.csr_matrix(-f2), -s_two]),
                sparse.hstack([sparse.csr_matrix(f1), -s_one]),
                sparse.hstack([sparse.csr_matrix(sys.cell), sparse.csr_matrix((c, ns))]),
            ],
            format="csr",
        )
        cost = np.r_[np.zeros(k), np.ones(ns)]
        bounds = [(None, None)] * k + [(0.0, None)] * ns
    b_ub = np.concatenate([sys.r[two], -sys.r[two], sys.r[one], sys.cell_rhs])
    res = linprog(
        cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs",
        options={"primal_feasibility_tolerance": LP_TOL, "dual_feasibility_tolerance": LP_TOL},
    )
    if res.status != 0:
        return None, np.inf, None, int(res.status)
    duals = -np.asarray(res.ineqlin.marginals)[len(b_ub) - c :]
    return np.asarray(res.x[:k]), float(res.fun), duals, 0


def _misfit(sys: _CellSystem, z: np.ndarray) -> np.ndarray:
    """Per fit row: |f_j| (two-sided) or max(f_j, 0) (one-sided), at z' (scaled)."""
    f = sys.fit @ z - sys.r
    return np.where(sys.two, np.abs(f), np.maximum(f, 0.0))


def pattern_lp(
    net: Network,
    y: np.ndarray,
    patterns: list[np.ndarray],
    *,
    A: np.ndarray | None = None,
    norm: str = "linf",
    tau: float = 0.0,
    z_ref: np.ndarray | None = None,
) -> PatternFit:
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
        A point near the answer. The one-sided rows far from binding there are
        left out of the first LP and added back only if the answer violates them
        (row generation: the same optimum, a smaller LP).

    Returns
    -------
    PatternFit
    """
    if norm not in ("linf", "l1"):
        raise ValueError(f"`norm` must be 'linf' or 'l1' for the pattern LP; got {norm!r}.")
    y = np.asarray(y, dtype=np.float64)
    sys = _cell_system(net, y, patterns, A, tau)
    k = net.latent_dim
    nan = np.full(k, np.nan)
    n_fit = len(sys.r)
    if z_ref is None or np.all(sys.two):
        rows = np.arange(n_fit)
    else:
        f = sys.fit @ (np.asarray(z_ref, dtype=np.float64) / sys.scale) - sys.r
        rows = np.flatnonzero(sys.two | (f > -0.1))
    n_lps = 0
    while True:
        z, value, duals, status = _solve_cell(sys, rows, norm)
        n_lps += 1
        if z is None:
            message = (
                "the activation cell is empty" if status == 2
                else f"HiGHS did not solve the pattern LP (status {status})"
            )
            return PatternFit(nan, np.inf, message, n_lps=n_lps)
        per_row = _misfit(sys, z)
        level = value if norm == "linf" else 0.0
        left_out = np.setdiff1d(np.arange(n_fit), rows)
        violated = left_out[per_row[left_out] > level + 10 * LP_TOL]
        if violated.size == 0:
            break
        rows = np.union1d(rows, violated)
    total = float(np.max(per_row, initial=0.0) if norm == "linf" else np.sum(per_row))
    split = np.cumsum(sys.cell_sizes)[:-1]
    return PatternFit(
        z * sys.scale, total * sys.scale, "pattern LP solved", np.split(duals, split),
        n_lps=n_lps,
    )


def pattern_walk(
    net: Network,
    y: np.ndarray,
    z0: np.ndarray,
    *,
    A: np.ndarray | None = None,
    norm: str = "linf",
    tau: float = 0.0,
    target: float = 0.0,
    max_lps: int = 100,
) -> PatternFit:
    """Local search over activation cells from z0: the reverse polish, walked on.

    The best fit inside z0's cell (`pattern_lp`) usually sits on the cell's
    walls. Flip one unit whose wall is tight there (those with the largest LP
    multipliers first), re-solve in the neighbouring cell, and move when the
    misfit drops; stop at `target`, at a cell no single flip improves, or after
    `max_lps` LPs. Inside every cell G is affine, so the answer is checked
    exactly: a misfit of 0 is an exact preimage.

    Parameters
    ----------
    net, y, A, norm, tau : as in `pattern_lp`.
    z0 : ndarray of shape (k,)
        The start (a gradient-descent result, an LP estimate).
    target : float
        Stop once the misfit is at most this (absolute).
    max_lps : int
        Budget of LPs.

    Returns
    -------
    PatternFit of the best cell found (``steps``: cells moved to).
    """
    patterns = activation_pattern(net, z0)
    best = pattern_lp(net, y, patterns, A=A, norm=norm, tau=tau, z_ref=z0)
    n_lps, steps = best.n_lps, 0
    flippable = len(net.layers) if A is not None else len(net.layers) - 1
    while n_lps < max_lps and np.isfinite(best.misfit) and best.misfit > target:
        h = np.asarray(best.z)[None]
        moves = []
        for i in range(flippable):
            pre = net.layers[i].preactivation(h)[0]
            h = net.layers[i].activation(pre)
            tight = np.flatnonzero(np.abs(pre) <= 1e-7 * max(float(np.max(np.abs(pre))), 1e-300))
            assert best.cell_duals is not None
            moves += [(float(best.cell_duals[i][j]), i, int(j)) for j in tight]
        moves.sort(key=lambda m: -m[0])
        moved = False
        for _, i, j in moves:
            if n_lps >= max_lps:
                break
            trial = [p.copy() for p in patterns]
            trial[i][j] = ~trial[i][j]
            fit = pattern_lp(net, y, trial, A=A, norm=norm, tau=tau, z_ref=best.z)
            n_lps += fit.n_lps
            if fit.misfit < best.misfit * (1 - 1e-9) - 1e-15 * best.misfit:
                best, patterns, moved = fit, trial, True
                steps += 1
                break
        if not moved:
            break
    best.n_lps, best.steps = n_lps, steps
    best.message = f"pattern walk: {steps} moves, {n_lps} LPs, misfit {best.misfit:.3g}"
    return best
