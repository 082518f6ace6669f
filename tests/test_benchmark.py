"""The benchmark runs (smoke mode) and records one JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.mark.skipif(not RUN.exists(), reason="benchmarks/ is not beside the tests")
def test_quick_benchmark_writes_a_json_line(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    out = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--threads", "1", "--results", str(results)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "| 20-100-500 | preimage |" in out.stdout
    lines = results.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["quick"] is True and record["machine"]["cpus"] >= 1
    rows = {r["method"]: r for r in record["results"]}
    assert set(rows) == {"forward", "preimage", "naive-lp", "adam"}
    assert rows["preimage"]["exact_recovery"] == 1.0
    assert rows["naive-lp"]["exact_recovery"] == 1.0
    assert all(r["samples_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows.values())


@pytest.mark.skipif(not RUN.exists(), reason="benchmarks/ is not beside the tests")
def test_stream_benchmark_small(tmp_path: Path) -> None:
    """The million-sample streaming measurement, on 3,000 samples (two chunks)."""
    results = tmp_path / "results.jsonl"
    out = subprocess.run(
        [sys.executable, str(RUN), "--stream", "3000", "--threads", "1", "--results",
         str(results), "--scratch", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["suite"] == "stream"
    summary = record["summary"]
    assert summary["complete"] and summary["samples"] == 3000
    assert 0 < summary["stream_peak_rss_mb"] < 2000
    assert summary["stream_samples_per_s"] > 0 and summary["in_memory_samples_per_s"] > 0
    rows = {r["method"]: r for r in record["results"]}
    assert rows["stream"]["counts"] == {"unique": 3000}
    assert list(tmp_path.iterdir()) == [results]  # the data and results were removed
