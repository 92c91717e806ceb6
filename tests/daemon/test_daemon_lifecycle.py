"""Daemon lifecycle with real processes and real signals: drain on SIGTERM, reload on SIGHUP, bad starts."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import edge_sdk

from .conftest import EDGE_SDK, fusion_inputs, metric_value, v2_request, write_config


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_drains_an_in_flight_call_then_exits_0(fusion_release: Path, tmp_path: Path, start_daemon) -> None:
    config = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release), "precision": "fp32"}])
    daemon = start_daemon(config).wait_ready()
    inputs = fusion_inputs(3)
    payload = json.dumps(v2_request(inputs)).encode()
    first_part_sent = threading.Event()
    release_rest = threading.Event()
    result: dict = {}

    def slow_body():
        # An upload that is still arriving when SIGTERM lands: the call is in flight.
        yield payload[:100]
        first_part_sent.set()
        release_rest.wait(30)
        yield payload[100:]

    def client() -> None:
        result["response"] = httpx.post(daemon.url + "/v2/models/fusion/infer", content=slow_body(), timeout=60)

    thread = threading.Thread(target=client)
    thread.start()
    first_part_sent.wait(10)
    wait_for(lambda: metric_value(httpx.get(daemon.url + "/metrics").text, "edge_inference_in_flight") == 1.0, what="in-flight call")
    daemon.signal(signal.SIGTERM)
    # Draining: readiness fails at once and new calls are refused, while the old one still runs.
    wait_for(lambda: httpx.get(daemon.url + "/v2/health/ready").status_code == 503, what="not ready")
    refused = httpx.post(daemon.url + "/v2/models/fusion/infer", json=v2_request(inputs))
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
    assert daemon.proc.poll() is None  # still waiting for the in-flight call
    release_rest.set()
    thread.join(30)
    response = result["response"]
    assert response.status_code == 200, response.text
    reference = edge_sdk.EdgeModel.load(fusion_release, profile="generic-x86_64", precision="fp32", monitor=False)
    try:
        want = reference.run(inputs)["scores"]
    finally:
        reference.close()
    np.testing.assert_array_equal(np.asarray(response.json()["outputs"][0]["data"], np.float32).reshape(1, 5), want)
    assert daemon.wait(20) == 0
    messages = [r["msg"] for r in daemon.log_records()]
    assert any(m.startswith("SIGTERM: draining") for m in messages)
    assert any(m.startswith("drained in") for m in messages)
    assert messages[-1] == "stopped"
    assert not (tmp_path / "state" / "http.port").exists()


def test_drain_timeout_bounds_the_exit(fusion_release: Path, tmp_path: Path, start_daemon) -> None:
    config = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release)}], drain_timeout_s=1,
                          shutdown_timeout_s=4)
    daemon = start_daemon(config).wait_ready()
    stuck = threading.Event()

    def never_finishes():
        yield b'{"inputs": ['
        stuck.set()
        time.sleep(60)
        yield b"]}"

    threading.Thread(target=lambda: _swallow(lambda: httpx.post(daemon.url + "/v2/models/fusion/infer",
                                                                 content=never_finishes(), timeout=90)), daemon=True).start()
    stuck.wait(10)
    wait_for(lambda: metric_value(httpx.get(daemon.url + "/metrics").text, "edge_inference_in_flight") == 1.0, what="in-flight call")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    # One overall deadline (shutdown_timeout_s = 4 s) bounds the exit, whatever is stuck; the
    # rest is process teardown.
    assert time.monotonic() - started < 8
    assert any("drain timeout: 1 call(s) still running" in r["msg"] for r in daemon.log_records())


def _swallow(fn) -> None:
    try:
        fn()
    except httpx.HTTPError:
        pass


def test_sigint_also_exits_cleanly(fusion_release: Path, tmp_path: Path, start_daemon) -> None:
    config = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release)}])
    daemon = start_daemon(config).wait_ready()
    daemon.signal(signal.SIGINT)
    assert daemon.wait(20) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_during_start_up_exits_0(fusion_release: Path, tmp_path: Path, start_daemon, sig: int) -> None:
    # Eight models load one after another: a signal after the first lands mid start-up.
    models = [{"name": f"m{i}", "release": str(fusion_release), "precision": "fp32"} for i in range(8)]
    daemon = start_daemon(write_config(tmp_path, models))
    wait_for(lambda: daemon.proc.poll() is not None or any(r["msg"].startswith("model m0: serving") for r in daemon.log_records()),
             timeout=60, what="the first model loaded")
    daemon.signal(sig)
    assert daemon.wait(30) == 0, daemon.logs()
    messages = [r["msg"] for r in daemon.log_records()]
    assert "stop requested during start-up; not serving" in messages
    assert not any(m.startswith("listening on") for m in messages)
    assert messages[-1] == "stopped"
    assert "Traceback" not in daemon.logs()
    assert not (tmp_path / "state" / "http.port").exists()


def test_loads_that_end_during_shutdown_are_not_served(fusion_release: Path, tmp_path: Path) -> None:
    # In-process: a hot swap (sync) or reload whose load finishes after SIGTERM must neither be
    # served nor stay open once the models are closed, and must not make sync roll back.
    from edge_sdk.daemon.config import load_config
    from edge_sdk.daemon.models import load_served
    from edge_sdk.daemon.service import Daemon

    path = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release), "precision": "fp32"}])
    config = load_config(path)
    daemon = Daemon(config, path)
    first = daemon.load_model(config.models[0])
    assert first is not None and daemon.models.get("fusion") is first
    late = load_served(config.models[0], fusion_release, policy=config.policy)  # a swap still loading
    synced = load_served(config.models[0], fusion_release, policy=config.policy)  # a synced release, self-tested
    daemon.stop()
    assert daemon.load_model(config.models[0]) is None  # no new load starts
    assert daemon.on_release(synced) is True  # on disk it stays active: no rollback
    assert daemon.reload() is False
    daemon.models.close()
    assert daemon.models.put(late) is False  # the swap lands after close: refused ...
    assert daemon.models.all() == []
    for served in (first, late, synced):  # ... and closed, like the model it would have replaced
        with pytest.raises(edge_sdk.errors.EdgeSDKError, match="closed"):
            served.model.info()


def test_sighup_reloads_a_good_config_and_rejects_a_bad_one(fusion_release: Path, tmp_path: Path, start_daemon) -> None:
    config = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release), "precision": "fp32"}])
    daemon = start_daemon(config).wait_ready()
    assert httpx.get(daemon.url + "/v2/models/second").status_code == 404
    # A good change: serve the same release under a second name, pinned to FP16.
    good = json.loads(config.read_text())
    good["models"].append({"name": "second", "release": str(fusion_release), "precision": "fp16"})
    config.write_text(json.dumps(good))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: httpx.get(daemon.url + "/v2/models/second").status_code == 200, what="reloaded model")
    assert httpx.get(daemon.url + "/v2/models/second").json()["parameters"]["precision"] == "fp16"
    r = httpx.post(daemon.url + "/v2/models/second/infer", json=v2_request(fusion_inputs()))
    assert r.status_code == 200
    # A bad change (unknown key + bad port): rejected, logged with key and line, old config kept.
    config.write_text(config.read_text().replace('"drain_timeout_s"', '"drian_timeout_s"'))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: any("reload rejected" in r["msg"] for r in daemon.log_records()), what="rejection log")
    line = next(r["msg"] for r in daemon.log_records() if "reload rejected" in r["msg"])
    assert "drian_timeout_s (line 1): unknown key" in line
    assert httpx.get(daemon.url + "/v2/health/ready").status_code == 200
    for name in ("fusion", "second"):
        assert httpx.post(daemon.url + f"/v2/models/{name}/infer", json=v2_request(fusion_inputs())).status_code == 200
    text = httpx.get(daemon.url + "/metrics").text
    assert metric_value(text, "edge_config_reloads_total", result="applied") == 1.0
    assert metric_value(text, "edge_config_reloads_total", result="rejected") == 1.0
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0


def _run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGE_SDK, *args], capture_output=True, text=True, timeout=timeout)


def test_port_in_use_is_a_clear_error(fusion_release: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        config = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release)}], http={"port": port})
        result = _run_cli("daemon", "--config", str(config))
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_unusable_state_dir_is_a_clear_error(fusion_release: Path, tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file, not a folder")
    config = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release)}])
    result = _run_cli("daemon", "--config", str(config))
    assert result.returncode == 1
    assert "state_dir" in result.stderr and "not usable" in result.stderr


def test_unusable_sync_folder_is_a_clear_error(fusion_release: Path, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "sync").write_text("a file where sync keeps its releases")
    config = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release)}],
                          sync={"broker": "mqtt://127.0.0.1:1", "allow_unsigned": True})
    result = _run_cli("daemon", "--config", str(config))
    assert result.returncode == 1
    assert "state_dir" in result.stderr and "sync is not usable" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_does_not_start(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text("device_id: d\nstate_dir: s\nmodels:\n  - name: a\n    release: r\nhttp:\n  port: -5\n")
    result = _run_cli("daemon", "--config", str(path))
    assert result.returncode == 1 and "http.port (line 7)" in result.stderr


def test_corrupt_release_keeps_the_daemon_up_and_says_why(fusion_release: Path, tmp_path: Path, start_daemon) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(fusion_release, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    artifact = broken / manifest["variants"][0]["files"][0]["path"]
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    config = write_config(tmp_path, [{"name": "good", "release": str(fusion_release)},
                                     {"name": "broken", "release": str(broken), "precision": manifest["variants"][0]["precision"]}])
    daemon = start_daemon(config).wait_ready(expect_ready=False)
    wait_for(lambda: httpx.get(daemon.url + "/v2/health/ready").status_code == 503, what="not-ready answer")
    ready = httpx.get(daemon.url + "/v2/health/ready").json()
    assert ready["ready"] is False and any(p.startswith("model broken:") for p in ready["problems"])
    assert httpx.get(daemon.url + "/v2/health/live").status_code == 200
    r = httpx.post(daemon.url + "/v2/models/broken/infer", json=v2_request(fusion_inputs()))
    assert r.status_code == 503 and "not loaded" in r.json()["error"]
    assert httpx.post(daemon.url + "/v2/models/good/infer", json=v2_request(fusion_inputs())).status_code == 200
    assert any("model broken: cannot load" in rec["msg"] for rec in daemon.log_records())


def test_unix_socket(fusion_release: Path, tmp_path: Path, start_daemon) -> None:
    sock = tmp_path / "api.sock"
    config = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release)}], http={"unix_socket": str(sock)})
    daemon = start_daemon(config)
    wait_for(lambda: sock.exists() or daemon.proc.poll() is not None, what="socket")
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://edge") as client:
        wait_for(lambda: _ok(client, "/v2/health/ready"), what="ready over the socket")
        r = client.post("/v2/models/fusion/infer", json=v2_request(fusion_inputs()))
        assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 5]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    assert not sock.exists()


def _ok(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def test_listening_socket_disables_nagle(tmp_path: Path) -> None:
    # Regression: without TCP_NODELAY every keep-alive response waited ~40 ms for a delayed ACK.
    from edge_sdk.daemon.config import load_config
    from edge_sdk.daemon.service import bind_socket

    config = load_config(write_config(tmp_path, [{"name": "m", "release": str(tmp_path)}]))
    sock = bind_socket(config)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()
