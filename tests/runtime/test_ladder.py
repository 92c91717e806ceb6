"""The memory ladder: steps ordered by measured footprint, skipped steps named, and a real memory
cgroup in which a process serving under 4 threads steps down before the OOM killer and back up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cgroups import PRESSURE, make_memory_cgroup, oom_kills, remove
from edge_sdk.manifest import Footprint, FootprintFigures
from edge_sdk.profiles import Hysteresis, PolicySettings, Thresholds
from edge_sdk.runtime.acceptance import DeviceChecks
from edge_sdk.runtime.ladder import Rung, build_ladder
from edge_sdk.runtime.model import EdgeModel
from edge_sdk.runtime.monitor import FakeSource
from edge_sdk.runtime.policy import EventKind, PrecisionPolicy
from edge_sdk.types import MemoryMode, Precision
from needs import missing, need_root

FP32, FP16, INT8 = Precision.FP32, Precision.FP16, Precision.INT8
LEAN = MemoryMode.LEAN


def footprint(default: float, lean: float | None = None) -> tuple[Footprint, str]:
    figures = FootprintFigures(load_rss_mb=default, peak_rss_mb=default)
    lean_figures = FootprintFigures(load_rss_mb=lean, peak_rss_mb=lean) if lean is not None else None
    return Footprint(backend="onnxruntime", weights_bytes=0, default=figures, lean=lean_figures), "device"


# Measured for the 98 MB MLP on onnxruntime 1.32, x86_64 (peak RSS, MB): FP16 costs more than FP32.
ORT = {FP32: footprint(181, 129), FP16: footprint(197, 212), INT8: footprint(67, 44)}


def test_ladder_orders_steps_by_measured_footprint_and_names_skipped_ones() -> None:
    ladder = build_ladder([FP32, FP16, INT8], ORT)
    chain, skipped = ladder.chain()
    assert chain == [Rung(FP32), Rung(FP32, LEAN), Rung(INT8), Rung(INT8, LEAN)]
    assert len(skipped) == 2 and all(s.startswith("fp16") for s in skipped)
    assert "costs 53%" in skipped[0] and "197 MB vs 129 MB" in skipped[0]
    # Without lean modes, FP16 is still no step from FP32 (it costs 9% more).
    chain, skipped = build_ladder([FP32, FP16, INT8], ORT, lean_modes=False).chain()
    assert chain == [Rung(FP32), Rung(INT8)] and "costs 9%" in skipped[0]
    # A step must save the set fraction: at 30%, FP32 lean (-29%) is not one.
    chain, _ = build_ladder([FP32, FP16, INT8], ORT, min_saving=0.30).chain()
    assert chain == [Rung(FP32), Rung(INT8), Rung(INT8, LEAN)]
    # No figures: every lower precision is assumed to save, as before measurements existed.
    assert build_ladder([FP32, FP16, INT8]).chain() == ([Rung(FP32), Rung(FP16), Rung(INT8)], [])


def test_policy_steps_down_only_to_rungs_that_save_memory() -> None:
    settings = PolicySettings(thresholds={FP32: Thresholds(min_free_memory_mb=100), FP16: Thresholds(min_free_memory_mb=100)},
                              hysteresis=Hysteresis(memory_mb=20), min_dwell_s=0)
    policy = PrecisionPolicy([FP32, FP16, INT8], settings, ladder=build_ladder([FP32, FP16, INT8], ORT))
    source = FakeSource(available_memory_mb=1000)
    assert policy.initial(source.sample()) == FP32 and policy.rung == Rung(FP32)
    # 60 MB free: FP32 lean would free 52 MB (112 MB free >= 100): the cheapest step that is enough.
    down = policy.decide(FakeSource(available_memory_mb=60).sample())
    assert down.kind == EventKind.STEP_DOWN and down.to_rung == Rung(FP32, LEAN), down
    assert "fp16 is not a memory step from fp32" in down.reason
    # 20 MB free under FP32 lean: FP16 would cost memory, INT8 frees 62 MB.
    down = policy.decide(FakeSource(available_memory_mb=20).sample())
    assert down.to_rung == Rung(INT8), down
    # Back up only when the step's measured footprint fits beside the margin.
    assert policy.decide(FakeSource(available_memory_mb=150).sample()) is None  # 150 + 67 - 129 < 120
    up = policy.decide(FakeSource(available_memory_mb=300).sample())
    assert up.kind == EventKind.STEP_UP and up.to_rung == Rung(FP32), up  # 300 + 67 - 181 >= 120


def test_cpu_pressure_still_steps_through_every_cheaper_precision() -> None:
    settings = PolicySettings(thresholds={FP32: Thresholds(max_cpu_percent=80)}, min_dwell_s=0)
    policy = PrecisionPolicy([FP32, FP16, INT8], settings, ladder=build_ladder([FP32, FP16, INT8], ORT))
    policy.initial(FakeSource().sample())
    down = policy.decide(FakeSource(cpu_percent=95).sample())
    assert down.to_rung == Rung(FP16), down  # CPU, not memory: FP16 is a cheaper precision


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_each_backend_gets_its_measured_ladder(mlp_release: Path, tmp_path: Path, backend: str) -> None:
    import shutil

    folder = tmp_path / "release"
    shutil.copytree(mlp_release, folder)
    checks = DeviceChecks(acceptance_budget_s=0)
    with EdgeModel.load(folder, profile="intel-nuc", backend=backend, monitor=False, device_checks=checks) as model:
        info = model.info()
        ladder = info.ladder
        events = {e.kind: e for e in model.events}
    assert set(ladder["sources"].values()) == {"device"}
    steps = ladder["memory_steps"]
    assert steps[0] == "fp32" and "int8" in steps
    sizes = ladder["footprint_mb"]
    assert all(sizes[b] <= 0.9 * sizes[a] for a, b in zip(steps, steps[1:]))  # every step saves >= 10%
    if backend == "onnxruntime":
        # FP16 weights are cast back to FP32 at load: no memory step unless measured to save.
        assert "fp16" not in steps and sizes["fp16"] > 0.9 * sizes["fp32"]
        assert any(s.startswith("fp16 is not a memory step") for s in ladder["skipped"])
    else:
        assert "fp16" in steps  # OpenVINO keeps FP16 weights: half the memory
        # OpenVINO's lean options change nothing measurable on this model: not steps.
        assert "fp32 (lean)" not in steps
        assert any(s.startswith("fp32 (lean) is not a memory step") for s in ladder["skipped"])
    assert events[EventKind.LADDER].reason.startswith("memory steps: fp32 -> ")
    assert "skipped:" in events[EventKind.LADDER].reason
    assert "measured on this device" in events[EventKind.MEASURED].reason


@pytest.mark.slow
def test_memory_cgroup_steps_down_before_the_oom_killer_and_back_up(mlp_release: Path, tmp_path: Path) -> None:
    import shutil

    need_root("a memory cgroup")
    made = make_memory_cgroup(limit_mb=1200)
    if made is None:
        missing("a writable memory cgroup (cgroup v2 or v1 memory controller)")
    folder, version = made
    release = tmp_path / "release"
    shutil.copytree(mlp_release, release)
    try:
        proc = subprocess.run([sys.executable, str(PRESSURE), str(release), str(folder), version], capture_output=True,
                              text=True, timeout=400,
                              preexec_fn=lambda: (folder / "cgroup.procs").write_text(str(os.getpid())))
        kills = oom_kills(folder, version)
    finally:
        remove(folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert kills == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["errors"] == [] and report["calls"] > 0
    assert report["initial"] == "fp32"
    assert report["stepped_down"] and report["held_int8"] and report["stepped_up"], (report, proc.stderr[-3000:])
    # The tight limit could not hold FP32 beside the process, and RSS stayed under it on INT8.
    assert report["charged_int8_mb"] + report["ladder"]["footprint_mb"]["fp32"] - report["ladder"]["footprint_mb"]["int8"] \
        > report["tight_limit_mb"]
    # RSS that the cgroup charges (private pages; shared libraries are charged where first loaded).
    assert report["anon_rss_under_tight_mb"] < report["tight_limit_mb"]
    kinds = [(e["kind"], e["to_precision"]) for e in report["events"]]
    assert ("step_down", "int8") in kinds and ("step_up", "fp32") in kinds[kinds.index(("step_down", "int8")):]
    # Steps up only as hot swaps: a paused load at a limit that cannot hold it is the OOM killer's.
    assert not [e for e in report["events"] if e["kind"] == "step_up" and e["paused"]], report["events"]
    down = next(e for e in report["events"] if e["kind"] == "step_down")
    assert "free memory" in down["reason"] and "fp16 is not a memory step" in down["reason"]
