"""Serving never depends on side state: a full disk or a corrupt outbox/state file leaves the
last good release serving (issue 15, class 4). Real daemon processes, a real tmpfs, real Mosquitto."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
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


def _fill(folder: Path) -> None:
    with open(folder / "ballast", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass


def test_a_full_disk_does_not_stop_the_daemon(fusion_release: Path, tiny_disk, mosquitto, start_daemon, tmp_path):
    state = tiny_disk("1m")
    _fill(state)
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
    _fill(state)
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
