from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import preimage
from preimage import Network, random_network


def test_random_network_shapes_and_seed() -> None:
    net = random_network([20, 100, 500], seed=0)
    assert net.widths == [20, 100, 500]
    assert net.latent_dim == 20 and net.output_dim == 500
    w = net.layers[0].weight.matrix()
    assert w.shape == (100, 20)
    # entries N(0, 1/n_out): the sample variance is close to 1/100
    assert abs(w.var() * 100 - 1) < 0.15
    same = random_network([20, 100, 500], seed=0)
    assert np.array_equal(same.layers[1].weight.matrix(), net.layers[1].weight.matrix())
    other = random_network([20, 100, 500], seed=1)
    assert not np.array_equal(other.layers[1].weight.matrix(), net.layers[1].weight.matrix())


def test_forward_shapes_and_float64(rng: np.random.Generator) -> None:
    net = random_network([5, 20, 30], bias=True, seed=0)
    z = rng.standard_normal(5)
    x = net.forward(z)
    assert x.shape == (30,) and x.dtype == np.float64
    xb = net.forward(np.stack([z, z]))
    assert xb.shape == (2, 30)
    assert np.allclose(xb[0], x)
    assert np.all(x >= 0)


def test_torch_roundtrip_sequential(rng: np.random.Generator) -> None:
    net = random_network([4, 16, 40], activation="leaky_relu", bias=True, seed=3)
    module = net.to_torch()
    back = Network.from_torch(module)
    z = rng.standard_normal((3, 4))
    assert np.allclose(back.forward(z), net.forward(z), atol=1e-12)
    with torch.no_grad():
        tz = module(torch.as_tensor(z)).numpy()
    assert np.allclose(tz, net.forward(z), atol=1e-12)


class _VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(30, 8)
        self.fc3 = nn.Linear(4, 12, bias=False)
        self.fc4 = nn.Linear(12, 30, bias=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc1(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc4(torch.relu(self.fc3(z))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[:, :4])


def test_from_torch_plain_module_entry_decode(rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    vae = _VAE()
    net = Network.from_torch(vae, entry="decode")
    assert net.widths == [4, 12, 30]
    assert net.source_dtype == "float32"
    z = rng.standard_normal((5, 4))
    with torch.no_grad():
        ref = vae.decode(torch.as_tensor(z, dtype=torch.float32)).double().numpy()
    assert np.allclose(net.forward(z), ref, atol=1e-5)


def test_from_torch_rejects_unsupported_layers() -> None:
    with pytest.raises(TypeError, match="Conv1d"):
        Network.from_torch(nn.Sequential(nn.Linear(3, 4), nn.Conv1d(1, 1, 1)))
    with pytest.raises(TypeError, match=r"'1' \(GELU\)"):
        Network.from_torch(nn.Sequential(nn.Linear(3, 4), nn.GELU()))
    with pytest.raises(TypeError, match=r"Unsupported operation .*getitem"):
        Network.from_torch(_VAE())  # forward slices the encoder output


def test_from_state_dict_and_bad_key() -> None:
    sd = {"fc3.weight": torch.randn(6, 2), "fc4.weight": torch.randn(9, 6)}
    net = Network.from_state_dict(sd, ["fc3", "fc4"], activation="leaky_relu")
    assert net.widths == [2, 6, 9]
    assert net.layers[0].activation.negative_slope == pytest.approx(0.1)
    with pytest.raises(ValueError, match="has no 'fc5.weight'; its layers are"):
        Network.from_state_dict(sd, ["fc3", "fc5"])


def test_network_validation_messages() -> None:
    w1, w2 = np.ones((4, 3)), np.ones((5, 2))
    with pytest.raises(ValueError, match="takes inputs of width 2"):
        Network.from_weights([w1, w2])
    with pytest.raises(ValueError, match="NaN"):
        Network.from_weights([np.full((4, 3), np.nan)])
    with pytest.raises(ValueError, match="activation must be one of"):
        preimage.Activation("gelu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative_slope"):
        preimage.Activation("leaky_relu", 0.0)
    with pytest.raises(ValueError, match="widths"):
        random_network([5])


def test_weights_are_copied_not_shared() -> None:
    w = np.ones((4, 2))
    net = Network.from_weights([w])
    w[0, 0] = 99.0
    assert net.layers[0].weight.matrix()[0, 0] == 1.0
    with pytest.raises(ValueError):
        net.layers[0].weight.matrix()[0, 0] = 5.0  # read-only
