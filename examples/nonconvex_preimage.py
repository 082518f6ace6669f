"""The preimage of a ReLU network need not be convex: a picture in the latent plane.

One ReLU layer has a convex preimage (a polyhedron), but composing two layers
can bend it: the set {z : G(z) = x} below is a piecewise-linear curve for a
small random network G: R^2 -> R^6 -> R^1 (ReLU after both layers, with bias).
`preimage.invert(..., method="global")` finds a preimage z_hat and, with its
branch and bound over the ReLU units, a second one (the "non_unique" witness), and
the midpoint of the two is *not* a preimage: G((z_hat + z') / 2) != x.

Run it (writes ``nonconvex_preimage.png`` into ``--out``, default here):

    python examples/nonconvex_preimage.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from preimage import GlobalSettings, Network, invert, random_network

#: The example's network: widths [2, 6, 1], ReLU, Gaussian bias, this seed.
WIDTHS = [2, 6, 1]
SEED = 251


def build() -> tuple[Network, np.ndarray, np.ndarray]:
    """The network, the code that made the observation, and the observation x = G(z)."""
    net = random_network(WIDTHS, activation="relu", bias=True, seed=SEED)
    z = 2.0 * np.random.default_rng(SEED).standard_normal(2)
    return net, z, net.forward(z)


def analyse() -> dict[str, Any]:
    """Invert x, check the two preimages and their midpoint; returns what was found."""
    net, z_true, x = build()
    # without the local probe: its witness would lie next to z_hat on the same straight
    # piece of the curve; the branch and bound's lies in another cell
    result = invert(net, x, method="global", fallback=GlobalSettings(probe=False))
    if result.status != "non_unique":
        raise RuntimeError(f"expected a 'non_unique' verdict, got {result!r}: {result.message}")
    scale = float(np.max(np.abs(x)))

    def misfit(z: np.ndarray) -> float:
        return float(np.max(np.abs(net.forward(z) - x)) / scale)

    # Three preimages: invert's two and the code that made x. The witness may lie on the
    # same straight piece of the curve as z_hat; the pair whose midpoint is farthest from
    # a preimage shows the non-convexity.
    z1 = result.z
    z2 = max((result.witness, z_true), key=lambda z: misfit((z1 + z) / 2))
    mid = (z1 + z2) / 2
    return {
        "net": net,
        "z_true": z_true,
        "x": x,
        "z1": z1,
        "z2": z2,
        "witness": result.witness,
        "mid": mid,
        "misfit1": float(np.max(np.abs(net.forward(z1) - x)) / scale),
        "misfit2": float(np.max(np.abs(net.forward(z2) - x)) / scale),
        "misfit_mid": float(np.max(np.abs(net.forward(mid) - x)) / scale),
        "message": result.message,
    }


def draw(found: dict[str, Any], path: Path) -> Path:
    """The latent plane: G(z) as shading, the preimage {G(z) = x} as a red curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    net, x = found["net"], found["x"]
    points = np.stack([found["z_true"], found["z1"], found["witness"], found["mid"]])
    half = max(3.0, float(np.max(np.abs(points))) + 1.0)
    grid = np.linspace(-half, half, 601)
    zz1, zz2 = np.meshgrid(grid, grid)
    gz = net.forward(np.column_stack([zz1.ravel(), zz2.ravel()]))[:, 0].reshape(zz1.shape)

    fig = Figure(figsize=(6.4, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shade = ax.pcolormesh(zz1, zz2, gz, cmap="Blues", shading="auto", alpha=0.85)
    fig.colorbar(shade, ax=ax, label="G(z)  (0 in the white region: the output unit is off)")
    ax.contour(zz1, zz2, gz, levels=np.linspace(0, gz.max(), 12)[1:], colors="0.5",
               linewidths=0.4)
    ax.contour(zz1, zz2, gz, levels=[x[0]], colors="C3", linewidths=2.5)
    ax.plot([], [], color="C3", lw=2, label="preimage {z : G(z) = x}")
    z1, z2, mid = found["z1"], found["z2"], found["mid"]
    ax.plot([z1[0], z2[0]], [z1[1], z2[1]], "--", color="C0", lw=1)
    ax.plot(*z1, "o", color="C0", ms=9, label="z_hat (invert)")
    ax.plot(*found["witness"], "s", color="C0", ms=9, label="witness z' (a second preimage)")
    ax.plot(*mid, "X", color="C1", ms=12,
            label=f"midpoint: |G - x|/|x| = {found['misfit_mid']:.2f}")
    ax.plot(*found["z_true"], "+", color="C2", ms=12, mew=2, label="z that made x")
    ax.set_xlabel("z_1")
    ax.set_ylabel("z_2")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)
    ax.set_title(f"G: R^2 -> R^6 -> R (ReLU, seed {SEED}), x = {x[0]:.3f}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the PNG")
    args = parser.parse_args(argv)
    found = analyse()
    print(f"x = {found['x']}  (made from z = {np.round(found['z_true'], 4)})")
    print(f"invert: non_unique ({found['message']})")
    print(f"  z_hat = {np.round(found['z1'], 4)}   |G(z_hat) - x| / |x| = {found['misfit1']:.1e}")
    print(f"  z'    = {np.round(found['witness'], 4)}   (the witness)")
    print(f"  z2    = {np.round(found['z2'], 4)}   |G(z2) - x| / |x|    = {found['misfit2']:.1e}")
    print(f"  midpoint of z_hat and z2 {np.round(found['mid'], 4)}: |G - x| / |x| = "
          f"{found['misfit_mid']:.3f}"
          " -> not a preimage: the preimage set is not convex")
    path = draw(found, args.out / "nonconvex_preimage.png")
    print(f"figure: {path.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
