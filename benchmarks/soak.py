"""A soak: millions of samples through the batched exact path, chunk after chunk (issue 15).

The paper's 20-100-500 random ReLU net; each chunk draws codes z ~ N(0, I),
computes x = G(z) and inverts it with `preimage.invert` (defaults: the batched
path). Every sample is accounted for: the result has one status per sample,
from the package's vocabulary; a "unique" z is the true code (relative l2
error at most 1e-6); no sample is "infeasible" (x is in the range); every
answer reproduces x. The resident memory is read after every chunk: it must
stay flat (no growth from chunk to chunk), and the peak is reported.

    nice python benchmarks/soak.py --samples 10000000 --chunk 50000   # the issue's run

`tests/test_soak.py` runs a small soak of the same function.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from preimage import STATUSES, invert, random_network
from preimage.methods.layerwise import ANSWER_RTOL
from preimage.results import SUCCESS

#: "unique" answers must be the true code within this relative l2 error.
Z_RTOL = 1e-6


def resident_mb() -> float:
    """This process's resident memory now, in MB (Linux: /proc/self/statm)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def peak_mb() -> float:
    """The peak resident memory of this process so far, in MB (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def soak(samples: int, chunk: int, *, widths: tuple[int, ...] = (20, 100, 500), seed: int = 0,
         report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Invert `samples` samples in chunks of `chunk`; counts, checks and memory (module doc).

    ``report(progress)`` after each chunk (the command prints it every few chunks).
    """
    net = random_network(list(widths), seed=seed)
    rng = np.random.default_rng(seed + 1)
    counts: Counter[str] = Counter()
    lost = misreported = done = 0
    worst: list[str] = []
    memory = []
    start = time.perf_counter()
    while done < samples:
        b = min(chunk, samples - done)
        z = rng.standard_normal((b, net.latent_dim))
        x = net.forward(z)
        result = invert(net, x)
        status = np.asarray(result.status)
        if status.shape != (b,) or result.z.shape != (b, net.latent_dim):
            lost += b
            worst.append(f"chunk at {done}: {status.shape} statuses for {b} samples")
        else:
            counts.update(status.tolist())
            known = np.isin(status, STATUSES)
            answered = np.isin(status, SUCCESS)
            err = np.linalg.norm(result.z - z, axis=1) / np.linalg.norm(z, axis=1)
            bad = (~known | (status == "infeasible")
                   | ((status == "unique") & ~(err <= Z_RTOL))
                   | (answered & ~(result.residual <= ANSWER_RTOL * result.rtol))
                   | (answered & ~np.all(np.isfinite(result.z), axis=1)))
            misreported += int(bad.sum())
            for i in np.flatnonzero(bad)[: max(0, 5 - len(worst))]:
                worst.append(f"sample {done + i}: {status[i]} (z error {err[i]:.2e}): "
                             f"{result.message[i][:120]}")
        done += b
        del x, z, result, status
        memory.append(resident_mb())
        if report is not None:
            report({"done": done, "seconds": round(time.perf_counter() - start, 1),
                    "resident_mb": round(memory[-1], 1)})
    seconds = time.perf_counter() - start
    warm = memory[min(len(memory) - 1, max(1, len(memory) // 10))]  # after the first chunks
    return {
        "network": "-".join(map(str, widths)), "samples": done, "chunk": chunk,
        "chunks": len(memory), "statuses": dict(counts), "lost": lost,
        "misreported": misreported, "examples": worst, "seconds": round(seconds, 1),
        "samples_per_s": round(done / seconds, 1),
        "resident_mb": {"first_chunk": round(memory[0], 1), "after_warmup": round(warm, 1),
                        "last_chunk": round(memory[-1], 1), "max": round(max(memory), 1)},
        "growth_after_warmup_mb": round(memory[-1] - warm, 1),
        "peak_rss_mb": round(peak_mb(), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--chunk", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=20, help="print progress every N chunks")
    args = parser.parse_args(argv)
    chunks = [0]

    def report(progress: dict[str, Any]) -> None:
        chunks[0] += 1
        if chunks[0] % args.every == 0:
            print(json.dumps(progress), file=sys.stderr, flush=True)

    result = soak(args.samples, args.chunk, seed=args.seed, report=report)
    print(json.dumps(result, indent=1))
    return 0 if result["lost"] == 0 and result["misreported"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
