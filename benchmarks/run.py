"""Speed of exact inversion, side by side with the paper's LP and with Adam.

One run measures, on the same seeded inputs x = G(z), z ~ N(0, I):

- ``preimage``: `preimage.invert` (batched exact method, certificates included);
- ``naive-lp``: the paper's method as published, one `scipy.optimize.linprog`
  feasibility LP per layer per sample (active units as equalities, inactive
  ones as inequalities, h >= 0 below the top layer), samples one after the
  other, no null space, no certificate; measured on a subset and scaled;
- ``adam``: `preimage.invert(method="adam")`, batched, 1000 steps, one
  restart (CSGM uses 10: multiply its time by 10), on a subset and scaled;

and, for reference, one float64 forward pass of the same batch in torch (the median
of FORWARD_REPEATS timings).
Every measurement runs in its own subprocess, so its peak resident memory
(``ru_maxrss``) is its own (``--quick`` runs them in one process instead).
It prints a table and appends one JSON line to ``benchmarks/results.jsonl``
(``--results``) with the machine's description.

    python benchmarks/run.py            # the full run (7-9 minutes on 2 cores)
    python benchmarks/run.py --quick    # a smoke run (seconds)

Two more suites, each one JSON line of its own ("suite"):

    python benchmarks/run.py --parallel       # 2 worker processes vs 2 threads (3-5 min)
    python benchmarks/run.py --stream 1000000 # a million samples from a .npy (5-10 min)

``--parallel``: the same batch inverted by one process with 2 threads
(``invert(n_jobs=2)``), by one thread, and by a Dask ``LocalCluster`` of 2
single-threaded worker processes (`preimage.jobs.invert_stream`, chunks as
tasks, results written to a folder), on 100-500-784 and the shipped MNIST
decoder: samples/s of each and the ratio processes / threads.
``--stream N``: N samples of 20-100-500 written to a ``.npy``, then (each in a
process of its own, for its own peak RSS) `invert_stream` over the file,
memory-mapped chunk by chunk, and in-memory `invert` on batches of the same
size (the stream's chunks) for the yardstick, measured before and after the
stream: the stream's peak RSS and its throughput as a fraction of in-memory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
AUTHORS_DECODER = ROOT.parent / "shared" / "models" / "invertgan_lp" / (
    "trained_vae_20_60_784_nobias.pth"
)
#: "Exact recovery": relative l2 error of z at most this (as in `preimage.cli`).
EXACT_RTOL = 1e-6

#: A unit of an LP's answer counts as active above this (relative), in the naive method.
LP_THRESHOLD = 1e-6

#: name -> (batch sizes for preimage, naive-LP samples, Adam samples, naive-LP time limit)
FULL: dict[str, tuple[tuple[int, ...], int, int, float]] = {
    "20-100-500": ((100, 1000, 10000), 30, 300, 60.0),
    "100-500-784": ((100,), 8, 50, 60.0),
    "200-600-2000": ((100,), 2, 20, 60.0),
    "512-2048-8192": ((1000,), 1, 4, 120.0),
    "mnist-relu-20-60-784": ((1000,), 30, 300, 60.0),
    # the shipped convolutional decoder: the default method runs the hybrid there (its last
    # layer contracts), and the paper's per-layer LP over 12,544 unknowns is not attempted
    "mnist-conv-32-6272-12544-784": ((10,), 0, 10, 60.0),
}
QUICK: dict[str, tuple[tuple[int, ...], int, int, float]] = {
    "20-100-500": ((100,), 2, 20, 60.0),
}
ADAM_STEPS = {"full": 1000, "quick": 20}
#: The forward pass, the yardstick of the "x a forward pass" ratios, is timed this many times.
FORWARD_REPEATS = 21


# --- the networks and data ----------------------------------------------------------


def load_network(name: str) -> Any:
    """The benchmark's generator `name` (random nets seeded; the MNIST decoder)."""
    import preimage

    if name.startswith("mnist"):
        try:
            from preimage.model.mnist import shipped_decoder

            return shipped_decoder("conv" if name.startswith("mnist-conv") else "relu")
        except (ImportError, AttributeError, FileNotFoundError, KeyError):
            pass
        if not AUTHORS_DECODER.exists():
            return None
        import torch

        sd = torch.load(AUTHORS_DECODER, map_location="cpu", weights_only=True)
        return preimage.Network.from_state_dict(sd, ["fc3", "fc4"])
    widths = [int(w) for w in name.split("-")]
    return preimage.random_network(widths, seed=0)


def data(net: Any, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    z = np.random.default_rng(seed).standard_normal((batch, net.latent_dim))
    return z, net.forward(z)


def recovery(z_hat: np.ndarray, z: np.ndarray) -> tuple[float, float, float]:
    """(fraction with relative error <= EXACT_RTOL, median and max relative error)."""
    err = np.linalg.norm(z_hat - z, axis=1) / np.linalg.norm(z, axis=1)
    err = np.where(np.isfinite(err), err, np.inf)
    return float(np.mean(err <= EXACT_RTOL)), float(np.median(err)), float(np.max(err))


# --- one measurement (runs in a child process) ---------------------------------------


def naive_lp(net: Any, x: np.ndarray, time_limit: float) -> tuple[np.ndarray, bool]:
    """The paper's method: one feasibility LP per layer, top down; (z, finished in time)."""
    from preimage.methods.paper_lp import paper_layerwise_lp

    # the LP's answer is exact only to HiGHS's tolerance (1e-7): threshold it
    z, timed_out = paper_layerwise_lp(
        net, x, rtol=LP_THRESHOLD, floor=1.0, time_limit=time_limit
    )
    return (np.full(net.latent_dim, np.nan) if z is None else z), not timed_out


def measure(name: str, method: str, batch: int, threads: int, steps: int,
            time_limit: float) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    import preimage

    def adam(x: np.ndarray, steps: int) -> Any:
        options = {"steps": steps, "restarts": 1}
        return preimage.invert(net, x, method="adam", options=options)

    net = load_network(name)
    z, x = data(net, batch, seed=1)
    _, warm_x = data(net, 4, seed=2)
    row: dict[str, Any] = {"config": name, "method": method, "batch": batch}
    if method == "preimage":
        preimage.invert(net, warm_x)
        start = time.perf_counter()
        result = preimage.invert(net, x)
        elapsed = time.perf_counter() - start
        z_hat = result.z
        row["counts"] = result.counts()
        row["ran"] = result.method
        row["lp_fraction"] = float(np.mean([rep.used_lp.any() for rep in result.layers]))
        row["samples_with_lp"] = int(np.any([rep.used_lp for rep in result.layers], axis=0).sum())
    elif method == "naive-lp":
        naive_lp(net, warm_x[0], time_limit)
        start = time.perf_counter()
        outs = [naive_lp(net, xi, time_limit) for xi in x]
        elapsed = time.perf_counter() - start
        z_hat = np.stack([o[0] for o in outs])
        row["timed_out"] = int(sum(not o[1] for o in outs))
    elif method == "adam":
        adam(warm_x, 5)
        start = time.perf_counter()
        result = adam(x, steps)
        elapsed = time.perf_counter() - start
        z_hat = result.z
        row["steps"] = steps
        row["restarts"] = 1
    elif method == "forward":
        model = net.to_torch(torch.float64)
        zt = torch.as_tensor(z)
        with torch.no_grad():
            model(zt)
            times = []  # the median of many: one run takes milliseconds, a hiccup as much
            for _ in range(FORWARD_REPEATS):
                start = time.perf_counter()
                model(zt)
                times.append(time.perf_counter() - start)
            elapsed = float(np.median(times))
        z_hat = z
    else:
        raise ValueError(method)
    rate, median, worst = recovery(z_hat, z)
    row.update(
        seconds=elapsed,
        samples_per_s=batch / elapsed,
        exact_recovery=rate,
        median_rel_error=median,
        max_rel_error=worst,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    return row


# --- parallel: worker processes vs threads ---------------------------------------------

#: name -> (batch, chunk size of the process version)
PARALLEL: dict[str, tuple[int, int]] = {
    "100-500-784": (120, 10),
    "mnist-relu-20-60-784": (3000, 250),
}


def parallel_measure(name: str, how: str, batch: int, chunk: int, out: str) -> dict[str, Any]:
    """One batch of `name` inverted by `how`: "threads-2", "threads-1" or "processes-2"."""
    import torch

    import preimage

    net = load_network(name)
    z, x = data(net, batch, seed=1)
    _, warm_x = data(net, 8, seed=2)
    row: dict[str, Any] = {"config": name, "method": how, "batch": batch}
    if how.startswith("threads"):
        threads = int(how.split("-")[1])
        torch.set_num_threads(threads)
        preimage.invert(net, warm_x, n_jobs=threads)
        start = time.perf_counter()
        result = preimage.invert(net, x, n_jobs=threads)
        elapsed = time.perf_counter() - start
    else:
        from distributed import Client, LocalCluster

        from preimage.jobs import invert_stream, load_results

        torch.set_num_threads(1)
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        with Client(cluster) as client:
            # warm: both workers import preimage and torch, and see the network once
            invert_stream(net, np.concatenate([warm_x] * 2), Path(out) / "warm",
                          executor=client, chunk_size=8)
            start = time.perf_counter()
            invert_stream(net, x, Path(out) / "run", executor=client, chunk_size=chunk)
            elapsed = time.perf_counter() - start
        cluster.close()
        result = load_results(Path(out) / "run")
        row["chunk_size"] = chunk
    row.update(
        counts=result.counts(),
        samples_with_lp=int(np.any([rep.used_lp for rep in result.layers], axis=0).sum()),
        seconds=elapsed, samples_per_s=batch / elapsed,
        exact_recovery=recovery(result.z, z)[0],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    return row


def parallel_table(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r.get("config"), r.get("method")): r for r in rows if "error" not in r}
    out = ["| config | method | batch | samples/s | x threads-2 | samples with an LP |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r.get('config')} | {r.get('method')} | | | | {r['error'][:60]} |")
            continue
        ref = by.get((r["config"], "threads-2"))
        ratio = f"{r['samples_per_s'] / ref['samples_per_s']:.2f}x" if ref else ""
        how = r["method"] + (f" (chunks of {r['chunk_size']})" if "chunk_size" in r else "")
        out.append(f"| {r['config']} | {how} | {r['batch']} | {_rate(r['samples_per_s'])} | "
                   f"{ratio} | {r['samples_with_lp']} |")
    return out


# --- stream: a dataset beyond memory --------------------------------------------------

STREAM_NET = "20-100-500"
#: Chunks of in-memory `invert` timed for the yardstick, before and after the stream.
YARDSTICK_CHUNKS = 24


def stream_data(n: int, path: str) -> dict[str, Any]:
    """x = G(z) of n codes, written block by block to a .npy (never whole in memory)."""
    net = load_network(STREAM_NET)
    rng = np.random.default_rng(1)
    block = 50_000
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_2_0(
            fh, {"descr": "<f8", "fortran_order": False, "shape": (n, net.output_dim)})
        for lo in range(0, n, block):
            fh.write(net.forward(rng.standard_normal((min(block, n - lo), net.latent_dim)))
                     .tobytes())
    return {"samples": n, "bytes": os.path.getsize(path)}


def stream_measure(how: str, path: str, out: str, threads: int) -> dict[str, Any]:
    """"stream": `invert_stream` over the file; "in-memory": `invert` on chunks in memory."""
    import torch

    import preimage
    from preimage.jobs import ResultsFolder, invert_stream
    from preimage.methods.batched.context import chunk_size

    torch.set_num_threads(threads)
    net = load_network(STREAM_NET)
    x = np.load(path, mmap_mode="r")
    n = x.shape[0]
    chunk = chunk_size(net, n, None)
    preimage.invert(net, np.array(x[:8]))  # warm
    row: dict[str, Any] = {"config": STREAM_NET, "method": how, "samples": n,
                           "chunk_size": chunk, "threads": threads}
    if how == "stream":
        del x
        start = time.perf_counter()
        report = invert_stream(net, path, out)
        elapsed = time.perf_counter() - start
        row.update(samples_done=report.computed_samples, counts=report.counts,
                   complete=report.complete,
                   result_bytes=sum(p.stat().st_size for p in ResultsFolder(out).chunks.iterdir()))
    else:
        count = min(YARDSTICK_CHUNKS, -(-n // chunk))
        batches = [np.array(x[i * chunk : (i + 1) * chunk]) for i in range(count)]
        del x
        start = time.perf_counter()
        for batch in batches:
            preimage.invert(net, batch)
        elapsed = time.perf_counter() - start
        row.update(samples_done=sum(b.shape[0] for b in batches))
    row.update(seconds=elapsed, samples_per_s=row["samples_done"] / elapsed,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def run_task(task: str, **kwargs: Any) -> dict[str, Any]:
    """`TASKS[task](**kwargs)` in a child process (its own peak RSS); its JSON row."""
    return _run_self(["--task", task, json.dumps(kwargs)])


TASKS = {"parallel": parallel_measure, "stream-data": stream_data, "stream": stream_measure}


def _record(rows: list[dict], row: dict, name: str, method: str, batch: int, *,
            width: int) -> None:
    """Label a measured row with its configuration and method, keep it and print its line
    (its rate, or its error)."""
    row.setdefault("config", name)
    row.setdefault("method", method)
    rows.append(row)
    rate = row.get("samples_per_s")
    print(f"  {name:>22} {method:>{width}} B={batch:<6} "
          + (f"{rate:12,.1f} samples/s" if rate else row.get("error", "")), flush=True)


def run_parallel(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    rows = []
    plan = {k: PARALLEL[k] for k in args.configs.split(",")} if args.configs else PARALLEL
    for name, (batch, chunk) in plan.items():
        for how in ("threads-1", "threads-2", "processes-2"):
            with tempfile.TemporaryDirectory() as tmp:
                row = run_task("parallel", name=name, how=how, batch=batch, chunk=chunk, out=tmp)
            _record(rows, row, name, how, batch, width=11)
    print()
    print("\n".join(parallel_table(rows)))
    return {"suite": "parallel", "results": rows}


def run_stream(args: argparse.Namespace) -> dict[str, Any]:
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="preimage-stream-", dir=args.scratch))
    try:
        path, out = str(tmp / "x.npy"), str(tmp / "results")
        made = run_task("stream-data", n=args.stream, path=path)
        print(f"  data: {made}", flush=True)
        rows = []
        for how in ("in-memory", "stream", "in-memory"):
            row = run_task("stream", how=how, path=path, out=out, threads=args.threads)
            rows.append(row)
            print(f"  {how:>9}: " + (f"{row['samples_per_s']:,.0f} samples/s, peak RSS "
                                    f"{row['peak_rss_mb']:,.0f} MB" if "error" not in row
                                    else row["error"]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = [r for r in rows if "error" not in r]
    summary: dict[str, Any] = {}
    streamed = [r for r in ok if r["method"] == "stream"]
    yard = [r["samples_per_s"] for r in ok if r["method"] == "in-memory"]
    if streamed and yard:
        summary = {
            "samples": args.stream,
            "stream_samples_per_s": streamed[0]["samples_per_s"],
            "in_memory_samples_per_s": float(np.mean(yard)),
            "throughput_vs_in_memory": streamed[0]["samples_per_s"] / float(np.mean(yard)),
            "stream_peak_rss_mb": streamed[0]["peak_rss_mb"],
            "complete": streamed[0]["complete"],
        }
        print(f"\nstream: {summary['stream_samples_per_s']:,.0f} samples/s = "
              f"{summary['throughput_vs_in_memory']:.0%} of in-memory invert on chunks of "
              f"{streamed[0]['chunk_size']} ({summary['in_memory_samples_per_s']:,.0f}/s); "
              f"peak RSS {summary['stream_peak_rss_mb']:,.0f} MB")
    return {"suite": "stream", "summary": summary, "results": rows}


# --- the driver -----------------------------------------------------------------------


def run_child(args: list[str]) -> dict[str, Any]:
    return _run_self(["--child", *args])


def _run_self(args: list[str]) -> dict[str, Any]:
    """This script with `args` in a child process; the JSON row it prints last."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    # On a shared machine, OpenMP threads that spin while waiting make small torch
    # operations up to 40x slower (measured); passive waiting costs nothing when idle.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_here(job: list[str]) -> dict[str, Any]:
    name, method, batch, threads, steps, limit = job
    return measure(name, method, int(batch), int(threads), int(steps), float(limit))


def machine() -> dict[str, Any]:
    import scipy
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
    }


def table(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r["config"], r["method"]): r for r in rows if "error" not in r}
    header = ["config", "method", "batch", "samples/s", "x naive LP", "x Adam",
              "exact", "median err", "peak RSS MB", "note"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r.get("config", "?"), r.get("method", "?"), "", "", "", "", "", "",
                          "", r["error"][:60]])
            continue
        naive = by.get((r["config"], "naive-lp"))
        adam = by.get((r["config"], "adam"))
        vs_naive = r["samples_per_s"] / naive["samples_per_s"] if naive else None
        vs_adam = r["samples_per_s"] / adam["samples_per_s"] if adam else None
        note = ""
        if r["method"] == "preimage":
            fwd = by.get((r["config"], "forward"))
            if fwd is not None:
                note = f"{fwd['samples_per_s'] / r['samples_per_s']:.0f}x a forward pass"
            if r.get("samples_with_lp"):
                note += f"; {r['samples_with_lp']} samples used the LP"
            if r.get("ran", "exact") != "exact":
                note += f"; invert ran the {r['ran']} (the layer-wise method cannot)"
        if r["method"] == "naive-lp" and r.get("timed_out"):
            note = f"{r['timed_out']} hit the time limit: rate at most this"
        if r["method"] == "adam":
            note = f"{r['steps']} steps, {r['restarts']} restart"
        baseline = r["method"] in ("naive-lp", "adam", "forward")
        lines.append([
            r["config"], r["method"], str(r["batch"]), _rate(r["samples_per_s"]),
            "" if vs_naive is None or baseline else f"{vs_naive:,.0f}x",
            "" if vs_adam is None or baseline else f"{vs_adam:,.1f}x",
            "" if r["method"] == "forward" else f"{r['exact_recovery']:.0%}",
            "" if r["method"] == "forward" else f"{r['median_rel_error']:.0e}",
            f"{r['peak_rss_mb']:,.0f}", note,
        ])
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return out


def _rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on 20-100-500 only")
    parser.add_argument("--results", type=Path, default=HERE / "results.jsonl",
                        help="JSON-lines file to append this run to")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated subset of: " + ", ".join(FULL))
    parser.add_argument("--table", action="store_true",
                        help="only print the table of the last run recorded in --results")
    parser.add_argument("--parallel", action="store_true",
                        help="2 worker processes vs 2 threads (suite 'parallel')")
    parser.add_argument("--stream", type=int, default=None, metavar="N",
                        help="stream N samples from a .npy (suite 'stream')")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder for --stream's data and results (default: the temp dir)")
    parser.add_argument("--child", nargs=6, metavar=("CONFIG", "METHOD", "BATCH", "THREADS",
                                                     "STEPS", "LIMIT"), help=argparse.SUPPRESS)
    parser.add_argument("--task", nargs=2, metavar=("NAME", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.task:
        print(json.dumps(TASKS[args.task[0]](**json.loads(args.task[1]))))
        return 0
    if args.parallel or args.stream is not None:
        info = machine()
        started = time.perf_counter()
        print(f"machine: {info['cpu']}, {info['cpus']} CPUs, load {info['load_average']}",
              flush=True)
        record = run_parallel(args) if args.parallel else run_stream(args)
        record = {
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **record,
            "quick": False,
            "threads": args.threads,
            "machine": info,
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "seconds": round(time.perf_counter() - started, 1),
        }
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"\nappended to {args.results}")
        return 0
    if args.child:
        name, method, batch, threads, steps, limit = args.child
        row = measure(name, method, int(batch), int(threads), int(steps), float(limit))
        print(json.dumps(row))
        return 0

    if args.table:
        last = json.loads(args.results.read_text().splitlines()[-1])
        show = parallel_table if last.get("suite") == "parallel" else table
        if last.get("suite") == "stream":
            print(json.dumps(last["summary"], indent=1))
        else:
            print("\n".join(show(last["results"])))
        return 0
    plan = QUICK if args.quick else FULL
    if args.configs:
        plan = {k: FULL[k] for k in args.configs.split(",")}
    steps = ADAM_STEPS["quick" if args.quick else "full"]
    info = machine()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    print(f"machine: {info['cpu']}, {info['cpus']} CPUs, load {info['load_average']}; "
          f"torch threads {args.threads}", flush=True)
    for name, (batches, n_naive, n_adam, limit) in plan.items():
        if name.startswith("mnist") and _missing_mnist():
            print(f"{name}: no decoder available, skipped", flush=True)
            continue
        jobs = [("forward", max(batches))]
        jobs += [("preimage", b) for b in batches]
        jobs += [("naive-lp", n_naive)] if n_naive else []
        jobs += [("adam", n_adam)]
        for method, batch in jobs:
            job = [name, method, str(batch), str(args.threads), str(steps), str(limit)]
            # --quick measures in this process (its peak RSS is then the run's so far).
            row = measure_here(job) if args.quick else run_child(job)
            _record(rows, row, name, method, batch, width=9)
    lines = table(rows)
    print()
    print("\n".join(lines))
    record = {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "threads": args.threads,
        "exact_rtol": EXACT_RTOL,
        "machine": info,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "seconds": round(time.perf_counter() - started, 1),
        "results": rows,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(f"\nappended to {args.results}")
    return 0


def _missing_mnist() -> bool:
    try:
        from preimage.model import mnist  # noqa: F401

        return False
    except ImportError:
        return not AUTHORS_DECODER.exists()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
