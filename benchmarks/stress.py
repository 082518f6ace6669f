"""Honest verdicts under numerical stress: generated networks and codes (issue 15).

Each case is one random generator G and a few codes z, built to be hard on the
arithmetic:

- every layer's weights (and biases) scaled by 10^e, e uniform in [-6, 6];
- some rows duplicated, some shrunk to 1e-12 of their size;
- some units exactly at their threshold for the first code (b_i = -w_i h_i, so
  that w_i h_i + b_i = 0 up to one rounding);
- ReLU or LeakyReLU hidden layers, and a ReLU, LeakyReLU, identity, tanh or
  sigmoid output;
- float64 (x = G(z) by `Network.forward`) or float32: the weights rounded to
  float32, read with `Network.from_torch` from a float32 module, and x = the
  module's own float32 output.

and x = G(z) in the network's own precision, inverted by `preimage.invert`
with its defaults. The checks: no "infeasible" (x is in the range, at the
precision it was computed in); "unique" only with z the true code (relative l2
error at most 1e-6 in float64, 1e-3 in float32); every answer reproduces x
(relative residual at most ANSWER_RTOL rtol, as the method promises);
"non_unique" only with a witness that is a second preimage.

    python benchmarks/stress.py --cases 1000      # the issue's run (a few minutes)

`tests/test_stress.py` runs a small number of cases of the same generator.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from preimage import GlobalSettings, Network, invert
from preimage.methods.layerwise import ANSWER_RTOL

#: "unique" must come with z within this relative l2 error of the true code.
Z_RTOL = {"float64": 1e-6, "float32": 1e-3}
#: the search below a non-unique layer, kept short (it finds preimages, proves nothing)
SEARCH = GlobalSettings(seconds=0.3, starts=2)
CODES = 4


@dataclass
class Case:
    """One generated network, its codes and observations, and how it was made."""

    net: Network
    z: np.ndarray  # (CODES, k), the codes in the network's precision
    x: Any  # (CODES, n) observations: float64 array or float32 tensor
    precision: str
    recipe: dict[str, Any] = field(default_factory=dict)


def make_case(seed: int) -> Case:
    """The case of one seed (module docstring)."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    widths = [k]
    for _ in range(int(rng.integers(1, 4))):
        widths.append(int(widths[-1] * rng.integers(2, 5)))
    hidden = str(rng.choice(["relu", "relu", "leaky_relu"]))
    output = str(rng.choice(["relu", "relu", "leaky_relu", "identity", "tanh", "sigmoid"]))
    precision = str(rng.choice(["float64", "float32"]))
    z = rng.standard_normal((CODES, k))
    if precision == "float32":
        z = z.astype(np.float32).astype(np.float64)
    weights, biases, recipe = [], [], {"widths": widths, "activations": [hidden, output],
                                       "precision": precision, "scales": [], "duplicated": 0,
                                       "near_zero": 0, "at_threshold": 0}
    h = z[:1]
    for i in range(len(widths) - 1):
        n_in, n_out = widths[i], widths[i + 1]
        scale = 10.0 ** rng.uniform(-6, 6)
        w = rng.standard_normal((n_out, n_in)) / np.sqrt(n_out) * scale
        b = rng.standard_normal(n_out) * scale * float(np.mean(np.abs(h))) if rng.random() < 0.6 \
            else None
        for _ in range(int(rng.integers(0, 3))):  # duplicated rows
            a, c = rng.integers(n_out, size=2)
            w[a] = w[c]
            if b is not None:
                b[a] = b[c]
            recipe["duplicated"] += 1
        for _ in range(int(rng.integers(0, 2))):  # near-zero rows
            w[rng.integers(n_out)] *= 1e-12
            recipe["near_zero"] += 1
        if b is not None and rng.random() < 0.5:  # units exactly at the threshold
            at = rng.choice(n_out, size=min(n_out, int(rng.integers(1, 4))), replace=False)
            b[at] = -(w[at] @ h[0])
            recipe["at_threshold"] += len(at)
        weights.append(w)
        biases.append(b)
        recipe["scales"].append(round(float(np.log10(scale)), 2))
        kind = hidden if i < len(widths) - 2 else output
        pre = h @ w.T + (0.0 if b is None else b)  # (h: the first code's, for thresholds)
        h = np.maximum(pre, 0.0) if kind == "relu" else np.where(pre > 0, pre, 0.2 * pre)
    kinds = [hidden] * (len(weights) - 1) + [output]
    net = Network.from_weights(weights, biases, activation=kinds, negative_slope=0.2)
    if precision == "float64":
        return Case(net, z, net.forward(z), precision, recipe)
    import torch

    module = net.to_torch(torch.float32).eval()
    net32 = Network.from_torch(module)  # the float32 weights, exactly, and source_dtype
    with torch.no_grad():
        x32 = module(torch.tensor(z, dtype=torch.float32))
    return Case(net32, z, x32, precision, recipe)


def check(case: Case) -> tuple[Counter[str], list[str], list[float]]:
    """Invert a case; (status counts, the violations found, each described, and the
    relative z errors of its "unique" answers)."""
    result = invert(case.net, case.x, fallback=SEARCH)
    x = np.asarray(case.x, dtype=np.float64)
    status = np.asarray(result.status)
    problems = []
    errors = []
    for b, s in enumerate(status):
        where = f"{case.recipe} code {b}: {s}: {result.message[b][:160]}"
        if s == "infeasible":
            problems.append(f"infeasible for x = G(z): {where}")
        if s in ("unique", "non_unique", "feasible"):
            fit = float(np.max(np.abs(case.net.forward(result.z[b]) - x[b])))
            scale = max(float(np.max(np.abs(x[b]))), 1e-300)
            if fit > ANSWER_RTOL * result.rtol * scale:  # (what the method promises)
                problems.append(f"answer misses x by {fit / scale:.2e}: {where}")
        if s == "unique":
            err = np.linalg.norm(result.z[b] - case.z[b]) / max(np.linalg.norm(case.z[b]),
                                                                1e-300)
            errors.append(float(err))
            if err > Z_RTOL[case.precision]:
                problems.append(f"unique with a wrong z (error {err:.2e}): {where}")
        if s == "non_unique":
            w = result.witness[b]
            fit = float(np.max(np.abs(case.net.forward(w) - x[b])))
            scale = max(float(np.max(np.abs(x[b]))), 1e-300)
            if not np.all(np.isfinite(w)) or fit > 100 * result.rtol * scale:
                problems.append(f"non_unique with a witness that misses x: {where}")
    return Counter(status.tolist()), problems, errors


def run(cases: int, first_seed: int = 0) -> dict[str, Any]:
    """`cases` cases from `first_seed` on: counts and violations."""
    counts: Counter[str] = Counter()
    by_precision: Counter[str] = Counter()
    problems: list[str] = []
    recipes: Counter[str] = Counter()
    worst = {"float64": 0.0, "float32": 0.0}
    start = time.perf_counter()
    for seed in range(first_seed, first_seed + cases):
        case = make_case(seed)
        found, wrong, errors = check(case)
        worst[case.precision] = max([worst[case.precision], *errors])
        counts.update(found)
        by_precision[case.precision] += 1
        recipes["duplicated rows"] += case.recipe["duplicated"]
        recipes["near-zero rows"] += case.recipe["near_zero"]
        recipes["units at threshold"] += case.recipe["at_threshold"]
        problems += [f"seed {seed}: {p}" for p in wrong]
    return {"cases": cases, "codes": cases * CODES, "networks_by_precision": dict(by_precision),
            "statuses": dict(counts), "recipes": dict(recipes),
            "largest_unique_z_error": {k: float(f"{v:.3g}") for k, v in worst.items()},
            "violations": len(problems),
            "problems": problems[:20], "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    args = parser.parse_args(argv)
    report = run(args.cases, args.seed)
    print(json.dumps(report, indent=1))
    return 0 if report["violations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
