"""Acceptance on the device: footprints measured at load and kept beside the release, the paired
benchmark within a budget (0 = skipped and reported), under a real CPU quota of 0.2 CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from cgroups import make_cpu_cgroup, remove
from edge_sdk import samples
from edge_sdk.manifest import FileEntry, Manifest, TensorSpec, Validation, Variant, write_manifest
from edge_sdk.runtime.acceptance import DeviceChecks
from edge_sdk.runtime.footprint import FIGURES_NAME
from edge_sdk.runtime.model import EdgeModel
from edge_sdk.runtime.monitor import SystemSource
from edge_sdk.runtime.policy import EventKind
from edge_sdk.types import Precision, SpeedVerdict, Target
from needs import missing, need_root
from onnx import TensorProto, helper, numpy_helper

PROFILE = "intel-nuc"


def copy(release: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "release"
    shutil.copytree(release, folder)
    return folder


def events_of(model: EdgeModel, kind: EventKind) -> list[str]:
    return [e.reason for e in model.events if e.kind == kind]


def test_release_without_figures_is_measured_at_load_and_kept_beside_it(cnn_release: Path, tmp_path: Path) -> None:
    folder = copy(cnn_release, tmp_path)  # built with footprint=False: no figures at all
    checks = DeviceChecks(acceptance_budget_s=0)
    with EdgeModel.load(folder, profile=PROFILE, monitor=False, device_checks=checks) as model:
        info = model.info()
        assert any("footprint measured on this device" in r for r in events_of(model, EventKind.MEASURED))
        # Budget 0: skipped, and said so (event and reported figures).
        assert any("acceptance skipped (budget 0 s)" in r for r in events_of(model, EventKind.ACCEPTANCE))
        assert info.device["acceptance"]["skipped"] == "acceptance budget is 0"
        assert set(info.ladder["sources"].values()) == {"device"}
        assert all(v["footprint_mb"] > 0 for v in info.device["variants"].values())
    kept = json.loads((folder / FIGURES_NAME).read_text())
    assert set(kept["variants"]) == set(info.device["variants"])
    # The next load reads them: nothing measured again.
    with EdgeModel.load(folder, profile=PROFILE, monitor=False, device_checks=checks) as model:
        assert not any("measured on this device" in r for r in events_of(model, EventKind.MEASURED))
        assert model.info().ladder["footprint_mb"] == info.ladder["footprint_mb"]
    # A corrupt side file is named, measured again and rewritten; the model serves throughout.
    (folder / FIGURES_NAME).write_bytes(b"\x00garbage")
    with EdgeModel.load(folder, profile=PROFILE, monitor=False, device_checks=checks) as model:
        measured = events_of(model, EventKind.MEASURED)
        assert any(FIGURES_NAME in r and "not valid device figures" in r for r in measured), measured
        assert any("measured on this device" in r for r in measured)
        model.run({"image": np.zeros((1, 3, 32, 32), np.float32)})
    assert json.loads((folder / FIGURES_NAME).read_text())["variants"]


def test_unreadable_cgroup_file_is_an_event_and_host_figures_serve(cnn_release: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for rel, text in {"proc/meminfo": "MemTotal: 8000000 kB\nMemAvailable: 4096000 kB\n",
                      f"proc/{os.getpid()}/statm": "100000 2560 500 1 0 900 0\n", f"proc/{os.getpid()}/cgroup": "0::/app\n",
                      "proc/stat": "cpu  100 0 100 800 0 0 0 0 0 0\n", "sys/fs/cgroup/cgroup.controllers": "memory\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "sys/fs/cgroup/app/memory.max").mkdir(parents=True)
    with EdgeModel.load(cnn_release, profile=PROFILE, monitor=SystemSource(root), interval_s=3600) as model:
        measured = events_of(model, EventKind.MEASURED)
        assert any("cgroup figures unreadable" in r and "memory.max: cannot be read" in r and "host figures" in r
                   for r in measured), measured
        assert model.precision == Precision.FP32  # 4000 MB of host memory: the best variant serves


def _mlp_with_dead_weight(base: onnx.ModelProto, extra_layers: int, width: int) -> onnx.ModelProto:
    """``base`` plus a chain of MatMuls whose result is multiplied by zero and added to the
    logits: the same outputs, several times the work (an artifact that loses on any CPU)."""
    model = onnx.ModelProto.FromString(base.SerializeToString())
    graph = model.graph
    rng = np.random.default_rng(1)
    x, cin = "x", graph.input[0].type.tensor_type.shape.dim[1].dim_value
    for i in range(extra_layers):
        w = (rng.standard_normal((cin, width)) * 0.01).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(w, f"dead{i}.w"))
        graph.node.append(helper.make_node("MatMul", [x, f"dead{i}.w"], [f"dead{i}"]))
        x, cin = f"dead{i}", width
    graph.initializer.append(numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero"))
    graph.node.append(helper.make_node("ReduceSum", [x], ["dead_sum"], keepdims=1))
    graph.node.append(helper.make_node("Mul", ["dead_sum", "zero"], ["dead_zero"]))
    out = graph.output[0].name
    for node in graph.node:
        for j, name in enumerate(node.output):
            if name == out:
                node.output[j] = "live_logits"
    graph.node.append(helper.make_node("Add", ["live_logits", "dead_zero"], [out]))
    return model


def slow_int8_release(folder: Path) -> Path:
    """fp32, fp16 (the same graph) and an "int8" variant that does ~10x the work; the build
    machine's figures claim INT8 is twice as fast (what a build machine unlike the device says)."""
    base = samples.make_mlp(width=256, layers=2, features=64)
    folder.mkdir(parents=True)
    models = {Precision.FP32: base, Precision.FP16: base,
              Precision.INT8: _mlp_with_dead_weight(base, extra_layers=6, width=512)}
    variants = []
    for precision, model in models.items():
        path = samples.save(model, folder / "onnx" / f"onnx-{precision.value}.onnx")
        ratio = 0.5 if precision is Precision.INT8 else 1.0
        variants.append(Variant(
            id=f"onnx-{precision.value}", profiles=[PROFILE], target=Target.ONNX, precision=precision,
            backend="onnxruntime", files=[FileEntry.from_file(folder, path)],
            inputs=[TensorSpec(name="x", dtype="float32", shape=[1, 64])],
            outputs=[TensorSpec(name="logits", dtype="float32", shape=[1, 16])],
            validation=Validation(latency_ratio=ratio, speed=SpeedVerdict.OK), latency_ms=0.1 * ratio))
    write_manifest(folder, Manifest(model="slow", version=1, source_sha256="0" * 64, variants=variants))
    return folder


CHILD = r"""
import json, sys
from edge_sdk.cloud.fleet import FleetView, parse_reported
from edge_sdk.runtime.acceptance import DeviceChecks
from edge_sdk.runtime.model import EdgeModel
from edge_sdk.runtime.monitor import FakeSource
from edge_sdk.runtime.sync.twin import Twin

checks = DeviceChecks(acceptance_budget_s=float(sys.argv[2]), measure_footprint=False)
with EdgeModel.load(sys.argv[1], profile="intel-nuc", monitor=False, device_checks=checks) as model:
    info = model.info()
    events = [e.as_dict() for e in model.events]
    precisions = [p.value for p in model.plan.precisions]
sent = []
twin = Twin("edge/f/dev1/reported", lambda topic, payload: sent.append(payload), resources=FakeSource())
twin.set(profile="intel-nuc")
twin.set_model("slow", release={"model": "slow", "version": 1}, backend=info.backend, precision=info.precision.value,
               device={**info.device, "ladder": info.ladder})
view = FleetView("f", {"dev1": parse_reported("dev1", sent[-1], online=True)})
print(json.dumps({"device": info.device, "events": events, "precisions": precisions,
                  "reported": json.loads(sent[-1])["models"]["slow"]["device"], "figures": view.figures("slow")}))
"""


@pytest.mark.slow
def test_acceptance_under_a_cpu_quota_rejects_the_variant_that_loses_there(tmp_path: Path) -> None:
    need_root("a CPU cgroup")
    made = make_cpu_cgroup(0.2)
    if made is None:
        missing("a writable CPU cgroup (cgroup v2 cpu.max or v1 cpu.cfs_quota_us)")
    folder, _ = made
    release = slow_int8_release(tmp_path / "release")
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(release), "8"], capture_output=True, text=True,
                              timeout=300, preexec_fn=lambda: (folder / "cgroup.procs").write_text(str(os.getpid())))
    finally:
        remove(folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    variants = out["device"]["variants"]
    int8 = variants["onnx-int8"]
    assert int8["verdict"] == "slower" and not int8["used"], int8
    assert int8["latency_ratio"] > 1.0 and int8["build"]["latency_ratio"] == 0.5
    assert "slower than onnx-fp32 on this device" in int8["reason"]
    assert variants["onnx-fp16"]["used"] and variants["onnx-fp16"]["verdict"] in ("ok", "inconclusive"), variants
    assert "int8" not in out["precisions"] and out["precisions"][0] == "fp32"
    assert out["device"]["acceptance"]["spent_s"] <= 8 + 1
    accepted = [e["reason"] for e in out["events"] if e["kind"] == "acceptance"]
    assert any("onnx-int8 not used: slower than onnx-fp32" in r for r in accepted), accepted
    # The figures reach the reported state, and the fleet view sets them beside the build machine's.
    assert out["reported"]["variants"]["onnx-int8"]["p50_ms"] == int8["p50_ms"] > 0
    row = next(r for r in out["figures"] if r["variant"] == "onnx-int8")
    assert row["profile"] == "intel-nuc" and row["verdicts"] == {"slower": 1} and row["used_on"] == 0
    assert row["device_ratio"] > 1.0 and row["build_ratio"] == 0.5


def test_acceptance_budget_bounds_the_benchmark_and_keeps_the_verdicts(tmp_path: Path) -> None:
    release = slow_int8_release(tmp_path / "release")
    checks = DeviceChecks(acceptance_budget_s=2, measure_footprint=False)
    with EdgeModel.load(release, profile=PROFILE, monitor=False, device_checks=checks) as model:
        device = model.info().device
        assert device["acceptance"]["spent_s"] <= 2 + 0.5
        assert device["variants"]["onnx-int8"]["verdict"] == "slower"
        assert Precision.INT8 not in model.plan.candidates
    # The verdicts are kept: the next activation does not benchmark again.
    with EdgeModel.load(release, profile=PROFILE, monitor=False, device_checks=checks) as model:
        assert model.info().device["acceptance"]["skipped"] == "judged earlier on this device"
        assert Precision.INT8 not in model.plan.candidates
