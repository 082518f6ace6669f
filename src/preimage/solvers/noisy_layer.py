"""One layer of a noisy observation: the l_inf / l_1 LPs, the l_2 QP, tau and error bounds.

Model: x = G(z) + e (Lei et al. 2019). One ReLU layer y = relu(W h + b) + e is inverted by
splitting its units with a threshold tau into "on" units A = {i : y_i > tau}
(two-sided misfit) and "off" units I (one-sided: a unit that reads about 0
only says w_i h + b_i <= y_i + slack), and minimising the misfit

    r_i(h) = w_i h + b_i - y_i        (i in A)
    r_i(h) = max(w_i h + b_i - y_i, 0) (i in I)

in one of three norms (h >= 0 when h is itself a ReLU output):

- ``"linf"``: min t  s.t. |r_i| <= t on A, r_i <= t on I          (an LP)
- ``"l1"``:   min sum_i s_i  s.t. |r_i| <= s_i on A, r_i <= s_i on I (an LP)
- ``"l2"``:   min sum_A r_i^2 + sum_I max(r_i, 0)^2                (a convex QP,
  solved by active-set non-negative least squares, `_solve_l2`).

Bijective activations (LeakyReLU, identity, tanh, sigmoid) are undone
elementwise first and leave A = all units, each row weighted by the
activation's slope there (d act / d pre: the misfit stays in the units of y).
Each layer's estimate becomes the observation of the layer below, down to z
(`preimage.methods.noisy`).

Choosing tau (only from what is observable)
    The smallest tau on a geometric ladder at which the fit is *consistent
    with its own split*: the re-forwarded output differs from y by at most
    tau on every unit, ``|act(W h_tau + b) - y|_inf <= tau`` (then every "on"
    unit's fitted pre-activation is positive). Too small a tau forces units
    that only carry noise to be fitted two-sidedly and the misfit jumps far
    above tau; past the noise floor the fit is good over a wide range of tau.
    The ladder starts at twice the noise floor read off the data (negative
    outputs of a ReLU are pure noise: ``floor = max(-min(y), 0)``), or at
    ``TAU_START`` times the data scale, and grows by ``TAU_GROWTH`` while at
    least n units (the input width) stay on: past that the split leaves the
    layer under-determined and consistency becomes trivial (all units off fit
    anything). When no rung is consistent
    the fit with the smallest re-forwarded misfit is kept and the layer is
    "failed". When fewer than n units stand above the floor, the "on" rows leave
    h under-determined and (h >= 0) the sparsest near-optimal fit is taken
    (NOTES-math section 3), as in the exact method. The true hidden activations
    are never used.

Error bounds (../NOTES-math.md section 4, for all three norms)
    Given a bound on the observation's error e (a per-unit box ``|e_i| <=
    beta_i`` and ``||e||_2``, ``||e||_1`` bounds, `NoiseBound`), the units
    S = {i : y_i > beta_i} are certainly active in the truth h*, so
    W_S h* + b_S = y_S - e_S. With r = W_S h_hat + b_S - y_S the fit's residual
    and W_S of full column rank,

        h_hat - h* = W_S^+ (r + e_S),

    so  |h_hat - h*|_j <= |W_S^+ r|_j + min(|W_S^+|_j. beta_S,
    ||(W_S^+)_j.||_2 ||e_S||_2, max_i |W_S^+|_ji ||e_S||_1)  and
    ||h_hat - h*||_2 <= ||W_S^+ r||_2 + min(||e_S||_2 / sigma_min(W_S),
    || |W_S^+| beta_S ||_2, max_i ||(W_S^+)_.i||_2 ||e_S||_1)  (`propagate_bound`).
    The error of h_hat is the next layer's noise: the bounds compose down to
    z. They hold for any h_hat (whatever tau or norm produced it); when W_S is
    rank deficient the bound is infinite.

Tolerances: each layer's data are divided by their scale max(|y - b|_inf)
before HiGHS sees them (its feasibility tolerances are absolute), and set to
``LP_TOL``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import minimize, nnls

from preimage.model.layer import Layer, check_layer_input
from preimage.model.operators import dense
from preimage.model.validation import check_choice, check_positive
from preimage.results import LP_TOL, NORMS
from preimage.solvers.highs import solve_lp

#: The tau ladder: first rung (times the data scale) when y shows no noise floor.
TAU_START = 1e-7
#: The tau ladder: ratio between rungs.
TAU_GROWTH = 4.0

_TINY = 1e-300


@dataclass(frozen=True)
class NoiseBound:
    """A bound on an observation error e of shape (m,).

    Attributes
    ----------
    box : ndarray of shape (m,)
        |e_i| <= box_i.
    l2 : float
        ||e||_2 <= l2.
    l1 : float
        ||e||_1 <= l1.
    """

    box: np.ndarray
    l2: float
    l1: float

    @classmethod
    def from_level(cls, norm: str, level: float, m: int, floor: float = 0.0) -> NoiseBound:
        """The bound implied by ||e||_norm <= level for e of length m, plus an error of at
        most `floor` in every coordinate (the data's own rounding: `data_floor`)."""
        if norm == "linf":
            box, l2, l1 = level, np.sqrt(m) * level, m * level
        elif norm == "l1":
            box, l2, l1 = level, level, level
        else:
            box, l2, l1 = level, level, np.sqrt(m) * level
        return cls(np.full(m, box + floor), float(l2 + np.sqrt(m) * floor),
                   float(l1 + m * floor))

    @classmethod
    def unbounded(cls, m: int) -> NoiseBound:
        return cls(np.full(m, np.inf), np.inf, np.inf)

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.l2))


@dataclass
class NoisyLayerResult:
    """The outcome of one noisy layer fit for one sample.

    Attributes
    ----------
    h : ndarray of shape (n,)
        The estimate of the layer's input (NaN when the solver failed).
    status : "feasible" or "failed"
        "feasible": the fit is consistent with its split (or tau was given);
        "failed": no tau on the ladder gave a consistent fit (h is the best
        one tried) or the solver failed (h is NaN).
    message : str
    tau : float
        The threshold used (absolute, in the units of y).
    misfit : float
        The optimal value: ||r(h)||_norm over the split (see the module docstring).
    residual : float
        |act(W h + b) - y|_inf, the re-forwarded misfit.
    n_active : int
        Number of "on" units.
    rank : int
        Rank of W_A.
    sigma_min : float
        Smallest nonzero singular value of W_A.
    n_solves : int
        Number of LPs / QPs solved (tau ladder rungs).
    time : float
    """

    h: np.ndarray
    status: str
    message: str
    tau: float
    misfit: float
    residual: float
    n_active: int
    rank: int
    sigma_min: float
    n_solves: int = 1
    time: float = 0.0


# --- the three fits ------------------------------------------------------------------
# All take the split data  w_on (p, n), r_on (p,), w_off (q, n), r_off (q,)  with
# r = y - b scaled to max |r| <= 1, and return (h, optimal value, message); h is None
# when the solver failed.


def _bounds(n: int, nonneg: bool) -> list[tuple[float | None, float | None]]:
    return [(0.0, None) if nonneg else (None, None)] * n


def _solve_linf(
    w_on: np.ndarray,
    r_on: np.ndarray,
    w_off: np.ndarray,
    r_off: np.ndarray,
    nonneg: bool,
    sparsest: bool = False,
) -> tuple[np.ndarray | None, float, str]:
    """min t  s.t.  -t <= W_A h - r_A <= t,  W_I h - r_I <= t,  t >= 0.

    Variables x = (h, t), n + 1 of them.
    """
    p, n = w_on.shape
    q = w_off.shape[0]
    a_ub = np.vstack(
        [
            np.hstack([w_on, -np.ones((p, 1))]),
            np.hstack([-w_on, -np.ones((p, 1))]),
            np.hstack([w_off, -np.ones((q, 1))]),
        ]
    )
    b_ub = np.concatenate([r_on, -r_on, r_off])
    cost = np.zeros(n + 1)
    cost[-1] = 1.0
    return _two_stage(
        cost, a_ub, b_ub, [*_bounds(n, nonneg), (0.0, None)], n, sparsest, "l_inf"
    )


def _solve_l1(
    w_on: np.ndarray,
    r_on: np.ndarray,
    w_off: np.ndarray,
    r_off: np.ndarray,
    nonneg: bool,
    sparsest: bool = False,
) -> tuple[np.ndarray | None, float, str]:
    """min 1^T s  s.t.  -s_A <= W_A h - r_A <= s_A,  W_I h - r_I <= s_I,  s >= 0.

    Variables x = (h, s_A, s_I), n + p + q of them (sparse identity blocks).
    """
    p, n = w_on.shape
    q = w_off.shape[0]
    eye_p, eye_q = sparse.eye(p, format="csr"), sparse.eye(q, format="csr")
    zeros_pq, zeros_qp = sparse.csr_matrix((p, q)), sparse.csr_matrix((q, p))
    a_ub = sparse.vstack(
        [
            sparse.hstack([sparse.csr_matrix(w_on), -eye_p, zeros_pq]),
            sparse.hstack([sparse.csr_matrix(-w_on), -eye_p, zeros_pq]),
            sparse.hstack([sparse.csr_matrix(w_off), zeros_qp, -eye_q]),
        ],
        format="csr",
    )
    b_ub = np.concatenate([r_on, -r_on, r_off])
    cost = np.concatenate([np.zeros(n), np.ones(p + q)])
    return _two_stage(
        cost, a_ub, b_ub, [*_bounds(n, nonneg)] + [(0.0, None)] * (p + q), n, sparsest, "l_1"
    )


def _two_stage(
    cost: np.ndarray,
    a_ub: Any,
    b_ub: np.ndarray,
    bounds: list[tuple[float | None, float | None]],
    n: int,
    sparsest: bool,
    name: str,
) -> tuple[np.ndarray | None, float, str]:
    """Minimise the misfit; then, if `sparsest`, minimise 1^T h among (near-)optimal fits.

    The second stage (NOTES-math section 3) adds the row cost^T x <= value (1 + 1e-7)
    + 1e-10 and the objective 1^T h: when the "on" rows leave h under-determined,
    the sparsest point, not an arbitrary vertex, is passed down.
    """
    first = solve_lp(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, tolerance=LP_TOL)
    if first.x is None:
        return None, np.inf, f"HiGHS did not solve the {name} LP ({first.status}: {first.message})"
    x, value = first.x, first.value
    message = f"{name} LP solved (HiGHS: optimal)"
    if sparsest:
        a2 = sparse.vstack([sparse.csr_matrix(a_ub), sparse.csr_matrix(cost)], format="csr")
        b2 = np.append(b_ub, value * (1 + 1e-7) + 1e-10)
        cost2 = np.zeros_like(cost)
        cost2[:n] = 1.0
        second = solve_lp(cost2, A_ub=a2, b_ub=b2, bounds=bounds, tolerance=LP_TOL)
        if second.x is not None:
            x = second.x
            message += ", then the sparsest of its near-optimal points"
    return x[:n], value, message


def _least_squares(a: np.ndarray, r: np.ndarray, nonneg: bool) -> np.ndarray:
    """argmin ||a h - r||_2 (h >= 0 with `nonneg`), the least-norm one: 0 with no rows
    (scipy's nnls returns uninitialised memory for a matrix of no rows)."""
    if a.shape[0] == 0:
        return np.zeros(a.shape[1])
    if nonneg:
        return nnls(a, r, maxiter=50 * a.shape[1])[0]
    return np.linalg.lstsq(a, r, rcond=None)[0]


def _solve_l2(
    w_on: np.ndarray,
    r_on: np.ndarray,
    w_off: np.ndarray,
    r_off: np.ndarray,
    nonneg: bool,
    sparsest: bool = False,
    max_iter: int = 50,
) -> tuple[np.ndarray | None, float, str]:
    """min f(h) = ||W_A h - r_A||^2 + ||max(W_I h - r_I, 0)||^2  (h >= 0 optional).

    f is convex, piecewise quadratic and C^1. Active set: with V the off rows
    violated at h, the next point minimises the quadratic ||W_A h - r_A||^2 +
    ||W_V h - r_V||^2 (non-negative least squares when h >= 0), then a halving
    line search keeps f decreasing (the finite Newton method of Keerthi and
    DeCoste). Stops when V repeats; an L-BFGS-B polish follows if the KKT
    conditions are not met. (No sparsest stage: an under-determined layer keeps
    the non-negative least-squares point, itself sparse.)
    """

    def f(h: np.ndarray) -> float:
        return float(
            np.sum((w_on @ h - r_on) ** 2) + np.sum(np.maximum(w_off @ h - r_off, 0.0) ** 2)
        )

    def grad(h: np.ndarray) -> np.ndarray:
        return 2 * (w_on.T @ (w_on @ h - r_on) + w_off.T @ np.maximum(w_off @ h - r_off, 0.0))

    h = _least_squares(w_on, r_on, nonneg)
    fh = f(h)
    previous = None
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007
        violated = w_off @ h - r_off > 0
        key = violated.tobytes()
        if key == previous:
            break
        previous = key
        a = np.vstack([w_on, w_off[violated]])
        r = np.concatenate([r_on, r_off[violated]])
        target = _least_squares(a, r, nonneg)
        step = 1.0
        while step > 1e-8:
            trial = h + step * (target - h)
            ft = f(trial)
            if ft <= fh:
                h, fh = trial, ft
                break
            step /= 2
    g = grad(h)
    scale = max(1.0, float(np.linalg.norm(g, np.inf)), float(np.sqrt(fh)))
    kkt = np.abs(np.where(h > 1e-12, g, np.minimum(g, 0.0)) if nonneg else g)
    message = f"l_2 QP solved by active-set least squares ({iterations} iterations)"
    if kkt.max(initial=0.0) > 1e-7 * scale:
        res = minimize(
            f, h, jac=grad, method="L-BFGS-B", bounds=_bounds(len(h), nonneg),
            options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12},
        )
        if res.fun <= fh:
            h, fh = np.asarray(res.x), float(res.fun)
        message += ", polished by L-BFGS-B"
    return h, float(np.sqrt(fh)), message


_SOLVERS = {"linf": _solve_linf, "l1": _solve_l1, "l2": _solve_l2}


def _fit(
    layer: Layer, y: np.ndarray, tau: float, norm: str, nonneg: bool
) -> tuple[np.ndarray | None, float, str, np.ndarray]:
    """One fit at a given tau; returns (h, misfit, message, on-mask)."""
    m, _ = layer.weight.shape
    b = layer.bias_or_zero()
    w = dense(layer.weight)
    if layer.activation.is_bijective:
        # Fit pre-activations, each row weighted by d act / d pre there, so the
        # misfit is measured in the units of y (a LeakyReLU's negative side
        # magnifies the noise by 1 / slope: those rows count less).
        on = np.ones(m, dtype=bool)
        r = layer.activation.clipped_inverse(y) - b
        d = layer.activation.slope(y)
        w, r = w * d[:, None], r * d
    else:
        on = y > tau
        r = y - b
    scale = max(float(np.max(np.abs(r))), _TINY)
    w_on = w[on]
    under = w_on.shape[0] < w.shape[1] or (
        np.linalg.matrix_rank(w_on) < w.shape[1] if w_on.size else True
    )
    h, value, message = _SOLVERS[norm](
        w_on, r[on] / scale, w[~on], r[~on] / scale, nonneg, nonneg and under
    )
    if h is None:
        return None, np.inf, message, on
    return h * scale, value * scale, message, on


def invert_layer_noisy(
    layer: Layer,
    y: np.ndarray,
    *,
    norm: str = "linf",
    tau: float | None = None,
    nonneg: bool = False,
    rtol: float = 1e-9,
    keep_rank: bool = False,
) -> NoisyLayerResult:
    """Fit h to a noisy observation y ~ act(W h + b) of one layer.

    Parameters
    ----------
    layer : Layer
        y = act(W h + b) + e, W of shape (m, n).
    y : ndarray of shape (m,)
        The noisy observation.
    norm : "linf", "l1" or "l2"
        The misfit minimised (module docstring).
    tau : float, optional
        The on/off threshold (absolute). Default: the smallest consistent rung
        of the tau ladder (module docstring). Ignored for bijective activations.
    nonneg : bool
        Whether h is known to be >= 0 (it is the output of a ReLU).
    rtol : float
        Relative floor of the ladder: tau >= rtol * max|y|.
    keep_rank : bool
        Start the ladder low enough that n units are on even when fewer stand
        above the noise floor (for observations far from the range, such as
        the gradient steps of PGD, whose "noise floor" buries the signal).

    Returns
    -------
    NoisyLayerResult
    """
    start = time.perf_counter()
    y, rtol = check_layer_input(layer, y, nonneg, rtol)
    check_choice(norm, "norm", NORMS)
    if tau is not None:
        tau = check_positive(tau, "tau", allow_zero=True)
    n = layer.in_width
    scale = max(float(np.max(np.abs(y))), _TINY)
    if layer.activation.is_bijective:
        ladder = [0.0]
    elif tau is not None:
        ladder = [float(tau)]
    else:
        floor = max(-float(np.min(y)), 0.0)
        first = max(2.0 * floor, TAU_START * scale, rtol * scale)
        # With keep_rank (or when no unit at all would be on), start low enough
        # that n units are on: tau below the (n+1)-th largest output.
        top = np.sort(y)[::-1]
        if (keep_rank or not np.any(y > first)) and len(top) > n and top[n] > 0:
            first = min(first, float(top[n]))
        ladder = [first]
        while ladder[-1] * TAU_GROWTH < scale:
            ladder.append(ladder[-1] * TAU_GROWTH)
    best: tuple[float, float, np.ndarray, float, str, np.ndarray] | None = None
    solves = 0
    consistent = False
    for rung, t in enumerate(ladder):
        on_count = int(np.sum(y > t)) if not layer.activation.is_bijective else len(y)
        if rung > 0 and on_count < n:
            break  # fewer on units than unknowns: higher rungs only lose information
        h, value, message, on = _fit(layer, y, t, norm, nonneg)
        solves += 1
        if h is None:
            continue
        if nonneg:
            h = np.maximum(h, 0.0)
        residual = float(np.max(np.abs(layer.forward(h[None])[0] - y)))
        if best is None or residual < best[0]:
            best = (residual, value, h, t, message, on)
        if len(ladder) == 1 or residual <= t * (1 + 1e-9) + rtol * scale:
            best = (residual, value, h, t, message, on)
            consistent = True
            break
    if best is None:
        return NoisyLayerResult(
            np.full(n, np.nan), "failed", "the solver failed at every tau tried", np.nan,
            np.inf, np.nan, 0, 0, np.nan, solves, time.perf_counter() - start,
        )
    residual, value, h, t, message, on = best
    w_on = dense(layer.weight)[on]
    s = np.linalg.svd(w_on, compute_uv=False) if w_on.size else np.zeros(0)
    rank = int(np.sum(s > s[0] * max(w_on.shape) * np.finfo(float).eps)) if s.size else 0
    sigma_min = float(s[rank - 1]) if rank else np.nan
    if consistent:
        status = "feasible"
        verdict = f"{message}; tau = {t:.3g} ({int(on.sum())} units on)"
    else:
        status = "failed"
        verdict = (
            f"{message}; no tau gave a fit consistent with its split (best |act(Wh+b) - y|_inf "
            f"= {residual:.3g} at tau = {t:.3g})"
        )
    return NoisyLayerResult(
        h, status, verdict, t, value, residual, int(on.sum()), rank, sigma_min, solves,
        time.perf_counter() - start,
    )


def propagate_bound(
    layer: Layer, y: np.ndarray, h: np.ndarray, bound: NoiseBound
) -> NoiseBound:
    """A bound on h - h* from a bound on the observation error of y = act(W h* + b) + e.

    Parameters
    ----------
    layer : Layer
    y : ndarray of shape (m,)
        The observation the estimate was fitted to.
    h : ndarray of shape (n,)
        The estimate (any point).
    bound : NoiseBound
        |e| bounds for y.

    Returns
    -------
    NoiseBound on the input error h - h* (infinite when W_S is rank deficient;
    see the module docstring for S and the formula).
    """
    m, n = layer.weight.shape
    if not bound.finite or not np.all(np.isfinite(h)):
        return NoiseBound.unbounded(n)
    b = layer.bias_or_zero()
    w = dense(layer.weight)
    # Rounding in w_i h + b_i - y_i: a few ulps of its terms.
    rounding = 8 * np.finfo(float).eps * (np.abs(w) @ np.abs(h) + np.abs(b) + np.abs(y))
    act = layer.activation
    if act.is_bijective:
        if act.kind not in ("identity", "leaky_relu"):
            return NoiseBound.unbounded(n)  # tanh / sigmoid: the inverse is not Lipschitz
        # |act^{-1}(y) - pre*| <= |e| where y >= |e| (both on the positive side), and
        # <= |e| / slope otherwise.
        slope = 1.0 if act.kind == "identity" else act.negative_slope
        gain = np.where(y >= bound.box, 1.0, max(1.0, 1.0 / slope))
        safe = np.ones(m, dtype=bool)
        target = act.inverse(y)
    else:
        gain = np.ones(m)
        safe = y > bound.box
        target = y
    box = gain[safe] * bound.box[safe] + rounding[safe]
    worst = float(np.max(gain[safe], initial=1.0))
    e2 = min(worst * bound.l2, float(np.linalg.norm(box))) + float(np.linalg.norm(rounding[safe]))
    e1 = min(worst * bound.l1, float(np.sum(box))) + float(np.sum(rounding[safe]))
    w_s = w[safe]
    if w_s.shape[0] < n:
        return NoiseBound.unbounded(n)
    u, s, vt = np.linalg.svd(w_s, full_matrices=False)
    if s[-1] <= s[0] * max(w_s.shape) * np.finfo(float).eps:
        return NoiseBound.unbounded(n)
    pinv = (vt.T / s) @ u.T  # (n, |S|)
    shift = pinv @ (w_s @ h + b[safe] - target[safe])
    abs_pinv = np.abs(pinv)
    coord = np.abs(shift) + np.minimum.reduce(
        [
            abs_pinv @ box,
            np.linalg.norm(pinv, axis=1) * e2,
            abs_pinv.max(axis=1) * e1,
        ]
    )
    l2 = float(np.linalg.norm(shift)) + min(
        e2 / s[-1],
        float(np.linalg.norm(abs_pinv @ box)),
        float(np.linalg.norm(pinv, axis=0).max()) * e1,
    )
    l2 = min(l2, float(np.linalg.norm(coord)))
    l1 = min(float(np.sum(coord)), np.sqrt(n) * l2)
    return NoiseBound(coord, l2, l1)


