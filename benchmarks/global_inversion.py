"""The global method's numbers (docs/results.md, docs/performance.md): settled rates and times.

    python benchmarks/global_inversion.py authors [--codes 200] [--seconds 10]
    python benchmarks/global_inversion.py random  [--codes 100]
    python benchmarks/global_inversion.py offrange [--codes 50]
    python benchmarks/global_inversion.py engines [--seconds 10] [--samples 40]

``authors``: the paper authors' ReLU decoder 20-60-784 (../shared/models/invertgan_lp),
z ~ N(0, I) (seed 0), x = G(z) in float64: the layer-wise method alone, then every sample
it leaves unsettled through `invert` (its default fallback, the global search) one at a
time, timed. ``random``: random ReLU nets where the layer-wise method fails for lack of
expansion. ``offrange``: 5-20-50, random x off the range, the proved global l_inf misfit.
``engines``: the same model, on the authors' unsettled samples, by the branch and bound,
HiGHS's MILP (scipy) and SCIP (pyscipopt, when installed), with and without bound
tightening. Run it with one BLAS thread (OPENBLAS_NUM_THREADS=1) on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

import preimage  # noqa: E402
from preimage import GlobalSettings, Network, invert, random_network  # noqa: E402

AUTHORS = (Path(__file__).resolve().parents[2] / "shared" / "models" / "invertgan_lp"
           / "trained_vae_20_60_784_nobias.pth")
SETTLED = ("unique", "non_unique")
#: Print one line per sample left to the global search.
VERBOSE = True


def authors_net() -> Network:
    import torch

    sd = torch.load(AUTHORS, map_location="cpu", weights_only=True)
    return Network.from_state_dict(sd, ["fc3", "fc4"])


def _times(values: list[float]) -> str:
    if not values:
        return "-"
    return f"median {np.median(values):.2f} s, max {np.max(values):.2f} s"


def _unsettled_run(net: Network, z: np.ndarray, seconds: float, label: str) -> None:
    """The layer-wise method on the batch, then each sample it leaves open on its own."""
    x = net.forward(z)
    start = time.perf_counter()
    alone = invert(net, x, rtol=1e-9, fallback=GlobalSettings(enabled=False))
    first = time.perf_counter() - start
    status = np.array(alone.status, dtype=object)
    todo = np.flatnonzero(~np.isin(status, SETTLED))
    times, boxed = [], 0
    witnesses_ok = True
    for b in todo:
        t0 = time.perf_counter()
        one = invert(net, x[b], rtol=1e-9, fallback=GlobalSettings(seconds=seconds))
        times.append(time.perf_counter() - t0)
        status[b] = one.status + (" (out of time)" if one.out_of_time else "")
        boxed += not one.proof_domain.startswith("every z")
        if VERBOSE:
            print(f"  sample {b}: {alone.status[b]} -> {status[b]} in {times[-1]:.2f} s "
                  f"({'box' if not one.proof_domain.startswith('every z') else 'every z'})",
                  flush=True)
        if one.status == "non_unique":
            witness = net.forward(one.witness[None])[0]
            witnesses_ok &= bool(np.max(np.abs(witness - x[b])) <= 1e-8 * np.max(np.abs(x[b])))
        if one.status == "unique":
            witnesses_ok &= bool(np.max(np.abs(one.z - z[b])) <= 1e-6 * np.max(np.abs(z[b])))
    values, counts = np.unique(status.astype(str), return_counts=True)
    settled = np.isin(status, SETTLED).sum()
    print(f"{label}: {len(z)} codes; layer-wise alone {alone.counts()} in {first:.2f} s; "
          f"{len(todo)} left to the global search ({_times(times)}, {boxed} needed the box)")
    print(f"  final: {dict(zip(values.tolist(), counts.tolist(), strict=True))}; settled "
          f"{settled}/{len(z)}; unique = true code and witnesses checked: {witnesses_ok}")


def authors(args: argparse.Namespace) -> None:
    net = authors_net()
    z = np.random.default_rng(args.seed).standard_normal((args.codes, net.latent_dim))
    _unsettled_run(net, z, args.seconds, f"authors' decoder {net}")


def random_nets(args: argparse.Namespace) -> None:
    for widths in ([10, 15, 30], [8, 12, 40]):
        net = random_network(widths, seed=args.seed)
        z = np.random.default_rng(args.seed).standard_normal((args.codes, widths[0]))
        _unsettled_run(net, z, args.seconds, f"random {widths}")


def offrange(args: argparse.Namespace) -> None:
    net = random_network([5, 20, 50], seed=args.seed)
    rng = np.random.default_rng(args.seed)
    x = np.abs(rng.standard_normal((args.codes, 50)))
    start = time.perf_counter()
    res = invert(net, x, method="global", noise="linf", fallback=GlobalSettings(
        seconds=args.seconds))
    total = time.perf_counter() - start
    gap = res.misfit - res.misfit_bound
    closed = gap <= 1e-6 * res.misfit + 1e-9 * np.max(np.abs(x), axis=1)
    print(f"off the range, random 5-20-50, {args.codes} x = |N(0, I)|, l_inf: gap closed for "
          f"{int(closed.sum())}/{args.codes}; {int(res.out_of_time.sum())} out of time; "
          f"misfit median {np.median(res.misfit):.4g}; max gap {np.max(gap):.2g}; "
          f"{total / args.codes:.2f} s per x; domain from the data for "
          f"{sum('every z' in d for d in res.proof_domain)}")
    descent = invert(net, x, noise="linf")
    worse = descent.misfit > res.misfit * (1 + 1e-6)
    excess = np.median(descent.misfit[worse] / res.misfit[worse]) - 1 if worse.any() else 0.0
    print(f"  the cell descent alone ended above the global minimum for {int(worse.sum())}/"
          f"{args.codes} (median excess {excess:.2%})")


def engines(args: argparse.Namespace) -> None:
    from preimage.methods.layerwise import _invert_one
    from preimage.solvers.exhaustive import settle

    net = authors_net()
    z = np.random.default_rng(args.seed).standard_normal((args.codes, net.latent_dim))
    x = net.forward(z)
    alone = invert(net, x, rtol=1e-9, fallback=GlobalSettings(enabled=False))
    todo = np.flatnonzero(~np.isin(np.asarray(alone.status), SETTLED))[: args.samples]
    for engine, tighten in (("branch", False), ("branch", True), ("milp", False),
                            ("milp", True), ("scip", False)):
        times, verdicts = [], []
        for b in todo:
            known = _invert_one(net, x[b], 1e-9).z
            known = known if np.all(np.isfinite(known)) else None
            t0 = time.perf_counter()
            if engine == "scip":
                verdict = _scip(net, x[b], known, args.seconds)
            else:
                verdict = settle(net, 1, x[b], rtol=1e-9, z_known=known, seconds=args.seconds,
                                 engine=engine, tighten=tighten).status
            if verdict is None:
                return
            times.append(time.perf_counter() - t0)
            verdicts.append(verdict)
        v, c = np.unique(verdicts, return_counts=True)
        print(f"{engine}{' + tightening' if tighten else ''}: {len(todo)} samples, "
              f"{dict(zip(v.tolist(), c.tolist(), strict=True))}, {_times(times)}", flush=True)


def _scip(net: Network, y: np.ndarray, known: np.ndarray | None, seconds: float) -> str | None:
    """The same MILP (data bounds, box 10) in SCIP: a preimage, then a no-good cut."""
    try:
        import pyscipopt
    except ImportError:
        print("scip: pyscipopt is not installed (pip install pyscipopt)")
        return None
    from preimage.solvers.exhaustive import _relu_below  # noqa: F401  (same preconditions)
    from preimage.solvers.layer import active_set
    from preimage.solvers.milp import reproduces
    from preimage.solvers.relaxation import Relaxation, data_bounds, exact_top

    deadline = time.perf_counter() + seconds
    cons = active_set(net.layers[1], y, 1e-9)
    top = exact_top(net, 1, cons, 0.0)
    domain = data_bounds(net, 1, top, box=10.0)
    relax = Relaxation(net, 1, domain, top)
    m, row_lo, row_hi, col_lo, col_hi, integ, free = relax.milp_arrays()
    cuts: list[np.ndarray] = []
    z_star = known
    for _ in range(3):
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        model = pyscipopt.Model()
        model.hideOutput()
        model.setParam("limits/time", left)
        v = [model.addVar(lb=None if not np.isfinite(col_lo[j]) else col_lo[j],
                          ub=None if not np.isfinite(col_hi[j]) else col_hi[j],
                          vtype="B" if integ[j] else "C") for j in range(m.shape[1])]
        for i in range(m.shape[0]):
            row = m.getrow(i)
            expr = pyscipopt.quicksum(c * v[j] for j, c in zip(row.indices, row.data,
                                                                strict=True))
            if np.isfinite(row_lo[i]) and row_lo[i] == row_hi[i]:
                model.addCons(expr == row_lo[i])
                continue
            if np.isfinite(row_lo[i]):
                model.addCons(expr >= row_lo[i])
            if np.isfinite(row_hi[i]):
                model.addCons(expr <= row_hi[i])
        for on in cuts:
            model.addCons(pyscipopt.quicksum(1 - v[j] for j in free[on])
                          + pyscipopt.quicksum(v[j] for j in free[~on]) >= 1)
        model.optimize()
        if model.getStatus() == "infeasible":
            return "unique" if z_star is not None else "infeasible"
        if model.getNSols() == 0:
            break
        u = np.array([model.getVal(var) for var in v])
        zz = u[: net.latent_dim]
        from preimage.solvers.cell import newton_refine
        zz = newton_refine(net, cons.target, cons.active, zz)
        if not reproduces(net, 1, y, zz, 1e-9):
            break
        if z_star is None:
            z_star = zz
        elif np.max(np.abs(zz - z_star)) > 1e-6 * max(1.0, np.max(np.abs(z_star))):
            return "non_unique"
        cuts.append(u[free] > 0.5)
    return "feasible" if z_star is not None else "failed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["authors", "random", "offrange", "engines"])
    parser.add_argument("--codes", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.codes is None:
        args.codes = {"authors": 200, "random": 100, "offrange": 50, "engines": 200}[args.what]
    print(f"preimage {preimage.__version__ if hasattr(preimage, '__version__') else ''}; "
          f"per-sample budget {args.seconds:g} s")
    {"authors": authors, "random": random_nets, "offrange": offrange,
     "engines": engines}[args.what](args)


if __name__ == "__main__":
    main()
