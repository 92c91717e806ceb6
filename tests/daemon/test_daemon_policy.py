"""A memory squeeze (a /proc tree the daemon's resource monitor reads) steps precision down and back up."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx

from .conftest import fusion_inputs, metric_value, v2_request, write_config
from .test_daemon_lifecycle import wait_for


def write_meminfo(root: Path, available_mb: int) -> None:
    """Atomically replace ``root/proc/meminfo`` (what the monitor reads for free memory)."""
    path = root / "proc" / "meminfo"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"MemTotal:       16000000 kB\nMemFree:        {available_mb * 1024} kB\n"
                   f"MemAvailable:   {available_mb * 1024} kB\n")
    os.replace(tmp, path)


def precision(daemon) -> str:
    return httpx.get(daemon.url + "/v2/models/fusion").json()["parameters"]["precision"]


def test_memory_squeeze_steps_down_and_back_up(fusion_release: Path, tmp_path: Path, start_daemon) -> None:
    root = tmp_path / "sysroot"
    write_meminfo(root, 8000)
    config = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release), "profile": "generic-x86_64"}],
                          policy={"enabled": True, "interval_s": 0.1, "min_dwell_s": 0.5, "resource_root": str(root)})
    daemon = start_daemon(config).wait_ready()
    assert precision(daemon) == "fp32"
    # /metrics reads the figures the policy decides on (the same reader, here the simulated tree).
    available = metric_value(httpx.get(daemon.url + "/metrics").text, "edge_resource_available_memory_bytes")
    assert available == 8000 * 2**20
    # generic-x86_64: FP32 needs 1024 MB free, FP16 512 MB.
    write_meminfo(root, 700)
    wait_for(lambda: precision(daemon) == "fp16", what="step down to fp16")
    assert httpx.post(daemon.url + "/v2/models/fusion/infer", json=v2_request(fusion_inputs())).status_code == 200
    write_meminfo(root, 8000)
    wait_for(lambda: precision(daemon) == "fp32", what="step back up to fp32")
    text = httpx.get(daemon.url + "/metrics").text
    assert metric_value(text, "edge_precision_switches_total", model="fusion", from_precision="fp32",
                        to_precision="fp16", kind="step_down") == 1.0
    assert metric_value(text, "edge_precision_switches_total", model="fusion", from_precision="fp16",
                        to_precision="fp32", kind="step_up") == 1.0
    assert metric_value(text, "edge_model_active", model="fusion", version="1", backend="onnxruntime", precision="fp32") == 1.0
    assert metric_value(text, "edge_model_active", model="fusion", version="1", backend="onnxruntime", precision="fp16") is None
    assert any("precision fp32 -> fp16" in r["msg"] and "memory" in r["msg"].lower() for r in daemon.log_records())
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
