"""Noisy inversion, partial observation and compressed sensing: the numbers.

Prints five tables:

1. noise 1e-3 (relative, uniform): median relative z-error of the l_inf LP,
   the l_1 LP, the l_2 QP, Adam (CSGM defaults) and the hybrid, on the paper's
   random 20-100-500 ReLU net and on the authors' ReLU decoder;
2. the error against the noise level (1e-6 ... 1e-1, uniform and Gaussian);
3. the tightness of the proved error bounds (error / bound);
4. partial observation of the authors' decoder: exact recoveries at 90, 70,
   50 and 30 % observed pixels for a plain per-layer feasibility LP, the
   layer-wise method (sparsest point + certificate), and the same with the
   cell search;
5. Gaussian compressed sensing, m = 100 and 200: PGD with the LP projection
   against latent Adam (CSGM).

Run:  PYTHONPATH=src python examples/noise_and_sensing.py [--codes 50] [--quick]
On a shared machine set OPENBLAS_NUM_THREADS=1 (the script does it unless set).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import preimage  # noqa: E402
from preimage.methods.noisy import invert_noisy_one  # noqa: E402
from preimage.methods.paper_lp import paper_layerwise_lp  # noqa: E402
from preimage.methods.partial import restrict_output  # noqa: E402
from preimage.model.operators import GaussianMatrix, Mask  # noqa: E402

AUTHORS = Path(__file__).resolve().parents[2] / "shared" / "models" / "invertgan_lp"
EXACT = 1e-6  # "recovered": relative error of z below this


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    line = "  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    err = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)
    return np.where(np.isfinite(err), err, np.inf)


def noisy_copy(
    x: np.ndarray, level: float, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """x + e with ||e||_2 = level ||x||_2 per row; e uniform or Gaussian."""
    e = rng.uniform(-1, 1, x.shape) if kind == "uniform" else rng.standard_normal(x.shape)
    e *= level * np.linalg.norm(x, axis=1, keepdims=True) / np.linalg.norm(
        e, axis=1, keepdims=True
    )
    return x + e, e


def networks() -> list[tuple[str, preimage.Network]]:
    nets = [("random 20-100-500", preimage.random_network([20, 100, 500], seed=0))]
    path = AUTHORS / "trained_vae_20_60_784_nobias.pth"
    if path.exists():
        import torch

        sd = torch.load(path, map_location="cpu", weights_only=True)
        nets.append(("authors' decoder", preimage.Network.from_state_dict(sd, ["fc3", "fc4"])))
    else:
        print(f"(the authors' decoder {path} is not available: skipping it)")
    return nets


def noise_table(codes: int) -> None:
    methods = [
        ("l_inf LP", {"noise": "linf"}),
        ("l_1 LP", {"noise": "l1"}),
        ("l_2 QP", {"noise": "l2"}),
        ("Adam (CSGM)", {"method": "adam", "noise": "linf"}),
        ("hybrid", {"method": "hybrid", "noise": "linf"}),
    ]
    rows = []
    for name, net in networks():
        rng = np.random.default_rng(0)
        z = rng.standard_normal((codes, net.latent_dim))
        y, _ = noisy_copy(net.forward(z), 1e-3, "uniform", rng)
        for label, kw in methods:
            start = time.perf_counter()
            res = preimage.invert(net, y, **kw)
            per = (time.perf_counter() - start) / codes
            err = rel(res.z, z)
            rows.append(
                [name, label, f"{np.median(err):.2e}", f"{np.quantile(err, 0.9):.2e}",
                 f"{per * 1e3:.0f} ms"]
            )
    table(
        f"1. Noise 1e-3 (||e||_2 = 1e-3 ||x||_2, uniform), {codes} codes: relative z-error",
        ["network", "method", "median", "90th pct", "time/code"],
        rows,
    )


def scaling_table(codes: int) -> None:
    net = preimage.random_network([20, 100, 500], seed=0)
    rng = np.random.default_rng(1)
    z = rng.standard_normal((codes, 20))
    x = net.forward(z)
    levels = 10.0 ** np.arange(-6, 0)
    rows = []
    for kind in ("uniform", "gaussian"):
        medians = []
        for level in levels:
            y, _ = noisy_copy(x, level, kind, rng)
            medians.append(np.median(rel(preimage.invert(net, y, noise="linf").z, z)))
        slope = np.polyfit(np.log10(levels), np.log10(medians), 1)[0]
        rows.append([kind, *(f"{m:.1e}" for m in medians), f"{slope:.2f}"])
    table(
        f"2. Random 20-100-500, l_inf LP, {codes} codes: median relative z-error by noise level",
        ["noise", *(f"{lv:.0e}" for lv in levels), "log-log slope"],
        rows,
    )


def bound_table(draws: int) -> None:
    rng = np.random.default_rng(2)
    rows = []
    for norm in preimage.noisy.NORMS:
        ratios, finite, worst = [], 0, 0.0
        for t in range(draws):
            widths = [20, 100, 500] if t % 2 else [10, 50, 200]
            net = preimage.random_network(widths, seed=1000 + t)
            hs = net.forward_all(rng.standard_normal((1, widths[0])))
            level = 10.0 ** rng.uniform(-5, -2)
            x, e = noisy_copy(hs[-1], level, "uniform" if t % 4 < 2 else "gaussian", rng)
            known = {"linf": np.abs(e).max(), "l1": np.abs(e).sum(), "l2": np.linalg.norm(e)}
            out = invert_noisy_one(net, x[0], norm=norm, noise_level=known[norm])
            if np.isfinite(out.bounds[0]):
                finite += 1
                ratio = np.linalg.norm(out.z - hs[0][0]) / out.bounds[0]
                ratios.append(ratio)
                worst = max(worst, ratio)
        rows.append(
            [norm, f"{finite}/{draws}", f"{np.median(ratios):.3g}", f"{worst:.3g}"]
        )
    table(
        f"3. Error bounds on ||z_hat - z||_2 (random 10-50-200 and 20-100-500 nets, levels "
        f"1e-5..1e-2): {draws} draws per norm",
        ["norm", "finite", "median error/bound", "max error/bound (<= 1)"],
        rows,
    )


def partial_table(codes: int) -> None:
    path = AUTHORS / "trained_vae_20_60_784_nobias.pth"
    if not path.exists():
        return
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    net = preimage.Network.from_state_dict(sd, ["fc3", "fc4"])
    rng = np.random.default_rng(3)
    z = rng.standard_normal((codes, 20))
    x = net.forward(z)
    rows = []
    for frac in (0.9, 0.7, 0.5, 0.3):
        plain = layerwise = search = unique = other = 0
        start = time.perf_counter()
        for b in range(codes):
            mask = rng.random(784) < frac
            sub = restrict_output(net, Mask(mask))
            zp, _ = paper_layerwise_lp(sub, x[b, mask], rtol=1e-9)
            plain += zp is not None and rel(zp, z[b]) < EXACT
            base = preimage.invert(net, x[b], observe=mask, options={"max_lps": 0})
            layerwise += rel(base.z, z[b]) < EXACT
            unique += base.status == "unique"
            full = preimage.invert(net, x[b], observe=mask)
            ok = rel(full.z, z[b]) < EXACT
            search += ok
            other += full.success and not ok  # a different z that fits every observed pixel
        per = (time.perf_counter() - start) / codes
        rows.append(
            [f"{frac:.0%}", f"{plain}/{codes}", f"{layerwise}/{codes}", f"{unique}",
             f"{search}/{codes}", f"{other}", f"{per:.1f} s"]
        )
    table(
        f"4. Authors' decoder, partial observation (random pixel mask per code), no noise, "
        f"{codes} codes: exact recoveries",
        ["observed", "plain feasibility LP", "layer-wise (sparsest+cert.)", "certified unique",
         "+ cell search", "other preimage found", "time/code"],
        rows,
    )


def sensing_table(codes: int) -> None:
    net = preimage.random_network([20, 100, 500], seed=0)
    rows = []
    for m in (100, 200):
        rng = np.random.default_rng(m)
        z = rng.standard_normal((codes, 20))
        A = GaussianMatrix(m, 500, seed=m)
        y = A.apply(net.forward(z))
        for label, kw in [("PGD + LP projection", {}), ("latent Adam (CSGM)", {"method": "adam"})]:
            start = time.perf_counter()
            res = preimage.invert(net, y, A=A, **kw)
            per = (time.perf_counter() - start) / codes
            err = rel(res.z, z)
            rows.append(
                [m, label, f"{np.mean(err < EXACT):.0%}", f"{np.mean(err < 1e-2):.0%}",
                 f"{np.median(err):.1e}", f"{per:.2f} s"]
            )
    table(
        f"5. Gaussian compressed sensing, random 20-100-500, A with N(0, 1/m) entries, "
        f"{codes} codes",
        ["m", "method", "exact (<1e-6)", "within 1e-2", "median error", "time/code"],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codes", type=int, default=50, help="codes for table 1")
    parser.add_argument("--quick", action="store_true", help="fewer codes everywhere")
    args = parser.parse_args(argv)
    few = 5 if args.quick else 20
    noise_table(10 if args.quick else args.codes)
    scaling_table(few)
    bound_table(10 if args.quick else 40)
    partial_table(few)
    sensing_table(few)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
