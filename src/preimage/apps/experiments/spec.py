"""What an experiment is: its grid of settings, its runs, its rows (no I/O, no figures).

Every experiment is a grid of *settings* (a network, a noise level, a latent
dimension, ...) times ``runs`` random draws. Each draw is inverted by every
method of the experiment and gives one row per (method, run) with the columns

    experiment, <the setting's parameters>, method, run, seed,
    error, misfit, in_range, status, time

- ``error``: ||z_hat - z||_2 / ||z||_2 against the true code (NaN where the
  method returned no z, or where there is no true code: real digits);
- ``misfit``: ||G(z_hat) - x||_2 / ||x||_2 against what the method saw (the
  observed pixels only, for partial observations);
- ``in_range``: |G(z_hat) - x|_inf <= IN_RANGE_RTOL |x|_inf, i.e. G(z_hat) = x;
- ``status``: the method's verdict (`preimage.invert` statuses; gradient
  descent reports "feasible" or "failed");
- ``time``: seconds per run (a batched call's wall time divided by its runs).

Randomness is keyed, not sequential: the code, noise direction and mask of run
``r`` of a setting come from ``numpy.random.default_rng([seed, <setting
ids>, r])`` (`keyed_rng`), so a run's data do not depend on which other runs
are computed. That is what makes the experiments resumable
(`preimage.apps.experiments.runner`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preimage.model.network import Network
from preimage.results import InversionResult

#: G(z_hat) = x when the relative l_inf misfit is at most this.
IN_RANGE_RTOL = 1e-6
#: A run "succeeds" (recovers z) when the relative l2 error of z is below this.
SUCCESS_RTOL = 1e-3

#: Result columns of every row, after the experiment's parameters.
COLUMNS: tuple[str, ...] = (
    "method", "run", "seed", "error", "misfit", "in_range", "status", "time"
)
NUMERIC = ("run", "seed", "error", "misfit", "time")

Progress = Callable[[int, int], None]
"""``progress(done, total)``: rows finished so far out of the rows to compute."""


@dataclass(frozen=True)
class AdamSettings:
    """The gradient-descent baseline: Adam on ||G(z) - x||^2 from random starts."""

    steps: int = 1000
    restarts: int = 3
    lr: float = 0.01


@dataclass(frozen=True)
class Config:
    """What to run.

    Attributes
    ----------
    runs : random draws per setting
    seed : seeds every network, code, noise vector, mask and random start
    quick : a small grid and a short gradient descent (at most 50 steps, one
        start), for smoke tests (``mnist-decoder``: digits on the ReLU decoders only)
    model : the folder of the paper authors' decoders (``mnist-decoder`` only)
    adam : the Adam baseline's settings
    """

    runs: int
    seed: int = 0
    quick: bool = False
    model: Path | None = None
    adam: AdamSettings = field(default_factory=AdamSettings)

    def __post_init__(self) -> None:
        if int(self.runs) < 1:
            raise ValueError(f"`runs` must be >= 1; got {self.runs}.")
        if int(self.seed) < 0:
            raise ValueError(f"`seed` must be >= 0; got {self.seed}.")

    @property
    def adam_steps(self) -> int:
        return min(self.adam.steps, 50) if self.quick else self.adam.steps

    @property
    def adam_restarts(self) -> int:
        return 1 if self.quick else self.adam.restarts


@dataclass(frozen=True)
class Batch:
    """The observations of some runs of one setting.

    Attributes
    ----------
    runs : the run indices, in order
    x : ndarray of shape (B, n)
        What the methods see (full-length; unobserved pixels are ignored).
    z : ndarray of shape (B, k) or None
        The true codes (None for real images, which have none).
    masks : bool ndarray of shape (B, n) or None
        Observed pixels per run (None: all).
    """

    runs: tuple[int, ...]
    x: np.ndarray
    z: np.ndarray | None
    masks: np.ndarray | None = None


@dataclass(frozen=True)
class Outcome:
    """What one method returned for a batch: z (B, k), status (B,), seconds per run (B,)."""

    z: np.ndarray
    status: np.ndarray
    time: np.ndarray


StepCallback = Callable[[int, int], None]
Solver = Callable[[Batch, StepCallback], Outcome]


@dataclass(frozen=True)
class Setting:
    """One point of an experiment's grid.

    Attributes
    ----------
    params : the parameter values (the experiment's parameter columns)
    net : the generator the misfit is measured with
    draw : run indices -> their Batch (deterministic per run)
    solvers : method name -> solver; a solver calls ``step(done, total)`` as it goes
    norm : the norm of the ``misfit`` column, relative: ||G(z_hat) - x|| / ||x||
    max_runs : at most this many runs here, whatever ``--runs`` asks (a costly solver)
    """

    params: Mapping[str, Any]
    net: Network
    draw: Callable[[Sequence[int]], Batch]
    solvers: Mapping[str, Solver]
    norm: str = "l2"
    max_runs: int | None = None


@dataclass(frozen=True)
class Experiment:
    """A named experiment: its grid, its columns and its figure."""

    name: str
    summary: str
    params: tuple[str, ...]
    default_runs: int
    settings: Callable[[Config], list[Setting]]
    figure: Callable[[list[dict[str, Any]], Path], None]


def key_int(value: int | str) -> int:
    return value if isinstance(value, int) else zlib.crc32(value.encode())


def keyed_rng(*keys: int | str) -> np.random.Generator:
    """A generator keyed by integers and names (names hashed with CRC-32)."""
    return np.random.default_rng([key_int(k) for k in keys])


def outcome_of(result: InversionResult, n: int) -> Outcome:
    z, status = result.z, result.status
    return Outcome(z, status, np.full(n, result.time / n))


def codes(net: Network, runs: Sequence[int], *keys: int | str) -> np.ndarray:
    """z ~ N(0, I) per run, keyed by (keys, run)."""
    return np.stack([keyed_rng(*keys, r).standard_normal(net.latent_dim) for r in runs])


def summarize(
    rows: Sequence[Mapping[str, Any]], by: Sequence[str]
) -> list[dict[str, Any]]:
    """Per group of `by` columns: runs, success rate, in-range rate, median error / misfit,
    90th-percentile misfit, mean time.

    Failed runs (no z) count as errors of +inf in the medians.
    """
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[b] for b in by), []).append(row)
    out = []
    for key, group in groups.items():
        err = np.array([inf_nan(r["error"]) for r in group])
        mis = np.array([inf_nan(r["misfit"]) for r in group])
        out.append(
            {
                **dict(zip(by, key, strict=True)),
                "runs": len(group),
                "success": float(np.mean(err < SUCCESS_RTOL)),
                "in_range": float(np.mean([bool(r["in_range"]) for r in group])),
                "median_error": float(np.median(err)),
                "median_misfit": float(np.median(mis)),
                "p90_misfit": float(np.quantile(mis, 0.9, method="higher")),  # inf-safe
                "time": float(np.mean([float(r["time"]) for r in group])),
            }
        )
    return out


def inf_nan(value: Any) -> float:
    v = float(value)
    return np.inf if np.isnan(v) else v
