"""Gradient baselines, the pattern LP (reverse polish) and the hybrid."""

from __future__ import annotations

import numpy as np
import pytest

import preimage
from preimage import random_network
from preimage.methods.gradient import gradient_invert, latent_descent
from preimage.methods.hybrid import hybrid_invert
from preimage.methods.search import cell_walk
from preimage.model.operators import dense
from preimage.solvers.cell import activation_pattern, cell_lp
from tests.conftest import authors_state_dict


def rel_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def test_cell_lp_is_exact_in_the_true_cell(rng: np.random.Generator) -> None:
    net = random_network([10, 40, 120, 300], bias=True, seed=5)
    z = rng.standard_normal(10)
    x = net.forward(z)
    fit = cell_lp(net, x, activation_pattern(net, z))
    assert fit.misfit < 1e-10
    assert rel_rows(fit.z, z) < 1e-9
    assert fit.wall_duals is not None and len(fit.wall_duals) == 2
    # A wrong pattern: the best fit in that cell misses.
    wrong = activation_pattern(net, z)
    flip = np.flatnonzero(wrong[0])[:5]
    wrong[0][flip] = False
    assert cell_lp(net, x, wrong).misfit > 1e-6


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("first", [5, 200])
def test_cell_lp_row_generation_keeps_the_linf_optimum(
    seed: int, first: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a reference point the l_inf cell LP through a bijective output starts from the
    FIT_FIRST rows of largest misfit there (and the nearest walls), adding what its answer
    violates: the optimum of the LP over every row, however few rows it starts with."""
    import preimage.solvers.cell as cell

    monkeypatch.setattr(cell, "FIT_FIRST", first)
    rng = np.random.default_rng(seed)
    base = random_network([6, 30, 400], bias=True, seed=seed)
    net = preimage.Network.from_weights(
        [dense(layer.weight) for layer in base.layers], [layer.bias for layer in base.layers],
        activation=["relu", ("sigmoid", "tanh", "leaky_relu", "sigmoid")[seed]])
    z = rng.standard_normal(6)
    x = net.forward(z) + 0.02 * rng.uniform(-1, 1, 400)
    start = z + 0.2 * rng.standard_normal(6)
    patterns = activation_pattern(net, start)
    whole = cell_lp(net, x, patterns)
    generated = cell_lp(net, x, patterns, z_ref=start)
    assert np.isfinite(whole.misfit) and whole.misfit > 1e-3  # the noise: a real fit
    assert generated.misfit == pytest.approx(whole.misfit, rel=1e-7)
    with monkeypatch.context() as off:  # the same LP with every row from the start
        off.setattr(cell, "FIT_FIRST", 10**6)
        assert cell_lp(net, x, patterns, z_ref=start).misfit == pytest.approx(whole.misfit,
                                                                               rel=1e-7)


def test_cell_walk_turns_a_near_miss_into_an_exact_answer(rng: np.random.Generator) -> None:
    net = random_network([10, 40, 160], seed=6)
    z = rng.standard_normal(10)
    x = net.forward(z)
    start = z + 0.3 * rng.standard_normal(10)
    assert activation_pattern(net, start)[0].tolist() != activation_pattern(net, z)[0].tolist()
    fit = cell_walk(net, x, start, norm="l1", target=1e-12, max_lps=200)
    assert fit.misfit < 1e-9 and rel_rows(fit.z, z) < 1e-8
    assert fit.steps >= 1 and fit.n_lps >= 2


def test_cell_lp_rejects_a_bad_norm() -> None:
    net = random_network([4, 12], seed=0)
    with pytest.raises(ValueError, match="`norm` must be 'linf', 'l1' or 'l2'"):
        cell_lp(net, np.ones(12), [], norm="l3")


def test_gradient_methods_share_the_result_type(rng: np.random.Generator) -> None:
    net = random_network([10, 50, 200], seed=2)
    z = rng.standard_normal((3, 10))
    x = net.forward(z)
    for method, kw in [("adam", {}), ("clipping", {"bound": 3.0}), ("negation", {})]:
        res = gradient_invert(net, x, method=method, steps=50, restarts=2, **kw)
        assert res.method == method
        assert res.z.shape == (3, 10)
        assert set(res.status) <= {"feasible", "failed"}
        assert res.misfit.shape == (3,) and np.all(res.misfit >= 0)
        assert np.all(res.steps == 100) and res.time > 0
        assert np.allclose(res.misfit, np.linalg.norm(net.forward(res.z) - x, axis=1))
        assert res.layers == ()
    one = gradient_invert(net, x[0], method="clipping", steps=20, restarts=2, bound=0.5)
    assert np.all(np.abs(one.z) <= 0.5) and one.method == "clipping"
    assert isinstance(one.status, str) and isinstance(one.steps, int)


def test_negation_step_flips_a_reflected_start(rng: np.random.Generator) -> None:
    """From -z*, the negation step (taken before each gradient step) jumps to z* at once."""
    net = random_network([10, 100, 500], seed=1)
    z = rng.standard_normal((1, 10))
    x = net.forward(z)
    starts = -z[None]
    plain = latent_descent(net, x, starts=starts, optimizer="sgd", lr=0.01, steps=1)
    assert np.array_equal(starts, -z[None])  # the start array is not written to
    flipped = latent_descent(
        net, x, starts=starts, optimizer="sgd", lr=0.01, steps=1, negation=True
    )
    assert rel_rows(flipped.z[0, 0], z[0]) < 1e-6
    assert rel_rows(plain.z[0, 0], -z[0]) < 0.1
    full = gradient_invert(net, x, method="negation", steps=300, restarts=2)
    assert full.status[0] == "feasible" and rel_rows(full.z, z)[0] < 1e-6


def test_hybrid_keeps_exact_answers_and_polishes_noisy_ones(rng: np.random.Generator) -> None:
    net = random_network([10, 50, 200], seed=2)
    z = rng.standard_normal((3, 10))
    x = net.forward(z)
    exact = hybrid_invert(net, x, steps=20)
    assert list(exact.status) == ["unique"] * 3
    assert np.all(rel_rows(exact.z, z) < 1e-9)
    e = rng.uniform(-1, 1, x.shape) * 1e-3
    noisy = preimage.invert(net, x + e, noise="linf")
    hybrid = preimage.invert(
        net, x + e, method="hybrid", noise="linf", noise_level=1e-3, options={"steps": 50}
    )
    assert list(hybrid.status) == ["feasible"] * 3
    assert np.all(hybrid.misfit <= noisy.misfit * (1 + 1e-9))
    assert "best:" in hybrid.message[0]


def test_bad_baseline_arguments() -> None:
    net = random_network([4, 20], seed=0)
    x = net.forward(np.ones(4))
    with pytest.raises(ValueError, match="`lr` must be"):
        gradient_invert(net, x, lr=0)
    with pytest.raises(ValueError, match="`steps` must be an integer >= 1"):
        gradient_invert(net, x, method="negation", steps=0)
    with pytest.raises(ValueError, match=r"`bound`"):
        gradient_invert(net, x, method="clipping", bound=-1.0)
    with pytest.raises(TypeError, match=r"`bound` is a setting of method 'clipping' only"):
        gradient_invert(net, x, bound=2.0)
    with pytest.raises(TypeError, match=r"preimage\.Network"):
        hybrid_invert("net", x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"\['speed'\] are not settings of method 'adam'"):
        preimage.invert(net, x, method="adam", options={"speed": 2})


def test_decoder_noise_lps_and_hybrid_beat_adam() -> None:
    """The authors' ReLU decoder, noise 1e-3 (relative, uniform): median relative z-error."""
    sd = authors_state_dict("trained_vae_20_60_784_nobias.pth")
    net = preimage.Network.from_state_dict(sd, ["fc3", "fc4"])
    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 20))
    x = net.forward(z)
    e = rng.uniform(-1, 1, x.shape)
    e *= 1e-3 * np.linalg.norm(x, axis=1, keepdims=True) / np.linalg.norm(e, axis=1, keepdims=True)
    medians = {}
    for name, kw in [
        ("linf LP", {"method": "layerwise", "noise": "linf"}),
        ("l1 LP", {"method": "layerwise", "noise": "l1"}),
        ("descent", {"noise": "l2"}),
        ("adam", {"method": "adam", "noise": "linf"}),
        ("hybrid", {"method": "hybrid", "noise": "linf"}),
    ]:
        res = preimage.invert(net, x + e, **kw)
        medians[name] = float(np.median(rel_rows(res.z, z)))
    print("\ndecoder, noise 1e-3: " + ", ".join(f"{k} {v:.2e}" for k, v in medians.items()))
    for name in ("linf LP", "l1 LP", "hybrid", "descent"):
        assert medians[name] < medians["adam"] / 10
    assert medians["hybrid"] <= medians["linf LP"]


@pytest.mark.parametrize("method", ["adam", "clipping", "negation"])
def test_one_samples_data_does_not_change_the_others_answers(method: str) -> None:
    # clipping redrew the coordinates out of its box from one generator only when some
    # sample of the batch left it: a far-off sample 1 moved samples 0 and 2 by 0.6
    net = random_network([4, 30, 100], bias=True, seed=3)
    x = net.forward(np.random.default_rng(11).standard_normal((3, 4)))
    opts = {"steps": 200, "restarts": 2}
    ref = preimage.invert(net, x, method=method, options=opts)
    bad = x.copy()
    bad[1] = x[1] * 1e30
    res = preimage.invert(net, bad, method=method, options=opts)
    for b in (0, 2):
        assert np.array_equal(ref.z[b], res.z[b])


@pytest.mark.parametrize("kw", [
    {"method": "adam", "options": {"steps": 100, "restarts": 2}},
    {"method": "clipping", "options": {"steps": 100, "restarts": 2}},
    {"method": "hybrid", "noise": "l2"},
    {"noise": "l1", "noise_level": 0.05},
])
def test_a_samples_answer_is_the_same_alone_and_in_any_batch(kw: dict) -> None:
    # the starts were drawn as randn(restarts * B, k): sample 1 of a batch of two started
    # elsewhere than alone, and its z, misfit and z_error_bound moved by 1e-3 relative
    net = random_network([4, 20, 60], bias=True, seed=3)
    rng = np.random.default_rng(0)
    x = net.forward(rng.standard_normal((3, 4)))
    x[1] += 0.01 * rng.standard_normal(60)
    alone = preimage.invert(net, x[1], **kw)
    for batch in (x[[1, 1]], x[[0, 1]], x[[2, 0, 1]]):
        res = preimage.invert(net, batch, **kw)
        np.testing.assert_allclose(res.z[-1], alone.z, rtol=1e-9, atol=1e-12)
        if res.z_error_bound is not None:
            np.testing.assert_allclose(res.z_error_bound[-1], alone.z_error_bound, rtol=1e-9)
