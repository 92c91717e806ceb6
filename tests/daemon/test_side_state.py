"""Serving never depends on side state: a full disk or a corrupt outbox/state file leaves the
last good release serving (issue 15, class 4). Real daemon processes, a real tmpfs, real Mosquitto."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from disk import fill_disk
from servers import free_port

from .conftest import fusion_inputs, write_config


def _infer_body() -> dict:
    inputs = fusion_inputs()
    return {"inputs": [{"name": k, "shape": list(v.shape), "datatype": "FP32", "data": v.ravel().tolist()}
                       for k, v in inputs.items()]}


def _serving(url: str, timeout: float = 60.0, proc=None) -> float:
    """Seconds until the daemon answers an infer with 200 (fails if it exits first)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.proc.returncode}: {proc.logs()[-3000:]}")
        try:
            if httpx.post(url + "/v2/models/fusion/infer", json=_infer_body(), timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not serving within {timeout}s: {proc.logs()[-3000:] if proc else ''}")


def test_a_full_disk_does_not_stop_the_daemon(fusion_release: Path, tiny_disk, mosquitto, start_daemon, tmp_path):
    state = tiny_disk("1m")
    fill_disk(state)
    port = free_port()
    config = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release)}],
                          state_dir=str(state), http={"port": port},
                          sync={"broker": mosquitto.url, "fleet": "lab", "allow_unsigned": True,
                                "telemetry_interval_s": 0.3})
    daemon = start_daemon(config)
    _serving(f"http://127.0.0.1:{port}", proc=daemon)
    assert daemon.proc.poll() is None


def test_corrupt_side_files_are_moved_aside_and_the_synced_release_serves(fusion_release: Path, mosquitto,
                                                                          start_daemon, tmp_path):
    """The model comes only from sync (no local release): a corrupt outbox.db and state.json must
    not stop the active synced release from serving; both are moved aside and rebuilt."""
    import json
    import os
    import shutil

    state = tmp_path / "state"
    releases = state / "sync" / "releases"
    shutil.copytree(fusion_release, releases / "fusion@v1")
    os.symlink("releases/fusion@v1", state / "sync" / "current")
    (state / "outbox.db").write_bytes(b"\x13garbage, not SQLite" * 100)
    (state / "sync" / "state.json").write_text("{not json")
    port = free_port()
    config = write_config(tmp_path, [{"name": "fusion"}], http={"port": port},
                          sync={"broker": mosquitto.url, "fleet": "lab", "allow_unsigned": True,
                                "telemetry_interval_s": 0.3})
    daemon = start_daemon(config)
    _serving(f"http://127.0.0.1:{port}", proc=daemon)
    assert list(state.glob("outbox.db.corrupt-*")) and list((state / "sync").glob("state.json.corrupt-*"))
    rebuilt = json.loads((state / "sync" / "state.json").read_text())
    assert rebuilt["highest"] == {"fusion": 1}  # rollback protection kept, from the releases on disk


def _reported(broker_url: str, fleet: str, device: str = "dev-test") -> dict:
    import json

    from edge_sdk.cloud.connection import collect_retained, connect
    from edge_sdk.runtime.sync.topics import Topics

    topics = Topics(fleet)
    with connect(broker_url, "test") as t:
        payload = collect_retained(t, topics, topics.reported(device)).get(topics.reported(device))
    return json.loads(payload) if payload else {}


def _until(check, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what} within {timeout}s" + (f": {proc.logs()[-3000:]}" if proc else ""))


def test_no_room_to_create_the_outbox_still_starts_sync_and_telemetry_comes_back(fusion_release: Path, tiny_disk,
                                                                                 mosquitto, start_daemon, tmp_path):
    """A full disk and no outbox.db yet used to mean "sync not started": no reported state, no
    release ever synced. Now sync runs with telemetry disabled (and says so), and both the
    release and telemetry follow once space returns, without a restart."""
    from edge_sdk.cloud.desire import build_desired, write_desired
    from edge_sdk.cloud.publish import publish_release

    publish_release(fusion_release, mosquitto.url, "full")
    write_desired(mosquitto.url, "full", build_desired("fusion", 1))
    state = tiny_disk("16m")
    fill_disk(state)
    port = free_port()
    config = write_config(tmp_path, [{"name": "fusion", "profile": "generic-x86_64"}], state_dir=str(state),
                          http={"port": port},
                          sync={"broker": mosquitto.url, "fleet": "full", "allow_unsigned": True,
                                "telemetry_interval_s": 0.3})
    daemon = start_daemon(config)
    telemetry = _until(lambda: _reported(mosquitto.url, "full").get("telemetry"), 60, "telemetry in the reported state",
                       daemon)
    assert "disk is full" in (telemetry["disabled"] or ""), telemetry
    assert not (state / "outbox.db").exists() or (state / "outbox.db").stat().st_size == 0
    (state / "ballast").unlink()
    _serving(f"http://127.0.0.1:{port}", timeout=120, proc=daemon)  # the desired release, synced after all
    telemetry = _until(lambda: (t := _reported(mosquitto.url, "full").get("telemetry")) and t["appended"] > 0 and t,
                       60, "telemetry stored again", daemon)
    assert telemetry["disabled"] is None and telemetry["rejected"] > 0  # what was refused meanwhile is counted
    assert daemon.proc.poll() is None


@pytest.fixture(scope="module")
def fusion_v2(tmp_path_factory) -> Path:
    from edge_sdk import samples

    from .conftest import _convert

    root = tmp_path_factory.mktemp("fusion-v2")
    return _convert(samples.save(samples.make_multimodal(seed=1), root / "fusion.onnx"), root / "fusion-v2", 2, "fusion")


def _damage_largest_model_file(release: Path):
    """Flip one byte in the release's largest model file; returns its manifest entry."""
    from edge_sdk.manifest import load_manifest

    entry = max((e for e in load_manifest(release).files() if (release / e.path).exists()), key=lambda e: e.size)
    data = bytearray((release / entry.path).read_bytes())
    data[len(data) // 2] ^= 0x20
    (release / entry.path).write_bytes(bytes(data))
    return entry


def _serving_state(broker_url: str, version: int, state: str):
    def check():
        model = _reported(broker_url, "heal").get("models", {}).get("fusion", {})
        ok = model.get("release", {}).get("version") == version and (model.get("serving") or {}).get("state") == state
        return model if ok else None
    return check


def test_a_damaged_active_release_is_rebuilt_or_falls_back_visibly(fusion_release: Path, fusion_v2: Path, mosquitto,
                                                                   start_daemon, tmp_path):
    """A corrupt file in the active release used to mean 503 forever (no previous) or a silent
    fallback. Now: rebuilt from local chunks and served; with its chunks gone too, the previous
    release serves, reported as a fallback, until the chunks are fetched again."""
    import signal

    from edge_sdk.cloud.desire import build_desired, write_desired
    from edge_sdk.cloud.publish import publish_release
    from edge_sdk.runtime.sync.chunk_store import ChunkStore
    from edge_sdk.runtime.sync.topics import Topics

    from .conftest import metric_value

    publish_release(fusion_release, mosquitto.url, "heal")
    write_desired(mosquitto.url, "heal", build_desired("fusion", 1))
    state = tmp_path / "state"
    config = write_config(tmp_path, [{"name": "fusion", "profile": "generic-x86_64", "precision": "fp32"}],
                          sync={"broker": mosquitto.url, "fleet": "heal", "allow_unsigned": True,
                                "telemetry_interval_s": 0.3})

    def version(daemon) -> float | None:
        text = httpx.get(daemon.url + "/metrics").text
        return next((v for v in (1, 2) if metric_value(text, "edge_model_active", model="fusion", version=str(v),
                                                         backend="onnxruntime", precision="fp32") == 1.0), None)

    daemon = start_daemon(config).wait_ready(timeout=120)
    v1 = state / "sync" / "releases" / "fusion@v1"
    # 1. Only release, one file damaged: rebuilt from the local chunks, served, reported as repaired.
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    damaged = _damage_largest_model_file(v1)
    daemon = start_daemon(config)
    _serving(f"{daemon.wait_ready(timeout=120).url}", proc=daemon)
    model = _until(_serving_state(mosquitto.url, 1, "repaired"), 30, "reported as repaired", daemon)
    assert damaged.path in model["serving"]["reason"]
    # 2. v2 active, v1 kept. v2 damaged and its chunk gone from the device and from the broker.
    publish_release(fusion_v2, mosquitto.url, "heal")
    write_desired(mosquitto.url, "heal", build_desired("fusion", 2))
    _until(lambda: version(daemon) == 2, 120, "v2 synced", daemon)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    entry = _damage_largest_model_file(state / "sync" / "releases" / "fusion@v2")
    lost = entry.chunks[len(entry.chunks) // 2]
    ChunkStore(state / "sync" / "chunks").path(lost.sha256).unlink(missing_ok=True)
    _retain_empty(mosquitto.url, Topics("heal").blob(lost.sha256))
    daemon = start_daemon(config).wait_ready(timeout=120)
    assert version(daemon) == 1  # the previous release serves at once...
    model = _until(_serving_state(mosquitto.url, 1, "fallback"), 30, "reported as a fallback", daemon)
    assert "fusion@v2" in model["serving"]["reason"]  # ...and the reported state says why
    # 3. The cloud repairs its store (a plain publish); the device fetches the chunk and serves v2.
    assert publish_release(fusion_v2, mosquitto.url, "heal").chunks_repaired == 1
    _until(lambda: version(daemon) == 2, 120, "v2 served again", daemon)
    _until(_serving_state(mosquitto.url, 2, "active"), 30, "reported as active", daemon)


def _retain_empty(broker_url: str, topic: str) -> None:
    from edge_sdk.cloud.connection import connect

    with connect(broker_url, "test") as t:
        assert t.publish(topic, b"", qos=1, retain=True, wait=5)
