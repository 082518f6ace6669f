"""Searching over activation cells: the one search the exact, partial, hybrid and sensing
paths share, and the search below a non-unique layer.

When layer j's preimage P_j(y_j) is not a point, the layer-wise method passes
one point of it down and may then fail although another point would have
worked (the true hidden vector is often not a vertex of P_j, so no choice of
vertex helps). Below layer j the question is global: is there a z whose
hidden activations land in P_j(y_j)?

Local search from a start z, in two stages, each one never raising the misfit
(`preimage.solvers.cell` gives the LPs):

1. `slp_descent` (optional): sequential linear programming with a trust region
   on the misfit f(z) = max(max_A |pre_i(z) - y_i|, max_I (pre_i(z) - y_i)_+) of
   layer j. f is piecewise linear in z (h(z) is affine on each cell), so each
   step is the cell LP of z's cell with its walls dropped and |d|_inf <= radius:
   it moves across many cells at once.
2. `cell_walk`: the best fit inside the current cell, then across the cell's
   tight walls to a neighbouring cell while that lowers the misfit (those with
   the largest LP multipliers first), until a target misfit, a cell no single
   flip improves, or an LP budget. Inside a cell G is affine, so a misfit of 0
   is an exact preimage.

`cell_search` runs both from several starts within a time budget and returns
the first z that a forward pass confirms; it finds preimages and never proves
their absence. `invert_below` runs the global search instead where the layers
below are small ReLU layers (`preimage.solvers.exhaustive`: a branch and bound
that proves uniqueness, finds a second preimage, or proves there is none).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from preimage.model.network import Network
from preimage.results import Deadline, SearchOutcome
from preimage.solvers.cell import CellFit, activation_pattern, cell_lp
from preimage.solvers.exhaustive import settle
from preimage.solvers.layer import active_set
from preimage.solvers.milp import reproduces


@dataclass(frozen=True)
class GlobalSettings:
    """The search below a non-unique layer, for samples the layer-wise method leaves open.

    Attributes
    ----------
    enabled : run it on the "failed" and "feasible" samples
    search : "branch" (default): the global search of `preimage.solvers.exhaustive` with its
        own branch and bound over ReLU units (proofs: unique / non_unique / infeasible);
        "milp": the same model through HiGHS's MILP solver; "cells": the cell search only
        (finds preimages, proves nothing; the one search for networks with smooth layers
        below or more than ``max_binaries`` ReLU units, whatever this says)
    seconds : time budget of the global search per sample (the sample says when it ran out)
    latent_bound : R; |z_j| <= R only along coordinates the data leave unbounded (the result's
        ``proof_domain`` says where that was needed)
    tighten : exact data: a second branch and bound, in a second thread, on bounds
        tightened first (optimisation-based: LP bounds on every unit while they shrink),
        racing the one on the data's bounds; the first to settle a sample answers
        (False: the latter only, one thread). Not for the projection of noisy data
        (measured there: no gap closed more, 12% slower)
    probe : before the branch and bound, a local search (Levenberg-Marquardt from random
        starts, `seed`) for a preimage and a second one: it proves nothing, but settles
        samples whose preimages are not isolated and hands the search a preimage
    max_binaries : the cell search instead where the layers below have more ReLU units (on
        a few hundred the branch and bound runs out of time where the cell search finds a
        preimage: [k, 250, 600] nets)
    starts : random starts z ~ N(0, I) of the cell search (after the layer-wise
        estimate, when there is one)
    iterations : SLP iterations per start
    walk_lps : LP budget of the cell walk after the SLP, per start
    cell_seconds : time budget of the cell search per sample
    seed : seed of the random starts (of the cell search and the probe)
    """

    enabled: bool = True
    search: str = "branch"
    seconds: float = 10.0
    latent_bound: float = 10.0
    tighten: bool = True
    probe: bool = True
    max_binaries: int = 100
    starts: int = 6
    iterations: int = 40
    walk_lps: int = 10
    cell_seconds: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise ValueError(
                f"`search` must be one of {SEARCHES}; got {self.search!r}.")
        for name in ("seconds", "cell_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"`{name}` must be a number of seconds >= 0; got {value!r}.")
        if not (isinstance(self.latent_bound, (int, float)) and self.latent_bound > 0):
            raise ValueError(f"`latent_bound` must be > 0; got {self.latent_bound!r}.")
        for name in ("enabled", "tighten", "probe"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"`{name}` must be True or False; got {getattr(self, name)!r}.")


#: GlobalSettings.search values.
SEARCHES: tuple[str, ...] = ("branch", "milp", "cells")


def cell_walk(
    net: Network,
    y: np.ndarray,
    z0: np.ndarray,
    *,
    A: np.ndarray | None = None,
    norm: str = "linf",
    tau: float = 0.0,
    target: float = 0.0,
    max_lps: int = 100,
    deadline: float = np.inf,
    output_cell: bool = False,
) -> CellFit:
    """Descent over activation cells from z0 (../NOTES-math.md section 8).

    The best fit inside z0's cell (`cell_lp`: an LP for l_inf / l_1, a QP for
    l_2) sits on some of the cell's walls. Cross every wall there with a
    positive multiplier at once (where there are several), or else flip one
    unit whose wall is tight (those with the largest multipliers first);
    re-solve in the neighbouring cell, and move when the misfit drops strictly; stop at
    `target`, at a cell no single flip of a tight wall improves, after
    `max_lps` LPs or at `deadline` (a `time.perf_counter()` value). The misfit
    never rises above the best fit of z0's own cell, so never above z0's.

    At the end, ``n_tight`` counts the walls tight at the optimum (whatever
    their multiplier: a wall with none can still hide a lower misfit across
    it), and ``local_minimum`` certifies z as a local minimum of the misfit
    over all of z: no tight wall (the cell's optimum is one of the whole
    piecewise problem near z), or at most `CORNER_WALLS` of them and every cell
    their on/off combinations give, which all touch z, tried without a lower
    fit. With more, the count is reported, no certificate. Only where the cell
    problem is the misfit itself (``output_cell`` or ``A``, a piecewise-linear
    output): the fit with the noise floor `tau` is a surrogate.

    Parameters
    ----------
    net, y, A, norm, tau, output_cell : as in `preimage.solvers.cell.cell_lp`
        (``output_cell``: the output units' pattern is part of the cell, the
        projection of any x; otherwise y's own active set decides, the search
        for an exact preimage).
    z0 : ndarray of shape (k,)
        The start (a gradient-descent result, an LP estimate, an encoder's code).
    target : float
        Stop once the misfit is at most this (absolute).

    Returns
    -------
    CellFit of the best cell found (``steps``: cells moved to).
    """
    patterns = activation_pattern(net, z0)
    best = cell_lp(net, y, patterns, A=A, norm=norm, tau=tau, z_ref=z0, output_cell=output_cell)
    n_lps, steps = best.n_lps, 0
    last = net.layers[-1].activation
    whole = (A is not None or output_cell) and last.is_piecewise_linear
    flippable = len(net.layers) if whole else len(net.layers) - 1
    exhausted = False

    def neighbour(units: list[tuple[int, int]]) -> tuple[list[np.ndarray], CellFit]:
        """The cell with these (layer, unit)s flipped, and its best fit."""
        trial = [p.copy() for p in patterns]
        for i, j in units:
            trial[i][j] = ~trial[i][j]
        first = min(i for i, _ in units)  # pre_0..pre_first do not see the flips
        return trial, cell_lp(net, y, trial, A=A, norm=norm, tau=tau, z_ref=best.z,
                              known=best.chain[: first + 1], output_cell=output_cell)

    def lower(fit: CellFit) -> bool:
        return bool(fit.misfit < best.misfit * (1 - 1e-9) - 1e-15 * best.misfit)

    while (
        n_lps < max_lps and np.isfinite(best.misfit) and best.misfit > target
        and time.perf_counter() < deadline
    ):
        moves = _tight_walls(net, best, flippable)
        moved = False
        pushing = [(i, j) for d, i, j in moves if d > 0]
        if len(pushing) > 1 and n_lps < max_lps:
            # Across every wall that pushes back at once: one step where single flips
            # would take one each (a path of many small cells on a smooth-looking misfit).
            trial, fit = neighbour(pushing)
            n_lps += fit.n_lps
            if lower(fit):
                best, patterns = fit, trial
                steps += 1
                continue
        # one wall at a time, then (z on a corner of at most CORNER_WALLS cells' walls)
        # every other combination of them: all those cells touch z
        corner = whole and 2 <= len(moves) <= CORNER_WALLS
        combos = [(m,) for m in range(len(moves))] + (
            _corner_flips(len(moves)) if corner else [])
        for flips in combos:
            if n_lps >= max_lps or time.perf_counter() >= deadline:
                break
            trial, fit = neighbour([moves[m][1:] for m in flips])
            n_lps += fit.n_lps
            if lower(fit):
                best, patterns, moved = fit, trial, True
                steps += 1
                break
        else:
            exhausted = True  # every cell tried, none improves
        if not moved:
            break
    if np.isfinite(best.misfit) and best.wall_duals is not None:
        tight = _tight_walls(net, best, flippable)
        best.n_tight = len(tight)
        # Near z only the tight units can change state, so z is a local minimum when no
        # wall is tight (the misfit is the cell's near z), or when every cell that the
        # tight walls' combinations give was tried (`exhausted`) and none fits better (each
        # cell problem is convex: none lower there means z is optimal there). Only where
        # the cell problem is the misfit itself (`whole`), not the surrogate of `tau`.
        best.local_minimum = whole and (
            best.misfit <= 0.0 or not tight or (exhausted and len(tight) <= CORNER_WALLS))
    best.n_lps, best.steps = n_lps, steps
    best.message = (
        f"cell descent: {steps} moves, {n_lps} LPs, misfit {best.misfit:.3g}"
        + (", a certified local minimum" if best.local_minimum else
           f", {best.n_tight} tight walls" if whole else
           " (of the fit with the noise floor tau; no certificate)")
    )
    return best


#: At most this many walls tight at once are checked cell by cell (2^m - 1 neighbours).
CORNER_WALLS = 3


def _corner_flips(m: int) -> list[tuple[int, ...]]:
    """Every subset of range(m) with at least two members (the single flips are apart)."""
    return [flips for size in range(2, m + 1) for flips in combinations(range(m), size)]


def _tight_walls(net: Network, fit: CellFit, flippable: int) -> list[tuple[float, int, int]]:
    """(multiplier, layer, unit) of the walls tight at fit.z, largest multiplier first."""
    assert fit.wall_duals is not None
    h = np.asarray(fit.z)[None]
    moves = []
    scale = max((float(np.max(d, initial=0.0)) for d in fit.wall_duals), default=0.0)
    for i in range(flippable):
        pre = net.layers[i].preactivation(h)
        h = net.layers[i].activation(pre)
        pre = pre[0]
        tight = np.flatnonzero(np.abs(pre) <= 1e-7 * max(float(np.max(np.abs(pre))), 1e-300))
        duals = fit.wall_duals[i]
        moves += [(float(duals[j]) if duals[j] > 1e-9 * scale else 0.0, i, int(j))
                  for j in tight]
    moves.sort(key=lambda m: -m[0])
    return moves


def _misfit(net: Network, y: np.ndarray, z: np.ndarray, tau: float) -> float:
    """max(max_A |pre_i(z) - y_i|, max_I (pre_i(z) - y_i)_+) of the last layer of net
    (bijective outputs: s_i |pre_i(z) - act^-1(y_i)| over every unit, as the cell LP)."""
    h = z[None]
    for layer in net.layers[:-1]:
        h = layer.forward(h)
    last = net.layers[-1]
    pre = last.preactivation(h)[0]
    if last.activation.is_bijective:
        act = last.activation
        return float(np.max(act.slope(y) * np.abs(pre - act.clipped_inverse(y))))
    on = y > tau
    return float(
        max(np.max(np.abs(pre[on] - y[on]), initial=0.0),
            np.max(pre[~on] - y[~on], initial=0.0))
    )


def slp_descent(
    net: Network,
    y: np.ndarray,
    z: np.ndarray,
    *,
    tau: float,
    target: float,
    iterations: int,
    deadline: float = np.inf,
) -> tuple[np.ndarray, int]:
    """Trust-region SLP on the misfit of net's last layer to y (module docstring); (z, LPs)."""
    f, radius = _misfit(net, y, z, tau), max(1.0, float(np.max(np.abs(z))))
    lps = 0
    depth = len(net.layers) - 1
    for _ in range(iterations):
        if f <= target or radius < 1e-9 or time.perf_counter() > deadline:
            break
        step = cell_lp(
            net, y, activation_pattern(net, z, depth), tau=tau, z_ref=z, walls=False,
            trust=(z, radius),
        )
        lps += step.n_lps
        if not np.all(np.isfinite(step.z)):
            break
        f_new = _misfit(net, y, step.z, tau)
        if f_new < f:
            z, f, radius = step.z, f_new, 2 * radius
        else:
            radius /= 4
    return z, lps


@dataclass(frozen=True)
class SearchResult:
    """z: the first confirmed preimage or None; how many starts were tried, LPs, why."""

    z: np.ndarray | None
    tried: int
    n_lps: int
    message: str


def cell_search(
    net: Network,
    y: np.ndarray,
    starts: list[np.ndarray],
    *,
    tau: float,
    tolerance: float,
    target: float,
    slp_iterations: int = 0,
    walk_lps: int = 100,
    seconds: float = np.inf,
) -> SearchResult:
    """A z with |G(z) - y|_inf <= tolerance from `starts`: the first exact one (misfit at
    most 10 `target`), else the closest within tolerance.

    From each start: `slp_descent` (``slp_iterations`` steps, 0 for none), then
    `cell_walk` (at most ``walk_lps`` LPs) aiming at misfit `target`; the answer
    is confirmed by a forward pass. Stops after `seconds` (checked between LPs):
    the message then says how many starts were tried.
    """
    deadline = time.perf_counter() + seconds
    lps = 0
    best: tuple[float, np.ndarray, int] | None = None  # (miss, z, start) within tolerance
    for i, z0 in enumerate(starts):
        if time.perf_counter() >= deadline:
            if best is not None:
                break
            return SearchResult(None, i, lps, (
                f"the cell search ran out of its {seconds:g} s after {i} of {len(starts)} starts "
                f"({lps} LPs)"
            ))
        z = np.asarray(z0, dtype=np.float64)
        if slp_iterations > 0:
            z, used = slp_descent(
                net, y, z, tau=tau, target=target, iterations=slp_iterations, deadline=deadline
            )
            lps += used
        fit = cell_walk(net, y, z, tau=tau, target=target, max_lps=walk_lps, deadline=deadline)
        lps += fit.n_lps
        if not np.all(np.isfinite(fit.z)):
            continue
        miss = float(np.max(np.abs(net.forward(fit.z[None])[0] - y)))
        if miss <= tolerance and (best is None or miss < best[0]):
            best = (miss, fit.z, i)
            if miss <= 10 * target:  # exact: no start can do better
                break
    if best is None:
        return SearchResult(None, len(starts), lps, (
            f"the cell search found no preimage ({len(starts)} starts, {lps} LPs)"
        ))
    # (within the tolerance but not exact: the other starts were tried for a closer one)
    return SearchResult(best[1], best[2] + 1, lps, (
        f"found by the cell search from start {best[2] + 1} of {len(starts)} ({lps} LPs)"
    ))


def invert_below(
    net: Network,
    top: int,
    y: np.ndarray,
    *,
    rtol: float,
    settings: GlobalSettings,
    start: np.ndarray | None = None,
    deadline: Deadline | None = None,
) -> SearchOutcome:
    """A z with layers 0..top of `net` mapping it to y, searched beyond one point per layer.

    Parameters
    ----------
    net : Network (layers 0..top-1 must be ReLU)
    top : index of the layer whose observation y is known exactly
    y : ndarray of shape (n_top,)
    rtol : the inversion's relative tolerance
    settings : GlobalSettings
    start : an estimate of z (a preimage the layer-wise method found, or its estimate)
    deadline : the call's time limit (`preimage.results.Deadline`): each search
        stops at the earlier of it and its own budget, and says so

    The global search (`preimage.solvers.exhaustive.settle`, ``settings.search``
    "branch" or "milp") where the layers below are ReLU and small enough; the cell
    search (`cell_search`) otherwise.
    """
    deadline = deadline or Deadline()
    cut = f" ({deadline.note()})" if deadline.expired() else ""
    if top < 1 or not all(layer.activation.kind == "relu" for layer in net.layers[:top]):
        return SearchOutcome(None, "none", None, "the search needs ReLU layers below")
    cons = active_set(net.layers[top], y, rtol)
    if isinstance(cons, str):
        return SearchOutcome(None, "none", None, cons)
    n_units = sum(layer.out_width for layer in net.layers[:top])
    if settings.search != "cells" and n_units <= settings.max_binaries:
        known = start if start is not None and reproduces(net, top, y, start, rtol) else None
        found = settle(net, top, y, rtol=rtol, z_known=known,
                       seconds=min(settings.seconds, deadline.remaining()),
                       box=settings.latent_bound, tighten=settings.tighten,
                       engine="branch" if settings.search == "branch" else "milp",
                       probe=settings.probe, seed=settings.seed)
        verdict = {"unique": "unique", "non_unique": "non_unique", "feasible": "feasible",
                   "infeasible": "infeasible"}.get(found.status, "none")
        return SearchOutcome(found.z, verdict, found.witness,
                             f"global search below layer {top}: {found.message}"
                             + (f" ({deadline.note()})" if deadline.expired() else ""),
                             domain=found.domain, out_of_time=found.out_of_time)
    rng = np.random.default_rng(settings.seed)
    starts = [rng.standard_normal(net.latent_dim) for _ in range(settings.starts)]
    if start is not None and np.all(np.isfinite(start)):
        starts.insert(0, np.asarray(start, dtype=float))
    upper = net.below(top + 1)
    found_cells = cell_search(
        upper, y, starts, tau=cons.tau, tolerance=10 * rtol * cons.scale,
        target=min(rtol, 1e-9) * cons.scale, slp_iterations=settings.iterations,
        walk_lps=settings.walk_lps, seconds=min(settings.cell_seconds, deadline.remaining()),
    )
    z = found_cells.z
    if z is not None and not reproduces(net, top, y, z, rtol):
        z = None
    if z is None:
        return SearchOutcome(None, "none", None, found_cells.message + cut)
    cut = f" ({deadline.note()})" if deadline.expired() else ""
    return SearchOutcome(
        z, "feasible", None,
        f"{found_cells.message}, below the first non-unique layer; uniqueness unsettled{cut}",
    )
