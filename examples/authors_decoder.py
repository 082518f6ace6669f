"""Exact inversion vs gradient descent on the paper authors' ReLU decoder (20-60-784).

Run: python examples/authors_decoder.py [--codes 200] [--model PATH]
Needs ../shared/models/invertgan_lp/ (the authors' trained VAE, not shipped).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import preimage

DEFAULT = (
    Path(__file__).resolve().parents[2]
    / "shared/models/invertgan_lp/trained_vae_20_60_784_nobias.pth"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT)
    parser.add_argument("--codes", type=int, default=200)
    parser.add_argument("--restarts", type=int, default=10)
    args = parser.parse_args()
    sd = torch.load(args.model, map_location="cpu", weights_only=True)
    net = preimage.Network.from_state_dict(sd, ["fc3", "fc4"])
    z = np.random.default_rng(0).standard_normal((args.codes, net.latent_dim))
    x = net.forward(z)
    rows = []
    start = time.perf_counter()
    exact = preimage.invert(net, x)
    rows.append(("exact (layer-wise LP + search)", exact, time.perf_counter() - start))
    for restarts in (1, args.restarts):
        start = time.perf_counter()
        adam = preimage.invert(
            net, x, method="adam", options={"steps": 1000, "restarts": restarts}
        )
        rows.append((f"adam, 1000 steps x {restarts} restarts", adam, time.perf_counter() - start))
    print(f"{net}; {args.codes} codes z ~ N(0, I), x = G(z)")
    print(f"{'method':38s} {'z to 1e-6':>10s} {'G(z)=x':>8s} {'median err':>11s} {'s/sample':>9s}")
    for name, res, seconds in rows:
        err = np.linalg.norm(res.z - z, axis=1) / np.linalg.norm(z, axis=1)
        err = np.where(np.isfinite(err), err, np.inf)
        print(
            f"{name:38s} {np.mean(err < 1e-6):>10.1%} {np.mean(res.success):>8.1%} "
            f"{np.median(err):>11.2e} {seconds / args.codes:>9.4f}"
        )
    print(f"exact verdicts: {exact.counts()}")


if __name__ == "__main__":
    main()
