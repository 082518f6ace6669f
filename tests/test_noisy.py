"""Noisy inversion: the layer LPs, tau selection, error bounds, scaling, statuses, bad input."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

import preimage
from preimage import random_network
from preimage.methods.noisy import invert_noisy_one
from preimage.results import CONSISTENCY, NORMS
from preimage.solvers.noisy_layer import NoiseBound, invert_layer_noisy, propagate_bound


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def noise(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    return rng.uniform(-1, 1, shape) if kind == "uniform" else rng.standard_normal(shape)


def add_noise(
    x: np.ndarray, level: float, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """x + e with ||e||_2 = level * ||x||_2 (row by row)."""
    e = noise(rng, x.shape, kind)
    e *= level * np.linalg.norm(x, axis=-1, keepdims=True) / np.linalg.norm(
        e, axis=-1, keepdims=True
    )
    return x + e, e


def split_misfit(
    layer: preimage.Layer, y: np.ndarray, h: np.ndarray, tau: float, norm: str
) -> float:
    """The quantity each layer fit minimises (module docstring of preimage.noisy)."""
    r = layer.preactivation(h[None])[0] - y
    on = y > tau
    v = np.where(on, np.abs(r), np.maximum(r, 0.0))
    return float({"linf": v.max(), "l1": v.sum(), "l2": np.linalg.norm(v)}[norm])


@pytest.mark.parametrize("norm", NORMS)
def test_layer_fit_is_exact_without_noise(norm: str, rng: np.random.Generator) -> None:
    net = random_network([8, 40, 160], seed=3)
    hs = net.forward_all(rng.standard_normal((1, 8)))
    res = invert_layer_noisy(net.layers[1], hs[2][0], norm=norm, nonneg=True)
    assert res.status == "feasible"
    assert rel(res.h, hs[1][0]) < 1e-7
    assert res.residual < 1e-7


@pytest.mark.parametrize("norm", NORMS)
def test_layer_fit_minimises_its_misfit(norm: str, rng: np.random.Generator) -> None:
    """The optimum is no worse than the true h (which is feasible for the same split)."""
    net = random_network([8, 40, 160], bias=True, seed=4)
    layer = net.layers[1]
    for _ in range(3):
        hs = net.forward_all(rng.standard_normal((1, 8)))
        y, e = add_noise(hs[2][0], 1e-2, "uniform", rng)
        tau = 2 * np.abs(e).max()
        res = invert_layer_noisy(layer, y, norm=norm, tau=tau, nonneg=True)
        assert res.tau == tau
        assert res.misfit == pytest.approx(split_misfit(layer, y, res.h, tau, norm), rel=1e-5)
        assert res.misfit <= split_misfit(layer, y, hs[1][0], tau, norm) * (1 + 1e-6)


def test_tau_ladder_starts_above_the_noise_floor(rng: np.random.Generator) -> None:
    net = random_network([20, 100, 500], seed=0)
    x = net.forward(rng.standard_normal(20))
    y, _ = add_noise(x, 1e-3, "uniform", rng)
    res = invert_layer_noisy(net.layers[1], y, nonneg=True)
    assert res.status == "feasible"
    assert res.tau >= -y.min()  # the negative outputs are pure noise
    assert res.residual <= res.tau  # consistent with its own split
    assert res.n_active >= 100


def test_noise_bound_from_level() -> None:
    b = NoiseBound.from_level("linf", 0.1, 4)
    assert b.l2 == pytest.approx(0.2) and b.l1 == pytest.approx(0.4)
    b = NoiseBound.from_level("l2", 0.1, 4)
    assert b.l2 == pytest.approx(0.1) and b.l1 == pytest.approx(0.2)
    assert not NoiseBound.unbounded(3).finite


def test_error_bounds_hold_over_random_nets() -> None:
    """Per layer and for z: the true error never exceeds the reported bound."""
    rng = np.random.default_rng(7)
    ratios = []
    finite = 0
    draws = 0
    for trial in range(24):
        widths = [6, 30, 120] if trial % 3 else [5, 25, 100, 300]
        net = random_network(widths, bias=trial % 2 == 1, seed=100 + trial)
        norm = NORMS[trial % 3]
        kind = "uniform" if trial % 4 < 2 else "gaussian"
        level = 10.0 ** rng.uniform(-5, -2)
        hs = net.forward_all(rng.standard_normal((1, widths[0])))
        x, e = add_noise(hs[-1][0], level, kind, rng)
        known = {"linf": np.abs(e).max(), "l1": np.abs(e).sum(), "l2": np.linalg.norm(e)}[norm]
        out = invert_noisy_one(net, x, norm=norm, noise_level=known)
        draws += 1
        for i in range(len(net.layers)):
            layer_res = out.layers[i]
            assert layer_res is not None
            err = np.linalg.norm(layer_res.h - hs[i][0])
            assert err <= out.bounds[i], (trial, i, err, out.bounds[i])
        if np.isfinite(out.bounds[0]):
            finite += 1
            ratios.append(np.linalg.norm(out.z - hs[0][0]) / out.bounds[0])
    assert finite >= draws * 0.75
    median = float(np.median(ratios))
    print(f"\nerror bound: {finite}/{draws} finite, median error/bound = {median:.3g}")
    assert 1e-3 < median <= 1.0


def test_propagate_bound_is_infinite_when_the_safe_rows_are_too_few() -> None:
    net = random_network([8, 40], seed=1)
    z = np.ones(8)
    y = net.forward(z)
    wide = NoiseBound.from_level("linf", 10 * y.max(), 40)  # no unit is certainly active
    assert not propagate_bound(net.layers[0], y, z, wide).finite


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_error_grows_linearly_with_the_noise(kind: str) -> None:
    """Median ||z_hat - z|| / ||z|| over noise levels 1e-6 ... 1e-1 (relative to ||x||)."""
    net = random_network([20, 100, 500], seed=0)
    rng = np.random.default_rng(11)
    z = rng.standard_normal((3, 20))
    x = net.forward(z)
    levels = 10.0 ** np.arange(-6, 0)
    medians = []
    for level in levels:
        y, _ = add_noise(x, level, kind, rng)
        res = preimage.invert(net, y, method="layerwise", noise="linf")
        assert list(res.status) == ["feasible"] * 3
        err = np.linalg.norm(res.z - z, axis=1) / np.linalg.norm(z, axis=1)
        medians.append(np.median(err))
    slope = np.polyfit(np.log10(levels), np.log10(medians), 1)[0]
    print(f"\n{kind}: median relative z-error {np.array(medians)}; log-log slope {slope:.2f}")
    assert 0.8 < slope < 1.2
    assert np.all(np.array(medians) < 10 * levels)


def test_statuses_follow_the_noise_level(rng: np.random.Generator) -> None:
    net = random_network([10, 50, 200], seed=2)
    z = rng.standard_normal((4, 10))
    x = net.forward(z)
    y, e = add_noise(x, 1e-3, "uniform", rng)
    level = float(np.abs(e).max())
    good = preimage.invert(net, y, method="layerwise", noise="linf", noise_level=level)
    assert list(good.status) == ["feasible"] * 4
    assert good.success.all()
    assert np.all(good.misfit <= CONSISTENCY * level)
    assert good.noise == "linf" and good.method == "noisy"
    assert good.z_error_bound.shape == (4,)
    assert np.all(np.linalg.norm(good.z - z, axis=1) <= good.z_error_bound)
    for report in good.layers:
        assert report.tau is not None and report.error_bound is not None
        assert np.all(report.tau > 0) and np.all(report.misfit >= 0)
    # A level far below the true noise: the misfit is inconsistent with it.
    bad = preimage.invert(net, y, method="layerwise", noise="linf", noise_level=level / 100)
    assert list(bad.status) == ["failed"] * 4
    assert np.all(np.isfinite(bad.z))  # the estimate is still returned
    assert "exceeds" in bad.message[0]
    # Without a level: an estimate, no bound, never "unique".
    free = preimage.invert(net, y[0], method="layerwise", noise="l2")
    assert free.status == "feasible" and free.z_error_bound == np.inf  # no level: no bound
    assert isinstance(free.misfit, float) and free.z.shape == (10,)


def test_noisy_inputs_are_not_modified(rng: np.random.Generator) -> None:
    net = random_network([10, 50, 200], seed=2)
    y = net.forward(rng.standard_normal((2, 10))) + 1e-3
    before = y.copy()
    preimage.invert(net, y, noise="l1")
    assert np.array_equal(y, before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"noise": "linf", "noise_level": -1.0}, ValueError, "noise_level.*>= 0"),
        ({"noise": "linf", "noise_level": np.nan}, ValueError, "noise_level"),
        ({"noise": "linf", "noise_level": "big"}, TypeError, "noise_level"),
        ({"noise": "l3"}, ValueError, "`noise` must be one of"),
        ({"noise_level": 0.1}, ValueError, "needs a noise model"),
        ({"noise": "linf", "options": {"lr": 1.0}}, TypeError, r"\['lr'\] are not settings"),
        ({"options": {"steps": 3}}, TypeError, "takes no options"),
        ({"noise": "linf", "options": [1]}, TypeError, "must be a dict"),
    ],
)
def test_bad_noise_arguments(kwargs: dict, error: type, match: str) -> None:
    net = random_network([10, 50, 200], seed=2)
    x = net.forward(np.ones(10))
    with pytest.raises(error, match=match):
        preimage.invert(net, x, **kwargs)


def test_leaky_relu_layers_and_a_zero_noise_level(rng: np.random.Generator) -> None:
    net = random_network([8, 40, 160], activation="leaky_relu", bias=True, seed=1)
    for _ in range(3):
        hs = net.forward_all(rng.standard_normal((1, 8)))
        e = rng.uniform(-1, 1, 160) * 1e-4
        out = invert_noisy_one(net, hs[-1][0] + e, norm="linf", noise_level=np.abs(e).max())
        for i in range(2):
            assert np.linalg.norm(out.layers[i].h - hs[i][0]) <= out.bounds[i]
        assert rel(out.z, hs[0][0]) < 1e-2
    exact = random_network([8, 40, 160], seed=1)
    x = exact.forward(np.ones(8))
    res = preimage.invert(exact, x, method="layerwise", noise="linf", noise_level=0.0)
    assert res.status == "feasible" and res.z_error_bound < 1e-9
    assert rel(res.z, np.ones(8)) < 1e-12


@pytest.mark.parametrize("noise", ["l2", "linf"])
def test_a_blank_observation_is_projected_not_skipped(noise) -> None:
    # x = 0 (a blank image): the cell LP was scaled by max |x| = 0 (floored at 1e-300),
    # its walls at 1e299: "the best start" without a descent (linf) or an internal error
    # (l2); the global projection's proved minimum is 0.447 for linf
    net = preimage.random_network([3, 12, 30], bias=True, seed=0)
    res = preimage.invert(net, np.zeros(30), noise=noise)
    assert res.local_minimum and "error" not in res.message, res.message
    if noise == "linf":
        best = preimage.invert(net, np.zeros(30), method="global", noise="linf")
        assert res.misfit <= best.misfit * (1 + 1e-6)


def test_a_bad_tau_is_refused_before_any_sample_runs() -> None:
    net = random_network([5, 40, 200], seed=0)
    x = net.forward(np.random.default_rng(0).standard_normal((2, 5)))
    with pytest.raises(ValueError, match="`tau` must be"):
        preimage.invert(net, x, method="layerwise", noise="linf", options={"tau": -1})


def _scaled_net(widths: list[int], seed: int) -> preimage.Network:
    rng = np.random.default_rng(seed)
    weights, biases = [], []
    for a, b in pairwise(widths):
        weights.append(rng.standard_normal((b, a)) / np.sqrt(b))
        biases.append(rng.standard_normal(b) / np.sqrt(b))
    return preimage.Network.from_weights(weights, biases)


@pytest.mark.parametrize("kw", [{"noise": "linf"}, {"noise": "l2"},
                                {"noise": "linf", "method": "layerwise"}])
def test_the_error_bound_allows_float32_datas_own_rounding(kw: dict) -> None:
    # G(z0) stored as float32 with noise_level 0: the bound held the level only, and the
    # true code lay 1.5e-7 from z against a bound of 9.5e-8
    for seed in range(1, 7):
        net = _scaled_net([4, 20, 60], seed)
        z0 = np.random.default_rng(seed + 77).standard_normal(4)
        x32 = net.forward(z0[None])[0].astype(np.float32)
        res = preimage.invert(net, x32, noise_level=0.0, **kw)
        if np.isfinite(res.z_error_bound):
            assert np.linalg.norm(res.z - z0) <= res.z_error_bound, seed
    # float64 data keep their own (tighter) bound
    x64 = net.forward(z0[None])[0]
    assert preimage.invert(net, x64, noise_level=0.0, **kw).z_error_bound < 1e-6
