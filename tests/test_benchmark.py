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
