"""The experiments, their CSVs and figures, resuming, the demo and the example (all small)."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest

from preimage.apps import experiments as ex
from preimage.apps.cli import main
from preimage.apps.experiments.grids import identifiability_limit

ROOT = Path(__file__).resolve().parents[1]
STATUSES = {"unique", "non_unique", "feasible", "infeasible", "failed"}


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _grid_size(name: str, config: ex.Config) -> int:
    """(settings x methods) of the experiment's grid."""
    return sum(len(s.solvers) for s in ex.EXPERIMENTS[name].settings(config))


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Every experiment run once through the CLI with ``--runs 3 --quick``: (folder, stdout)."""
    out = tmp_path_factory.mktemp("experiments")
    printed = {}
    for name in ex.EXPERIMENTS:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(["experiment", name, "--runs", "3", "--quick", "--out", str(out)])
        assert code == 0
        printed[name] = buffer.getvalue()
    return {name: (out, text) for name, text in printed.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ex.EXPERIMENTS))
def test_every_experiment_runs_3_runs_to_a_csv_and_a_png(
    name: str, quick_runs: dict[str, tuple[Path, str]]
) -> None:
    out, printed = quick_runs[name]
    csv_path, png = out / f"{name}.csv", out / f"{name}.png"
    assert str(csv_path.resolve()) in printed and str(png.resolve()) in printed
    rows = _csv(csv_path)
    assert tuple(rows[0]) == ex.columns(name)
    params = ex.EXPERIMENTS[name].params
    # one row per (setting, method, run), nothing twice
    keys = [(*(r[p] for p in params), r["method"], r["run"]) for r in rows]
    assert len(keys) == len(set(keys)) == 3 * _grid_size(name, ex.Config(runs=3, quick=True))
    assert {r["run"] for r in rows} == {"0", "1", "2"}
    for r in rows:
        assert r["experiment"] == name
        assert r["status"] in STATUSES | {"optimal", "gap"}  # (the MILP: proved or not)
        assert float(r["time"]) > 0
        assert r["in_range"] in ("True", "False")
        if r["status"] in ("infeasible", "failed") and r["method"] in ("lp", "lp+search"):
            assert np.isnan(float(r["misfit"]))  # the exact method returns no z then
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_latent_dim_rows_match_the_theory(quick_runs: dict[str, tuple[Path, str]]) -> None:
    """Small k: the LP recovers z exactly; k = 250 on a 250-wide ReLU layer: it cannot."""
    rows = ex.read_rows(quick_runs["latent-dim"][0] / "latent-dim.csv")
    lp = {(r["activation"], r["k"], r["run"]): r for r in rows if r["method"] == "lp"}
    for run in range(3):
        assert lp["relu", 10, run]["error"] < 1e-9 and lp["relu", 10, run]["status"] == "unique"
        big = lp["relu", 250, run]
        assert big["status"] == "non_unique" and big["in_range"]  # G(z_hat) = x, z_hat != z
        assert big["error"] > ex.SUCCESS_RTOL
        # LeakyReLU is a bijection: [250, 250, 600] is still invertible
        assert lp["leaky_relu", 250, run]["error"] < 1e-6
    assert identifiability_limit(10) == pytest.approx(1.0)
    assert identifiability_limit(125) == pytest.approx(0.525, abs=0.01)
    assert identifiability_limit(200) < 1e-15


@pytest.mark.slow
def test_mnist_decoder_rows(quick_runs: dict[str, tuple[Path, str]]) -> None:
    rows = ex.read_rows(quick_runs["mnist-decoder"][0] / "mnist-decoder.csv")
    codes = [r for r in rows if r["target"] == "code"]
    leaky_lp = [r for r in codes if r["decoder"] == "shipped-leaky_relu" and r["method"] == "lp"]
    assert all(r["status"] == "unique" and r["error"] < 1e-9 for r in leaky_lp)
    relu_lp = [r for r in codes if r["decoder"] == "shipped-relu" and r["method"] == "lp"]
    assert all(r["in_range"] for r in relu_lp)  # unique or not, G(z_hat) = x
    assert all(0 < r["error"] < 5 for r in codes if r["method"] == "encoder")
    # real digits: no true code, not in the range; every method gives some z
    digits = [r for r in rows if r["target"] == "digit"]
    assert {r["method"] for r in digits} == {"lp-linf", "descent-l2", "hybrid-l2", "adam",
                                                "encoder"}
    for r in digits:
        assert np.isnan(r["error"]) and not r["in_range"]
        assert 0 < r["misfit"] < 5


@pytest.mark.slow
def test_noise_rows(quick_runs: dict[str, tuple[Path, str]]) -> None:
    """The noisy LPs' error follows the noise: about the level, far below Adam's at 1e-5."""
    rows = ex.read_rows(quick_runs["noise"][0] / "noise.csv")
    assert {r["method"] for r in rows} == {"lp-linf", "lp-l1", "adam", "hybrid-linf"}
    assert {r["noise"] for r in rows} == {"uniform", "gaussian"}
    for r in rows:
        if r["method"].startswith("lp-") and r["level"] == 1e-5:
            assert r["error"] < 1e-3
            assert r["status"] in ("feasible", "failed")  # an estimate, never "unique"


def _toy_experiment() -> ex.Experiment:
    """A two-setting experiment whose runs take microseconds: for the CSV bookkeeping."""
    from preimage import invert, random_network
    from preimage.apps.experiments.spec import codes, outcome_of

    def settings(config: ex.Config) -> list[ex.Setting]:
        out = []
        for width in (6, 8):
            net = random_network([2, width], seed=width)

            def draw(runs: tuple[int, ...], net=net) -> ex.Batch:  # type: ignore[no-untyped-def]
                z = codes(net, runs, config.seed, "toy", net.output_dim)
                return ex.Batch(tuple(runs), net.forward(z), z)

            def exact(batch: ex.Batch, step: object, net=net) -> ex.Outcome:  # type: ignore[no-untyped-def]
                return outcome_of(invert(net, batch.x), len(batch.runs))

            def zero(batch: ex.Batch, step: object) -> ex.Outcome:
                n = len(batch.runs)
                return ex.Outcome(np.zeros((n, 2)), np.full(n, "failed", dtype=object),
                                  np.zeros(n))

            out.append(ex.Setting({"width": width}, net, draw, {"exact": exact, "zero": zero}))
        return out

    def figure(rows: list[dict[str, object]], path: Path) -> None:
        path.write_bytes(b"\x89PNG\r\n\x1a\n")

    return ex.Experiment("toy", "a toy grid", ("width",), 2, settings, figure)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> ex.Experiment:
    experiment = _toy_experiment()
    monkeypatch.setitem(ex.EXPERIMENTS, "toy", experiment)
    return experiment


def test_resume_skips_done_runs_and_adds_missing_ones(tmp_path: Path, toy: ex.Experiment) -> None:
    path = tmp_path / "toy.csv"
    config = ex.Config(runs=2)
    # interrupted: only the first (setting, method) made it to the file
    first = next(iter(ex.run_experiment("toy", config)))
    ex.append_rows(path, "toy", first)
    done = ex.done_keys(path, "toy")
    assert len(done) == len(first) == 2
    calls: list[tuple[int, int]] = []
    rest = [
        r
        for chunk in ex.run_experiment(
            "toy", config, done=done, progress=lambda d, t: calls.append((d, t))
        )
        for r in chunk
    ]
    assert len(rest) == 2 * 4 - 2  # 2 settings x 2 methods x 2 runs, 2 done
    assert calls[0] == (0, len(rest)) and calls[-1] == (len(rest), len(rest))
    ex.append_rows(path, "toy", rest)
    # more runs later: only run 2 of each (setting, method) is computed
    config3 = ex.Config(runs=3)
    more = [r for chunk in ex.run_experiment("toy", config3, done=ex.done_keys(path, "toy"))
            for r in chunk]
    assert {r["run"] for r in more} == {2} and len(more) == 4
    ex.append_rows(path, "toy", more)
    # nothing left: nothing computed
    assert list(ex.run_experiment("toy", config3, done=ex.done_keys(path, "toy"))) == []
    # runs are keyed, not sequential: the rows equal those of an uninterrupted run
    fresh = {ex.row_key(toy, r): r for chunk in ex.run_experiment("toy", config3)
             for r in chunk}
    resumed = ex.read_rows(path)
    assert len(resumed) == len(fresh) == 12
    for r in resumed:
        f = fresh[ex.row_key(toy, r)]
        assert r["status"] == f["status"]
        assert r["error"] == pytest.approx(f["error"], rel=1e-9, abs=1e-15, nan_ok=True)
        assert r["misfit"] == pytest.approx(f["misfit"], rel=1e-9, abs=1e-15, nan_ok=True)
    exact = [r for r in resumed if r["method"] == "exact"]
    assert all(r["status"] == "unique" and r["error"] < 1e-9 and r["in_range"] for r in exact)


def test_cli_resumes_and_refuses_a_foreign_csv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toy: ex.Experiment
) -> None:
    args = ["experiment", "toy", "--runs", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    n = len(_csv(tmp_path / "toy.csv"))
    assert n == 4 and (tmp_path / "toy.png").exists()
    capsys.readouterr()
    assert main(args) == 0
    assert "0 new rows" in capsys.readouterr().out
    assert len(_csv(tmp_path / "toy.csv")) == n
    # another seed is another experiment: nothing of seed 0 counts as done
    assert main([*args, "--seed", "1"]) == 0
    assert f"{n} new rows" in capsys.readouterr().out
    rows = _csv(tmp_path / "toy.csv")
    assert len(rows) == 2 * n and {r["seed"] for r in rows} == {"0", "1"}
    (tmp_path / "partial.csv").write_text("a,b\n1,2\n")
    bad = ["experiment", "partial", "--runs", "1", "--quick", "--out", str(tmp_path)]
    assert main(bad) == 2
    assert "not those of experiment 'partial'" in capsys.readouterr().err


def test_config_and_names_are_checked() -> None:
    with pytest.raises(ValueError, match="runs"):
        ex.Config(runs=0)
    with pytest.raises(ValueError, match="Unknown experiment"):
        list(ex.run_experiment("nope", ex.Config(runs=1)))
    with pytest.raises(FileNotFoundError, match="--model"):
        ex.EXPERIMENTS["mnist-decoder"].settings(ex.Config(runs=1, model=Path("/nonexistent")))


def test_authors_decoders_join_mnist_decoder_with_model(tmp_path: Path) -> None:
    from tests.conftest import AUTHORS_DIR

    if not AUTHORS_DIR.is_dir():
        pytest.skip(f"the authors' decoders {AUTHORS_DIR} are not available")
    settings = ex.EXPERIMENTS["mnist-decoder"].settings(
        ex.Config(runs=1, quick=True, model=AUTHORS_DIR)
    )
    nets = {s.params["decoder"]: s.net.widths for s in settings}
    assert list(nets) == ["shipped-relu", "shipped-leaky_relu", "authors-relu",
                          "authors-leaky_relu"]
    assert nets["authors-relu"] == [20, 60, 784]
    assert nets["authors-leaky_relu"] == [20, 200, 500, 784]


@pytest.mark.slow
def test_demo_prints_the_table_and_writes_the_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["demo", "--out", str(tmp_path), "--samples", "10", "--digits", "4",
            "--adam-steps", "30", "--restarts", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    png = tmp_path / "preimage_demo.png"
    assert str(png.resolve()) in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = {line.split("  ")[0] + "/" + line.split()[1]: line for line in out.splitlines()
             if line.startswith(("codes", "digits"))}
    assert set(lines) == {
        "codes/exact", "codes/adam", "digits/cell", "digits/adam", "digits/VAE"
    }
    # the exact method recovers most codes of the shipped decoder (86% of 50 measured)
    assert int(lines["codes/exact"].split()[3].rstrip("%")) >= 50


def test_demo_report(tmp_path: Path) -> None:
    from preimage.apps.demo import run_demo

    report = run_demo(tmp_path, codes=6, digits=0, adam_steps=5, restarts=1)
    assert [r.part for r in report.rows] == ["codes", "codes"]
    exact = report.rows[0]
    assert exact.in_range == 1.0 and exact.median_misfit < 1e-9
    assert sum(report.verdicts.values()) == 6
    assert report.figure.exists()


def test_nonconvex_example(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "nonconvex_preimage", ROOT / "examples" / "nonconvex_preimage.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = module.analyse()
    assert found["misfit1"] < 1e-9 and found["misfit2"] < 1e-9  # two preimages ...
    assert np.linalg.norm(found["z1"] - found["z2"]) > 0.5  # ... far apart ...
    assert found["misfit_mid"] > 0.1  # ... whose midpoint is not one
    assert module.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "nonconvex_preimage.png").exists()


def test_bad_experiment_options_get_one_line_and_status_2(
    tmp_path, capsys
) -> None:
    from preimage.apps.cli import main

    (tmp_path / "afile").write_text("")
    import torch

    torch.save({"fc1.weight": torch.zeros(3, 2)}, tmp_path / "other.pt")
    for extra, says in ((["--runs", "0", "--out", str(tmp_path)], "--runs must be >= 1"),
                        (["--out", str(tmp_path / "afile")], "is a file"),
                        (["--model", str(tmp_path / "none"), "--out", str(tmp_path)],
                         "does not exist"),
                        # (these ended in a traceback after rows were written)
                        (["--adam-steps", "0", "--out", str(tmp_path)], "--adam-steps"),
                        (["--adam-restarts", "-1", "--out", str(tmp_path)],
                         "--adam-restarts"),
                        (["--model", str(tmp_path / "other.pt"), "--out", str(tmp_path)],
                         "has no 'fc3.weight'")):
        assert main(["experiment", "noise", "--quick", *extra]) == 2
        assert says in capsys.readouterr().err
