"""The HiGHS front end: one vocabulary of LP statuses, and an LP that grows by rows.

Every LP and MILP of the package goes through here and ends in one of
`LP_STATUSES` (as SciPy's `_linprog_highs` maps HiGHS's model statuses onto a
few codes, keeping HiGHS's own in the message):

- `solve_lp`: ``scipy.optimize.linprog(method="highs")``;
- `solve_milp`: ``scipy.optimize.milp`` (HiGHS's branch and cut);
- `RowLP`: highspy's model kept alive between solves (below).

`RowLP`: an LP that grows by rows, HiGHS kept alive between solves (warm dual simplex).

    minimise c^T u   subject to   lower_r <= a_r u <= upper_r  for the rows added so far,
                                  lo <= u <= hi.

Row generation (`preimage.solvers.layer._polyhedron_lp`) solves a relaxation with
some rows, adds the rows its answer violates and solves again. Through
`scipy.optimize.linprog` every round starts from scratch; here the rows are
added to the same HiGHS instance, which restarts the dual simplex from the
previous optimal basis (new rows enter as basic slacks), so a round costs a
few pivots instead of a full solve. Measured on the 500 x ~110 null-space LPs
of a 100-500-784 network: 84 ms per LP against 128 ms for one full linprog.

The small dense LPs of the uniqueness certificate (`certificate`) use the
same class with one round. HiGHS's presolve is off: on these dense LPs it
removes nothing and costs as much as the solve (the Stiemke LP of a
100-500-784 layer: 12 ms without it, 21 ms with it, 25 ms through linprog).

Uses highspy's core binding ``_Highs``: the public ``highspy.Highs`` adds
Python callbacks and prints a banner on the first instance of a process, and
a library must not print.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from highspy._core import HessianFormat, HighsModelStatus, MatrixFormat, _Highs, kHighsInf
from scipy.optimize import linprog, milp

#: How every LP / MILP can end: an optimum, a proof of infeasibility or of
#: unboundedness (or HiGHS could not tell which), out of time, or a solver error.
LP_STATUSES: tuple[str, ...] = (
    "optimal", "infeasible", "unbounded", "infeasible_or_unbounded", "time_limit", "error",
)

#: scipy.optimize.linprog / milp status codes onto LP_STATUSES.
_SCIPY_STATUS = {0: "optimal", 1: "time_limit", 2: "infeasible", 3: "unbounded", 4: "error"}


@dataclass(frozen=True)
class LPSolution:
    """The outcome of one LP or MILP.

    Attributes
    ----------
    status : one of LP_STATUSES
    x : ndarray or None
        The optimal point (for a MILP out of time: the best feasible point found, if any).
    value : float
        The objective at x (inf without x).
    message : str
        What HiGHS said, with its own status.
    ineq_duals : ndarray or None
        Multipliers (>= 0) of the rows A_ub x <= b_ub (`solve_lp`, at an optimum).
    bound : float
        A proved lower bound on the optimum (MILP: HiGHS's dual bound; LP: the value).
    """

    status: str
    x: np.ndarray | None
    value: float
    message: str
    ineq_duals: np.ndarray | None = None
    bound: float = -np.inf

    @property
    def optimal(self) -> bool:
        return self.status == "optimal"


def solve_lp(
    cost: np.ndarray,
    *,
    A_ub: Any = None,
    b_ub: np.ndarray | None = None,
    A_eq: Any = None,
    b_eq: np.ndarray | None = None,
    bounds: Any = (None, None),
    tolerance: float | None = None,
    time_limit: float | None = None,
) -> LPSolution:
    """min cost^T x s.t. A_ub x <= b_ub, A_eq x = b_eq, bounds (as `scipy.optimize.linprog`).

    ``tolerance``: HiGHS's primal and dual feasibility tolerance (absolute: scale
    the data first). Empty constraint blocks may be passed as None or with 0 rows.
    """
    options: dict[str, Any] = {}
    if tolerance is not None:
        options.update(primal_feasibility_tolerance=tolerance, dual_feasibility_tolerance=tolerance)
    if time_limit is not None:
        options["time_limit"] = max(float(time_limit), 1e-3)
    if A_ub is not None and A_ub.shape[0] == 0:
        A_ub = b_ub = None
    if A_eq is not None and A_eq.shape[0] == 0:
        A_eq = b_eq = None
    res = linprog(
        cost, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=bounds, method="highs",
        options=options,
    )
    status = _SCIPY_STATUS.get(int(res.status), "error")
    if status != "optimal":
        return LPSolution(status, None, np.inf, str(res.message))
    duals = None
    if A_ub is not None and getattr(res, "ineqlin", None) is not None:
        duals = -np.asarray(res.ineqlin.marginals)
    value = float(res.fun)
    return LPSolution(status, np.asarray(res.x), value, str(res.message), duals, value)


#: Seconds one QP may take (`solve_qp`).
QP_SECONDS = 2.0


def solve_qp(
    hessian: np.ndarray,
    linear: np.ndarray,
    *,
    A_ub: Any,
    b_ub: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    tolerance: float | None = None,
    time_limit: float = QP_SECONDS,
) -> LPSolution:
    """min 1/2 x^T H x + c^T x  s.t.  A_ub x <= b_ub,  lower <= x <= upper (HiGHS's QP solver).

    H (k, k) symmetric positive semidefinite (dense), A_ub dense or sparse. The
    multipliers of the rows (>= 0) come back in ``ineq_duals``. HiGHS's active-set
    QP solver was seen to stall on a few degenerate cells for minutes: beyond
    ``time_limit`` seconds the status is "time_limit" (the caller skips the cell).
    """
    from scipy import sparse

    k = int(linear.size)
    highs = _Highs()
    highs.setOptionValue("output_flag", False)
    highs.setOptionValue("time_limit", float(time_limit))
    if tolerance is not None:
        highs.setOptionValue("primal_feasibility_tolerance", float(tolerance))
        highs.setOptionValue("dual_feasibility_tolerance", float(tolerance))
    none = np.zeros(0, dtype=np.int32)
    highs.addCols(k, np.asarray(linear, dtype=float),
                  np.array([_bound(v) for v in lower]), np.array([_bound(v) for v in upper]),
                  0, none, none, np.zeros(0))
    rows = sparse.csr_matrix(A_ub)
    r = rows.shape[0]
    if r:
        highs.addRows(r, np.full(r, -kHighsInf), np.asarray(b_ub, dtype=float), rows.nnz,
                      rows.indptr[:-1].astype(np.int32), rows.indices.astype(np.int32),
                      rows.data.astype(float))
    lower_h = sparse.csc_matrix(np.tril(np.asarray(hessian, dtype=float)))
    highs.passHessian(k, lower_h.nnz, HessianFormat.kTriangular,
                      lower_h.indptr.astype(np.int32), lower_h.indices.astype(np.int32),
                      lower_h.data.astype(float))
    highs.run()
    status = highs.getModelStatus()
    raw = highs.modelStatusToString(status)
    if status != HighsModelStatus.kOptimal:
        return _not_optimal(status, raw)
    solution = highs.getSolution()
    value = float(highs.getInfo().objective_function_value)
    duals = -np.asarray(solution.row_dual) if r else np.zeros(0)
    return LPSolution("optimal", np.array(solution.col_value), value, f"HiGHS: {raw}",
                      np.maximum(duals, 0.0), value)


def solve_milp(
    cost: np.ndarray,
    *,
    integrality: np.ndarray,
    bounds: Any,
    constraints: Any,
    time_limit: float,
) -> LPSolution:
    """A MILP through `scipy.optimize.milp` (HiGHS): the optimum, or the best point in time."""
    res = milp(
        cost, integrality=integrality, bounds=bounds, constraints=constraints,
        options={"time_limit": max(float(time_limit), 1e-3), "disp": False},
    )
    status = _SCIPY_STATUS.get(int(res.status), "error")
    x = None if res.x is None else np.asarray(res.x)
    value = np.inf if x is None else float(res.fun)
    raw = getattr(res, "mip_dual_bound", None)  # None when HiGHS stopped before any bound
    bound = np.nan if raw is None else float(raw)
    if status == "optimal":
        bound = value
    elif not np.isfinite(bound):
        bound = -np.inf
    return LPSolution(status, x, value, str(res.message), None, bound)


def _not_optimal(status: Any, raw: str) -> LPSolution:
    """The LPSolution of a HiGHS run that ended without an optimum (LP_STATUSES' names)."""
    names = {
        HighsModelStatus.kInfeasible: "infeasible",
        HighsModelStatus.kUnbounded: "unbounded",
        HighsModelStatus.kUnboundedOrInfeasible: "infeasible_or_unbounded",
        HighsModelStatus.kTimeLimit: "time_limit",
        HighsModelStatus.kIterationLimit: "time_limit",
    }
    return LPSolution(names.get(status, "error"), None, np.inf, f"HiGHS: {raw}")


#: HiGHS's default simplex_iteration_limit (none).
ITERATIONS_UNLIMITED = 2**31 - 1


#: The least small_matrix_value HiGHS accepts (entries below it are dropped).
SMALL_MATRIX_VALUE = 1e-12


class LiveLP:
    """An LP kept alive in one HiGHS instance, changed in place between solves.

        minimise c^T u   subject to   row_lo <= A u <= row_hi,   col_lo <= u <= col_hi.

    Bounds, costs and coefficients change without rebuilding the model, and
    each `solve` restarts the simplex from the last optimal basis: a branch and
    bound (`preimage.solvers.branch`) or a round of bound tightening changes a
    few bounds or one cost between solves and pays a few pivots for it.
    Presolve is off (it would discard the basis, and on these small dense LPs
    it removes little).
    """

    def __init__(self, cost: np.ndarray, lower: Any = -np.inf, upper: Any = np.inf) -> None:
        k = int(np.size(cost))
        self.k = k
        self.rows = 0
        self._highs = _Highs()
        self._highs.setOptionValue("output_flag", False)
        self._highs.setOptionValue("presolve", "off")
        # HiGHS drops matrix entries below this (default 1e-9): a relaxation's row whose
        # entries are small by design would be another row (`relaxation._row_factor`)
        self._highs.setOptionValue("small_matrix_value", SMALL_MATRIX_VALUE)
        none = np.zeros(0, dtype=np.int32)
        self._highs.addCols(
            k, np.asarray(cost, dtype=float), _bounds(lower, k), _bounds(upper, k),
            0, none, none, np.zeros(0),
        )

    def add_rows(self, a: Any, lower: Any, upper: Any) -> None:
        """Add the rows lower <= a u <= upper (a dense or sparse (r, k); bounds (r,) or scalars)."""
        from scipy import sparse

        rows = sparse.csr_matrix(a)
        r = rows.shape[0]
        if r == 0:
            return
        self._highs.addRows(
            r, _bounds(lower, r), _bounds(upper, r), rows.nnz,
            rows.indptr[:-1].astype(np.int32), rows.indices.astype(np.int32),
            rows.data.astype(float),
        )
        self.rows += r

    def set_cost(self, cost: np.ndarray) -> None:
        """Replace the whole objective (minimised)."""
        self._highs.changeColsCost(self.k, np.arange(self.k, dtype=np.int32),
                                   np.asarray(cost, dtype=float))

    def set_bounds(self, cols: Any, lower: Any, upper: Any) -> None:
        """Set col_lo, col_hi of the columns `cols` (indices; bounds per column or scalars)."""
        cols = np.atleast_1d(np.asarray(cols, dtype=np.int32))
        if cols.size:
            self._highs.changeColsBounds(cols.size, cols, _bounds(lower, cols.size),
                                         _bounds(upper, cols.size))

    def set_coefficient(self, row: int, col: int, value: float) -> None:
        self._highs.changeCoeff(int(row), int(col), float(value))

    def set_row_bounds(self, row: int, lower: float, upper: float) -> None:
        self._highs.changeRowBounds(int(row), _bound(lower), _bound(upper))

    def set_time_limit(self, seconds: float) -> None:
        """At most `seconds` more (HiGHS's limit counts the instance's whole run time)."""
        spent = float(self._highs.getRunTime())
        self._highs.setOptionValue("time_limit", spent + max(float(seconds), 1e-3))

    def set_tolerance(self, tolerance: float) -> None:
        """HiGHS's primal and dual feasibility tolerance (absolute)."""
        self._highs.setOptionValue("primal_feasibility_tolerance", float(tolerance))
        self._highs.setOptionValue("dual_feasibility_tolerance", float(tolerance))

    def set_primal(self, primal: bool, iterations: int | None = None) -> None:
        """Primal simplex (after cost changes: the basis stays primal feasible) or dual
        simplex (HiGHS's default; after bound changes: it stays dual feasible); with at
        most `iterations` pivots a solve (None: no limit), past which a solve is not
        optimal."""
        self._highs.setOptionValue("simplex_strategy", 4 if primal else 1)
        self._highs.setOptionValue("simplex_iteration_limit",
                                   ITERATIONS_UNLIMITED if iterations is None else int(iterations))

    def model(self) -> Any:
        """HiGHS's copy of the LP (``HighsLp``: a_matrix_, row_lower_, col_upper_, ...)."""
        return self._highs.getLp()

    def matrix(self) -> Any:
        """The constraint matrix A (scipy.sparse CSR, rows x k) as HiGHS holds it now."""
        from scipy import sparse

        lp = self._highs.getLp()
        a = lp.a_matrix_
        # (HiGHS keeps A by columns, or by rows after coefficient changes)
        by_columns = a.format_ == MatrixFormat.kColwise
        kind = sparse.csc_matrix if by_columns else sparse.csr_matrix
        starts = np.array(a.start_)[: (lp.num_col_ if by_columns else lp.num_row_) + 1]
        return kind((np.array(a.value_), np.array(a.index_), starts),
                    shape=(lp.num_row_, lp.num_col_)).tocsr()

    def solve(self) -> LPSolution:
        """Solve (warm from the last basis); the status is one of LP_STATUSES."""
        self._highs.run()
        status = self._highs.getModelStatus()
        raw = self._highs.modelStatusToString(status)
        if status == HighsModelStatus.kOptimal:
            x = np.array(self._highs.getSolution().col_value)
            value = float(self._highs.getInfo().objective_function_value)
            return LPSolution("optimal", x, value, f"HiGHS: {raw}", None, value)
        return _not_optimal(status, raw)


class RowLP:
    """min cost^T u over lower <= u <= upper (default: u free), rows added with `add`.

    HiGHS's tolerances are absolute (feasibility 1e-7, and matrix entries below
    1e-9 are dropped), so the LP is handed over equilibrated: u = scale v, each
    row divided by the largest |entry| of its coefficients on v, the cost by its
    own largest entry. ``scale`` is the magnitude of the answer expected
    (`natural_scale`); with it the same LP at 1e-30 or 1e30 times the data is
    the same problem for HiGHS. Points and values come back in u.
    """

    def __init__(
        self, cost: np.ndarray, lower: float = -np.inf, upper: float = np.inf,
        *, scale: float = 1.0,
    ) -> None:
        k = int(cost.size)
        self.k = k
        self.rows = 0
        self.scale = float(scale) if np.isfinite(scale) and scale > 0 else 1.0
        self._cost = np.asarray(cost, dtype=float)
        cost_norm = float(np.max(np.abs(self._cost), initial=0.0))
        self._highs = _Highs()
        self._highs.setOptionValue("output_flag", False)
        self._highs.setOptionValue("presolve", "off")
        none = np.zeros(0, dtype=np.int32)
        self._highs.addCols(
            k, self._cost / cost_norm if cost_norm > 0 else self._cost,
            np.full(k, _bound(lower / self.scale)), np.full(k, _bound(upper / self.scale)),
            0, none, none, np.zeros(0),
        )

    def add(self, a: np.ndarray, upper: np.ndarray, lower: np.ndarray | None = None) -> None:
        """Add the rows lower <= a (r, k) u <= upper (r,) (dense; lower defaults to -inf)."""
        r = int(a.shape[0])
        if r == 0:
            return
        coef = np.asarray(a, dtype=float) * self.scale
        norm = np.max(np.abs(coef), axis=1, initial=0.0)
        norm = np.where(norm > 0, norm, 1.0)[:, None]
        up = np.asarray(upper, dtype=float)[:, None] / norm
        low = (np.full((r, 1), -np.inf) if lower is None
               else np.asarray(lower, dtype=float)[:, None] / norm)
        self._highs.addRows(
            r,
            np.where(np.isfinite(low[:, 0]), low[:, 0], -kHighsInf),
            np.where(np.isfinite(up[:, 0]), up[:, 0], kHighsInf),
            r * self.k,
            np.arange(0, r * self.k, self.k, dtype=np.int32),
            np.tile(np.arange(self.k, dtype=np.int32), r),
            np.ascontiguousarray(coef / norm).ravel(),
        )
        self.rows += r

    def solve(self) -> LPSolution:
        """Solve (warm from the last basis); the status is one of LP_STATUSES."""
        self._highs.run()
        status = self._highs.getModelStatus()
        raw = self._highs.modelStatusToString(status)
        if status == HighsModelStatus.kOptimal:
            x = np.array(self._highs.getSolution().col_value) * self.scale
            value = float(self._cost @ x)
            return LPSolution("optimal", x, value, f"HiGHS: {raw}", None, value)
        return _not_optimal(status, raw)


def natural_scale(a: np.ndarray, b: np.ndarray, point: np.ndarray | None = None) -> float:
    """The magnitude of points of {u : a u <= b}, for `RowLP`'s ``scale``: that of a
    `point` of the problem's own (such as the least-norm solution of the equalities)
    where it is nonzero, else the median of |b_r| / max_j |a_rj| (1e-300 at least)."""
    size = 0.0 if point is None else float(np.max(np.abs(point), initial=0.0))
    if size > 0:
        return size
    norms = np.max(np.abs(a), axis=1, initial=0.0) if a.size else np.zeros(0)
    ratio = np.abs(b[norms > 0]) / norms[norms > 0]
    ratio = ratio[ratio > 0]
    return max(float(np.median(ratio)) if ratio.size else 0.0, 1e-300)


def _bound(value: float) -> float:
    """HiGHS's infinity for an infinite bound."""
    if np.isinf(value):
        return kHighsInf if value > 0 else -kHighsInf
    return float(value)


def _bounds(values: Any, n: int) -> np.ndarray:
    """n bounds (a scalar broadcast, or an array) with HiGHS's infinity for infinite ones."""
    arr = np.broadcast_to(np.asarray(values, dtype=float), (n,))
    return np.clip(arr, -kHighsInf, kHighsInf)
