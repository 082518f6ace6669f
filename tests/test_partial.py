"""Partial observations (inpainting): the row-restricted network, the cell search, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import preimage
from preimage import random_network
from preimage.methods.paper_lp import paper_layerwise_lp
from preimage.methods.partial import observed_values, restrict_output
from preimage.model.operators import GaussianMatrix, Mask
from tests.conftest import authors_state_dict


def rel_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def decoder() -> preimage.Network:
    sd = authors_state_dict("trained_vae_20_60_784_nobias.pth")
    return preimage.Network.from_state_dict(sd, ["fc3", "fc4"])


def test_restricted_network_is_the_observed_output(rng: np.random.Generator) -> None:
    net = random_network([6, 30, 80], bias=True, seed=0)
    mask = Mask(rng.random(80) < 0.4)
    sub = restrict_output(net, mask)
    z = rng.standard_normal((3, 6))
    assert np.allclose(sub.forward(z), mask.apply(net.forward(z)))
    assert sub.widths == [6, 30, mask.shape[0]]


def test_observed_values_take_full_or_observed_length(rng: np.random.Generator) -> None:
    mask = Mask(np.array([True, False, True, True]))
    full = np.array([1.0, np.nan, 3.0, 4.0])  # unobserved entries may be NaN
    y, single = observed_values(full, mask)
    assert single and y.tolist() == [[1.0, 3.0, 4.0]]
    y, single = observed_values(np.ones((2, 3)), mask)
    assert not single and y.shape == (2, 3)
    with pytest.raises(ValueError, match="`observe` has 4 coordinates, 3 of them observed"):
        observed_values(np.ones(5), mask)


def test_partial_observation_of_a_random_net(rng: np.random.Generator) -> None:
    net = random_network([10, 60, 300], seed=1)
    z = rng.standard_normal((4, 10))
    x = net.forward(z)
    mask = rng.random(300) < 0.5
    x_seen = np.where(mask, x, np.nan)
    res = preimage.invert(net, x_seen, observe=mask)
    assert list(res.status) == ["unique"] * 4  # certified, as with full observation
    assert np.all(rel_rows(res.z, z) < 1e-9)
    assert np.all(res.misfit < 1e-9)
    noisy = preimage.invert(net, x[:, mask] + 1e-4, observe=mask, noise="l2")
    assert noisy.success.all() and np.all(rel_rows(noisy.z, z) < 1e-2)
    adam = preimage.invert(net, x, observe=mask, method="adam", options={"steps": 50})
    assert adam.misfit.shape == (4,)


def test_decoder_90_percent_observed_recovers_at_least_80_percent() -> None:
    """The paper's inpainting setting: 90% of the 784 pixels, no noise, 20 codes."""
    net = decoder()
    rng = np.random.default_rng(0)
    z = rng.standard_normal((20, 20))
    x = net.forward(z)
    mask = rng.random(784) < 0.9
    res = preimage.invert(
        net, x, observe=mask, options={"restarts": 2, "steps": 200, "max_lps": 30}
    )
    exact = rel_rows(res.z, z) < 1e-6
    print(f"\ndecoder, 90% observed: {exact.sum()}/20 exact, {res.counts()}")
    assert exact.sum() >= 16
    ok = np.asarray(res.success)
    seen = net.forward(res.z[ok])[:, mask]
    # every answer fits the observed pixels, at the tolerance of the float32 decoder's precision
    assert res.rtol == 1e-5
    assert np.all(np.abs(seen - x[ok][:, mask]).max(axis=1)
                  <= 10 * res.rtol * np.abs(x[ok][:, mask]).max(axis=1))
    assert np.all(exact[np.asarray(res.status) == "unique"])


def test_decoder_half_observed_beats_the_plain_feasibility_lp() -> None:
    net = decoder()
    rng = np.random.default_rng(1)
    z = rng.standard_normal((8, 20))
    x = net.forward(z)
    mask = rng.random(784) < 0.5
    sub = restrict_output(net, Mask(mask))
    plain = []
    for b in range(8):
        zp, _ = paper_layerwise_lp(sub, x[b, mask], rtol=1e-9)
        plain.append(zp is not None and rel_rows(zp, z[b]) < 1e-6)
    res = preimage.invert(
        net, x, observe=mask, options={"restarts": 2, "steps": 200, "max_lps": 30}
    )
    ours = rel_rows(res.z, z) < 1e-6
    print(f"\ndecoder, 50% observed: plain LP {sum(plain)}/8, preimage {ours.sum()}/8")
    assert ours.sum() > sum(plain)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"observe": np.ones(199, dtype=bool)}, ValueError, "has length 199"),
        ({"observe": np.ones(200)}, TypeError, "dtype bool"),
        ({"observe": np.ones(200, dtype=bool), "A": np.eye(200)}, ValueError, "not both"),
        ({"observe": np.ones(200, dtype=bool), "options": {"restarts": 1, "lr": 2}}, TypeError,
         r"\['lr'\]"),
    ],
)
def test_bad_partial_arguments(kwargs: dict, error: type, match: str) -> None:
    net = random_network([10, 50, 200], seed=2)
    x = net.forward(np.ones(10))
    with pytest.raises(error, match=match):
        preimage.invert(net, x, **kwargs)


def test_a_mask_passed_as_A_is_a_partial_observation(rng: np.random.Generator) -> None:
    net = random_network([10, 50, 200], seed=2)
    z = rng.standard_normal(10)
    mask = Mask(rng.random(200) < 0.6)
    res = preimage.invert(net, mask.apply(net.forward(z)), A=mask)
    assert res.status == "unique" and rel_rows(res.z, z) < 1e-9
    with pytest.raises(ValueError, match="has 100 columns"):
        preimage.invert(net, np.ones(30), A=GaussianMatrix(30, 100))
