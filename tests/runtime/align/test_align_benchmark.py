"""The alignment benchmark runs and reports identical outputs (smoke run; figures come from a full run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "align.py"


def test_benchmark_quick_run_reports_identical_outputs():
    proc = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    batch = report["batch_vs_merge_asof"]
    assert batch["identical_to_merge_asof"] is True and batch["reference_rows"] == 20_000
    assert report["batch_vs_naive_loop"]["identical"] is True
    streaming = report["streaming"]
    assert streaming["late"] == 0 and streaming["dropped"] == 0 and streaming["tuples"] == 300
    # Stream-time latency is deterministic here: within a frame period or so of the floor the windows impose.
    assert streaming["latency_floor_ms"] <= streaming["added_latency_ms_p50"] <= streaming["added_latency_ms_p99"] <= streaming["latency_floor_ms"] + 40
    clock = report["clock_estimation"]
    assert clock["offset_err_ms_max"] < 1.0 and clock["drift_err_ppm_max"] < 5.0
