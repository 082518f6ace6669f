"""Searching below a non-unique layer: pattern search, then (optionally) a MILP.

When layer j's preimage P_j(y_j) is not a point, the layer-wise method passes
one point of it down and may then fail although another point would have
worked (the true hidden vector is often not a vertex of P_j, so no choice of
vertex helps). Below layer j the question is global: is there a z whose
hidden activations land in P_j(y_j)?

Pattern search (`pattern_search`, cheap, incomplete). The misfit
f(z) = max(max_A |w_i h(z) + b_i - y_i|, max_I (w_i h(z) + b_i - tau)_+) is
piecewise linear in z: on each activation pattern of the layers below, h(z)
is affine. Sequential linear programming with a trust region minimises it
from several starts; a zero misfit is then polished (the LP with the pattern
fixed) and checked by a forward pass. It finds preimages, it never proves
their absence.

MILP (`milp_search`, complete within a box, exponential in the worst case;
../NOTES-math.md section 6). Each hidden ReLU unit u of layers 0..j-1 has
pre-activation a = w_u h_prev + b_u with bounds L <= a <= U from interval
arithmetic on the latent box |z|_inf <= R, output r and a binary delta:

    r >= a,   r >= 0,   r <= a - L (1 - delta),   r <= U delta

(units with U <= 0 or L >= 0 need no binary). Layer j's own ReLU has a known
active set, so its rows are plain equalities and inequalities.

The MILP's point is then polished: with its activation pattern fixed, G is
linear in z and one LP in the k latent coordinates gives z to full accuracy,
checked by a forward pass. A no-good cut on the pattern and a second MILP
decide uniqueness: no other pattern feasible and the fixed-pattern equalities
of full column rank prove that z is the only preimage *within the box*; a
second pattern gives a second z (a witness).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from preimage.layer_inversion import active_set
from preimage.network import Network


@dataclass(frozen=True)
class SearchOutcome:
    """z: a checked preimage or None; verdict: unique / non_unique / feasible / none."""

    z: np.ndarray | None
    verdict: str
    witness: np.ndarray | None
    message: str


@dataclass
class _Block:
    """Column offsets of one hidden layer's variables (outputs r, binaries delta)."""

    r: int
    delta: int
    width: int
    lower: np.ndarray
    upper: np.ndarray


def _interval_bounds(net: Network, top: int, bound: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pre-activation bounds (L, U) of layers 0..top-1 over |z|_inf <= bound."""
    lo, hi = np.full(net.latent_dim, -bound), np.full(net.latent_dim, bound)
    out = []
    for layer in net.layers[:top]:
        w = layer.weight.matrix()
        center, radius = (lo + hi) / 2, (hi - lo) / 2
        mid = w @ center + layer.bias_or_zero()
        spread = np.abs(w) @ radius
        pre_lo, pre_hi = mid - spread, mid + spread
        out.append((pre_lo, pre_hi))
        lo, hi = np.maximum(pre_lo, 0.0), np.maximum(pre_hi, 0.0)
    return out


def _supported(net: Network, top: int) -> bool:
    return all(layer.activation.kind == "relu" for layer in net.layers[:top])


def _build(
    net: Network, top: int, y: np.ndarray, rtol: float, bound: float
) -> tuple[np.ndarray, list[LinearConstraint], Bounds, list[_Block]] | None:
    k = net.latent_dim
    pre_bounds = _interval_bounds(net, top, bound)
    blocks: list[_Block] = []
    n_vars = k
    for (lo, hi), layer in zip(pre_bounds, net.layers[:top], strict=True):
        blocks.append(_Block(n_vars, n_vars + layer.out_width, layer.out_width, lo, hi))
        n_vars += 2 * layer.out_width
    lb, ub = np.full(n_vars, -np.inf), np.full(n_vars, np.inf)
    lb[:k], ub[:k] = -bound, bound
    integrality = np.zeros(n_vars)
    rows: list[np.ndarray] = []
    row_lo: list[float] = []
    row_hi: list[float] = []

    def add(coef: np.ndarray, low: float, high: float) -> None:
        rows.append(coef)
        row_lo.append(low)
        row_hi.append(high)

    prev_cols = np.arange(k)
    for blk, layer in zip(blocks, net.layers[:top], strict=True):
        w, b = layer.weight.matrix(), layer.bias_or_zero()
        r_cols = np.arange(blk.r, blk.r + blk.width)
        d_cols = np.arange(blk.delta, blk.delta + blk.width)
        lb[r_cols], ub[r_cols] = 0.0, np.maximum(blk.upper, 0.0)
        lb[d_cols], ub[d_cols] = 0.0, 1.0
        integrality[d_cols] = 1
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
                add(coef, b[u], b[u])
                continue
            add(coef, b[u], np.inf)  # r - w.prev >= b   (r >= a)
            c2 = coef.copy()
            c2[d_cols[u]] = -lo_u
            add(c2, -np.inf, b[u] - lo_u)  # r <= a - L (1 - delta)
            c3 = np.zeros(n_vars)
            c3[r_cols[u]] = 1.0
            c3[d_cols[u]] = -hi_u
            add(c3, -np.inf, 0.0)  # r <= U delta
        prev_cols = r_cols

    top_layer = net.layers[top]
    cons = active_set(top_layer, y, rtol)
    if isinstance(cons, str):
        return None
    w, b = top_layer.weight.matrix(), top_layer.bias_or_zero()
    tol = rtol * (cons.scale + float(np.max(np.abs(w), initial=0.0)) * bound)
    for i in range(top_layer.out_width):
        coef = np.zeros(n_vars)
        coef[prev_cols] = w[i]
        if cons.active[i]:
            rhs = cons.target[i] - b[i]
            add(coef, rhs - tol, rhs + tol)
        else:
            add(coef, -np.inf, cons.tau - b[i])
    constraint = LinearConstraint(np.array(rows), np.array(row_lo), np.array(row_hi))
    return integrality, [constraint], Bounds(lb, ub), blocks


def _pattern(x: np.ndarray, blocks: list[_Block]) -> list[np.ndarray]:
    return [x[b.delta : b.delta + b.width] > 0.5 for b in blocks]


def _affine_below(
    net: Network, top: int, pattern: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """With every unit of layers 0..top-1 fixed on or off, h_{top-1} = M z + c.

    Returns (M, c, R, r) where R z <= r says that z really has that pattern
    (on units: pre-activation >= 0, off units: <= 0).
    """
    k = net.latent_dim
    m, c = np.eye(k), np.zeros(k)
    region_a, region_b = [np.zeros((0, k))], [np.zeros(0)]
    for on, layer in zip(pattern, net.layers[:top], strict=True):
        pre_m = layer.weight.apply(m.T).T
        pre_c = layer.preactivation(c[None])[0]
        region_a += [-pre_m[on], pre_m[~on]]
        region_b += [pre_c[on], -pre_c[~on]]
        m, c = pre_m * on[:, None], pre_c * on
    return m, c, np.vstack(region_a), np.concatenate(region_b)


def _pattern_at(net: Network, top: int, z: np.ndarray) -> list[np.ndarray]:
    pattern, h = [], z[None]
    for layer in net.layers[:top]:
        pre = layer.preactivation(h)
        pattern.append(pre[0] > 0)
        h = layer.activation(pre)
    return pattern


def _top_rows(
    net: Network, top: int, y: np.ndarray, rtol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float] | None:
    """Layer `top`'s constraints on its input h: W_A h = t_A and W_I h <= t_I."""
    layer = net.layers[top]
    cons = active_set(layer, y, rtol)
    if isinstance(cons, str):
        return None
    w, b = layer.weight.matrix(), layer.bias_or_zero()
    act = cons.active
    return w[act], cons.target[act] - b[act], w[~act], cons.tau - b[~act], cons.scale


def _polish(
    net: Network, top: int, y: np.ndarray, rtol: float, pattern: list[np.ndarray]
) -> tuple[np.ndarray | None, int]:
    """z from the LP with every hidden unit's on/off state fixed; and the rank of its equalities.

    With the pattern fixed, h_{top-1} = M z + c is affine in z, so the unit
    states and layer `top`'s active set are linear constraints on z.
    """
    k = net.latent_dim
    rows = _top_rows(net, top, y, rtol)
    if rows is None:
        return None, 0
    w_a, t_a, w_i, t_i, scale = rows
    m, c, region_a, region_b = _affine_below(net, top, pattern)
    a_eq, b_eq = w_a @ m, t_a - w_a @ c
    a_ub = np.vstack([region_a, w_i @ m])
    b_ub = np.concatenate([region_b, t_i - w_i @ c])
    rank = int(np.linalg.matrix_rank(a_eq)) if a_eq.size else 0
    z = np.linalg.lstsq(a_eq, b_eq, rcond=None)[0] if a_eq.size else np.zeros(k)
    if rank < k or np.any(a_ub @ z > b_ub + rtol * (scale + 1.0)):
        res = linprog(
            np.zeros(k),
            A_ub=a_ub,
            b_ub=b_ub,
            A_eq=a_eq if a_eq.size else None,
            b_eq=b_eq if a_eq.size else None,
            bounds=(None, None),
            method="highs",
        )
        if res.status != 0:
            return None, rank
        z = np.asarray(res.x)
    return z, rank


def _reproduces(net: Network, top: int, y: np.ndarray, z: np.ndarray, rtol: float) -> bool:
    h = z[None]
    for layer in net.layers[: top + 1]:
        h = layer.forward(h)
    scale = max(float(np.max(np.abs(y))), 1e-300)
    return float(np.max(np.abs(h[0] - y))) <= 100 * rtol * scale


def _misfit(net: Network, top: int, z: np.ndarray, rows: tuple) -> float:
    """max(|W_A h(z) - t_A|_inf, max(W_I h(z) - t_I, 0)): zero exactly at a preimage."""
    w_a, t_a, w_i, t_i, _ = rows
    h = z[None]
    for layer in net.layers[:top]:
        h = layer.forward(h)
    return float(
        max(np.max(np.abs(w_a @ h[0] - t_a), initial=0.0), np.max(w_i @ h[0] - t_i, initial=0.0))
    )


def _slp_step(
    z: np.ndarray, m: np.ndarray, c: np.ndarray, rows: tuple, radius: float
) -> np.ndarray | None:
    """One trust-region step on the misfit linearised at z's pattern (h = M z + c).

    Variables (d, t), d the step in z (k + 1 variables, so the LP is small):
        minimise    t
        subject to  |W_A (M (z + d) + c) - t_A| <= t
                    W_I (M (z + d) + c) - t_I <= t,   |d|_inf <= radius
    """
    w_a, t_a, w_i, t_i, _ = rows
    j_a, j_i = w_a @ m, w_i @ m
    r_a, r_i = j_a @ z + w_a @ c - t_a, j_i @ z + w_i @ c - t_i
    # Inactive rows that cannot become violated inside the trust region can be left out.
    near = r_i + radius * np.abs(j_i).sum(axis=1) > 0
    j_i, r_i = j_i[near], r_i[near]
    k = len(z)
    a_ub = np.vstack([j_a, -j_a, j_i])
    a_ub = np.hstack([a_ub, -np.ones((a_ub.shape[0], 1))])
    b_ub = np.concatenate([-r_a, r_a, -r_i])
    cost = np.zeros(k + 1)
    cost[-1] = 1.0
    bounds = [(-radius, radius)] * k + [(0.0, None)]
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    return None if res.status != 0 else z + res.x[:k]


def pattern_search(
    net: Network,
    top: int,
    y: np.ndarray,
    *,
    rtol: float,
    starts: list[np.ndarray],
    iterations: int = 40,
    seconds: float = np.inf,
) -> tuple[np.ndarray | None, int]:
    """A checked z with layers 0..top reproducing y, by trust-region SLP from each start.

    Stops after `seconds` (checked between LPs). Returns (z, rank of the
    fixed-pattern equalities) or (None, 0).
    """
    rows = _top_rows(net, top, y, rtol)
    if rows is None:
        return None, 0
    done_tol = rtol * rows[4]
    deadline = time.perf_counter() + seconds
    for z in starts:
        if time.perf_counter() > deadline:
            break
        f, radius = _misfit(net, top, z, rows), max(1.0, float(np.max(np.abs(z))))
        for _ in range(iterations):
            if time.perf_counter() > deadline:
                break
            m, c, _, _ = _affine_below(net, top, _pattern_at(net, top, z))
            z_new = _slp_step(z, m, c, rows, radius)
            if z_new is None:
                break
            f_new = _misfit(net, top, z_new, rows)
            if f_new < f:
                z, f, radius = z_new, f_new, 2 * radius
            else:
                radius /= 4
            if f <= done_tol or radius < 1e-9:
                break
        z_polished, rank = _polish(net, top, y, rtol, _pattern_at(net, top, z))
        if z_polished is not None and _reproduces(net, top, y, z_polished, rtol):
            return z_polished, rank
    return None, 0


def milp_search(
    net: Network,
    top: int,
    y: np.ndarray,
    *,
    rtol: float,
    latent_bound: float,
    time_limit: float,
) -> SearchOutcome:
    """The MILP: a preimage within |z|_inf <= latent_bound and, if it can, a verdict."""
    built = _build(net, top, y, rtol, latent_bound)
    if built is None:
        return SearchOutcome(None, "none", None, "layer observation out of range")
    integrality, constraints, bounds, blocks = built
    n_vars = len(integrality)
    options = {"time_limit": float(time_limit), "disp": False}
    first = milp(
        np.zeros(n_vars),
        integrality=integrality,
        bounds=bounds,
        constraints=constraints,
        options=options,
    )
    box = f"|z|_inf <= {latent_bound:g}"
    if first.status == 2:
        return SearchOutcome(None, "none", None, f"MILP: no preimage with {box}")
    if first.x is None:
        return SearchOutcome(None, "none", None, f"MILP gave no point: {first.message}")
    pattern = _pattern(first.x, blocks)
    z, rank = _polish(net, top, y, rtol, pattern)
    if z is None or not _reproduces(net, top, y, z, rtol):
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
    second = milp(
        np.zeros(n_vars),
        integrality=integrality,
        bounds=bounds,
        constraints=[*constraints, LinearConstraint(cut[None], 1 - ones, np.inf)],
        options=options,
    )
    if second.status == 2 and rank == net.latent_dim:
        return SearchOutcome(
            z, "unique", None,
            f"MILP: the only preimage with {box} (no other activation pattern is feasible)",
        )
    if second.x is not None:
        z2, _ = _polish(net, top, y, rtol, _pattern(second.x, blocks))
        far = z2 is not None and np.linalg.norm(z2 - z) > 1e-6 * max(np.linalg.norm(z), 1.0)
        if far and z2 is not None and _reproduces(net, top, y, z2, rtol):
            return SearchOutcome(
                z, "non_unique", z2, "MILP: a second activation pattern gives a second preimage"
            )
    return SearchOutcome(z, "feasible", None, "MILP found a preimage; uniqueness unsettled")


@dataclass(frozen=True)
class GlobalSettings:
    """The search below a non-unique layer, for samples the layer-wise method leaves open.

    Attributes
    ----------
    enabled : run it on "failed" and "feasible" samples
    starts : random starts z ~ N(0, I) of the pattern search (after the
        layer-wise estimate, when there is one)
    iterations : SLP iterations per start
    seconds : time budget of the pattern search per sample
    milp : also run the MILP (slow: seconds to minutes per sample) to settle
        uniqueness or search exhaustively
    latent_bound : R; the MILP covers |z|_inf <= R (its verdicts hold within it)
    time_limit : seconds per MILP solve
    max_binaries : skip the MILP when the layers below have more ReLU units
    seed : seed of the random starts
    """

    enabled: bool = True
    starts: int = 6
    iterations: int = 40
    seconds: float = 2.0
    milp: bool = False
    latent_bound: float = 10.0
    time_limit: float = 20.0
    max_binaries: int = 400
    seed: int = 0


def invert_below(
    net: Network,
    top: int,
    y: np.ndarray,
    *,
    rtol: float,
    settings: GlobalSettings,
    start: np.ndarray | None = None,
) -> SearchOutcome:
    """A z with layers 0..top of `net` mapping it to y, searched beyond one point per layer.

    Parameters
    ----------
    net : Network (layers 0..top-1 must be ReLU)
    top : index of the layer whose observation y is known exactly
    y : ndarray of shape (n_top,)
    rtol : the inversion's relative tolerance
    settings : GlobalSettings
    start : an estimate of z to start the pattern search from
    """
    if top < 1 or not _supported(net, top):
        return SearchOutcome(None, "none", None, "the search needs ReLU layers below")
    rng = np.random.default_rng(settings.seed)
    starts = [rng.standard_normal(net.latent_dim) for _ in range(settings.starts)]
    if start is not None and np.all(np.isfinite(start)):
        starts.insert(0, np.asarray(start, dtype=float))
    z, _rank = pattern_search(
        net, top, y, rtol=rtol, starts=starts, iterations=settings.iterations
    )
    n_units = sum(layer.out_width for layer in net.layers[:top])
    if settings.milp and n_units <= settings.max_binaries:
        return milp_search(
            net, top, y, rtol=rtol, latent_bound=settings.latent_bound,
            time_limit=settings.time_limit,
        )
    if z is None:
        return SearchOutcome(
            None,
            "none",
            None,
            f"pattern search found no preimage ({len(starts)} starts, {settings.seconds:g} s)",
        )
    return SearchOutcome(
        z, "feasible", None,
        "pattern search found a preimage below the first non-unique layer; uniqueness "
        "unsettled" + ("" if settings.milp else " (GlobalSettings(milp=True) may settle it)"),
    )
