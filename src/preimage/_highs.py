"""An LP that grows by rows: HiGHS kept alive between solves (warm dual simplex).

    minimise c^T u   subject to   lower_r <= a_r u <= upper_r  for the rows added so far,
                                  lo <= u <= hi.

Row generation (`layer_inversion._polyhedron_lp`) solves a relaxation with
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

import numpy as np
from highspy._core import HighsModelStatus, _Highs, kHighsInf


class RowLP:
    """min cost^T u over lower <= u <= upper (default: u free), rows added with `add`."""

    def __init__(
        self, cost: np.ndarray, lower: float = -np.inf, upper: float = np.inf
    ) -> None:
        k = int(cost.size)
        self.k = k
        self.rows = 0
        self._highs = _Highs()
        self._highs.setOptionValue("output_flag", False)
        self._highs.setOptionValue("presolve", "off")
        none = np.zeros(0, dtype=np.int32)
        self._highs.addCols(
            k, np.asarray(cost, dtype=float), np.full(k, _bound(lower)), np.full(k, _bound(upper)),
            0, none, none, np.zeros(0),
        )

    def add(self, a: np.ndarray, upper: np.ndarray, lower: np.ndarray | None = None) -> None:
        """Add the rows lower <= a (r, k) u <= upper (r,) (dense; lower defaults to -inf)."""
        r = int(a.shape[0])
        if r == 0:
            return
        low = np.full(r, -kHighsInf) if lower is None else np.asarray(lower, dtype=float)
        self._highs.addRows(
            r,
            low,
            np.asarray(upper, dtype=float),
            r * self.k,
            np.arange(0, r * self.k, self.k, dtype=np.int32),
            np.tile(np.arange(self.k, dtype=np.int32), r),
            np.ascontiguousarray(a, dtype=float).ravel(),
        )
        self.rows += r

    def solve(self) -> tuple[str, np.ndarray | None]:
        """("optimal", u), ("infeasible" | "unbounded" | "unbounded_or_infeasible", None),
        or (HiGHS's status name, None) when it stopped for another reason."""
        self._highs.run()
        status = self._highs.getModelStatus()
        if status == HighsModelStatus.kOptimal:
            return "optimal", np.array(self._highs.getSolution().col_value)
        names = {
            HighsModelStatus.kInfeasible: "infeasible",
            HighsModelStatus.kUnbounded: "unbounded",
            HighsModelStatus.kUnboundedOrInfeasible: "unbounded_or_infeasible",
        }
        return names.get(status, self._highs.modelStatusToString(status)), None


def _bound(value: float) -> float:
    """HiGHS's infinity for an infinite bound."""
    if np.isinf(value):
        return kHighsInf if value > 0 else -kHighsInf
    return float(value)
