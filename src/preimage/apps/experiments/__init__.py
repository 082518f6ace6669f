"""The paper's experiments as data: seeded grids of runs, one CSV row per run, and figures.

`spec` says what an experiment is, `grids` holds each experiment's settings,
`figures` draws them, `registry` names them and `runner` runs them resumably.
"""

from preimage.apps.experiments.registry import EXPERIMENTS
from preimage.apps.experiments.runner import (
    append_rows,
    columns,
    done_keys,
    figure,
    read_rows,
    row_key,
    run_experiment,
)
from preimage.apps.experiments.spec import (
    COLUMNS,
    IN_RANGE_RTOL,
    SUCCESS_RTOL,
    AdamSettings,
    Batch,
    Config,
    Experiment,
    Outcome,
    Setting,
    summarize,
)

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
    "read_rows",
    "row_key",
    "run_experiment",
    "summarize",
]
