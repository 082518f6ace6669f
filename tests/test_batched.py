"""The batched path gives the answers of the one-sample reference path."""

from __future__ import annotations

import numpy as np
import pytest

import preimage
from preimage import GlobalSettings, invert, random_network
from preimage.methods.batched import checks, context, gram, square


def rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-300)


def assert_same_answers(
    net: preimage.Network, x: np.ndarray, z_rtol: float = 1e-9, **kwargs: object
) -> tuple[preimage.InversionResult, preimage.InversionResult]:
    fast = invert(net, x, **kwargs)  # type: ignore[arg-type]
    ref = invert(net, x, batched=False)
    assert list(fast.status) == list(ref.status)
    assert np.array_equal(fast.success, ref.success)
    for a, b in zip(fast.layers, ref.layers, strict=True):
        assert list(a.status) == list(b.status)
        assert np.array_equal(a.n_active, b.n_active)
        assert np.array_equal(a.rank, b.rank)
        assert np.array_equal(a.used_lp, b.used_lp)
    unique = np.asarray(ref.status) == "unique"
    assert np.all(rel(fast.z[unique], ref.z[unique]) < z_rtol)
    failed = ~np.asarray(ref.success)
    assert np.isnan(fast.z[failed]).all()
    for status, m_fast, m_ref in zip(ref.status, fast.message, ref.message, strict=True):
        if status in ("unique", "infeasible"):
            assert m_fast == m_ref
    return fast, ref


def test_full_rank_batch_matches_reference_and_truth(rng: np.random.Generator) -> None:
    net = random_network([20, 100, 500], seed=0)
    z = rng.standard_normal((40, 20))
    fast, _ = assert_same_answers(net, net.forward(z))
    assert fast.counts() == {"unique": 40}
    assert np.all(rel(fast.z, z) < 1e-12)
    # the batched path solved every layer itself: no LP, sigma_min not computed
    for report in fast.layers:
        assert not report.used_lp.any()
        assert np.isnan(report.sigma_min).all()
        assert (report.time >= 0).all()


def test_rank_deficient_layers_match_reference() -> None:
    """[70, 125, 300]: the latent layer is often rank-deficient (null space, certificate)."""
    net = random_network([70, 125, 300], seed=3)
    z = np.random.default_rng(3).standard_normal((5, 70))
    fast, ref = assert_same_answers(net, net.forward(z))
    assert (ref.layers[0].rank < 70).any()  # the case this test is about
    assert not fast.layers[1].used_lp.any()
    for i in np.flatnonzero(np.asarray(fast.status) == "non_unique"):
        assert rel(net.forward(fast.witness[i]), net.forward(fast.z[i])) < 1e-8


@pytest.mark.parametrize(
    ("widths", "activation", "bias"),
    [
        ([10, 50, 200], "relu", True),
        ([8, 40, 160], "leaky_relu", True),
        ([6, 30, 120], "sigmoid", False),
        ([6, 30, 120], "tanh", True),
    ],
)
def test_other_layers_match_reference(
    widths: list[int], activation: str, bias: bool, rng: np.random.Generator
) -> None:
    net = random_network(widths, activation=activation, bias=bias, seed=4)  # type: ignore[arg-type]
    z = rng.standard_normal((12, widths[0]))
    fast, _ = assert_same_answers(net, net.forward(z))
    unique = np.asarray(fast.status) == "unique"
    assert unique.sum() >= 10
    assert np.all(rel(fast.z[unique], z[unique]) < 1e-9)


def test_infeasible_and_valid_samples_in_one_batch(rng: np.random.Generator) -> None:
    net = random_network([20, 100, 500], seed=0)
    x = net.forward(rng.standard_normal((6, 20)))
    x[1] += np.where(x[1] > 0, 1e-3 * rng.standard_normal(500), 0.0)  # off the range
    x[3, np.argmin(x[3])] = -1.0  # a negative ReLU output
    x[4, np.argmax(x[4])] = 0.0  # an inactive unit the active ones would switch on
    fast, _ = assert_same_answers(net, x)
    assert fast.status[1] == "infeasible" and fast.status[3] == "infeasible"
    assert fast.status[0] == "unique"


def test_chunks_threads_and_progress_do_not_change_answers(rng: np.random.Generator) -> None:
    net = random_network([10, 50, 200], bias=True, seed=2)
    x = net.forward(rng.standard_normal((25, 10)))
    calls: list[tuple[int, int]] = []
    whole = invert(net, x, n_jobs=2)
    pieces = invert(net, x, batch_size=7, n_jobs=1, device="cpu",
                    progress=lambda d, t: calls.append((d, t)))
    assert list(whole.status) == list(pieces.status)
    assert np.allclose(whole.z, pieces.z, rtol=1e-12, atol=1e-14)
    assert calls == [(7, 25), (14, 25), (21, 25), (25, 25)]
    single = invert(net, x[0])
    assert single.z.shape == (10,) and single.status == "unique"


def test_float32_observations(rng: np.random.Generator) -> None:
    net = random_network([20, 100, 500], seed=1)
    z = rng.standard_normal((5, 20))
    x32 = net.forward(z).astype(np.float32)
    fast, _ = assert_same_answers(net, x32, z_rtol=1e-5)
    assert fast.rtol == pytest.approx(1e-5)
    assert np.all(rel(fast.z, z) < 1e-5)


def test_duplicate_columns_are_never_called_unique(rng: np.random.Generator) -> None:
    """W with two equal columns: W_A is always rank-deficient; the Gram certificate must see it."""
    w = rng.standard_normal((60, 8))
    w[:, 7] = w[:, 6]
    net = preimage.Network.from_weights([w], activation="leaky_relu")
    x = net.forward(rng.standard_normal((4, 8)))
    fast, _ = assert_same_answers(net, x)
    assert not np.any(np.asarray(fast.status) == "unique")
    assert (fast.layers[0].rank < 8).all()


def test_square_subset_path(monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator) -> None:
    """The path of wide layers (LU of n active rows, float32 + refinement), on a small net."""
    monkeypatch.setattr(context, "SQUARE_MIN_WIDTH", 16)
    net = random_network([12, 60, 240], seed=5)
    z = rng.standard_normal((30, 12))
    fast, _ = assert_same_answers(net, net.forward(z), z_rtol=1e-9)
    assert fast.counts() == {"unique": 30}
    assert np.all(rel(fast.z, z) < 1e-9)
    assert not any(r.used_lp.any() for r in fast.layers)


def test_square_subset_path_wider(monkeypatch: pytest.MonkeyPatch,
                                  rng: np.random.Generator) -> None:
    """n = 256: the size where torch's batched CPU LU went wrong (pivots < 1)."""
    monkeypatch.setattr(context, "SQUARE_MIN_WIDTH", 200)
    net = random_network([32, 256, 1024], seed=6)
    z = rng.standard_normal((6, 32))
    fast, _ = assert_same_answers(net, net.forward(z), n_jobs=2)
    assert fast.counts() == {"unique": 6}
    assert np.all(rel(fast.z, z) < 1e-9)


def test_pairs_share_one_factorisation(monkeypatch: pytest.MonkeyPatch,
                                        rng: np.random.Generator) -> None:
    """A layer 4x wider than its input: most samples are solved in pairs, answers unchanged."""
    monkeypatch.setattr(context, "SQUARE_MIN_WIDTH", 16)
    calls: list[int] = []
    real = square._square_solve

    def spy(cache, rows, group, rhs, ctx):  # type: ignore[no-untyped-def]
        calls.append(rhs.shape[0] - rows.shape[0])  # samples that shared a subset
        return real(cache, rows, group, rhs, ctx)

    monkeypatch.setattr(square, "_square_solve", spy)
    net = random_network([16, 64, 256], seed=7)
    z = rng.standard_normal((40, 16))
    fast, _ = assert_same_answers(net, net.forward(z), z_rtol=1e-9)
    assert fast.counts() == {"unique": 40}
    assert np.all(rel(fast.z, z) < 1e-9)
    assert sum(calls) >= 20  # at least half of the 2 x 40 layer solves were shared


def test_pair_up_pairs_are_disjoint_and_share_n_rows(rng: np.random.Generator) -> None:
    ranked = rng.random((300, 120)) < 0.5
    pairs = square.pair_up(ranked, 30)
    assert pairs.shape[0] >= 120  # E[common] = 30: half the candidates qualify; 80% paired
    assert len(np.unique(pairs)) == pairs.size
    assert np.all((ranked[pairs[:, 0]] & ranked[pairs[:, 1]]).sum(axis=1) >= 30)
    assert np.all(pairs // square.PAIR_BLOCK == pairs[:, :1] // square.PAIR_BLOCK)
    assert square.pair_up(ranked[:1], 30).shape == (0, 2)


def test_cuda_code_path_on_the_cpu(monkeypatch: pytest.MonkeyPatch,
                                   rng: np.random.Generator) -> None:
    """The branches taken on CUDA (torch LU and Cholesky), run on the CPU."""
    monkeypatch.setattr(context.Context, "on_cpu", property(lambda self: False))
    for width in (16, 10_000):  # square subsets, then normal equations
        monkeypatch.setattr(context, "SQUARE_MIN_WIDTH", width)
        net = random_network([12, 60, 240], seed=5)
        z = rng.standard_normal((10, 12))
        fast, _ = assert_same_answers(net, net.forward(z), n_jobs=1)
        assert fast.counts() == {"unique": 10}
        assert np.all(rel(fast.z, z) < 1e-9)


def test_rejected_subsets_fall_back(monkeypatch: pytest.MonkeyPatch,
                                    rng: np.random.Generator) -> None:
    """Every square subset rejected -> normal equations; every Gram rejected -> reference."""
    monkeypatch.setattr(context, "SQUARE_MIN_WIDTH", 16)
    monkeypatch.setattr(square, "KAPPA_PER_WIDTH", 1e-9)
    net = random_network([12, 60, 240], seed=5)
    x = net.forward(rng.standard_normal((8, 12)))
    fast, _ = assert_same_answers(net, x)
    assert not any(r.used_lp.any() for r in fast.layers)
    monkeypatch.setattr(gram, "GRAM_RTOL", 0.0)  # nothing passes: all via invert_layer
    fast, _ = assert_same_answers(net, x)
    assert all(np.isfinite(r.sigma_min).all() for r in fast.layers)


def test_bad_batched_arguments() -> None:
    net = random_network([10, 50, 200], seed=2)
    x = net.forward(np.ones(10))
    with pytest.raises(ValueError, match="batch_size"):
        invert(net, x, batch_size=0)
    with pytest.raises(ValueError, match="n_jobs"):
        invert(net, x, n_jobs=0)


def test_feasible_samples_match_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank-deficient top layers: "feasible" verdicts agree, and only the global search
    redoes them (not the cell search)."""
    net = random_network([20, 60, 90], seed=0)
    x = net.forward(np.random.default_rng(0).standard_normal((12, 20)))  # both kinds
    import importlib

    invert_module = importlib.import_module("preimage.methods.layerwise")
    redone: list[int] = []
    real = invert_module._invert_one

    def spy(net_, x_, rtol):  # type: ignore[no-untyped-def]
        redone.append(1)
        return real(net_, x_, rtol)

    cells = GlobalSettings(search="cells")
    monkeypatch.setattr(invert_module, "_invert_one", spy)
    fast = invert(net, x, fallback=cells)
    monkeypatch.undo()
    ref = invert(net, x, batched=False, fallback=cells)
    assert list(fast.status) == list(ref.status)
    assert "feasible" in list(fast.status)
    searched = sum("search" in m for m in fast.message)  # the samples whose layer failed
    assert any("unsettled at layer" in m for m in fast.message)
    assert len(redone) == searched  # the cell search does not redo a "feasible" sample
    assert np.allclose(fast.z, ref.z, rtol=1e-9, atol=1e-12)
    settled, settled_ref = invert(net, x), invert(net, x, batched=False)  # the global search
    assert list(settled.status) == list(settled_ref.status)
    assert set(settled.status) <= {"unique", "non_unique"}


@pytest.mark.parametrize("factor", [1.0, 1.25])
def test_downdates_over_frequent_rows_then_all_rows(
    monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator, factor: float
) -> None:
    """Downdates over the most often active rows, the rest by Gram matrices of all rows."""
    monkeypatch.setattr(gram, "FREQUENT_ROWS", factor)
    calls: list[tuple[str, int, int]] = []

    def spy(name: str) -> object:
        real = getattr(gram, name)

        def call(*args: object) -> object:
            active = args[-2]
            assert isinstance(active, np.ndarray)
            calls.append((name, *active.shape))
            return real(*args)

        return call

    for name in ("gram_solve", "_downdate_solve"):
        monkeypatch.setattr(gram, name, spy(name))
    net = random_network([20, 100, 500], seed=0)
    z = rng.standard_normal((60, 20))
    fast, _ = assert_same_answers(net, net.forward(z))
    assert fast.counts() == {"unique": 60}
    assert np.all(rel(fast.z, z) < 1e-12)
    downdates = [c for c in calls if c[0] == "_downdate_solve"]
    assert len(downdates) == 1 and downdates[0][2] < 250  # the 500-wide layer, over few rows
    full = [c for c in calls if c == ("gram_solve", c[1], 500)]
    if factor == 1.0:  # about half the samples have fewer than n rows active among them
        assert full and 10 < full[0][1] < 50
    else:
        assert not full


def test_downdate_certificate_rejects_rank_deficient_samples(rng: np.random.Generator) -> None:
    """A sample whose active rows span fewer than n directions is never solved by a downdate."""
    n = 10
    basis = rng.standard_normal((5, n))
    w = np.vstack([rng.standard_normal((30, n)), rng.standard_normal((30, 5)) @ basis])
    ctx = context.Context("cpu", 2)
    h = rng.standard_normal((3, n))
    target = h @ w.T
    active = np.ones((3, 60), dtype=bool)
    active[0, 4:30] = False  # 4 generic rows + the 5-dim subspace: rank 9 < n
    active[1, 20:30] = False  # 20 generic rows: full rank
    active[2, 40:] = False
    solved, ok = gram._downdate_solve(w, np.zeros(60), target, active, ctx)
    ctx.close()
    assert list(ok) == [False, True, True]
    assert np.allclose(solved[1:], h[1:], rtol=0, atol=1e-12)


def reference_checks(layer: preimage.Layer, h0: np.ndarray, y: np.ndarray, rtol: float) -> bool:
    """`invert_layer`'s checks of a full-rank h0 (ReLU, input h >= 0), one sample."""
    w, b = layer.weight.matrix(), layer.bias_or_zero()
    scale = max(float(np.max(np.abs(y))), float(np.max(np.abs(b))), 1e-300)
    tau = rtol * scale
    active = y > tau
    tol = rtol * (scale + float(np.max(np.abs(w) @ np.abs(h0))))
    pre = w @ h0 + b
    if np.max(np.abs(pre[active] - y[active])) > 10 * tol:
        return False
    if np.any(pre[~active] > tau + tol) or h0.min() < -tol:
        return False
    h = np.maximum(h0, 0.0)
    size = scale + float(np.max(np.abs(w) @ h))
    return float(np.max(np.abs(layer.forward(h[None])[0] - y))) <= 10 * rtol * size


def test_batched_checks_accept_only_what_the_reference_accepts(rng: np.random.Generator) -> None:
    """Perturbations of h0 around the tolerances: an accepted h0 passes `invert_layer`'s checks."""
    net = random_network([20, 100, 300], seed=1)
    layer = net.layers[1]
    rtol = 1e-9
    h_true = np.maximum(net.layers[0].forward(rng.standard_normal((200, 20))), 0.0)
    y = layer.forward(h_true)
    # each sample: one entry moved by +-10^k times rtol * |h|, k in [-3, 3]
    h0 = h_true.copy()
    rows = np.arange(200)
    cols = rng.integers(0, 100, 200)
    size = 10.0 ** rng.uniform(-3, 3, 200) * rtol * np.abs(h_true).max(axis=1)
    h0[rows, cols] += np.where(rng.random(200) < 0.5, -size, size)
    scale = np.maximum(np.abs(y).max(axis=1), np.abs(layer.bias_or_zero()).max())
    active = y > rtol * scale[:, None]
    ctx = context.Context("cpu", 1)
    ok, h, _ = checks.check(layer, ctx.layer(layer), h0, y, y, active, scale, rtol,
                               True, ctx)
    ctx.close()
    reference = np.array([reference_checks(layer, h0[k], y[k], rtol) for k in range(200)])
    assert not np.any(ok & ~reference)  # never more lenient than the reference
    assert ok.sum() >= 0.9 * reference.sum() and 20 < ok.sum() < 180  # and hardly stricter
    assert np.array_equal(h[ok], np.maximum(h0[ok], 0.0))


@pytest.mark.parametrize(("gather_cost", "packed_min"), [(1e-9, 32), (1e9, 32), (1e9, 1000)])
def test_gram_pieces_gathered_or_packed(monkeypatch: pytest.MonkeyPatch,
                                        rng: np.random.Generator, gather_cost: float,
                                        packed_min: int) -> None:
    """Gram matrices from gathered rows, from the packed table (dense Cholesky or dpptrf)."""
    monkeypatch.setattr(gram, "GATHER_COST", gather_cost)
    monkeypatch.setattr(gram, "PACKED_MIN_WIDTH", packed_min)
    monkeypatch.setattr(gram, "DOWNDATE_MAX", -1.0)  # no downdates: every sample here
    monkeypatch.setattr(gram, "GRAM_PIECE_MIN", 4)
    monkeypatch.setattr(gram, "GRAM_MEMORY", 1)  # pieces of 4 samples, sorted by |A|
    net = random_network([12, 40, 160], seed=2)
    z = rng.standard_normal((30, 12))
    fast, _ = assert_same_answers(net, net.forward(z))
    assert fast.counts() == {"unique": 30}
    assert np.all(rel(fast.z, z) < 1e-12)
    for report in fast.layers:  # solved here, not by the reference (which computes sigma_min)
        assert np.isnan(report.sigma_min).all()


@pytest.mark.parametrize("width", [5, 6, 7, 9])
def test_tiny_layers_whose_padded_downdates_exceed_their_rows(width: int) -> None:
    """|E| rounded up to DOWNDATE_PAD may exceed the rows R themselves (an IndexError once)."""
    net = random_network([2, width], seed=width)
    z = np.random.default_rng(2).standard_normal((8, 2))
    fast, _ = assert_same_answers(net, net.forward(z))
    unique = np.asarray(fast.status) == "unique"
    assert unique.any() and np.all(rel(fast.z[unique], z[unique]) < 1e-9)
