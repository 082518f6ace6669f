"""Training the two MNIST VAEs whose decoders ship with the package (`preimage train-mnist`).

Seeded: with the defaults, `train_and_save` reproduces the shipped files bit for bit.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
import torch.nn.functional as F

from preimage.model.mnist import (
    DECODER_LAYERS,
    DEFAULT_EPOCHS,
    RECON_VARIANCE,
    WEIGHT_FILES,
    Kind,
    MnistConvVAE,
    MnistVAE,
    Progress,
    check_kind,
    load_mnist_digits,
    new_vae,
)

# ----------------------------------------------------------------------- training


def _vae_loss(
    pre: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    model: MnistVAE | MnistConvVAE,
    recon_variance: float,
) -> torch.Tensor:
    """Negative ELBO per image (up to a constant), averaged over the batch."""
    rec = model.reconstruction_loss(pre, x, recon_variance)
    kl = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)
    return (rec + kl).mean()


@torch.no_grad()
def _active_pixels(model: MnistVAE | MnistConvVAE, x: torch.Tensor) -> int:
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
) -> tuple[MnistVAE | MnistConvVAE, dict[str, Any]]:
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
    kind = check_kind(kind)
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
        model = new_vae(kind)
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
            loss = _vae_loss(pre, x, mu, logvar, model, recon_variance)
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
    model: MnistVAE | MnistConvVAE, path: str | Path, *, metrics: Mapping[str, Any] | None = None
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
        latent_dim=str(model.latent_dim),
        hidden_width=str(model.hidden_width),
        decoder_widths=json.dumps(list(model.decoder_widths)),
        decoder_layers=json.dumps(list(DECODER_LAYERS[model.kind])),
        negative_slope=json.dumps(model.negative_slope),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


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
