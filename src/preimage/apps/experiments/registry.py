"""The experiments by name: each one's grid (`grids`) and figure (`figures`)."""

from __future__ import annotations

from preimage.apps.experiments import figures, grids
from preimage.apps.experiments.spec import Experiment

EXPERIMENTS: dict[str, Experiment] = {
    "noise": Experiment(
        "noise",
        "relative error of z vs relative noise level, random 20-100-500 net and MNIST decoder",
        ("network", "noise", "level"),
        200,
        grids.noise_settings,
        figures.figure_noise,
    ),
    "latent-dim": Experiment(
        "latent-dim",
        "success, in-range rate and time vs latent dimension k on random [k, 250, 600] nets",
        ("activation", "k"),
        50,
        grids.latent_dim_settings,
        figures.figure_latent_dim,
    ),
    "partial": Experiment(
        "partial",
        "recovery vs fraction of observed pixels (inpainting) on the MNIST ReLU decoder",
        ("network", "fraction"),
        50,
        grids.partial_settings,
        figures.figure_partial,
    ),
    "mnist-decoder": Experiment(
        "mnist-decoder",
        "codes and held-out digits through the shipped MNIST decoders (and the authors' "
        "with --model)",
        ("decoder", "target"),
        100,
        grids.mnist_decoder_settings,
        figures.figure_mnist_decoder,
    ),
    "projection": Experiment(
        "projection",
        "projection of real observations onto the range: held-out digits, noisy codes, "
        "compressed digits, small nets against the MILP",
        ("part", "network", "level", "m"),
        100,
        grids.projection_settings,
        figures.figure_projection,
    ),
}
"""The experiments by name."""




def experiment(name: str) -> Experiment:
    """The experiment called `name`, or a ValueError listing them."""
    if name not in EXPERIMENTS:
        raise ValueError(f"Unknown experiment {name!r}; choose one of {tuple(EXPERIMENTS)}.")
    return EXPERIMENTS[name]
