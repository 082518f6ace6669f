"""Global inversion of small ReLU networks: one sample, settled or bounded for certain.

`settle` takes an exact observation y of layer `top` (the layers below it
ReLU) and proves one of: z is the only preimage, here is a second one, there
is none. `global_projection` takes any x and proves the smallest l_inf or l_1
misfit min_z ||G(z) - x||. Both:

1. derive the domain of z from the data (`preimage.solvers.relaxation.data_bounds`:
   the output layer's preimage polyhedron, or the incumbent's misfit, bounds
   every unit), with a box |z_j| <= ``box`` only along coordinates the data
   leave unbounded; the answer says which (``domain``);
2. probe: Levenberg-Marquardt from random starts (`_probe`,
   `preimage.solvers.cell.local_preimage`) for a first preimage, and a second
   one (another start's, or one along the null directions of the first's own
   cell): it proves nothing, but a sample whose preimages are not isolated is
   settled by it, and the search then starts with its hardest part done;
3. search: ``engine="branch"`` the branch and bound over units on one live
   HiGHS LP (`preimage.solvers.branch`), with ``tighten`` raced in a second
   thread by a second one whose bounds are first tightened over the LP
   relaxation (optimisation-based bound tightening, `_race_searches`), which
   then works on the same tree (`preimage.solvers.branch.NodePool`);
   ``engine="milp"`` the same model as a MILP through HiGHS's own branch and
   cut (`scipy.optimize.milp`; uniqueness by a second MILP with a no-good cut
   on the first answer's pattern), after the tightening with ``tighten``.

Every preimage is refined in its activation cell (Gauss-Newton on the active
rows, `preimage.solvers.cell.newton_refine`) and checked by a forward pass
(`preimage.solvers.milp.reproduces`) before it counts; a witness is a checked
preimage farther than ``separation`` from the first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import Bounds, LinearConstraint

from preimage.model.layer import Layer
from preimage.model.network import Network
from preimage.model.operators import DenseOperator, dense
from preimage.solvers.branch import BranchOutcome, NodePool, minimise_misfit, settle_exact
from preimage.solvers.cell import (
    activation_pattern,
    cell_lp,
    local_preimage,
    newton_refine,
    null_directions,
    top_preactivation,
)
from preimage.solvers.highs import solve_milp
from preimage.solvers.layer import ActiveSet, active_set
from preimage.solvers.milp import reproduces
from preimage.solvers.relaxation import (
    Domain,
    Relaxation,
    Top,
    balanced,
    data_bounds,
    exact_top,
)

#: HiGHS's default primal feasibility tolerance (absolute): the LPs' rows are unit rows.
HIGHS_FEASIBILITY = 1e-7

#: The search engines.
ENGINES: tuple[str, ...] = ("branch", "milp")

#: The local probe before the search (`_probe`): at most this share of the budget and this
#: many starts, and this many more starts after its first preimage (for a second one).
PROBE_SHARE = 0.2
PROBE_STARTS = 200
PROBE_AFTER = 20

#: Two preimages are distinct where farther apart (l_inf) than SEPARATION max(1, |z*|_inf),
#: or SEPARATION_RTOL rtol max(1, |z*|_inf) where the data's tolerance is coarser: in
#: float32 (rtol 1e-5) points 1e-5 to 1e-4 from z* still reproduce x within 10 rtol, the
#: same preimage blurred by the tolerance, not a second one.
SEPARATION = 1e-6
SEPARATION_RTOL = 100.0

#: Levenberg-Marquardt steps from a branch-and-bound LP point while no preimage is known.
ACCEPT_ITERATIONS = 20


@dataclass(frozen=True)
class Settled:
    """The global verdict on one sample.

    status : "unique", "non_unique", "infeasible" (proved), "feasible" (a checked preimage,
        uniqueness unsettled), "failed" (none found); projection: "optimal" or "time_limit"
    z, witness : the preimage (best point) and a second preimage
    value, bound : projection: the misfit of z and a proved lower bound of the minimum
    domain : the z a proof covers (`Domain.describe`)
    boxed : whether that needed a box
    out_of_time : the budget ran out before the proof was complete
    nodes, lps : branch-and-bound nodes and LPs
    """

    status: str
    z: np.ndarray | None
    witness: np.ndarray | None
    message: str
    domain: str
    boxed: bool = False
    out_of_time: bool = False
    value: float = np.inf
    bound: float = -np.inf
    nodes: int = 0
    lps: int = 0


def _relu_below(net: Network, depth: int) -> bool:
    return all(layer.activation.kind == "relu" for layer in net.layers[:depth])


def settle(
    net: Network,
    top: int,
    y: np.ndarray,
    *,
    rtol: float,
    z_known: np.ndarray | None = None,
    seconds: float = 10.0,
    box: float = 10.0,
    tighten: bool = False,
    engine: str = "branch",
    probe: bool = True,
    seed: int = 0,
) -> Settled:
    """Is there a z with layers 0..top of net mapping it to y, and is it the only one?

    Parameters
    ----------
    net : Network; layers 0..top-1 ReLU
    top : the layer y is an exact observation of (its own activation any kind)
    y : ndarray (n_top,)
    rtol : the inversion's tolerance (`preimage.solvers.layer.active_set`, the checks)
    z_known : a preimage found already (checked again here)
    seconds : time budget
    box : |z_j| <= box along coordinates the data leave unbounded
    tighten : race a second search on bounds tightened first (`_race_searches`)
    engine : "branch" or "milp" (module docstring)
    probe, seed : the local probe before the search (`_probe`) and its random starts' seed
    """
    if engine not in ENGINES:
        raise ValueError(f"`engine` must be one of {ENGINES}; got {engine!r}.")
    if top < 1 or not _relu_below(net, top):
        raise ValueError("The global search needs ReLU layers below the observed layer.")
    deadline = time.perf_counter() + seconds
    cons = active_set(net.layers[top], y, rtol)
    if isinstance(cons, str):
        return Settled("infeasible", None, None, f"y is out of range: {cons}", "every z")
    # the LPs see the network with its hidden units rescaled (`balanced`: the same z -> y)
    # and unit top rows (`exact_top`); answers are checked on the network itself
    lp_net = balanced(net, top)
    unit = _latent_unit(lp_net, top, cons)
    if unit != 1.0:
        lp_net = balanced(net, top, unit)
    found = _settle(net, top, y, cons, lp_net, unit, rtol=rtol, z_known=z_known,
                    deadline=deadline, seconds=seconds, box=box, tighten=tighten,
                    engine=engine, probe=probe, seed=seed)
    if unit == 1.0:
        return found
    return replace(found, z=None if found.z is None else unit * found.z,
                   witness=None if found.witness is None else unit * found.witness)


def _latent_unit(lp_net: Network, top: int, cons: ActiveSet) -> float:
    """The unit z is measured in for the LPs: 1, or, where the codes the observation
    implies are far from 1 in size (the hidden values of `lp_net`, balanced in z's own
    units, are of z's size), about their size, so that HiGHS's absolute tolerances stay
    relative (x of 1e7: false "infeasible").

    The size is max |y_r - b_r| / |W_r diag(g)| over the active rows r, with g the gain
    of each hidden unit from z (the norm of its row in z, through the layers below:
    |h_j| <~ g_j |z| + its bias' share). Not |W_r| alone: a unit that `balanced` scales by
    a large bias (a dead unit, bias -1e5) has a small gain and a large top weight, which
    made the codes look 1e-5 times their size (a box of 0.08, a false "unique")."""
    if not cons.active.any():
        return 1.0
    gain = np.ones(lp_net.latent_dim)
    for layer in lp_net.layers[:top]:
        gain = np.linalg.norm(dense(layer.weight) * gain[None, :], axis=1)
    layer = lp_net.layers[top]
    norms = np.linalg.norm(dense(layer.weight) * gain[None, :], axis=1)
    rows = cons.active & (norms > 0)
    if not rows.any():
        return 1.0
    size = float(np.max(np.abs(cons.target - layer.bias_or_zero())[rows] / norms[rows]))
    return size if size > 0 and not 1e-3 <= size <= 1e3 else 1.0


def _settle(
    net: Network,
    top: int,
    y: np.ndarray,
    cons: ActiveSet,
    lp_net: Network,
    unit: float,
    *,
    rtol: float,
    z_known: np.ndarray | None,
    deadline: float,
    seconds: float,
    box: float,
    tighten: bool,
    engine: str,
    probe: bool,
    seed: int,
) -> Settled:
    """`settle` on y's active set, the LPs on `lp_net` = balanced(net, top, unit) (z = unit
    z'): its answers in z' (``seconds``: the budget `deadline` ends, for messages)."""
    # Active units: within the data's band rtol max(|target|, |b|) of their targets;
    # equalities (band 0) where that band, on a unit row, is below HiGHS's feasibility
    # tolerance (a narrower band only stalls its simplex), which a near-zero row's is not.
    # A curved activation's units: the rounding of y stretched by its inverse where that
    # is wider (near saturation; not cons.scale, which is the largest such stretch).
    size = max(float(np.max(np.abs(cons.target))),
               float(np.max(np.abs(net.layers[top].bias_or_zero()), initial=0.0)), 1e-300)
    norms = np.linalg.norm(dense(lp_net.layers[top].weight), axis=1)
    band = np.where(rtol * size > HIGHS_FEASIBILITY * norms, rtol * size, 0.0)
    curved = cons.curved_band(net.layers[top], y, rtol)
    loose = curved > 1e-7 * size
    band = np.maximum(band, np.where(loose, curved, 0.0))
    # the units whose pre-activation y fixes (to HiGHS's tolerance): not a saturated one
    # (a half-line) nor one whose band is wide; only these pin z in a refinement, in a
    # null space or in a leaf's fit (leaving a unit out only weakens a pruning)
    vague = loose if cons.saturated is None else loose | cons.saturated
    pinned = cons.active & ~vague
    top_block = exact_top(lp_net, top, cons, band)
    domain = data_bounds(lp_net, top, top_block, box=_box_in(box, unit), deadline=deadline)
    if not isinstance(domain, str):
        domain.unit = unit
    upper = lp_net.below(top + 1)
    fit_net, fit_y = upper, y
    kept = np.flatnonzero(~vague)
    if vague.any() and kept.size:
        last = upper.layers[-1]
        fit_net = Network((*upper.layers[:-1], Layer(
            DenseOperator(dense(last.weight)[kept]),
            None if last.bias is None else last.bias[kept], last.activation)))
        fit_y = y[kept]
    elif vague.all():
        fit_y = y[:0]

    lo_pre, hi_pre = cons.pre_activation_bounds(np.zeros(len(y)), band)

    def accept(z: np.ndarray, thorough: bool = False) -> np.ndarray | None:
        """A checked preimage near z, or None: Gauss-Newton in z's cell; ``thorough``,
        where that does not reproduce y: a short Levenberg-Marquardt across cells from z,
        then Gauss-Newton."""
        if not np.all(np.isfinite(z)):
            return None
        refined = newton_refine(upper, cons.target, pinned, z)
        candidates = [refined, z]  # (a target that rounding blurred may pull z off)
        if thorough and not reproduces(net, top, y, unit * refined, rtol):
            moved = local_preimage(upper, lo_pre, hi_pre, z, iterations=ACCEPT_ITERATIONS)
            candidates = [newton_refine(upper, cons.target, pinned, moved), z]
        for candidate in candidates:
            if reproduces(net, top, y, unit * candidate, rtol):
                return candidate
        return None

    known = accept(z_known / unit) if z_known is not None else None

    def separation_of(z_star: np.ndarray | None) -> float:
        size = 1.0 if z_star is None else max(1.0, float(np.max(np.abs(z_star))))
        return max(SEPARATION, SEPARATION_RTOL * rtol) * size

    def second_in_cell(z_star: np.ndarray) -> np.ndarray | None:
        """A second preimage in z*'s own cell, along the directions that keep its pinned
        rows and the units seen off that z* holds at their threshold unchanged there (the
        other units seen off, and the cell's walls, hold near z*)."""
        sep = separation_of(z_star)
        size = max(1.0, float(np.max(np.abs(z_star))))
        pre = top_preactivation(upper, z_star)
        tight = ~cons.active & (pre > hi_pre - 1e-6 * cons.scale)
        rows = pinned | tight
        for v in null_directions(upper, activation_pattern(upper, z_star, top), rows).T:
            for sign in (1.0, -1.0):
                for step in size * 0.5 ** np.arange(0, 40, 3):
                    if step <= 10 * sep:
                        break
                    found = accept(z_star + sign * step * v)
                    if found is not None and float(np.max(np.abs(found - z_star))) > sep:
                        return found
        return None

    if isinstance(domain, str):
        if domain == "infeasible":
            return Settled("infeasible", None, None,
                           "no z satisfies the bounds the data imply", "every z")
        return _timed_out(known, "while deriving the domain", "none derived yet")
    where = domain.describe()
    if domain.empty:
        return _no_preimage(domain, where, "interval bounds over the box")
    relax = Relaxation(lp_net, top, domain, top_block)
    relax.deadline = deadline
    if probe:
        probe_until = min(deadline, time.perf_counter() + PROBE_SHARE * seconds)
        known, witness, starts = _probe(upper, lo_pre, hi_pre, domain, accept,
                                        second_in_cell, known, separation_of, probe_until,
                                        seed)
        if witness is not None:
            return Settled("non_unique", known, witness, "a second preimage by the local "
                           f"probe ({starts} local starts)", where, bool(domain.boxed.any()))
    separation = separation_of(known)
    if engine == "milp":
        # (after the probe: a sample it settles needs no tightening)
        if tighten and relax.tighten(deadline=deadline) == "infeasible":
            return _no_preimage(domain, where, "bound tightening")
        return _settle_milp(relax, accept, known, domain, where, deadline, separation)

    def directions(z_star: np.ndarray, on: np.ndarray) -> np.ndarray:
        return null_directions(upper, relax.patterns(on), pinned)

    def leaf_fit(on: np.ndarray) -> tuple[float, np.ndarray]:
        if fit_y.size == 0:  # nothing to fit: the relaxation's own point
            return 0.0, np.full(net.latent_dim, np.nan)
        fit = cell_lp(fit_net, fit_y, relax.patterns(on), tau=cons.tau)
        return fit.misfit, fit.z

    shared = _SharedBounds()  # (published to only when racing)
    # one tree for both searches when racing: the tightened one joins it after its
    # tightening, taking the other's shallowest open nodes (`NodePool`)
    pool = NodePool(relax.n_units, 2 if tighten else 1, known)

    def search(tightened: bool, stop: Callable[[], bool] | None) -> BranchOutcome:
        own = Relaxation(lp_net, top, domain, top_block) if tightened else relax
        own.deadline = deadline
        if tightened and own.tighten(deadline=deadline, stop=stop,
                                     publish=shared.publish) == "infeasible":
            return BranchOutcome("infeasible", None, lps=own.n_lps)
        return settle_exact(own, accept, directions, leaf_fit, leaf_tol=10 * rtol * cons.scale,
                            z_known=known, separation=separation, deadline=deadline,
                            second=second_in_cell, stop=stop,
                            refresh=None if tightened else shared.refresh, pool=pool,
                            worker=int(tightened))

    found, _ = _race_searches(search, tighten, EXACT_CONCLUSIVE)
    # (no wall time in a message: results are the same whatever the machine's speed; which
    # of two raced searches answers, and after how many nodes, depends on it)
    tail = (" (two branch and bounds raced, one on tightened bounds)" if tighten
            else f" ({found.nodes} nodes, {found.lps} LPs)")
    if found.status == "unique":
        return _unique(domain, found.z, f"the only preimage of {where}" + tail, where,
                       nodes=found.nodes, lps=found.lps)
    if found.status == "non_unique":
        return Settled("non_unique", found.z, found.witness,
                       "a second preimage found by the branch and bound" + tail, where,
                       bool(domain.boxed.any()), nodes=found.nodes, lps=found.lps)
    if found.status == "infeasible":
        return _no_preimage(domain, where, f"the branch and bound{tail}")
    timed = time.perf_counter() > deadline
    status = "feasible" if found.z is not None else "failed"
    what = "uniqueness unsettled" if found.z is not None else "no preimage found"
    return Settled(status, found.z, None,
                   f"{what}: {found.message}" + (f"; out of its {seconds:g} s" if timed else ""),
                   where, bool(domain.boxed.any()), out_of_time=timed, nodes=found.nodes,
                   lps=found.lps)


class _SharedBounds:
    """The tightened search's bounds, published after each pass of its tightening, for the
    plain search to take up between nodes (bounds valid for every z of the domain)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bounds: tuple[np.ndarray, np.ndarray] | None = None
        self._version = self._adopted = 0

    def publish(self, lower: np.ndarray, upper: np.ndarray) -> None:
        with self._lock:
            self._bounds = (lower.copy(), upper.copy())
            self._version += 1

    def refresh(self, relax: Relaxation) -> None:
        """`relax` takes up the last published bounds, if it has not yet."""
        if self._version == self._adopted:
            return
        with self._lock:
            bounds, version = self._bounds, self._version
        assert bounds is not None
        relax.adopt(*bounds)
        self._adopted = version


#: The branch-and-bound answers that settle a sample (the others wait for the budget).
EXACT_CONCLUSIVE = ("unique", "non_unique", "infeasible")


def _race_searches(
    search: Callable[[bool, Callable[[], bool] | None], BranchOutcome], tighten: bool,
    conclusive: tuple[str, ...], misfit: bool = False,
) -> tuple[BranchOutcome, bool]:
    """(outcome, whether it is the tightened search's): ``search(tightened, stop)`` once,
    or, with `tighten`, twice at once in two threads (HiGHS releases the GIL in its
    simplex): on the bounds from the data, and on bounds tightened first
    (`Relaxation.tighten`). Neither dominates: tightening settles in one node the
    samples whose tightened relaxation closes onto the preimage's own cell (the
    authors' decoder: 3-6 s of LPs, where the plain search needed 8 s or more than 40),
    and costs the time that the plain search settles others in (docs/performance.md).
    The tightened search publishes its bounds after each pass (`_SharedBounds`, given
    to `search` through its closure), which the plain one takes up between nodes once it
    knows a preimage (valid over the whole domain, they hold in every node: samples
    169, 89, 124 of the authors' decoder then settle in 4-5 s instead of 6-11).
    An exact search's two are one tree (`NodePool`, given the same way): the tightened
    one, done tightening, takes the plain one's shallowest open nodes, and the two
    search disjoint subtrees instead of the same tree twice.
    The first answer whose status is `conclusive` ends the other search; without one,
    the answer with a preimage (exact) or the better incumbent and the higher bound
    (misfit: each search's bound holds for every z of the domain), and the nodes and
    LPs of both.
    """
    if not tighten:
        return search(False, None), False
    done = threading.Event()
    answers: list[BranchOutcome | None] = [None, None]
    order: list[int] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            answers[i] = search(bool(i), done.is_set)
            order.append(i)
            if answers[i].status in conclusive:
                done.set()
        except BaseException as error:  # (re-raised below, in the caller's thread)
            errors.append(error)
            done.set()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    both = [a for a in answers if a is not None]
    nodes, lps = sum(a.nodes for a in both), sum(a.lps for a in both)
    for i in order:
        answer = answers[i]
        if answer is not None and answer.status in conclusive:
            return replace(answer, nodes=nodes, lps=lps), bool(i)
    plain, tight = answers
    assert plain is not None and tight is not None
    if misfit:
        best = plain if plain.value <= tight.value else tight
        return replace(best, bound=max(plain.bound, tight.bound), nodes=nodes, lps=lps), \
            best is tight
    best = plain if plain.z is not None or tight.z is None else tight
    return replace(best, nodes=nodes, lps=lps), best is tight


def _probe(
    upper: Network, lo: np.ndarray, hi: np.ndarray, domain: Domain, accept, second_in_cell,
    known: np.ndarray | None, separation_of, until: float, seed: int,
) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    """(z*, witness, starts): a local search for preimages before the branch and bound.

    Levenberg-Marquardt on lo <= pre(z) <= hi (`local_preimage`) from random starts
    N(0, I) in the LPs' units of z, clipped to the domain (from `seed`: the same
    sample gets the same answer), until a second preimage turns up (the
    witness), PROBE_AFTER starts after the first found none, or `until`; then,
    without a witness, the first's own cell is searched for one
    (`second_in_cell`: a witness there is on the same piece of the preimage set,
    another start's is most often on another). Every preimage is checked by
    `accept`. Finds, never proves: what it finds saves the search its hardest
    part (no preimage yet), or settles the sample.
    """
    rng = np.random.default_rng(seed)
    z_star, after, starts = known, 0, 0
    while starts < PROBE_STARTS and after < PROBE_AFTER and time.perf_counter() <= until:
        starts += 1
        z0 = np.clip(rng.standard_normal(upper.latent_dim), domain.z_lower, domain.z_upper)
        found = accept(local_preimage(upper, lo, hi, z0))
        after += z_star is not None
        if found is None:
            continue
        if z_star is None:
            # (a first preimage outside the domain would be "the only one" of a domain
            # that does not hold it; a second one anywhere is a witness)
            inside = np.all(found >= domain.z_lower) and np.all(found <= domain.z_upper)
            z_star = found if inside else None
        elif float(np.max(np.abs(found - z_star))) > separation_of(z_star):
            return z_star, found, starts
    if z_star is None:
        return None, None, starts
    return z_star, second_in_cell(z_star), starts


def _timed_out(z: np.ndarray | None, when: str, where: str) -> Settled:
    status = "feasible" if z is not None else "failed"
    return Settled(status, z, None, f"out of time {when}", where, out_of_time=True)


def _unique(domain: Domain, z_star: np.ndarray | None, message: str, where: str,
            **counts: int) -> Settled:
    """"unique" for z* (in z' units) where it lies in the domain the search covered; one
    outside the box (a far preimage the layer-wise method or the probe handed in) is the
    only one in the box, not proved the only one: "feasible"."""
    assert z_star is not None
    boxed = bool(domain.boxed.any())
    slack = 1e-6 * (1.0 + np.maximum(np.abs(domain.z_lower), np.abs(domain.z_upper)))
    if boxed and np.any((z_star < domain.z_lower - slack) | (z_star > domain.z_upper + slack)):
        return Settled("feasible", z_star, None, "uniqueness unsettled: this preimage lies "
                       "outside the box searched, which holds no other preimage", where,
                       boxed, **counts)
    return Settled("unique", z_star, None, message, where, boxed, **counts)


def _no_preimage(domain: Domain, where: str, how: str) -> Settled:
    if domain.boxed.any():
        # no preimage in the box: proved for the box only, not "not in the range"
        return Settled("failed", None, None, f"no preimage among {where} ({how})", where, True)
    return Settled("infeasible", None, None, f"no preimage: {how} proves none exists", where)


def _settle_milp(relax: Relaxation, accept, known, domain: Domain, where: str,
                 deadline: float, separation: float) -> Settled:
    """The same model through HiGHS's MILP: a preimage, then a no-good cut on its pattern."""
    m, row_lo, row_hi, col_lo, col_hi, integrality, free = relax.milp_arrays()
    cost = np.zeros(m.shape[1])
    cuts: list[LinearConstraint] = []
    boxed = bool(domain.boxed.any())
    z_star = known
    for _ in range(4):  # a few cuts: ambiguous units at z* may admit z* in several patterns
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        sol = solve_milp(cost, integrality=integrality, bounds=Bounds(col_lo, col_hi),
                         constraints=[LinearConstraint(m, row_lo, row_hi), *cuts],
                         time_limit=left)
        if sol.status == "infeasible":
            if z_star is None:
                return _no_preimage(domain, where, "the MILP")
            return _unique(domain, z_star, f"the only preimage of {where} (MILP)", where)
        if sol.x is None:
            break
        z = accept(sol.x[: relax.k])
        if z is None:
            break
        if z_star is None:
            z_star = z
        elif float(np.max(np.abs(z - z_star))) > separation:
            return Settled("non_unique", z_star, z, "a second preimage (MILP)", where, boxed)
        # exclude this answer's pattern: some unstable unit must change state
        on = sol.x[free] > 0.5
        row = np.zeros(m.shape[1])
        row[free[on]], row[free[~on]] = -1.0, 1.0
        cuts.append(LinearConstraint(row[None], 1 - int(on.sum()), np.inf))
    timed = time.perf_counter() > deadline
    status = "feasible" if z_star is not None else "failed"
    return Settled(status, z_star, None, "the MILP did not finish" +
                   ("; out of time" if timed else ""), where, boxed, out_of_time=timed)


def misfit_of(net: Network, z: np.ndarray, x: np.ndarray, norm: str) -> float:
    """||G(z) - x|| in the l_inf or l_1 norm."""
    r = net.forward(z[None])[0] - x
    return float(np.max(np.abs(r)) if norm == "linf" else np.sum(np.abs(r)))


def global_projection(
    net: Network,
    x: np.ndarray,
    *,
    norm: str,
    start: np.ndarray,
    seconds: float = 10.0,
    box: float = 10.0,
    tighten: bool = False,
    rel_gap: float = 1e-6,
) -> Settled:
    """min_z ||G(z) - x|| (l_inf or l_1) globally, from an incumbent `start` (module docstring).

    Every layer ReLU. The incumbent's misfit t bounds the search (`data_bounds`:
    any better z has G(z) within t of x), so the answer's bound holds for every z
    in ``domain`` (the box ``box`` on the coordinates the data do not bound, widened
    to twice the start's largest |z_j| where it would not hold the start). Status
    "optimal" when the gap is within rel_gap (relative) of the misfit, else
    "time_limit" with the best z and the bound reached.
    ``tighten``: race a second search on bounds tightened first (`_race_searches`;
    measured no faster here, so `invert` leaves it off).
    """
    if norm not in ("linf", "l1"):
        raise ValueError(f"`norm` must be 'linf' or 'l1' for the global projection; got {norm!r}.")
    depth = len(net.layers)
    if not _relu_below(net, depth):
        raise ValueError("The global projection needs ReLU layers only, the output's too.")
    x = np.asarray(x, dtype=np.float64)
    z0 = np.asarray(start, dtype=np.float64)
    # HiGHS's tolerances are absolute: x and z far from 1 in size (1e-6, 1e7 gave wrong
    # bounds) are measured in their own units, min ||G(u z') / s - x / s|| (the misfit is
    # homogeneous; G(u z') / s is G with its first weight times u, its last layer over s)
    x_unit = _unit_of(x)
    z_unit = _unit_of(z0)
    if x_unit == 1.0 and z_unit == 1.0:
        return _projection(net, x, norm, z0, seconds, box, tighten, rel_gap, 1.0, 1.0)
    layers = list(net.layers)
    first = layers[0]
    layers[0] = Layer(DenseOperator(dense(first.weight) * z_unit), first.bias, first.activation)
    last = layers[-1]  # (after the line above: with one layer, it is the first)
    layers[-1] = Layer(DenseOperator(dense(last.weight) / x_unit),
                       None if last.bias is None else last.bias / x_unit, last.activation)
    found = _projection(Network(tuple(layers)), x / x_unit, norm, z0 / z_unit, seconds,
                        _box_in(box, z_unit), tighten, rel_gap, z_unit, x_unit)
    return replace(found, z=None if found.z is None else z_unit * found.z,
                   value=found.value * x_unit, bound=found.bound * x_unit)


#: In units of z's own size, the box is at most this wide: big-M bounds far above the
#: data's size are beyond HiGHS's absolute tolerances (a box of 1e7 for codes of 1e-6 gave
#: a wrong bound); the proof's domain then says the smaller box.
MAX_BOX = 1e3


def _box_in(box: float, unit: float) -> float:
    """The box |z_j| <= box in units of `unit`, at most MAX_BOX (where unit is not 1)."""
    return box if unit == 1.0 else min(box / unit, MAX_BOX)


def _unit_of(v: np.ndarray) -> float:
    """1, or v's size (max |v|) where that is far from 1 (outside 1e-3..1e3)."""
    size = float(np.max(np.abs(v), initial=0.0))
    return size if size > 0 and not 1e-3 <= size <= 1e3 else 1.0


def _projection(net: Network, x: np.ndarray, norm: str, z0: np.ndarray, seconds: float,
                box: float, tighten: bool, rel_gap: float, z_unit: float,
                x_unit: float) -> Settled:
    """`global_projection` in units (z = z_unit z', x = x_unit x'): answers in z', x'
    units; its messages and domain in z's and x's own."""
    depth = len(net.layers)
    deadline = time.perf_counter() + seconds
    t0 = misfit_of(net, z0, x, norm)
    scale = max(float(np.max(np.abs(x))), 1e-300)
    abs_gap = 1e-9 * scale
    if t0 <= abs_gap:
        return Settled("optimal", z0, None, "the start fits x exactly", "every z", value=t0,
                       bound=0.0)
    cutoff = t0 * (1 + 1e-9)
    top = Top(lo=x - cutoff, hi=x + cutoff, x=x, norm=norm)
    lp_net = balanced(net, depth - 1)  # (as in `settle`; the output keeps its scale: x's)
    # the box holds the start: a bound over a box that misses the incumbent compares it
    # with nothing (a start at |z| = 58 was "the proved minimum" over |z| <= 10, and a z
    # with half its misfit lay at |z| = 24)
    box = max(box, 2.0 * float(np.max(np.abs(z0), initial=0.0)))
    domain = data_bounds(lp_net, depth, top, box=box, deadline=deadline)
    if not isinstance(domain, str):
        domain.unit = z_unit
    if isinstance(domain, str):
        if domain == "infeasible":  # nothing beats the start: it is the minimum
            return Settled("optimal", z0, None, "no z does better than the start", "every z",
                           value=t0, bound=t0)
        return Settled("time_limit", z0, None, "out of time while deriving the domain",
                       "none derived yet", out_of_time=True, value=t0, bound=0.0)
    where = domain.describe()
    if domain.empty:  # nothing in the box beats the start
        return Settled("optimal", z0, None, f"no z of {where} does better than the start",
                       where, True, value=t0, bound=t0)
    upper_dim = net.below(depth - 1) if depth > 1 else None

    def evaluate(z: np.ndarray) -> tuple[float, np.ndarray]:
        value = misfit_of(net, z, x, norm)
        if upper_dim is None:
            return value, z
        # the best point of z's own cell (its output pattern included): no worse than z
        fit = cell_lp(net, x, activation_pattern(net, z), norm=norm, output_cell=True,
                      z_ref=z)
        if np.all(np.isfinite(fit.z)):
            polished = misfit_of(net, fit.z, x, norm)
            if polished < value:
                return polished, fit.z
        return value, z

    def search(tightened: bool, stop: Callable[[], bool] | None) -> BranchOutcome:
        relax = Relaxation(lp_net, depth, domain, top)
        relax.deadline = deadline
        if tightened:
            relax.set_cutoff(cutoff)
            if relax.tighten(deadline=deadline, stop=stop) == "infeasible":
                # nothing beats the start
                return BranchOutcome("optimal", z0, value=t0, bound=t0, lps=relax.n_lps)
        return minimise_misfit(relax, evaluate, start=z0, start_value=cutoff,
                               deadline=deadline, rel_gap=rel_gap, abs_gap=abs_gap, stop=stop)

    found, _ = _race_searches(search, tighten, ("optimal",), misfit=True)
    value = min(found.value, t0) if found.z is not None else t0
    z = found.z if found.z is not None else z0
    if found.value > t0:  # the cutoff's slack: the start itself is the best
        value, z = t0, z0
    bound = min(found.bound, value)
    timed = found.status == "time_limit"
    return Settled(
        "time_limit" if timed else "optimal", z, None,
        f"global {norm} misfit {value * x_unit:.6g}, proved lower bound {bound * x_unit:.6g} "
        f"over {where if domain.boxed.any() else 'every z'} ({found.nodes} nodes)"
        + ("; out of time" if timed else ""),
        where, bool(domain.boxed.any()), out_of_time=timed, value=value, bound=bound,
        nodes=found.nodes, lps=found.lps,
    )
