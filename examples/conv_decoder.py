"""The shipped convolutional MNIST decoder (32 -> 128x7x7 -> 64x14x14 -> 1x28x28, batch
norm, a sigmoid output): the default method against Adam on codes z ~ N(0, I).

Its last layer contracts (12,544 inputs, 784 outputs), so the layer-wise method cannot
settle it and `invert` runs the hybrid: Adam from random starts, then the exact LP of
the activation cell it reached and of the neighbouring cells. Prints one table::

    python examples/conv_decoder.py --codes 100
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import preimage
from preimage.model.mnist import shipped_decoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    net = shipped_decoder("conv")
    z = np.random.default_rng(args.seed).standard_normal((args.codes, net.latent_dim))
    x = net.forward(z)
    rows = []
    for name, kwargs in [
        ("default (hybrid: Adam 1000 x 3, cell walk)", {}),
        ("Adam, 1000 steps x 3 restarts", {"method": "adam",
                                            "options": {"steps": 1000, "restarts": 3}}),
    ]:
        start = time.perf_counter()
        res = preimage.invert(net, x, **kwargs)
        seconds = time.perf_counter() - start
        err = np.linalg.norm(res.z.reshape(len(z), -1) - z, axis=1) / np.linalg.norm(z, axis=1)
        recovered = err < 1e-6
        claims = res.success
        rows.append((name, recovered.mean(), claims.mean(),
                     float(np.max(res.residual[claims], initial=0.0)),
                     float(np.median(err)), seconds / len(z), res.counts()))
    print(f"{net}; {args.codes} codes z ~ N(0, I), x = G(z) (float64)")
    print(f"{'method':44s} {'z to 1e-6':>9s} {'success':>8s} {'max residual':>12s} "
          f"{'median err':>10s} {'s/code':>7s}  statuses")
    for name, rec, ok, worst, med, sec, counts in rows:
        print(f"{name:44s} {rec:9.0%} {ok:8.0%} {worst:12.2e} {med:10.2e} {sec:7.2f}  {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
