"""`make demo` runs examples/demo.py: the whole flow end to end, every process cleaned up."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, mosquitto) -> None:  # `mosquitto` skips when it is not installed
    out = tmp_path / "demo-out"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = subprocess.run([sys.executable, str(DEMO), "--out", str(out), "--seconds", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["release_synced"] is True and summary["daemon_exit_status"] == 0
    assert summary["chunks_fetched"] > 0 and summary["bytes_fetched"] > 0
    assert summary["samples_pushed"]["camera"] >= 20 and summary["tuples_aligned"] >= summary["tuples_run"] > 0
    # The HTTP calls answered with the model's output (5 finite scores), not just a 200.
    infer = re.search(r"(\d+) KServe v2 infer calls over HTTP: scores (\[.*\])", result.stdout)
    assert infer and int(infer.group(1)) == summary["infer_calls"] > 0, result.stdout[-3000:]
    scores = json.loads(infer.group(2))
    assert len(scores) == 5 and all(math.isfinite(x) for x in scores)
    # fp32 -> a cheaper precision under the squeeze -> fp32 again.
    assert summary["precision_switches"] >= 2 and summary["precision_path"][0] == summary["precision_path"][2] == "fp32"
    kinds = summary["records_by_kind"]
    assert kinds.get("result", 0) > 0 and kinds.get("stats", 0) > 0 and kinds.get("precision_switch", 0) >= 2
    assert "summary" in result.stdout and "records ingested" in result.stdout
    # The real pretrained detector: INT8 accepted on held-out faces, its table printed.
    assert summary["real_model"]["int8_ok"] is True and "onnx-int8" in result.stdout and "face F1" in result.stdout
    # Nothing the demo started is still running (mosquitto, ingest, daemon).
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert leftovers == []
    assert not any(p.info["cmdline"] and str(out) in " ".join(p.info["cmdline"])
                   for p in psutil.process_iter(["cmdline"]))
