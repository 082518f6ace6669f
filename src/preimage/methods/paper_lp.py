"""The paper's layer-wise method as published (Lei et al. 2019), as a reference.

One feasibility LP per layer (`scipy.optimize.linprog` through
`preimage.solvers.highs.solve_lp`), no objective, no null space, no
certificate: what the benchmark (`naive-lp`) and the partial-observation
comparison measure against.
"""

from __future__ import annotations

import time

import numpy as np

from preimage.model.network import Network
from preimage.model.operators import dense
from preimage.solvers.highs import solve_lp


def paper_layerwise_lp(
    net: Network,
    x: np.ndarray,
    *,
    rtol: float = 1e-9,
    floor: float = 0.0,
    time_limit: float | None = None,
) -> tuple[np.ndarray | None, bool]:
    """Lei et al.'s layer-wise inversion as published, for one sample x (n,).

    Top down, one `linprog` per layer finds any point of
    {W_A h + b_A = y_A, W_I h + b_I <= 0, h >= 0 below the top layer}, with
    A = {i : y_i > rtol max(|y|_inf, floor)} (a LP's answer is exact only to
    HiGHS' tolerance, so the next layer needs a threshold); bijective
    activations are undone elementwise, every unit active.

    Returns (z or None, timed_out): None when a layer's LP had no answer;
    timed_out when `time_limit` seconds (for the whole sample) ran out.
    """
    start = time.perf_counter()
    h = np.asarray(x, dtype=float)
    for i in range(len(net.layers) - 1, -1, -1):
        layer = net.layers[i]
        w, b = dense(layer.weight), layer.bias_or_zero()
        nonneg = net.input_nonnegative(i)
        if layer.activation.is_bijective:
            target, active = layer.activation.inverse(h), np.ones(h.size, dtype=bool)
        else:
            target, active = h, h > rtol * max(float(np.max(np.abs(h))), floor)
        left = None
        if time_limit is not None:
            left = time_limit - (time.perf_counter() - start)
            if left <= 0:
                return None, True
        solution = solve_lp(
            np.zeros(w.shape[1]), A_ub=w[~active], b_ub=-b[~active], A_eq=w[active],
            b_eq=target[active] - b[active], bounds=(0, None) if nonneg else (None, None),
            time_limit=left,
        )
        if solution.x is None:
            return None, solution.status == "time_limit"
        h = solution.x
    return h, False
