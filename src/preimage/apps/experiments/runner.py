"""Running an experiment: seeded, resumable, one CSV row per (method, run).

`run_experiment` skips the (parameters, method, seed, run) keys it is told are
done and yields the rows of the others as each (setting, method) finishes;
`append_rows` / `done_keys` keep them in a CSV (`read_rows` reads them back).
(The random starts of Adam are drawn for the whole batch of a call, so an Adam
run recomputed in a different batch starts elsewhere.)

Nothing here prints; `preimage.apps.cli` adds the progress bars. Figures are
drawn with matplotlib's object-oriented Agg API (no pyplot, no global backend).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preimage.apps.experiments.registry import experiment as _experiment
from preimage.apps.experiments.spec import (
    COLUMNS,
    IN_RANGE_RTOL,
    NUMERIC,
    Batch,
    Config,
    Experiment,
    Outcome,
    Progress,
    Setting,
)
from preimage.model.network import Network
from preimage.results import vector_norm

#: Runs of one (setting, method) solved together and written at once.
RUNS_PER_PIECE = 25


def _row_values(
    net: Network, batch: Batch, outcome: Outcome, norm: str = "l2"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """error, misfit (in `norm`) and in_range per run."""
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
        misfit[ok] = vector_norm(diff, norm) / np.maximum(vector_norm(xs, norm), tiny)
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
            n_runs = min(config.runs, setting.max_runs or config.runs)
            runs = [
                r for r in range(n_runs) if row_key(experiment, {**base, "run": r}) not in done
            ]
            # in pieces, so that an interrupted experiment loses at most one piece
            todo += [(setting, method, runs[i : i + RUNS_PER_PIECE])
                     for i in range(0, len(runs), RUNS_PER_PIECE)]
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
        error, misfit, in_range = _row_values(setting.net, batch, outcome, setting.norm)
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
            if key in NUMERIC:
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


def figure(name: str, rows: list[dict[str, Any]], path: str | Path) -> None:
    """Draw experiment `name`'s figure from its rows (as `read_rows` returns them) to `path`."""
    _experiment(name).figure(rows, Path(path))
