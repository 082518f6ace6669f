"""The figures of the paper's experiments, drawn from their rows (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preimage.apps.experiments.grids import LATENT_WIDTHS, NOISE_KINDS, identifiability_limit
from preimage.apps.experiments.spec import SUCCESS_RTOL, inf_nan, summarize
from preimage.apps.plotting import new_figure, save_figure

_COLORS = {
    "lp": "C0", "lp-linf": "C0", "lp-l1": "C2", "lp+search": "C4", "adam": "C1",
    "descent-l2": "C6", "descent": "C6", "adam+descent": "C9", "layerwise-linf": "C0",
    "descent-linf": "C6", "milp": "C7",
    "hybrid-linf": "C3", "hybrid-l2": "C3", "encoder": "C5",
}
_LABELS = {
    "lp": "exact (layer-wise LP)", "lp-linf": "noisy LP, l_inf", "lp-l1": "noisy LP, l_1",
    "descent-l2": "cell descent, l_2", "descent": "cell descent", "adam+descent":
    "Adam, then the cell descent", "layerwise-linf": "layer-wise LP, l_inf",
    "descent-linf": "cell descent, l_inf", "milp": "MILP (global, |z| <= 6)",
    "lp+search": "exact + searches", "adam": "Adam", "hybrid-linf": "hybrid (l_inf LP, Adam)",
    "hybrid-l2": "hybrid (l_2 fit, Adam)", "encoder": "VAE encoder",
}


def _runs(rows: Sequence[Mapping[str, Any]]) -> int:
    """Runs per point: one more than the largest run index."""
    return max((int(r["run"]) for r in rows), default=-1) + 1


def _methods(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def figure_noise(rows: list[dict[str, Any]], path: Path) -> None:
    networks = list(dict.fromkeys(r["network"] for r in rows))
    kinds = [k for k in NOISE_KINDS if any(r["noise"] == k for r in rows)]
    fig = new_figure(5.2 * max(len(kinds), 1), 4.3 * max(len(networks), 1))
    axes = np.atleast_2d(fig.subplots(max(len(networks), 1), max(len(kinds), 1), squeeze=False))
    methods = _methods(rows)
    shift = {m: 10 ** (0.06 * (i - (len(methods) - 1) / 2)) for i, m in enumerate(methods)}
    rng = np.random.default_rng(0)
    for i, network in enumerate(networks):
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            sel = [r for r in rows if r["network"] == network and r["noise"] == kind]
            levels = sorted({float(r["level"]) for r in sel})
            for method in methods:
                mine = [r for r in sel if r["method"] == method]
                if not mine:
                    continue
                color = _COLORS.get(method)
                lv = np.array([float(r["level"]) for r in mine])
                err = np.array([inf_nan(r["error"]) for r in mine])
                jitter = shift[method] * 10 ** rng.uniform(-0.02, 0.02, len(lv))
                ok = np.isfinite(err)
                ax.scatter(lv[ok] * jitter[ok], err[ok], s=7, alpha=0.35, color=color,
                           linewidths=0)
                med = [np.median([e for e, v in zip(err, lv, strict=True) if v == level])
                       for level in levels]
                ax.plot(levels, med, "o-", color=color, label=_LABELS.get(method, method))
            if levels:
                ax.plot(levels, levels, ":", color="0.4", label="error = noise level")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{network}, {kind} noise", fontsize=10)
            ax.set_xlabel("relative noise level ||e|| / ||G(z)||")
            ax.set_ylabel("relative error ||z_hat - z|| / ||z||")
            ax.grid(alpha=0.3, which="major")
            ax.legend(fontsize=7, loc="upper left")
    runs = _runs(rows)
    fig.suptitle(f"Recovery from noisy observations ({runs} runs per point; dots: runs, "
                 "lines: medians)")
    save_figure(fig, path)


def figure_latent_dim(rows: list[dict[str, Any]], path: Path) -> None:
    fig = new_figure(11, 7.5)
    axes = fig.subplots(2, 2, sharex=True)
    for col, activation in enumerate(("relu", "leaky_relu")):
        sel = [r for r in rows if r["activation"] == activation]
        ax, ax_t = axes[0, col], axes[1, col]
        for method in _methods(sel):
            stats = sorted(
                summarize([r for r in sel if r["method"] == method], ["k"]), key=lambda s: s["k"]
            )
            ks = [s["k"] for s in stats]
            color = _COLORS.get(method)
            ax.plot(ks, [s["success"] for s in stats], "o-", color=color,
                    label=f"{_LABELS.get(method, method)}: error < {SUCCESS_RTOL:g}")
            ax.plot(ks, [s["in_range"] for s in stats], "s--", color=color, alpha=0.6,
                    markersize=4, label=f"{_LABELS.get(method, method)}: G(z_hat) = x")
            ax_t.plot(ks, [s["time"] for s in stats], "o-", color=color,
                      label=_LABELS.get(method, method))
        if activation == "relu" and sel:
            kk = np.arange(1, LATENT_WIDTHS[0] + 1)
            ax.plot(kk, identifiability_limit(kk), "k:", lw=2,
                    label=f"P(Binomial({LATENT_WIDTHS[0]}, 1/2) >= k): identifiable")
        ax.set_title(f"{activation}, [k, {LATENT_WIDTHS[0]}, {LATENT_WIDTHS[1]}]")
        ax.set_ylabel("rate over runs")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center right")
        ax_t.set_yscale("log")
        ax_t.set_xlabel("latent dimension k")
        ax_t.set_ylabel("seconds per run")
        ax_t.grid(alpha=0.3, which="both")
        ax_t.legend(fontsize=7)
    runs = _runs(rows)
    fig.suptitle(f"Recovery vs latent dimension ({runs} runs per point)")
    save_figure(fig, path)


def figure_mnist_decoder(rows: list[dict[str, Any]], path: Path) -> None:
    targets = [t for t in ("code", "digit") if any(r["target"] == t for r in rows)] or ["code"]
    fig = new_figure(6.2 * len(targets), 4.8)
    axes = np.atleast_1d(fig.subplots(1, len(targets)))
    rng = np.random.default_rng(0)
    for ax, target in zip(axes, targets, strict=True):
        sel = [r for r in rows if r["target"] == target]
        column = "error" if target == "code" else "misfit"
        decoders = list(dict.fromkeys(r["decoder"] for r in sel))
        methods = _methods(sel)
        values = {
            (d, m): np.array([inf_nan(r[column]) for r in sel
                              if r["decoder"] == d and r["method"] == m])
            for d in decoders for m in methods
        }
        finite = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in values.values()]
                                or [np.ones(1)])
        floor = max(float(finite.min()) / 3, 1e-17) if finite.size else 1e-16
        ceiling = float(finite.max()) * 3 if finite.size else 1.0
        width = 0.8 / max(len(methods), 1)
        for j, method in enumerate(methods):
            color = _COLORS.get(method, "k")
            for i, decoder in enumerate(decoders):
                v = values[decoder, method]
                if v.size == 0:
                    continue
                x0 = i - 0.4 + (j + 0.5) * width
                shown = np.where(np.isfinite(v), np.maximum(v, floor), ceiling)
                xs = x0 + rng.uniform(-0.3, 0.3, len(v)) * width
                ax.scatter(xs, shown, s=8, alpha=0.5, color=color,
                           label=_LABELS.get(method, method) if i == 0 else None)
                med = float(np.median(v))
                if np.isfinite(med):
                    ax.hlines(max(med, floor), x0 - 0.4 * width, x0 + 0.4 * width, color="k",
                              lw=2)
        ax.set_xticks(range(len(decoders)))
        ax.set_xticklabels(decoders, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("relative error of z" if target == "code" else
                      "relative misfit ||G(z_hat) - x|| / ||x||")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="best")
        ax.set_title("codes z ~ N(0, I): x = G(z)" if target == "code" else
                     "held-out digits (not in the range)", fontsize=10)
    runs = _runs(rows)
    fig.suptitle(f"MNIST decoders ({runs} runs each; dots: runs, bars: medians, "
                 "runs without a z at the top)")
    save_figure(fig, path)


def figure_partial(rows: list[dict[str, Any]], path: Path) -> None:
    fig = new_figure(11, 4.2)
    ax_s, ax_e = fig.subplots(1, 2)
    for method in _methods(rows):
        stats = sorted(summarize([r for r in rows if r["method"] == method], ["fraction"]),
                       key=lambda s: s["fraction"])
        fr = [s["fraction"] for s in stats]
        color = _COLORS.get(method)
        ax_s.plot(fr, [s["success"] for s in stats], "o-", color=color,
                  label=_LABELS.get(method, method))
        ax_s.plot(fr, [s["in_range"] for s in stats], "s--", color=color, alpha=0.5,
                  markersize=4)
        ax_e.plot(fr, [max(s["median_error"], 1e-17) for s in stats], "o-", color=color,
                  label=_LABELS.get(method, method))
    ax_s.plot([], [], "k-", label=f"solid: error of z < {SUCCESS_RTOL:g}")
    ax_s.plot([], [], "k--", alpha=0.5, label="dashed: G(z_hat) = x on the observed pixels")
    ax_s.set_xlabel("fraction of observed pixels")
    ax_s.set_ylabel("rate over runs")
    ax_s.set_ylim(-0.03, 1.03)
    ax_s.grid(alpha=0.3)
    ax_s.legend(fontsize=8, loc="center right")
    ax_e.set_xlabel("fraction of observed pixels")
    ax_e.set_ylabel("median relative error of z")
    ax_e.set_title("no point: most runs returned no z", fontsize=9)
    ax_e.set_yscale("log")
    ax_e.grid(alpha=0.3, which="both")
    runs = _runs(rows)
    fig.suptitle(f"Partial observation on the MNIST ReLU decoder 20-60-784 ({runs} runs per point)")
    save_figure(fig, path)


def figure_projection(rows: list[dict[str, Any]], path: Path) -> None:
    """Median misfit (z-error for the noisy codes) per method, one panel per part."""
    parts = [p for p in ("digits", "noisy-codes", "sensing", "small-nets")
             if any(r["part"] == p for r in rows)]
    fig = new_figure(5.0 * max(len(parts), 1), 4.4)
    axes = np.atleast_1d(fig.subplots(1, max(len(parts), 1)))
    for ax, part in zip(axes, parts, strict=False):
        sel = [r for r in rows if r["part"] == part]
        groups = list(dict.fromkeys(
            (r["network"], r["level"], r["m"]) for r in sel))
        methods = _methods(sel)
        width = 0.8 / max(len(methods), 1)
        column = "error" if part == "noisy-codes" else "misfit"
        for j, method in enumerate(methods):
            med = []
            for g in groups:
                vals = [inf_nan(r[column]) for r in sel
                        if (r["network"], r["level"], r["m"]) == g and r["method"] == method]
                med.append(float(np.median(vals)) if vals else np.nan)
            ax.bar(np.arange(len(groups)) + j * width, med, width,
                   label=_LABELS.get(method, method), color=_COLORS.get(method))
        labels = [g[0].replace("shipped-", "") + (f"\nnoise {g[1]:g}" if g[1] else "")
                  + (f"\nm = {g[2]}" if g[2] else "") for g in groups]
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("median relative error of z" if column == "error" else
                      ("median relative l_inf misfit" if part == "small-nets" else
                       "median relative misfit ||G(z) - x|| / ||x||"))
        ax.set_title(part, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.suptitle(f"Projection onto the range ({_runs(rows)} runs per bar)")
    save_figure(fig, path)
