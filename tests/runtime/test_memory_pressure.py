"""Real memory pressure: a hog process eats the budget and the policy steps down, then back up.

Preferred: the model runs in a child process inside its own memory cgroup (v1
``memory.limit_in_bytes`` or v2 ``memory.max``) with a hog subprocess in the same cgroup, so the
monitor must read the *container* budget (host free memory barely moves). Where cgroups cannot be
created, the same scenario runs against host memory with thresholds set relative to what is free.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cgroups import make_memory_cgroup, remove
from needs import missing, need_root

CHILD = r"""
import json, subprocess, sys, time
from edge_sdk.profiles import Hysteresis, PolicySettings, Thresholds
from edge_sdk.runtime.model import EdgeModel
from edge_sdk.runtime.monitor import SystemSource
import numpy as np

release, hog_mb, expect_cgroup = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
source = SystemSource()
start = source.sample()
headroom = start.available_memory_mb
# FP32 needs (headroom - hog/2) free, FP16 (headroom - hog/4): the hog leaves less than both.
settings = PolicySettings(thresholds={
    "fp32": Thresholds(min_free_memory_mb=headroom - hog_mb / 2),
    "fp16": Thresholds(min_free_memory_mb=headroom - hog_mb / 4)},
    hysteresis=Hysteresis(memory_mb=hog_mb / 10), min_dwell_s=0)
model = EdgeModel.load(release, profile="intel-nuc", monitor=source, interval_s=0.05, policy=settings)
x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
report = {"start": start.as_dict(), "initial": model.precision.value, "calls": 0, "errors": []}

def serve_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        try:
            model.run({"image": x}); report["calls"] += 1
        except Exception as exc:
            report["errors"].append(repr(exc))
        time.sleep(0.002)
    return predicate()

hog = subprocess.Popen([sys.executable, "-c",
    "import numpy as np, sys, time; a = np.ones(int(sys.argv[1]) * 2**20, np.uint8); "
    "print('ready', flush=True); time.sleep(120)", str(hog_mb)], stdout=subprocess.PIPE, text=True)
assert hog.stdout.readline().strip() == "ready"
report["stepped_down"] = serve_until(lambda: model.precision.value == "int8", 30)
report["pressure"] = model.monitor.latest.as_dict()
hog.kill(); hog.wait()
report["recovered"] = serve_until(lambda: model.precision.value == "fp32", 30)
report["events"] = [e.as_dict() for e in model.events]
model.close()
print(json.dumps(report))
"""


def run_child(release: Path, hog_mb: int, cgroup: Path | None) -> dict:
    def enter_cgroup() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    proc = subprocess.run([sys.executable, "-c", CHILD, str(release), str(hog_mb), "1" if cgroup else "0"],
                          capture_output=True, text=True, timeout=150, preexec_fn=enter_cgroup)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(report: dict) -> None:
    assert report["errors"] == []
    assert report["initial"] == "fp32"
    assert report["stepped_down"], report
    assert report["recovered"], report
    kinds = [(e["kind"], e["to_precision"]) for e in report["events"]]
    assert kinds[0] == ("initial", "fp32")
    first_int8 = kinds.index(("step_down", "int8"))
    # Back to fp32 once the hog is gone. Not necessarily the last event: these thresholds have no
    # dwell time, and inside a small cgroup the page cache of the reloaded variant counts too.
    assert ("step_up", "fp32") in kinds[first_int8:], kinds
    down = next(e for e in report["events"] if e["kind"] == "step_down")
    assert "free memory" in down["reason"]
    assert report["calls"] > 0


def test_cgroup_memory_pressure_steps_down_and_back(cnn_release: Path) -> None:
    need_root("a memory cgroup")
    made = make_memory_cgroup(limit_mb=600)
    if made is None:
        missing("a writable memory cgroup (cgroup v2 or v1 memory controller)")
    folder, version = made
    try:
        report = run_child(cnn_release, hog_mb=240, cgroup=folder)
    finally:
        remove(folder)
    # The monitor saw the cgroup's budget, not the host's gigabytes.
    assert report["start"]["cgroup_limit_mb"] == pytest.approx(600), version
    assert report["start"]["available_memory_mb"] < 600
    assert report["pressure"]["available_memory_mb"] < report["start"]["available_memory_mb"] - 120
    check(report)


def test_host_memory_pressure_steps_down_and_back(cnn_release: Path) -> None:
    import psutil

    # The thresholds scale with the hog, so any size well above background noise works: a third
    # of what is free (at most 1 GB) keeps the machine out of swap and the OOM killer's way.
    hog_mb = int(min(1024, psutil.virtual_memory().available / 2**20 / 3))
    assert hog_mb >= 128, f"only {hog_mb * 3} MB free: too little to run any real-pressure test"
    report = run_child(cnn_release, hog_mb=hog_mb, cgroup=None)
    check(report)
