"""The `preimage` command. All printing lives here; the library prints nothing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from preimage.baselines import gradient_invert
from preimage.invert import InversionResult, invert
from preimage.network import random_network

EXACT_RTOL = 1e-6  # "recovered": relative l2 error of z below this


def _bar(desc: str, total: int) -> tuple[tqdm, Callable[[int, int], None]]:
    bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)

    def update(done: int, _total: int) -> None:
        bar.n = done
        bar.refresh()

    return bar, update


def _row(name: str, result: InversionResult, z_true: np.ndarray) -> list[str]:
    err = np.linalg.norm(result.z - z_true, axis=1) / np.linalg.norm(z_true, axis=1)
    err = np.where(np.isfinite(err), err, np.inf)
    n = len(z_true)
    return [
        name,
        f"{np.mean(err < EXACT_RTOL):.1%}",
        f"{np.median(err):.2e}",
        f"{np.mean(np.asarray(result.success)):.1%}",
        f"{result.time / n * 1e3:.2f} ms",
    ]


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


def cmd_demo(args: argparse.Namespace) -> int:
    widths = [int(w) for w in args.widths.split(",")]
    net = random_network(widths, activation="relu", seed=args.seed)
    rng = np.random.default_rng(args.seed)
    z = rng.standard_normal((args.samples, net.latent_dim))
    x = net.forward(z)
    print(f"Network: {net} (seed {args.seed}); {args.samples} codes z ~ N(0, I)")
    bar, update = _bar("exact (layer-wise LP)", args.samples)
    exact = invert(net, x, progress=update)
    bar.close()
    bar, update = _bar("adam (1000 steps x 10 restarts)", args.adam_steps)
    adam = gradient_invert(net, x, steps=args.adam_steps, restarts=args.restarts, progress=update)
    bar.close()
    print()
    print_table(
        ["method", "exact recovery", "median rel. error", "G(z)=x", "time/sample"],
        [_row("exact (LP)", exact, z), _row("adam", adam, z)],
    )
    print()
    print(f"exact method verdicts: {exact.counts()}")
    print(f"exact recovery: relative error of z below {EXACT_RTOL:g}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preimage", description="Invert deep generative models one layer at a time."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="invert a batch of codes through a default generator")
    demo.add_argument("--widths", default="20,100,500", help="random ReLU net widths")
    demo.add_argument("--samples", type=int, default=100)
    demo.add_argument("--adam-steps", type=int, default=1000)
    demo.add_argument("--restarts", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
