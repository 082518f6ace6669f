"""Exact inversion: property tests on random networks, verdicts, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import preimage
from preimage import invert, invert_layer, random_network


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@st.composite
def expanding_nets(draw: st.DrawFn) -> tuple[preimage.Network, np.ndarray]:
    k = draw(st.integers(5, 12))
    depth = draw(st.integers(1, 3))
    widths = [k]
    for _ in range(depth):
        widths.append(widths[-1] * draw(st.integers(4, 6)))
    activation = draw(st.sampled_from(["relu", "leaky_relu"]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    net = random_network(widths, activation=activation, bias=bias, seed=seed)
    z = np.random.default_rng(seed + 1).standard_normal(k)
    return net, z


@given(expanding_nets())
def test_expanding_nets_are_inverted_exactly(case: tuple[preimage.Network, np.ndarray]) -> None:
    net, z = case
    x = net.forward(z)
    result = invert(net, x)
    # With expansion >= 4 the latent layer is identifiable unless fewer than k
    # of its units are active (probability < 1% at k >= 5); then z is truly
    # not unique and the tool must say so with a checked second preimage.
    n_active_latent = int(np.sum(net.forward_all(z)[1][0] > 0))
    if result.status == "unique":
        assert rel(result.z, z) < 1e-8
    else:
        assert net.layers[0].activation.kind == "relu" and n_active_latent < net.latent_dim
        assert result.status == "non_unique"
    assert result.success
    # A non-unique layer's LP may leave inactive units at up to rtol * scale
    # (layer_inversion's documented tolerance), so G(z) matches x to ~1e-9 there.
    assert rel(net.forward(result.z), x) < (1e-10 if result.status == "unique" else 1e-8)


@given(st.integers(0, 10_000), st.sampled_from([60, 110, 130, 160]))
def test_unique_is_never_claimed_for_a_wrong_z(seed: int, k: int) -> None:
    """[k, 250, 600]: past k ~ 125 the latent code is often not identifiable."""
    net = random_network([k, 250, 600], seed=seed)
    z = np.random.default_rng(seed).standard_normal((3, k))
    x = net.forward(z)
    result = invert(net, x)
    for i in range(3):
        assert result.status[i] != "infeasible"  # x = G(z) is in the range
        if result.status[i] == "unique":
            assert rel(result.z[i], z[i]) < 1e-8
        if result.success[i]:
            assert rel(net.forward(result.z[i]), x[i]) < 1e-8
        if result.status[i] == "non_unique":
            w = result.witness[i]
            assert rel(net.forward(w), x[i]) < 1e-8
            assert rel(w, result.z[i]) > 1e-6


def test_non_unique_latent_layer_gives_a_checked_witness() -> None:
    # k = 200 > the ~125 active units of a 250-wide layer: never identifiable.
    net = random_network([200, 250, 600], seed=0)
    z = np.random.default_rng(0).standard_normal(200)
    x = net.forward(z)
    result = invert(net, x)
    assert result.status == "non_unique"
    assert rel(net.forward(result.z), x) < 1e-8
    assert rel(net.forward(result.witness), x) < 1e-8
    assert rel(result.witness, result.z) > 1e-3
    assert result.layers[0].rank[0] < 200


def test_batch_shapes_and_reports(rng: np.random.Generator) -> None:
    net = random_network([10, 50, 200], bias=True, seed=2)
    z = rng.standard_normal((4, 10))
    result = invert(net, net.forward(z))
    assert result.z.shape == (4, 10)
    assert list(result.status) == ["unique"] * 4
    assert result.success.all()
    assert len(result.layers) == 2
    for report in result.layers:
        assert report.status.shape == (4,)
        assert (report.rank == net.layers[report.index].in_width).all()
        assert (report.time >= 0).all()
    assert result.counts() == {"unique": 4}
    single = invert(net, net.forward(z[0]))
    assert single.z.shape == (10,) and single.status == "unique"


def test_out_of_range_observations_are_infeasible(rng: np.random.Generator) -> None:
    net = random_network([20, 100, 500], seed=0)
    x = net.forward(rng.standard_normal(20))
    noisy = x + np.where(x > 0, 1e-3 * rng.standard_normal(500), 0.0)
    bad = invert(net, noisy)
    assert bad.status == "infeasible"
    assert np.isnan(bad.z).all()
    assert "not in the range" in bad.message
    negative = x.copy()
    negative[np.argmin(x)] = -1.0
    assert invert(net, negative).status == "infeasible"
    # an inactive unit that the active ones would make positive
    flipped = x.copy()
    flipped[np.argmax(x)] = 0.0
    res = invert(net, flipped)
    assert res.status in ("infeasible", "non_unique", "unique")
    if res.success:
        assert rel(net.forward(res.z), flipped) < 1e-8


def test_sigmoid_output_out_of_range_is_infeasible() -> None:
    net = preimage.Network.from_weights(
        [np.random.default_rng(0).standard_normal((12, 3))], activation="sigmoid"
    )
    x = net.forward(np.array([0.5, -1.0, 2.0]))
    assert invert(net, x).status == "unique"
    x[0] = 1.5
    assert invert(net, x).status == "infeasible"


def test_invert_layer_full_rank_and_lp_paths(rng: np.random.Generator) -> None:
    net = random_network([8, 40], seed=5)
    layer = net.layers[0]
    h = rng.standard_normal(8)
    y = layer.forward(h[None])[0]
    res = invert_layer(layer, y)
    assert res.status == "unique" and not res.used_lp
    assert rel(res.h, h) < 1e-10
    # keep only 5 active units: rank 5 < 8, the LP path runs
    y2 = y.copy()
    y2[np.argsort(-y)[5:]] = 0.0
    res2 = invert_layer(layer, y2)
    assert res2.used_lp or res2.status == "infeasible"
    if res2.h is not None and np.isfinite(res2.h).all():
        assert np.max(np.abs(layer.forward(res2.h[None])[0] - y2)) < 1e-8


def test_wide_null_space_layers_get_a_verdict() -> None:
    """A rank-deficient layer whose LP point has many zero coordinates.

    The null-space directions that keep h >= 0 have rounding-size negative
    entries on those zeros; they once capped the witness step at 0, leaving
    "feasible" (not settled) where a second preimage exists.
    """
    net = random_network([100, 500, 784], seed=0)
    hidden = net.forward_all(np.random.default_rng(1).standard_normal((6, 100)))
    layer, seen = net.layers[1], set()
    for h, y in zip(hidden[1], hidden[2], strict=True):
        res = invert_layer(layer, y, nonneg=True)
        seen.add(res.status)
        assert res.status in ("unique", "non_unique") and res.used_lp
        assert rel(res.h, h) < 1e-9  # the sparsest point is the true hidden vector here
        if res.status == "non_unique":
            assert np.max(np.abs(layer.forward(res.witness[None])[0] - y)) < 1e-8 * np.max(y)
            assert np.linalg.norm(res.witness - res.h) > 1e-3
    assert seen == {"unique", "non_unique"}


def test_float32_observations_work(rng: np.random.Generator) -> None:
    net = random_network([20, 100, 500], seed=1)
    z = rng.standard_normal(20)
    x32 = net.forward(z).astype(np.float32)
    result = invert(net, x32)
    assert result.rtol == pytest.approx(1e-5)
    assert result.status == "unique"
    assert rel(result.z, z) < 1e-5


def test_inputs_are_not_modified(rng: np.random.Generator) -> None:
    net = random_network([10, 50, 200], seed=2)
    x = net.forward(rng.standard_normal((3, 10)))
    before = x.copy()
    invert(net, x)
    assert np.array_equal(x, before)


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (np.zeros(199), ValueError, "has 199 entries"),
        (np.zeros((2, 3, 200)), ValueError, "must have shape"),
        (np.zeros((0, 200)), ValueError, "empty batch"),
        (np.full(200, np.nan), ValueError, "NaN"),
        (np.full(200, np.inf), ValueError, "inf"),
        ("abc", TypeError, "real numbers"),
    ],
)
def test_bad_observations(x: object, error: type, match: str) -> None:
    net = random_network([10, 50, 200], seed=2)
    with pytest.raises(error, match=match):
        invert(net, x)


def test_bad_arguments() -> None:
    net = random_network([10, 50, 200], seed=2)
    x = net.forward(np.ones(10))
    with pytest.raises(TypeError, match=r"preimage\.Network"):
        invert("net", x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rtol"):
        invert(net, x, rtol=-1.0)
    with pytest.raises(ValueError, match="method"):
        invert(net, x, method="magic")


@pytest.mark.parametrize(("n", "k", "inactive"), [(12, 4, 0), (200, 5, 30), (300, 60, 80)])
def test_row_generation_lp_matches_one_full_linprog(n: int, k: int, inactive: int) -> None:
    """`_polyhedron_lp` (warm row generation) reaches the optimum of the whole LP."""
    from scipy.optimize import linprog

    from preimage.solvers.layer import _polyhedron_lp

    rng = np.random.default_rng(n + k)
    null_basis = np.linalg.qr(rng.standard_normal((n, k)))[0]
    h_true = np.maximum(rng.standard_normal(n), 0.0)  # a feasible point
    h0 = h_true - null_basis @ rng.standard_normal(k)  # h_true = h0 + N u*
    w_i = rng.standard_normal((inactive, n))
    rhs = w_i @ h_true + rng.uniform(0.0, 1.0, inactive)  # slack at h_true
    h, status, message = _polyhedron_lp(h0, null_basis, w_i, rhs, nonneg=True)
    assert h is not None and status == "optimal", message
    full = linprog(
        null_basis.sum(axis=0),
        A_ub=np.vstack([w_i @ null_basis, -null_basis]),
        b_ub=np.concatenate([rhs - w_i @ h0, h0]),
        bounds=(None, None),
        method="highs",
    )
    assert full.status == 0
    assert h.min() >= -1e-9 and np.all(w_i @ h <= rhs + 1e-9)
    assert np.sum(h) == pytest.approx(np.sum(h0) + full.fun, rel=1e-9, abs=1e-9)
    # an inactive row h_0 <= -1, which no h >= 0 meets: infeasible, and said so
    w_bad = np.vstack([w_i, np.eye(1, n)])
    rhs_bad = np.concatenate([rhs, [-1.0]])
    h_bad, status, message = _polyhedron_lp(h0, null_basis, w_bad, rhs_bad, nonneg=True)
    assert h_bad is None and status == "infeasible", message


@given(
    p=st.integers(1, 60),
    k=st.integers(1, 30),
    deficiency=st.integers(0, 3),
    log_scale=st.floats(-8.0, 8.0),
    seed=st.integers(0, 2**16),
)
def test_cholesky_rank_test_never_contradicts_the_svd(
    p: int, k: int, deficiency: int, log_scale: float, seed: int
) -> None:
    """`_full_column_rank` says True only where the SVD's rank threshold counts all of M."""
    from preimage.solvers.certificate import _full_column_rank, _null_space

    rng = np.random.default_rng(seed)
    rank = max(0, min(p, k) - deficiency)
    m = rng.standard_normal((p, rank)) @ rng.standard_normal((rank, k)) * 10.0**log_scale
    s = np.linalg.svd(m, compute_uv=False)
    svd_full = p >= k and int(np.sum(s > 1e-10 * s[0] * max(p, k))) == k
    if _full_column_rank(m, 1e-10):
        assert svd_full
    null = _null_space(m)
    assert null.shape[1] == k - (int(np.sum(s > 1e-10 * max(s[0], 1e-300) * max(p, k))))
    assert np.allclose(m @ null, 0.0, atol=1e-8 * max(s[0], 1e-300))


def test_stiemke_and_witness_lps_on_known_cones() -> None:
    """{u : M u >= 0} = {0} for the rows +-e_i (certified); e_1, e_2, -e_1 leave the ray (0, 1)."""
    from preimage.solvers.certificate import _stiemke_certifies, _witness_direction

    box = np.vstack([np.eye(3), -np.eye(3)])
    assert _stiemke_certifies(box)
    simplex = np.vstack([np.eye(2), -np.ones((1, 2))])  # u1, u2 >= 0, u1 + u2 <= 0
    assert _stiemke_certifies(simplex)
    half = np.vstack([np.eye(2), [[-1.0, 0.0]]])  # u1 = 0, u2 >= 0: the ray (0, 1)
    assert not _stiemke_certifies(half)
    u = _witness_direction(half)
    assert u is not None and np.all(half @ u >= -1e-12) and np.max(half @ u) > 0.5
    assert _witness_direction(box) is None


@pytest.mark.parametrize(("a", "n", "rank"), [(30, 50, 30), (30, 50, 20), (1, 5, 1), (50, 50, 50),
                                             (80, 50, 50), (80, 50, 45)])
def test_active_equalities_qr_matches_the_svd(a: int, n: int, rank: int) -> None:
    """The QR shortcut for wide W_A gives the SVD's least-norm h0, rank and null space."""
    from preimage.solvers.layer import _active_equalities

    rng = np.random.default_rng(a * n + rank)
    w_a = rng.standard_normal((a, rank)) @ rng.standard_normal((rank, n))
    r_a = w_a @ rng.standard_normal(n)
    h0, null, got_rank, sigma_min, _ = _active_equalities(w_a, r_a)
    s = np.linalg.svd(w_a, compute_uv=False)
    assert got_rank == rank and sigma_min == pytest.approx(s[rank - 1], rel=1e-10)
    assert np.allclose(h0, np.linalg.pinv(w_a) @ r_a, atol=1e-10)
    assert null.shape == (n, n - rank)
    assert np.allclose(null.T @ null, np.eye(n - rank), atol=1e-12)
    assert np.allclose(w_a @ null, 0.0, atol=1e-10 * s[0])


def test_inner_point_lp_on_known_polyhedra() -> None:
    """Free layers: the point nearest h0 inside a box; a flat or empty P goes to the plain LP."""
    from preimage.solvers.layer import DEPTH_RTOL, _inner_point_lp, _polyhedron_lp

    n = 4
    null_basis = np.eye(n)[:, :2]  # null(W_A) = span(e_1, e_2)
    h0 = np.array([5.0, -3.0, 1.0, 2.0])
    d = DEPTH_RTOL * np.linalg.norm(h0)
    # |h_1 - 1| <= 1 and |h_2| <= 3 as four inactive rows w h <= rhs
    w_i = np.vstack([np.eye(n)[0], -np.eye(n)[0], np.eye(n)[1], -np.eye(n)[1]])
    h = _inner_point_lp(h0, null_basis, w_i, np.array([2.0, 0.0, 3.0, 3.0]))
    assert h is not None
    assert abs(h[0] - (2.0 - d)) < 1e-9  # as near h0 as depth d allows
    assert abs(h[1]) <= 3.0 - d + 1e-9 and np.array_equal(h[2:], h0[2:])  # within null(W_A)
    # h_1 <= 0 and h_1 >= 0: a segment with no point at depth d; an empty P
    flat, empty = np.array([0.0, 0.0, 3.0, 3.0]), np.array([-1.0, 0.0, 3.0, 3.0])
    assert _inner_point_lp(h0, null_basis, w_i, flat) is None
    assert _inner_point_lp(h0, null_basis, w_i, empty) is None
    # ... where the plain feasibility LP decides
    h, _, message = _polyhedron_lp(h0, null_basis, w_i, flat, nonneg=False)
    assert h is not None and abs(h[0]) < 1e-9 and abs(h[1]) <= 3 + 1e-9
    assert message == "LP solved (HiGHS: optimal)"
    h, status, message = _polyhedron_lp(h0, null_basis, w_i, empty, nonneg=False)
    assert h is None and status == "infeasible", message
    # the latent layer of a net with too few active units, where the least-norm h0
    # violates an inactive unit: the LP's deep point leaves no constraint tight, so
    # the certificate's second preimage comes along null(W_A) without another LP
    layer = random_network([20, 30], seed=4).layers[0]
    y = layer.forward(np.random.default_rng(1).standard_normal((1, 20)))[0]
    res = preimage.invert_layer(layer, y)
    assert res.used_lp and (y > 0).sum() < 20
    assert res.status == "non_unique" and res.witness is not None
    assert "inside every inactive unit" in res.message and "along null(W_A)" in res.message
    assert np.max(np.abs(layer.forward(res.witness[None])[0] - y)) <= 1e-8 * np.abs(y).max()
    assert np.linalg.norm(res.witness - res.h) > 0.1
