"""The paper's experiments as data: seeded grids of runs, one row per run, and their figures.

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
ids>, r])``, so a run's data do not depend on which other runs are computed.
That is what makes the experiments resumable: `run_experiment` skips the
(parameters, method, seed, run) keys it is told are done and yields the rows of the
others as each (setting, method) finishes; `append_rows` / `done_keys` keep
them in a CSV. (The random starts of Adam are drawn for the whole batch of a
call, so an Adam run recomputed in a different batch starts elsewhere.)

Nothing here prints; `preimage.cli` adds the progress bars. Figures are drawn
with matplotlib's object-oriented Agg API (no pyplot, no global backend).
"""

from __future__ import annotations

import csv
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preimage._plotting import new_figure, save_figure
from preimage.baselines import gradient_invert
from preimage.global_search import GlobalSettings
from preimage.invert import InversionResult, invert
from preimage.network import Network, random_network

__all__ = [
    "COLUMNS",
    "EXPERIMENTS",
    "IN_RANGE_RTOL",
    "SUCCESS_RTOL",
    "AdamSettings",
    "Batch",
    "Config",
    "Experiment",
    "Outcome",
    "Setting",
    "append_rows",
    "columns",
    "done_keys",
    "figure",
    "identifiability_limit",
    "read_rows",
    "row_key",
    "run_experiment",
    "shipped_decoder",
    "summarize",
]

#: G(z_hat) = x when the relative l_inf misfit is at most this.
IN_RANGE_RTOL = 1e-6
#: A run "succeeds" (recovers z) when the relative l2 error of z is below this.
SUCCESS_RTOL = 1e-3

#: Result columns of every row, after the experiment's parameters.
COLUMNS: tuple[str, ...] = (
    "method", "run", "seed", "error", "misfit", "in_range", "status", "time"
)
_NUMERIC = ("run", "seed", "error", "misfit", "time")

Progress = Callable[[int, int], None]
"""``progress(done, total)``: rows finished so far out of the rows to compute."""


# --------------------------------------------------------------------------- specs


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
    """

    params: Mapping[str, Any]
    net: Network
    draw: Callable[[Sequence[int]], Batch]
    solvers: Mapping[str, Solver]


@dataclass(frozen=True)
class Experiment:
    """A named experiment: its grid, its columns and its figure."""

    name: str
    summary: str
    params: tuple[str, ...]
    default_runs: int
    settings: Callable[[Config], list[Setting]]
    figure: Callable[[list[dict[str, Any]], Path], None]


# ------------------------------------------------------------------------ helpers


def _key_int(value: int | str) -> int:
    return value if isinstance(value, int) else zlib.crc32(value.encode())


def _rng(*keys: int | str) -> np.random.Generator:
    """A generator keyed by integers and names (names hashed with CRC-32)."""
    return np.random.default_rng([_key_int(k) for k in keys])


def _outcome(result: InversionResult, n: int) -> Outcome:
    z = np.atleast_2d(np.asarray(result.z, dtype=np.float64))
    status = np.atleast_1d(np.asarray(result.status, dtype=object))
    return Outcome(z, status, np.full(n, result.time / n))


def _invert_solver(net: Network, **kwargs: Any) -> Solver:
    """`preimage.invert` on the batch (keyword arguments passed on: method, noise, ...)."""

    def solve(batch: Batch, step: StepCallback) -> Outcome:
        return _outcome(invert(net, batch.x, progress=step, **kwargs), len(batch.runs))

    return solve


def _adam_solver(net: Network, config: Config, seed: int, *, noise: str | None = None) -> Solver:
    """`preimage.baselines.gradient_invert` on the batch (one call: all runs together).

    With ``noise="l2"`` (noisy x) the status is "feasible" whatever the misfit:
    no noise level is given.
    """

    def solve(batch: Batch, step: StepCallback) -> Outcome:
        result = gradient_invert(
            net,
            batch.x,
            lr=config.adam.lr,
            steps=config.adam_steps,
            restarts=config.adam_restarts,
            seed=seed,
            noise=noise,
            progress=step,
        )
        return _outcome(result, len(batch.runs))

    return solve


def _codes(net: Network, runs: Sequence[int], *keys: int | str) -> np.ndarray:
    """z ~ N(0, I) per run, keyed by (keys, run)."""
    return np.stack([_rng(*keys, r).standard_normal(net.latent_dim) for r in runs])


def _row_values(
    net: Network, batch: Batch, outcome: Outcome
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """error, misfit and in_range per run."""
    z_hat = outcome.z
    ok = np.all(np.isfinite(z_hat), axis=1)
    n = len(batch.runs)
    error = np.full(n, np.nan)
    misfit = np.full(n, np.nan)
    in_range = np.zeros(n, dtype=bool)
    if batch.z is not None:
        err = np.linalg.norm(z_hat - batch.z, axis=1) / np.linalg.norm(batch.z, axis=1)
        error = np.where(ok, err, np.nan)
    if ok.any():
        fx = net.forward(z_hat[ok])
        x = batch.x[ok]
        seen = np.ones_like(x, dtype=bool) if batch.masks is None else batch.masks[ok]
        diff = np.where(seen, fx - x, 0.0)
        xs = np.where(seen, x, 0.0)
        tiny = 1e-300
        misfit[ok] = np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(xs, axis=1), tiny)
        linf = np.max(np.abs(diff), axis=1) / np.maximum(np.max(np.abs(xs), axis=1), tiny)
        in_range[ok] = linf <= IN_RANGE_RTOL
    return error, misfit, in_range


def _native(value: Any) -> Any:
    """A plain Python value (NumPy scalars would write as 'np.float64(...)' in keys)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def row_key(experiment: Experiment, row: Mapping[str, Any]) -> tuple[str, ...]:
    """The identity of a row: (experiment, parameters, method, seed, run) as strings.

    Rows read back from a CSV and rows just computed give equal keys.
    """
    parts = [str(row["experiment"])]
    parts += [str(_native(row[p])) for p in experiment.params]
    parts += [str(row["method"]), str(int(float(row["seed"]))), str(int(float(row["run"])))]
    return tuple(parts)


def columns(name: str) -> tuple[str, ...]:
    """The CSV header of experiment `name`."""
    return ("experiment", *_experiment(name).params, *COLUMNS)


def _experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"Unknown experiment {name!r}; choose one of {tuple(EXPERIMENTS)}.")
    return EXPERIMENTS[name]


# ------------------------------------------------------------------------- runner


def run_experiment(
    name: str,
    config: Config,
    *,
    done: frozenset[tuple[str, ...]] | set[tuple[str, ...]] = frozenset(),
    progress: Progress | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Compute the runs of experiment `name` that are not `done`, one (setting, method) at a time.

    Parameters
    ----------
    name : one of `EXPERIMENTS`
    config : Config
    done : keys (`row_key`) of rows already computed; they are skipped
    progress : callable(done, total), optional
        Called as rows finish (and within long calls), counting the rows to compute.

    Yields
    ------
    list of dict
        The rows of one (setting, method): the columns of `columns(name)`.
    """
    experiment = _experiment(name)
    settings = experiment.settings(config)
    todo: list[tuple[Setting, str, list[int]]] = []
    for setting in settings:
        for method in setting.solvers:
            base = {"experiment": name, **setting.params, "method": method, "seed": config.seed}
            runs = [
                r for r in range(config.runs) if row_key(experiment, {**base, "run": r}) not in done
            ]
            if runs:
                todo.append((setting, method, runs))
    total = sum(len(runs) for _, _, runs in todo)
    finished = 0
    if progress is not None:
        progress(0, total)
    for setting, method, runs in todo:
        batch = setting.draw(runs)
        n = len(runs)

        def step(i: int, of: int, base: int = finished, n: int = n) -> None:
            if progress is not None and of > 0:
                progress(base + min(n, (n * i) // of), total)

        outcome = setting.solvers[method](batch, step)
        error, misfit, in_range = _row_values(setting.net, batch, outcome)
        rows = []
        for i, run in enumerate(batch.runs):
            row: dict[str, Any] = {"experiment": name}
            row.update({p: _native(setting.params[p]) for p in experiment.params})
            row.update(
                method=method,
                run=int(run),
                seed=int(config.seed),
                error=float(error[i]),
                misfit=float(misfit[i]),
                in_range=bool(in_range[i]),
                status=str(outcome.status[i]),
                time=float(outcome.time[i]),
            )
            rows.append(row)
        finished += n
        if progress is not None:
            progress(finished, total)
        yield rows


# ------------------------------------------------------------------------ CSV I/O


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a CSV written by `append_rows`, numbers and booleans parsed.

    Parameter columns that hold numbers are parsed as numbers too.
    """
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        raw = list(csv.DictReader(fh))
    rows = []
    for r in raw:
        row: dict[str, Any] = {}
        for key, value in r.items():
            if key in _NUMERIC:
                row[key] = float(value)
            elif key == "in_range":
                row[key] = value == "True"
            elif key in ("experiment", "method", "status"):
                row[key] = value
            else:
                row[key] = _parse_param(value)
        if "run" in row:
            row["run"] = int(row["run"])
        if "seed" in row:
            row["seed"] = int(row["seed"])
        rows.append(row)
    return rows


def _parse_param(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def done_keys(path: str | Path, name: str) -> set[tuple[str, ...]]:
    """Keys of the rows of experiment `name` already in the CSV at `path` (empty if none).

    Raises
    ------
    ValueError
        When the file's header is not this experiment's (another experiment's
        CSV, or one from an older version): resuming into it would mix columns.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return set()
    experiment = _experiment(name)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = tuple(reader.fieldnames or ())
        if header != columns(name):
            raise ValueError(
                f"{path} has the columns {list(header)}, not those of experiment {name!r} "
                f"({list(columns(name))}); write to another --out folder or remove the file."
            )
        return {row_key(experiment, row) for row in reader if row["experiment"] == name}


def append_rows(path: str | Path, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append rows to the CSV at `path`, writing the header first when the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns(name))
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _native(row[k]) for k in columns(name)})


def summarize(
    rows: Sequence[Mapping[str, Any]], by: Sequence[str]
) -> list[dict[str, Any]]:
    """Per group of `by` columns: runs, success rate, in-range rate, median error / misfit, time.

    Failed runs (no z) count as errors of +inf in the medians.
    """
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[b] for b in by), []).append(row)
    out = []
    for key, group in groups.items():
        err = np.array([_inf_nan(r["error"]) for r in group])
        mis = np.array([_inf_nan(r["misfit"]) for r in group])
        out.append(
            {
                **dict(zip(by, key, strict=True)),
                "runs": len(group),
                "success": float(np.mean(err < SUCCESS_RTOL)),
                "in_range": float(np.mean([bool(r["in_range"]) for r in group])),
                "median_error": float(np.median(err)),
                "median_misfit": float(np.median(mis)),
                "time": float(np.mean([float(r["time"]) for r in group])),
            }
        )
    return out


def _inf_nan(value: Any) -> float:
    v = float(value)
    return np.inf if np.isnan(v) else v


# -------------------------------------------------------------------- the decoders


def shipped_decoder(kind: str) -> Network:
    """The decoder of the shipped ``kind`` ("relu" or "leaky_relu") VAE as a Network.

    ReLU 20-60-784 or LeakyReLU(0.1) 20-200-500-784, no bias (`preimage.mnist`).
    """
    from preimage.mnist import load_vae_state

    return _decoder_from_state(kind, load_vae_state(kind))  # type: ignore[arg-type]


#: The paper authors' decoders (files in ``../shared/models/invertgan_lp/``) by kind.
AUTHORS_FILES: dict[str, str] = {
    "relu": "trained_vae_20_60_784_nobias.pth",
    "leaky_relu": "trained_vae_leakyrelu_20_200_500_784.pth",
}


def _authors_states(model: Path) -> dict[str, dict[str, Any]]:
    """The authors' state dicts found at `model` (a folder with their files, or one file)."""
    import torch

    model = Path(model)
    if model.is_file():
        state = torch.load(model, map_location="cpu", weights_only=True)
        kind = "leaky_relu" if "fc5.weight" in state else "relu"
        return {kind: state}
    if not model.is_dir():
        raise FileNotFoundError(f"--model {model}: no such file or folder.")
    found = {
        kind: torch.load(model / f, map_location="cpu", weights_only=True)
        for kind, f in AUTHORS_FILES.items()
        if (model / f).is_file()
    }
    if not found:
        raise FileNotFoundError(
            f"--model {model}: none of {sorted(AUTHORS_FILES.values())} is in that folder."
        )
    return found


def _decoder_from_state(kind: str, state: Mapping[str, Any]) -> Network:
    """The decoder layers of a VAE state dict (`preimage.mnist` layout) as a Network."""
    from preimage.mnist import DECODER_LAYERS, NEGATIVE_SLOPE

    if kind == "relu":
        return Network.from_state_dict(state, DECODER_LAYERS["relu"], activation="relu")
    return Network.from_state_dict(
        state,
        DECODER_LAYERS["leaky_relu"],
        activation="leaky_relu",
        negative_slope=NEGATIVE_SLOPE["leaky_relu"],
    )


def _encoder_solver(vae: Any) -> Solver:
    """The VAE's own encoder mean: the amortised inverse the decoder was trained with."""

    def solve(batch: Batch, step: StepCallback) -> Outcome:
        import torch

        start = time.perf_counter()
        with torch.no_grad():
            mu, _ = vae.encode(torch.as_tensor(batch.x, dtype=torch.float32))
        n = len(batch.runs)
        step(n, n)
        z = mu.double().numpy()
        return Outcome(z, np.full(n, "feasible", dtype=object),
                       np.full(n, (time.perf_counter() - start) / n))

    return solve


# -------------------------------------------------------------------- experiments


NOISE_LEVELS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
NOISE_LEVELS_QUICK: tuple[float, ...] = (1e-5, 1e-2)
NOISE_KINDS: tuple[str, ...] = ("uniform", "gaussian")
#: The random network of Figure 1 (ReLU, no bias, N(0, 1/n) weights).
NOISE_RANDOM_WIDTHS: tuple[int, ...] = (20, 100, 500)


def _noise_direction(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """A unit-norm noise vector: uniform on [-1, 1]^n or Gaussian, scaled to ||u||_2 = 1."""
    u = rng.uniform(-1.0, 1.0, n) if kind == "uniform" else rng.standard_normal(n)
    return u / np.linalg.norm(u)


def _noise_settings(config: Config) -> list[Setting]:
    """Figure 1: x = G(z) + e with ||e||_2 = level * ||G(z)||_2.

    The code z of run r is the same at every level and for both kinds of noise,
    and so is the direction of e for one kind: the levels only rescale it.
    """
    widths = "-".join(map(str, NOISE_RANDOM_WIDTHS))
    nets = {
        f"random-{widths}": random_network(
            list(NOISE_RANDOM_WIDTHS), seed=_rng(config.seed, "noise-net")
        ),
        "mnist-relu": shipped_decoder("relu"),
    }
    levels = NOISE_LEVELS_QUICK if config.quick else NOISE_LEVELS
    settings = []
    for name, net in nets.items():
        for kind in NOISE_KINDS:
            for level in levels:

                def draw(
                    runs: Sequence[int], net: Network = net, name: str = name, kind: str = kind,
                    level: float = level,
                ) -> Batch:
                    z = _codes(net, runs, config.seed, "noise", name)
                    clean = net.forward(z)
                    e = np.stack([
                        _noise_direction(kind, net.output_dim,
                                         _rng(config.seed, "noise-e", name, kind, r))
                        for r in runs
                    ])
                    x = clean + level * np.linalg.norm(clean, axis=1, keepdims=True) * e
                    return Batch(tuple(runs), x, z)

                seed = _key_int(f"{config.seed}-{name}-{kind}-{level!r}")
                hybrid: dict[str, Any] = {"seed": seed}
                if config.quick:
                    hybrid["steps"] = config.adam_steps
                solvers = {
                    "lp-linf": _invert_solver(net, noise="linf"),
                    "lp-l1": _invert_solver(net, noise="l1"),
                    "adam": _adam_solver(net, config, seed, noise="l2"),
                    "hybrid-linf": _invert_solver(
                        net, method="hybrid", noise="linf", options=hybrid
                    ),
                }
                params = {"network": name, "noise": kind, "level": level}
                settings.append(Setting(params, net, draw, solvers))
    return settings


LATENT_DIMS: tuple[int, ...] = tuple(range(10, 251, 10))
LATENT_DIMS_QUICK: tuple[int, ...] = (10, 250)
LATENT_WIDTHS: tuple[int, int] = (250, 600)


def identifiability_limit(k: int | np.ndarray, width: int = LATENT_WIDTHS[0]) -> Any:
    """P(Binomial(width, 1/2) >= k).

    The first layer of a [k, width, ...] ReLU network with Gaussian weights has
    about Binomial(width, 1/2) active units at a random z; with fewer than k
    the active rows cannot fix z (their null space is not {0}) and z is not
    unique, whatever the method. So this bounds every method's success rate.
    """
    from scipy.stats import binom

    return binom.sf(np.asarray(k) - 1, width, 0.5)


def _latent_dim_settings(config: Config) -> list[Setting]:
    ks = LATENT_DIMS_QUICK if config.quick else LATENT_DIMS
    settings = []
    for activation in ("relu", "leaky_relu"):
        for k in ks:
            net = random_network(
                [k, *LATENT_WIDTHS],
                activation=activation,  # type: ignore[arg-type]
                seed=_rng(config.seed, "latent-dim", activation, k),
            )

            def draw(runs: Sequence[int], net: Network = net, act: str = activation) -> Batch:
                z = _codes(net, runs, config.seed, "latent-dim", act, net.latent_dim)
                return Batch(tuple(runs), net.forward(z), z)

            solvers = {
                # The layer-wise method as in the paper: no search below a non-unique layer.
                "lp": _invert_solver(net, fallback=GlobalSettings(enabled=False)),
                "adam": _adam_solver(net, config, _key_int(f"{config.seed}-{activation}-{k}")),
            }
            settings.append(Setting({"activation": activation, "k": k}, net, draw, solvers))
    return settings


SENSING_FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
SENSING_FRACTIONS_QUICK: tuple[float, ...] = (0.1, 0.5)


def _per_run_solver(net: Network, method: str, config: Config) -> Solver:
    """Invert each run from its own observed pixels (`invert(..., observe=mask)`).

    "lp": the layer-wise method alone on the network restricted to the
    observed rows (`partial.restrict_output`, no search: as in the paper);
    "lp+search": the tool's partial-observation path (`invert(net, x,
    observe=mask)`: the layer-wise method, then the searches of
    `preimage.global_search` and `partial.search_preimage` where it fails);
    "adam": `invert(net, x, method="adam", observe=mask)`, the loss on the
    observed pixels only.
    """
    from preimage.measurements import Mask
    from preimage.partial import restrict_output

    def solve(batch: Batch, step: StepCallback) -> Outcome:
        assert batch.masks is not None
        n = len(batch.runs)
        z = np.full((n, net.latent_dim), np.nan)
        status = np.empty(n, dtype=object)
        seconds = np.zeros(n)
        for i in range(n):
            mask = Mask(batch.masks[i])
            if method == "lp":
                sub = restrict_output(net, mask)
                y = batch.x[i, batch.masks[i]]
                result = invert(sub, y, fallback=GlobalSettings(enabled=False))
            elif method == "lp+search":
                result = invert(net, batch.x[i], observe=mask)
            else:
                options = {
                    "lr": config.adam.lr, "steps": config.adam_steps,
                    "restarts": config.adam_restarts,
                    "seed": _key_int(f"{config.seed}-{batch.runs[i]}"),
                }
                result = invert(net, batch.x[i], method="adam", observe=mask, options=options)
            z[i], status[i], seconds[i] = result.z, result.status, result.time
            step(i + 1, n)
        return Outcome(z, status, seconds)

    return solve


def _sensing_settings(config: Config) -> list[Setting]:
    net = shipped_decoder("relu")
    fractions = SENSING_FRACTIONS_QUICK if config.quick else SENSING_FRACTIONS
    settings = []
    for fraction in fractions:
        m = max(1, round(fraction * net.output_dim))

        def draw(runs: Sequence[int], m: int = m) -> Batch:
            z = _codes(net, runs, config.seed, "sensing")
            masks = np.zeros((len(runs), net.output_dim), dtype=bool)
            for i, r in enumerate(runs):
                pick = _rng(config.seed, "sensing-mask", m, r).choice(
                    net.output_dim, m, replace=False
                )
                masks[i, pick] = True
            return Batch(tuple(runs), net.forward(z), z, masks)

        solvers = {
            method: _per_run_solver(net, method, config) for method in ("lp", "lp+search", "adam")
        }
        params = {"network": "mnist-relu", "fraction": fraction}
        settings.append(Setting(params, net, draw, solvers))
    return settings


def _mnist_decoder_settings(config: Config) -> list[Setting]:
    from preimage.mnist import load_mnist_digits, load_vae

    # Held-out digits (never trained on), in a seeded order; run r is digit r.
    test = load_mnist_digits()[1]
    digits = test[np.random.default_rng([config.seed, _key_int("mnist-digits")]).permutation(
        len(test))]
    decoders: list[tuple[str, str, Network, Any]] = [
        ("shipped-relu", "relu", shipped_decoder("relu"), load_vae("relu")),
        ("shipped-leaky_relu", "leaky_relu", shipped_decoder("leaky_relu"),
         load_vae("leaky_relu")),
    ]
    if config.model is not None:
        # No "encoder" method for these: the encoders stored with the authors'
        # decoders do not reconstruct our [0, 1] digits (held-out MSE through
        # encoder and decoder 0.30 and 1.97, against 0.066 for the mean image).
        for kind, state in _authors_states(config.model).items():
            decoders.append((f"authors-{kind}", kind, _decoder_from_state(kind, state), None))
    settings = []
    for name, kind, net, vae in decoders:

        def draw(runs: Sequence[int], net: Network = net, name: str = name) -> Batch:
            z = _codes(net, runs, config.seed, "mnist-decoder", name)
            return Batch(tuple(runs), net.forward(z), z)

        solvers = {
            "lp": _invert_solver(net),
            "adam": _adam_solver(net, config, _key_int(f"{config.seed}-{name}")),
        }
        if vae is not None:
            solvers["encoder"] = _encoder_solver(vae)
        settings.append(Setting({"decoder": name, "target": "code"}, net, draw, solvers))

        if config.quick and kind != "relu":
            continue  # the noisy LPs of the deeper decoder take seconds per digit

        def draw_digits(runs: Sequence[int]) -> Batch:
            return Batch(tuple(runs), digits[np.asarray(runs) % len(digits)], None)

        solvers = {
            "lp-linf": _invert_solver(net, noise="linf"),
            "hybrid-l2": _invert_solver(
                net, method="hybrid", noise="l2",
                options={"seed": _key_int(f"{config.seed}-{name}-hybrid"),
                         **({"steps": config.adam_steps} if config.quick else {})},
            ),
            "adam": _adam_solver(
                net, config, _key_int(f"{config.seed}-{name}-digits"), noise="l2"
            ),
        }
        if vae is not None:
            solvers["encoder"] = _encoder_solver(vae)
        settings.append(Setting({"decoder": name, "target": "digit"}, net, draw_digits, solvers))
    return settings


# ------------------------------------------------------------------------ figures


_COLORS = {
    "lp": "C0", "lp-linf": "C0", "lp-l1": "C2", "lp+search": "C4", "adam": "C1",
    "hybrid-linf": "C3", "hybrid-l2": "C3", "encoder": "C5",
}
_LABELS = {
    "lp": "exact (layer-wise LP)", "lp-linf": "noisy LP, l_inf", "lp-l1": "noisy LP, l_1",
    "lp+search": "exact + searches", "adam": "Adam", "hybrid-linf": "hybrid (l_inf LP, Adam)",
    "hybrid-l2": "hybrid (l_2 fit, Adam)", "encoder": "VAE encoder",
}


def _methods(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def _figure_noise(rows: list[dict[str, Any]], path: Path) -> None:
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
                err = np.array([_inf_nan(r["error"]) for r in mine])
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
    runs = max((r["run"] for r in rows), default=-1) + 1
    fig.suptitle(f"Recovery from noisy observations ({runs} runs per point; dots: runs, "
                 "lines: medians)")
    save_figure(fig, path)


def _figure_latent_dim(rows: list[dict[str, Any]], path: Path) -> None:
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
    runs = max((r["run"] for r in rows), default=-1) + 1
    fig.suptitle(f"Recovery vs latent dimension ({runs} runs per point)")
    save_figure(fig, path)


def _figure_mnist_decoder(rows: list[dict[str, Any]], path: Path) -> None:
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
            (d, m): np.array([_inf_nan(r[column]) for r in sel
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
    runs = max((r["run"] for r in rows), default=-1) + 1
    fig.suptitle(f"MNIST decoders ({runs} runs each; dots: runs, bars: medians, "
                 "runs without a z at the top)")
    save_figure(fig, path)


def _figure_sensing(rows: list[dict[str, Any]], path: Path) -> None:
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
    runs = max((r["run"] for r in rows), default=-1) + 1
    fig.suptitle(f"Partial observation on the MNIST ReLU decoder 20-60-784 ({runs} runs per point)")
    save_figure(fig, path)


EXPERIMENTS: dict[str, Experiment] = {
    "noise": Experiment(
        "noise",
        "relative error of z vs relative noise level, random 20-100-500 net and MNIST decoder",
        ("network", "noise", "level"),
        200,
        _noise_settings,
        _figure_noise,
    ),
    "latent-dim": Experiment(
        "latent-dim",
        "success, in-range rate and time vs latent dimension k on random [k, 250, 600] nets",
        ("activation", "k"),
        50,
        _latent_dim_settings,
        _figure_latent_dim,
    ),
    "sensing": Experiment(
        "sensing",
        "recovery vs fraction of observed pixels on the MNIST ReLU decoder",
        ("network", "fraction"),
        50,
        _sensing_settings,
        _figure_sensing,
    ),
    "mnist-decoder": Experiment(
        "mnist-decoder",
        "codes and held-out digits through the shipped MNIST decoders (and the authors' "
        "with --model)",
        ("decoder", "target"),
        100,
        _mnist_decoder_settings,
        _figure_mnist_decoder,
    ),
}
"""The experiments by name."""


def figure(name: str, rows: list[dict[str, Any]], path: str | Path) -> None:
    """Draw experiment `name`'s figure from its rows (as `read_rows` returns them) to `path`."""
    _experiment(name).figure(rows, Path(path))
