"""Branch and bound over the ReLU units, on one live HiGHS LP (`preimage.solvers.relaxation`).

A node is a set of decisions (unit g on: 1, off: 0); its LP is
the relaxation with those bounds, warm-started from the last basis (dual
simplex after a bound change: a few pivots). Depth first for the exact
problem, best bound first for the misfit. A unit is branched on where the
relaxation is most violated (r_g - max(a_g, 0) largest at the LP point);
where no unit is violated the LP point is a true point of the network and
the widest undecided unit is split instead (only needed to prove uniqueness).

Exact observation (`settle_exact`): find z with G(z) = y, then prove it is
the only one, or find a second one. Every LP point (once z* is known: every
one near a point of the network) is refined in its own activation cell and
checked by a forward pass (``accept``); a point far from the first preimage
z* that passes is a second preimage (the witness), as is one next to z* in its
own cell (``second``, tried when z* is found). The
search ends when every node is pruned: infeasible, or a leaf (every unit
decided: the LP is then the cell's own preimage set Q) whose Q is {z*}:
z* in Q and the cell's active rows of full column rank, or, with a null
space, no point of Q farther than ``separation`` from z* along it (two LPs per
null direction). With no preimage and every node infeasible, y has none in
the domain (proved).

The tree can be shared by workers in threads, each on its own relaxation
(`NodePool`): each depth first on its own stack, an idle one taking another's
shallowest open node.

Misfit (`minimise_misfit`): min t over the relaxation is a lower bound of the
misfit in each node; the incumbent is the best true misfit at the LP points
(refined in their cells by ``evaluate``). The search ends when the lowest
open bound is within the gap tolerance of the incumbent: the incumbent is
then the global minimum over the domain, to that gap.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from preimage.solvers.relaxation import Relaxation

#: A unit counts as violated at an LP point when r - max(a, 0) exceeds this (relative to
#: 1 + its U).
VIOLATION = 1e-7

#: Once a preimage is known, an LP point is refined and checked (for a second one) only
#: where no unit is violated by more than this (as VIOLATION).
NEAR_NETWORK = 1e-3


@dataclass
class BranchOutcome:
    """What the branch and bound found.

    status : exact: "unique", "non_unique", "infeasible" (proved), "found" (a preimage,
        the proof unfinished: out of time or an unresolved leaf), "none" (nothing found,
        nothing proved); misfit: "optimal" (gap closed) or "time_limit"
    z : the preimage / best point, or None
    witness : a second preimage ("non_unique")
    value, bound : misfit: the incumbent's misfit and the proved lower bound
    nodes, lps : nodes processed, LPs solved
    unresolved : leaves or nodes that could be neither pruned nor turned into a witness
    """

    status: str
    z: np.ndarray | None
    witness: np.ndarray | None = None
    value: float = np.inf
    bound: float = -np.inf
    nodes: int = 0
    lps: int = 0
    unresolved: int = 0
    message: str = ""


def _violations(relax: Relaxation, u: np.ndarray, pre: np.ndarray) -> np.ndarray:
    """(n_units,) (r - max(a, 0)) / (1 + U) of every unit at the LP point u (pre: its a)."""
    return (u[relax.r_col] - np.maximum(pre, 0.0)) / (1.0 + relax.upper)


def _branch_unit(relax: Relaxation, u: np.ndarray, undecided: np.ndarray,
                 pre: np.ndarray | None = None) -> tuple[int, bool]:
    """(unit, violated): the undecided unit most violated at the LP point u (pre: its a,
    when known), else the widest (min(U, -L) largest)."""
    pre = relax.pre(u) if pre is None else pre
    violation = _violations(relax, u, pre)[undecided]
    j = int(np.argmax(violation))
    if violation[j] > VIOLATION:
        return int(undecided[j]), True
    width = np.minimum(relax.upper[undecided], -relax.lower[undecided])
    return int(undecided[int(np.argmax(width))]), False


def _children(decisions: np.ndarray, g: int, prefer_on: bool) -> list[np.ndarray]:
    """The two children, the preferred one last (popped first from a stack)."""
    on, off = decisions.copy(), decisions.copy()
    on[g], off[g] = 1, 0
    return [off, on] if prefer_on else [on, off]


class NodePool:
    """The open nodes of one exact branch and bound, shared by the workers (threads) that
    search it, and what they have found.

    Each worker goes depth first on its own stack; one whose stack is empty takes
    the oldest open node of the fullest other stack (the shallowest: the largest
    subtree), so two workers search disjoint parts of one tree instead of the same
    tree twice. The tree is done (`take` returns None, `drained`) when every stack
    is empty and no worker is processing a node (which may push children) or has
    left the search before its end (`leave`). The
    first checked preimage found by any worker is ``z_star`` (`offer`); unresolved
    nodes are counted over all workers. Workers may join late (a second one after
    its bound tightening) or never: an idle worker does not hold the tree open.
    """

    def __init__(self, n_units: int, workers: int = 1, z_known: np.ndarray | None = None) -> None:
        self._cond = threading.Condition()
        self._stacks: list[list[np.ndarray]] = [[] for _ in range(workers)]
        self._stacks[0].append(np.full(n_units, -1, dtype=np.int8))
        self._busy = [False] * workers
        self.z_star = z_known
        self.unresolved = 0
        self.drained = False
        self._abandoned = False

    @property
    def open(self) -> int:
        """Open nodes over all stacks."""
        return sum(len(stack) for stack in self._stacks)

    def take(self, worker: int, give_up: Callable[[], bool]) -> np.ndarray | None:
        """The next node for `worker` (its own stack's last, else another's oldest), or None:
        the tree is drained, or ``give_up()`` (checked before each node and while waiting
        for work)."""
        with self._cond:
            self._busy[worker] = False
            while True:
                if give_up() or self._abandoned:
                    return None
                own = self._stacks[worker]
                if own:
                    self._busy[worker] = True
                    return own.pop()
                donor = max(range(len(self._stacks)), key=lambda j: len(self._stacks[j]))
                if self._stacks[donor]:
                    self._busy[worker] = True
                    return self._stacks[donor].pop(0)
                if not any(self._busy):
                    self.drained = True
                    self._cond.notify_all()
                    return None
                self._cond.wait(timeout=0.01)

    def give(self, worker: int, children: list[np.ndarray]) -> None:
        """Push `worker`'s children (the one to search first last)."""
        with self._cond:
            self._stacks[worker] += children
            self._cond.notify_all()

    def offer(self, z: np.ndarray) -> tuple[np.ndarray, bool]:
        """(the pool's preimage, whether it is z): z becomes it where there is none yet."""
        with self._cond:
            if self.z_star is None:
                self.z_star = z
                return z, True
            return self.z_star, False

    def leave(self, worker: int) -> None:
        """`worker` stops (its answer given). Before the tree is drained (a witness, out of
        time, stopped), the node it held is not done: the tree then never counts as
        drained, and no other worker can conclude "unique" or "infeasible" from it."""
        with self._cond:
            self._busy[worker] = False
            self._abandoned |= not self.drained
            self._cond.notify_all()

    def count_unresolved(self) -> None:
        with self._cond:
            self.unresolved += 1


def settle_exact(
    relax: Relaxation,
    accept: Callable[..., np.ndarray | None],
    null_directions: Callable[[np.ndarray, np.ndarray], np.ndarray],
    leaf_fit: Callable[[np.ndarray], tuple[float, np.ndarray]],
    *,
    leaf_tol: float,
    z_known: np.ndarray | None,
    separation: float,
    deadline: float,
    second: Callable[[np.ndarray], np.ndarray | None] | None = None,
    stop: Callable[[], bool] | None = None,
    refresh: Callable[[Relaxation], None] | None = None,
    pool: NodePool | None = None,
    worker: int = 0,
) -> BranchOutcome:
    """The exact problem (module docstring) on `relax` (an exact top).

    Parameters
    ----------
    accept : (z (k,), thorough) -> a checked preimage near it (refined in its cell;
        thorough, asked while no preimage is known: by a local search across cells too),
        or None
    null_directions : (z*, on (n_units,)) -> (k, m) directions along which the cell of
        pattern `on` leaves the active rows unchanged (m = 0: full column rank)
    leaf_fit : on (n_units,) -> (misfit, z): the best fit to y inside the cell of `on`
        (`preimage.solvers.cell.cell_lp`); above ``leaf_tol`` the cell holds no preimage
    z_known : a checked preimage already found (the layer-wise method's), or None
        (with a `pool`: the pool's own, given when it was made)
    separation : two preimages farther apart than this (l_inf) are distinct
    deadline : time.perf_counter() value
    second : z* -> a checked second preimage near z* (its own cell), or None; tried on the
        first preimage the search finds
    stop : () -> True where the search is to end now, as at the deadline (another search
        of the same sample has settled it)
    refresh : relax -> None, called before each node once a preimage is known: may tighten
        relax's bounds (`Relaxation.adopt`; bounds valid over the whole domain hold in
        every node). Not before: while no preimage is known, the LP points are the seeds
        of the local search for one, and other bounds move them (the authors' sample
        193, whose preimage only they find, then ran out of time)
    pool, worker : the tree shared with other workers (`NodePool`; each on its own
        Relaxation of the same network) and this one's number; None: a tree of its own.
        The verdict ("unique", "infeasible") is then the whole tree's, every worker's
        nodes done
    """
    pool = NodePool(relax.n_units, 1, z_known) if pool is None else pool
    try:
        return _search_exact(relax, accept, null_directions, leaf_fit, leaf_tol, separation,
                             deadline, second, stop, refresh, pool, worker)
    finally:
        pool.leave(worker)


def _search_exact(relax: Relaxation, accept, null_directions, leaf_fit, leaf_tol: float,
                  separation: float, deadline: float, second, stop, refresh, pool: NodePool,
                  worker: int) -> BranchOutcome:
    """`settle_exact`'s search, `worker`'s part of the pool's tree."""
    k = relax.k
    nodes = 0

    def give_up() -> bool:
        return time.perf_counter() > deadline or (stop is not None and stop())

    def distinct(z: np.ndarray) -> bool:
        return pool.z_star is not None and float(np.max(np.abs(z - pool.z_star))) > separation

    def outcome(status: str, message: str, witness: np.ndarray | None = None) -> BranchOutcome:
        return BranchOutcome(status, pool.z_star, witness, nodes=nodes, lps=relax.n_lps,
                             unresolved=pool.unresolved, message=message)

    def witness_of(found: np.ndarray, where: str) -> BranchOutcome | None:
        """A checked preimage into the pool: the answer "non_unique" where it is a second
        one (or, the first, its cell holds a second), else None."""
        z_star, first = pool.offer(found)
        if not first:
            return (outcome("non_unique", f"a second preimage {where}", found)
                    if distinct(found) else None)
        near = second(z_star) if second is not None else None
        if near is not None:
            return outcome("non_unique", f"a second preimage next to the first ({where})", near)
        return None

    while True:
        decisions = pool.take(worker, give_up)
        if decisions is None:
            if pool.drained:
                break
            return outcome("found" if pool.z_star is not None else "none",
                           f"out of time after {nodes} nodes ({pool.open} open)")
        if refresh is not None and pool.z_star is not None:
            refresh(relax)
        if relax.contradicts(decisions):
            continue  # (no point of its own: its sibling, the other state, holds them all)
        relax.fix(decisions)
        sol = relax.solve()
        nodes += 1
        if sol.status == "infeasible":
            continue
        if not sol.optimal or sol.x is None:
            pool.count_unresolved()  # HiGHS gave no answer: this subtree stays open
            continue
        u = sol.x
        z_lp = u[:k]
        pre = relax.pre(u)
        # with a preimage in hand, only LP points near a point of the network are worth a
        # refinement (one from far off rarely lands on a second preimage, and costs more
        # than the node's LP)
        if pool.z_star is None or (distinct(z_lp) and float(np.max(
                _violations(relax, u, pre), initial=0.0)) <= NEAR_NETWORK):
            found = accept(z_lp, pool.z_star is None)
            if found is not None:
                answer = witness_of(found, f"at node {nodes}")
                if answer is not None:
                    return answer
        undecided = relax.undecided()
        if undecided.size:
            g, _ = _branch_unit(relax, u, undecided, pre)
            pool.give(worker, _children(decisions, g, bool(pre[g] > 0)))
            continue
        # A leaf: every unit decided, the LP is the cell's own preimage set Q.
        on = np.where(relax.stable >= 0, relax.stable, relax.fixed) == 1
        negligible = (relax.stable < 0) & (relax.fixed < 0)
        on[negligible] = relax.upper[negligible] > -relax.lower[negligible]
        if pool.z_star is None or distinct(z_lp):
            # the cell's own LP (scaled, tight tolerances) decides: the relaxation's point
            # is feasible only to HiGHS's tolerance
            misfit, z_cell = leaf_fit(on)
            if misfit > leaf_tol:
                continue  # no preimage in this cell
            found = accept(z_cell)
            if found is None:
                pool.count_unresolved()
                continue
            answer = witness_of(found, f"in leaf {nodes}")
            if answer is not None:
                return answer
        z_star = pool.z_star
        assert z_star is not None
        directions = null_directions(z_star, on)
        far = None
        for v in directions.T:
            for sign in (1.0, -1.0):
                cost = np.zeros(relax.n_cols)
                cost[:k] = -sign * v
                extreme = relax.solve(cost)
                if extreme.optimal and extreme.x is not None and distinct(extreme.x[:k]):
                    far = extreme.x[:k]
                    break
            if far is not None:
                break
        if far is None:
            continue  # Q = {z*}
        for z_try in (far, (far + z_star) / 2, (far + 3 * z_star) / 4):
            found = accept(z_try)
            if found is not None and distinct(found):
                return outcome("non_unique", f"a second preimage in the cell of z* (leaf {nodes})",
                               found)
        pool.count_unresolved()
    if pool.z_star is None:
        if pool.unresolved:
            return outcome("none", f"no preimage found; {pool.unresolved} node(s) unresolved")
        return outcome("infeasible", f"no preimage: every node infeasible ({nodes} here)")
    if pool.unresolved:
        return outcome("found", f"a preimage; {pool.unresolved} node(s) unresolved, "
                       "uniqueness open")
    return outcome("unique", f"the only preimage: every other node infeasible ({nodes} here)")


def minimise_misfit(
    relax: Relaxation,
    evaluate: Callable[[np.ndarray], tuple[float, np.ndarray]],
    *,
    start: np.ndarray,
    start_value: float,
    deadline: float,
    rel_gap: float,
    abs_gap: float,
    stop: Callable[[], bool] | None = None,
) -> BranchOutcome:
    """The misfit problem (module docstring) on `relax` (a misfit top), best bound first.

    ``evaluate(z)`` -> (true misfit, point) of a point at least as good as z (refined in
    its cell); ``start``, ``start_value``: an incumbent (a local search's answer), whose
    value is also the cutoff of the relaxation; ``stop`` as in `settle_exact`.
    """
    best_z, best = np.asarray(start, dtype=float), float(start_value)
    relax.set_cutoff(best)
    cost = relax.misfit_cost()
    heap: list[tuple[float, int, np.ndarray]] = [(-np.inf, 0, np.full(relax.n_units, -1,
                                                                       dtype=np.int8))]
    counter, nodes = 1, 0
    stuck: list[float] = []  # bounds of nodes HiGHS could not solve: never pruned

    def closed(bound: float) -> bool:
        return best - bound <= max(abs_gap, rel_gap * best)

    def lowest() -> float:
        return min(([heap[0][0]] if heap else []) + stuck, default=best)

    while heap:
        bound = heap[0][0]
        if closed(min([bound, *stuck])):
            break
        if time.perf_counter() > deadline or (stop is not None and stop()):
            low = min(max(lowest(), 0.0), best)
            return BranchOutcome("time_limit", best_z, value=best, bound=low,
                                 nodes=nodes, lps=relax.n_lps,
                                 message=f"out of time after {nodes} nodes ({len(heap)} open)")
        parent, _, decisions = heapq.heappop(heap)
        relax.fix(decisions)
        sol = relax.solve(cost)
        nodes += 1
        if sol.status == "infeasible":
            continue  # no point of this node beats the cutoff (the incumbent)
        if not sol.optimal or sol.x is None:
            stuck.append(parent)
            continue
        if closed(sol.value):
            continue
        value, z = evaluate(sol.x[: relax.k])
        if value < best:
            best_z, best = z, value
            relax.set_cutoff(best)
            if closed(sol.value):
                continue
        undecided = relax.undecided()
        if undecided.size == 0:
            continue  # a leaf: its LP is exact, evaluate gave its optimum
        g, violated = _branch_unit(relax, sol.x, undecided)
        if not violated:
            continue  # the LP point is a true point: its misfit is this node's minimum
        for child in _children(decisions, g, bool(relax.pre(sol.x)[g] > 0)):
            heapq.heappush(heap, (sol.value, counter, child))
            counter += 1
    bound = min(max(lowest(), 0.0), best)
    status = "optimal" if closed(bound) else "time_limit"
    return BranchOutcome(status, best_z, value=best, bound=bound, nodes=nodes, lps=relax.n_lps,
                         message=f"{nodes} nodes, gap {best - bound:.3g}")
