"""The demo: invert the shipped MNIST ReLU decoder (20-60-784) and compare with Adam.

(a) Codes z ~ N(0, I) through the decoder: x = G(z) is exactly in the range,
    so the exact method should give z back (or prove it is not unique), while
    Adam on ||G(z) - x||^2 may stop in a local minimum.
(b) Held-out MNIST digits (never seen in training): not in the range of G,
    so the question is the projection onto the range, min_z ||G(z) - x||:
    the cell descent (``invert(net, x, noise="l2")``, started from the VAE's
    encoder and a few Adam runs) against Adam, with the VAE's own encoder as
    the reference point.

`run_demo` computes everything and draws one PNG; `preimage.apps.cli` prints it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preimage.api import invert
from preimage.apps.experiments.spec import IN_RANGE_RTOL
from preimage.apps.plotting import save_figure
from preimage.model.mnist import load_mnist_digits, load_vae, shipped_decoder
from preimage.results import InversionResult

#: "Recovered": relative l2 error of z below this.
RECOVERY_RTOL = 1e-6
#: Name of the PNG `run_demo` writes.
FIGURE_NAME = "preimage_demo.png"


@dataclass(frozen=True)
class DemoRow:
    """One line of the demo's table.

    Attributes
    ----------
    part : "codes" or "digits"
    method : the method's name
    recovered : fraction of codes with relative error of z < RECOVERY_RTOL
        (None for digits, which have no true code)
    median_error : median relative l2 error of z (codes; failures count as inf)
    in_range : fraction with G(z_hat) = x (relative l_inf misfit <= IN_RANGE_RTOL)
    median_misfit : median ||G(z_hat) - x||_2 / ||x||_2
    time : seconds per sample
    """

    part: str
    method: str
    recovered: float | None
    median_error: float | None
    in_range: float
    median_misfit: float
    time: float


@dataclass(frozen=True)
class DemoReport:
    """What `run_demo` returns: the table, the exact method's verdicts and the PNG's path."""

    network: str
    rows: tuple[DemoRow, ...]
    verdicts: dict[str, int]
    figure: Path
    seconds: float


def _row(
    part: str, method: str, net: Any, x: np.ndarray, z_hat: np.ndarray, z: np.ndarray | None,
    seconds: float,
) -> DemoRow:
    ok = np.all(np.isfinite(z_hat), axis=1)
    misfit = np.full(len(x), np.inf)
    linf = np.full(len(x), np.inf)
    if ok.any():
        fx = net.forward(z_hat[ok])
        misfit[ok] = np.linalg.norm(fx - x[ok], axis=1) / np.linalg.norm(x[ok], axis=1)
        linf[ok] = np.max(np.abs(fx - x[ok]), axis=1) / np.max(np.abs(x[ok]), axis=1)
    recovered = median_error = None
    if z is not None:
        err = np.linalg.norm(z_hat - z, axis=1) / np.linalg.norm(z, axis=1)
        err = np.where(ok, err, np.inf)
        recovered, median_error = float(np.mean(err < RECOVERY_RTOL)), float(np.median(err))
    return DemoRow(
        part, method, recovered, median_error, float(np.mean(linf <= IN_RANGE_RTOL)),
        float(np.median(misfit)), seconds / len(x),
    )


def _images(net: Any, z_hat: np.ndarray) -> np.ndarray:
    """G(z_hat) as 28 x 28 images (blank where there is no z_hat)."""
    out = np.zeros((len(z_hat), 784))
    ok = np.all(np.isfinite(z_hat), axis=1)
    if ok.any():
        out[ok] = net.forward(z_hat[ok])
    return out.reshape(-1, 28, 28)


def _draw(path: Path, blocks: list[tuple[str, list[tuple[str, np.ndarray]]]]) -> None:
    """Rows of digit images: per block a title and (label, images) rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_cols = max(len(images) for _, rows in blocks for _, images in rows)
    cell, left, title_h = 0.8, 1.1, 0.35  # inches
    height = sum(title_h + cell * len(rows) for _, rows in blocks) + 0.1
    width = left + cell * n_cols + 0.1
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    top = height - 0.05
    for title, rows in blocks:
        fig.text(0.1 / width, (top - 0.2) / height, title, fontsize=10, va="center")
        top -= title_h
        for label, images in rows:
            fig.text((left - 0.1) / width, (top - cell / 2) / height, label, fontsize=9,
                     ha="right", va="center")
            for c, image in enumerate(images):
                ax = fig.add_axes(
                    [(left + c * cell + 0.04) / width, (top - cell + 0.04) / height,
                     (cell - 0.08) / width, (cell - 0.08) / height]
                )
                ax.imshow(np.clip(image, 0, 1), cmap="gray_r", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
            top -= cell
    save_figure(fig, path)


def run_demo(
    out: str | Path = ".",
    *,
    codes: int = 50,
    digits: int = 16,
    adam_steps: int = 1000,
    restarts: int = 3,
    seed: int = 0,
    shown: int = 12,
    progress: Any = None,
) -> DemoReport:
    """Invert codes and held-out digits through the shipped ReLU decoder; draw one PNG.

    Parameters
    ----------
    out : folder for the PNG (`FIGURE_NAME`), created if needed
    codes : codes z ~ N(0, I) for part (a)
    digits : held-out MNIST digits for part (b)
    adam_steps, restarts : the Adam baseline (lr 0.01)
    seed : seeds the codes, the choice of digits and Adam's starts
    shown : columns of images in the PNG
    progress : callable(stage: str) -> callable(done, total), optional
        Makes a progress callback for each stage (the CLI's bars).

    Returns
    -------
    DemoReport
    """
    if codes < 1 or digits < 0:
        raise ValueError(f"`codes` must be >= 1 and `digits` >= 0; got {codes} and {digits}.")
    start = time.perf_counter()
    net = shipped_decoder("relu")
    rng = np.random.default_rng(seed)

    def bar(stage: str) -> Any:
        return None if progress is None else progress(stage)

    # (a) codes: x = G(z) exactly.
    z = rng.standard_normal((codes, net.latent_dim))
    x = net.forward(z)
    exact: InversionResult = invert(net, x, progress=bar("exact: codes"))
    adam = invert(
        net, x, method="adam", options={"steps": adam_steps, "restarts": restarts, "seed": seed},
        progress=bar("adam: codes"),
    )
    rows = [
        _row("codes", "exact (LP)", net, x, exact.z, z, exact.time),
        _row("codes", "adam", net, x, adam.z, z, adam.time),
    ]
    show = min(shown, codes)
    blocks = [
        (
            "(a) codes z ~ N(0, I): x = G(z)",
            [
                ("G(z)", x[:show].reshape(-1, 28, 28)),
                ("exact LP", _images(net, exact.z[:show])),
                ("Adam", _images(net, adam.z[:show])),
            ],
        )
    ]

    # (b) held-out digits: the projection onto the range.
    if digits:
        import torch

        _, test = load_mnist_digits()
        pick = rng.choice(len(test), min(digits, len(test)), replace=False)
        xd = test[pick]
        t0 = time.perf_counter()
        with torch.no_grad():
            mu = load_vae("relu").encode(torch.as_tensor(xd, dtype=torch.float32))[0]
        z_enc = mu.double().numpy()
        t_enc = time.perf_counter() - t0
        enc = load_vae("relu")

        def encoder(images: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return enc.encode(torch.as_tensor(images, dtype=torch.float32))[0].double().numpy()

        lp_d = invert(net, xd, noise="l2", options={"encoder": encoder, "seed": seed},
                      progress=bar("cell descent: digits"))
        adam_d = invert(
            net, xd, method="adam", noise="l2", progress=bar("adam: digits"),
            options={"steps": adam_steps, "restarts": restarts, "seed": seed + 1},
        )
        rows += [
            _row("digits", "cell descent (l_2)", net, xd, lp_d.z, None, lp_d.time),
            _row("digits", "adam", net, xd, adam_d.z, None, adam_d.time),
            _row("digits", "VAE encoder", net, xd, z_enc, None, t_enc),
        ]
        show = min(shown, len(xd))
        blocks.append(
            (
                "(b) held-out digits x (not in the range): G(z_hat)",
                [
                    ("digit x", xd[:show].reshape(-1, 28, 28)),
                    ("cell descent", _images(net, lp_d.z[:show])),
                    ("Adam", _images(net, adam_d.z[:show])),
                    ("VAE encoder", _images(net, z_enc[:show])),
                ],
            )
        )

    path = Path(out) / FIGURE_NAME
    _draw(path, blocks)
    return DemoReport(
        repr(net), tuple(rows), exact.counts(), path.resolve(), time.perf_counter() - start
    )
