"""Compressed sensing: PGD with the LP projection against latent Adam (CSGM)."""

from __future__ import annotations

import numpy as np
import pytest

import preimage
from preimage import random_network
from preimage.methods.gradient import gradient_invert
from preimage.methods.sensing import pgd_invert
from preimage.model.operators import GaussianMatrix


def rel_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("m", [100, 200])
def test_gaussian_sensing_pgd_with_lp_projection_beats_latent_adam(m: int) -> None:
    """Random 20-100-500 net, y = A G(z) with A of N(0, 1/m) entries, 8 / 6 codes."""
    net = random_network([20, 100, 500], seed=0)
    rng = np.random.default_rng(m)
    z = rng.standard_normal((8 if m == 100 else 6, 20))
    A = GaussianMatrix(m, 500, seed=m)
    y = A.apply(net.forward(z))
    pgd = preimage.invert(net, y, A=A)
    adam = preimage.invert(net, y, A=A, method="adam")
    rate_pgd = float(np.mean(rel_rows(pgd.z, z) < 1e-6))
    rate_adam = float(np.mean(rel_rows(adam.z, z) < 1e-6))
    close_adam = float(np.mean(rel_rows(adam.z, z) < 1e-2))
    print(
        f"\nm = {m}: exact recovery PGD+LP {rate_pgd:.0%}, latent Adam {rate_adam:.0%} "
        f"(Adam within 1e-2: {close_adam:.0%})"
    )
    assert rate_pgd >= (0.5 if m == 100 else 0.85)
    assert rate_pgd > rate_adam
    recovered = rel_rows(pgd.z, z) < 1e-6
    assert np.all(np.asarray(pgd.status)[recovered] == "feasible")
    assert np.all(pgd.misfit[recovered] < 1e-9)


def test_pgd_result_fields_and_noise(rng: np.random.Generator) -> None:
    net = random_network([10, 50, 200], seed=3)
    A = GaussianMatrix(120, 200, seed=1)
    z = rng.standard_normal(10)
    y = A.apply(net.forward(z))
    e = rng.uniform(-1, 1, 120) * 1e-3
    res = pgd_invert(net, y + e, A, noise="linf", noise_level=1e-3)
    assert res.z.shape == (10,) and isinstance(res.status, str) and res.noise == "linf"
    assert res.misfit == pytest.approx(np.abs(A.apply(net.forward(res.z)) - y - e).max())
    assert res.status == "feasible" and res.misfit <= 3e-3
    assert rel_rows(res.z, z) < 0.01
    assert res.steps >= 1
    base = gradient_invert(net, y, A=A, steps=30, restarts=2)
    assert base.method == "adam" and base.z.shape == (10,)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"A": np.ones((30, 199))}, ValueError, "`A` has 199 columns but the network's output"),
        ({"A": np.ones(200)}, ValueError, "2-D"),
        ({"A": "matrix"}, TypeError, "real numbers"),
        ({"A": np.ones((30, 200)), "options": {"projection": "l3"}}, ValueError, "projection"),
        ({"A": np.ones((30, 200)), "options": {"step": -1.0}}, ValueError, "`step`"),
    ],
)
def test_bad_sensing_arguments(kwargs: dict, error: type, match: str) -> None:
    net = random_network([10, 50, 200], seed=2)
    with pytest.raises(error, match=match):
        preimage.invert(net, np.ones(30), **kwargs)


def test_measurements_of_the_wrong_length() -> None:
    net = random_network([10, 50, 200], seed=2)
    with pytest.raises(ValueError, match="`y` has 31 entries"):
        preimage.invert(net, np.ones(31), A=GaussianMatrix(30, 200))
