"""The MNIST data split and the two shipped VAEs (no retraining beyond one tiny epoch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from preimage.apps.train_mnist import save_vae, train_vae
from preimage.model.mnist import (
    DECODER_LAYERS,
    DECODER_WIDTHS,
    ENCODER_WIDTH,
    LATENT_DIM,
    N_PIXELS,
    NEGATIVE_SLOPE,
    MnistVAE,
    load_mnist_digits,
    load_mnist_labels,
    load_vae,
    load_vae_metadata,
    load_vae_state,
)

KINDS = ["relu", "leaky_relu"]

#: Held-out reconstruction MSE / best-constant-image MSE must stay below this.
#: Measured for the shipped weights: 0.222 (ReLU) and 0.190 (LeakyReLU).
MAX_MSE_RATIO = {"relu": 0.3, "leaky_relu": 0.25}

AUTHORS_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "invertgan_lp"
AUTHORS_FILES = {
    "relu": "trained_vae_20_60_784_nobias.pth",
    "leaky_relu": "trained_vae_leakyrelu_20_200_500_784.pth",
}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return load_mnist_digits()


def _decode_from_state(state: dict[str, torch.Tensor], kind: str, z: torch.Tensor) -> torch.Tensor:
    """The decoder rebuilt from the state dict and the module constants only."""
    h = z
    for name in DECODER_LAYERS[kind]:
        h = F.leaky_relu(h @ state[f"{name}.weight"].T, NEGATIVE_SLOPE[kind])
    return h


# ----------------------------------------------------------------------------- data


def test_digits_shapes_range_and_deterministic_split(digits: tuple[np.ndarray, np.ndarray]):
    train, test = digits
    assert train.shape == (4500, N_PIXELS) and test.shape == (500, N_PIXELS)
    assert train.dtype == np.float64 and test.dtype == np.float64
    for x in (train, test):
        assert x.min() == 0.0 and x.max() == 1.0
    train2, test2 = load_mnist_digits()
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(test, test2)
    # Another seed: another split of the same 5,000 digits.
    train3, test3 = load_mnist_digits(seed=1, n_test=1000)
    assert train3.shape == (4000, N_PIXELS) and test3.shape == (1000, N_PIXELS)
    assert not np.array_equal(test3[:500], test)
    assert np.isclose(np.concatenate([train3, test3]).sum(), np.concatenate([train, test]).sum())


def test_labels_follow_the_same_split():
    y_train, y_test = load_mnist_labels()
    assert y_train.shape == (4500,) and y_test.shape == (500,)
    assert y_train.dtype == np.int64
    counts = np.bincount(np.concatenate([y_train, y_test]), minlength=10)
    np.testing.assert_array_equal(counts, np.full(10, 500))
    np.testing.assert_array_equal(load_mnist_labels(seed=3)[1], load_mnist_labels(seed=3)[1])


@pytest.mark.parametrize("n_test", [0, 5000])
def test_bad_split_size_is_rejected(n_test: int):
    with pytest.raises(ValueError, match="n_test"):
        load_mnist_digits(n_test=n_test)


# ------------------------------------------------------------------- shipped models


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_state_dict_layout(kind: str):
    state = load_vae_state(kind)
    hidden = ENCODER_WIDTH[kind]
    expected = {
        "fc1.weight": (hidden, N_PIXELS),
        "fc1.bias": (hidden,),
        "fc21.weight": (LATENT_DIM, hidden),
        "fc21.bias": (LATENT_DIM,),
        "fc22.weight": (LATENT_DIM, hidden),
        "fc22.bias": (LATENT_DIM,),
    }
    widths = DECODER_WIDTHS[kind]
    for name, n_in, n_out in zip(DECODER_LAYERS[kind], widths[:-1], widths[1:], strict=True):
        expected[f"{name}.weight"] = (n_out, n_in)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected  # no decoder bias
    assert all(v.dtype == torch.float32 for v in state.values())
    assert all(torch.isfinite(v).all() for v in state.values())

    meta = load_vae_metadata(kind)
    assert meta["kind"] == kind
    assert json.loads(meta["negative_slope"]) == NEGATIVE_SLOPE[kind]
    assert json.loads(meta["decoder_widths"]) == list(widths)
    assert json.loads(meta["decoder_layers"]) == list(DECODER_LAYERS[kind])

    model = load_vae(kind)
    assert all(layer.bias is None for layer in model.decoder_layers)
    assert not model.training


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_vae_reconstructs_held_out_digits(kind: str, digits: tuple[np.ndarray, np.ndarray]):
    train, test = digits
    model = load_vae(kind)
    x = torch.from_numpy(test).float()
    with torch.no_grad():
        mu, _ = model.encode(x)
        recon = model.decode(mu)
    mse = float(((recon - x) ** 2).mean())
    constant_mse = float(((test - train.mean(axis=0)) ** 2).mean())
    assert mse < MAX_MSE_RATIO[kind] * constant_mse
    # No dead output pixels: nearly every pixel inked in some test digit is produced
    # (measured: 557 of 560 for ReLU, all 560 for LeakyReLU).
    inked = (test > 0).any(axis=0)
    produced = (recon > 0).any(dim=0).numpy()
    assert (produced & inked).sum() >= 0.98 * inked.sum()
    # A decoder rebuilt from the bare state dict and the constants agrees.
    torch.testing.assert_close(_decode_from_state(load_vae_state(kind), kind, mu), recon)


@pytest.mark.parametrize("kind", KINDS)
def test_authors_state_dict_fits_the_same_module(kind: str):
    path = AUTHORS_DIR / AUTHORS_FILES[kind]
    if not path.exists():
        pytest.skip(f"the authors' decoder {path} is not available")
    state = torch.load(path, map_location="cpu", weights_only=True)
    MnistVAE(kind).load_state_dict(state)  # strict: same keys and shapes


# -------------------------------------------------------------------- training, I/O


def test_train_one_tiny_epoch_and_round_trip(tmp_path: Path):
    calls: list[tuple[int, int, float]] = []
    model, metrics = train_vae(
        "relu", epochs=1, n_train=32, seed=3, progress=lambda *a: calls.append(a)
    )
    assert [c[:2] for c in calls] == [(1, 1)] and np.isfinite(calls[0][2])
    assert metrics["n_train"] == 32 and metrics["epochs"] == 1
    assert np.isfinite(metrics["test_mse"]) and metrics["constant_mse"] > 0
    assert 0 <= metrics["active_pixels"] <= N_PIXELS
    assert 0 < metrics["inked_pixels"] <= N_PIXELS

    path = tmp_path / "vae.safetensors"
    save_vae(model, path, metrics=metrics)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert meta["kind"] == "relu" and json.loads(meta["seed"]) == 3
    reloaded = MnistVAE("relu")
    reloaded.load_state_dict(state)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[k], v, rtol=0, atol=0)

    model2, _ = train_vae("relu", epochs=1, n_train=32, seed=3)
    torch.testing.assert_close(model2.fc4.weight, model.fc4.weight, rtol=0, atol=0)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind"):
        MnistVAE("tanh")  # type: ignore[arg-type]


# ------------------------------------------------------------- the convolutional VAE


def test_shipped_conv_vae_reconstructs_and_is_a_dcgan_shaped_decoder(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    """Held-out reconstruction through its encoder at least 3x better than the best constant
    image (measured: 0.0099 vs 0.066), and its decoder read as convolutional layers."""
    from preimage import Network
    from preimage.model.mnist import CONV_LATENT_DIM, MnistConvVAE, shipped_decoder
    from preimage.model.structured import Conv2dOperator

    train, test = digits
    model = load_vae("conv")
    assert isinstance(model, MnistConvVAE) and not model.training
    assert load_vae_metadata("conv")["kind"] == "conv"
    x = torch.from_numpy(test).float()
    with torch.no_grad():
        mu, _ = model.encode(x)
        recon = model.decode(mu)
    mse = float(((recon - x) ** 2).mean())
    constant_mse = float(((test - train.mean(axis=0)) ** 2).mean())
    assert mse < constant_mse / 3
    net = shipped_decoder("conv")
    assert net.widths == [CONV_LATENT_DIM, 128 * 7 * 7, 64 * 14 * 14, N_PIXELS]
    assert net.output_shape == (1, 28, 28) and net.source_dtype == "float32"
    assert [str(layer.activation) for layer in net.layers] == ["relu", "relu", "sigmoid"]
    assert all(isinstance(layer.weight, Conv2dOperator) for layer in net.layers[1:])
    z = mu[:4].double().numpy()
    assert np.allclose(net.forward(z), recon[:4].double().numpy(), atol=1e-5)
    assert isinstance(Network.from_torch(model, entry="decode"), Network)


def test_train_the_conv_vae_one_tiny_epoch() -> None:
    from preimage.model.mnist import MnistConvVAE

    model, metrics = train_vae("conv", epochs=1, n_train=64, seed=1)
    assert isinstance(model, MnistConvVAE) and metrics["kind"] == "conv"
    assert np.isfinite(metrics["test_mse"]) and np.isfinite(metrics["train_loss"])
