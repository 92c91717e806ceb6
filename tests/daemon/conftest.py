"""Daemon test helpers: real releases (converted with edge_sdk.convert) and a real daemon process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import edge_sdk
from edge_sdk import samples

EDGE_SDK = [sys.executable, "-m", "edge_sdk"]


def _convert(model_path: Path, out: Path, version: int = 1, name: str | None = None) -> Path:
    edge_sdk.convert(model_path, profiles=["generic-x86_64", "generic-aarch64"], output=out, targets=["onnx"], calibration="random",
                     latency_runs=3, validation_limit=4, release_version=version, model_name=name,
                     speed_gate=False, footprint=False)
    return out


@pytest.fixture(scope="session")
def fusion_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The multimodal sample (image + audio + imu → scores) as an ONNX release, version 1."""
    root = tmp_path_factory.mktemp("daemon-releases")
    src = samples.save(samples.make_multimodal(), root / "fusion.onnx")
    return _convert(src, root / "fusion-v1", 1, "fusion")


def fusion_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.random((1, 3, 32, 32), dtype=np.float32), "audio": rng.standard_normal((1, 4, 40)).astype(np.float32),
            "imu": rng.standard_normal((1, 6)).astype(np.float32)}


def v2_request(inputs: dict[str, np.ndarray], **extra) -> dict:
    return {"inputs": [{"name": k, "shape": list(v.shape), "datatype": "FP32", "data": v.ravel().tolist()} for k, v in inputs.items()], **extra}


def write_config(folder: Path, models: list[dict], **sections) -> Path:
    # Tests of other parts call the API without a token; the API tests set `api` themselves.
    config = {"device_id": "dev-test", "state_dir": str(folder / "state"), "http": {"port": 0}, "grpc": {"port": 0},
              "api": {"auth": {"anonymous_loopback": True}},
              "models": models, "policy": {"enabled": False}, "logging": {"format": "json"},
              "drain_timeout_s": 20, "shutdown_timeout_s": 40,
              "sync": {"allow_unsigned": True},  # the test releases are unsigned unless a test says otherwise
              **sections}
    path = folder / "edge.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


class DaemonProcess:
    """``edge-sdk daemon --config`` as a real subprocess; stderr (JSON logs) goes to a file."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.folder = config_path.parent
        self.log_path = self.folder / f"daemon-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([*EDGE_SDK, "daemon", "--config", str(config_path)], stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.url = ""

    def wait_ready(self, timeout: float = 60.0, state_dir: Path | None = None, expect_ready: bool = True) -> DaemonProcess:
        port_file = (state_dir or self.folder / "state") / "http.port"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.logs()}")
            if port_file.exists() and port_file.read_text().strip():
                self.url = f"http://127.0.0.1:{port_file.read_text().strip()}"
                try:
                    r = httpx.get(self.url + "/v2/health/ready", timeout=2)
                    if r.status_code == 200 or not expect_ready:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready within {timeout}s: {self.logs()}")

    def ready(self, timeout: float = 60.0) -> DaemonProcess:
        """:meth:`wait_ready`, killing the daemon if it never gets there; reads its API token (``token``)."""
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        self.token = (self.folder / "state" / "api-tokens").read_text().split()[-1]
        return self

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def start_daemon():
    """``start_daemon(config_path, env=None) -> DaemonProcess`` (not yet waited for); killed at the end."""
    started: list[DaemonProcess] = []

    def start(config_path: Path, env: dict[str, str] | None = None) -> DaemonProcess:
        proc = DaemonProcess(config_path, env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        proc.kill()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition (None if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None
