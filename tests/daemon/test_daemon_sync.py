"""Daemon + real Mosquitto: sync a signed release, hot-swap to v2, upload telemetry to ingest,
and keep serving (and queueing telemetry) with the broker gone."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from edge_sdk import samples
from edge_sdk.cloud.desire import build_desired, write_desired
from edge_sdk.cloud.ingest import IngestWorker, SqliteSink
from edge_sdk.cloud.publish import publish_release
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.transport import Transport, TransportConfig
from edge_sdk.signing import generate_keypair

from .conftest import _convert, fusion_inputs, metric_value, v2_request, write_config
from .test_daemon_lifecycle import wait_for

FLEET = "lab"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("keys")
    return generate_keypair(folder / "release.key", folder / "release.pub")


@pytest.fixture(scope="module")
def fusion_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fusion-v2")
    src = samples.save(samples.make_multimodal(seed=1), root / "fusion.onnx")
    return _convert(src, root / "fusion-v2", 2, "fusion")


class Ingest:
    """A real ingest worker (shared subscription) committing to SQLite."""

    def __init__(self, broker, db: Path) -> None:
        self.db = db
        config = TransportConfig.from_url(broker.url, client_id=f"ingest-{time.monotonic_ns()}", session_expiry_s=0)
        self.worker = IngestWorker(Transport(config), Topics(FLEET), SqliteSink(db))
        self.worker.start()

    def kinds(self, device: str = "dev-test") -> dict[str, int]:
        with sqlite3.connect(self.db) as db:
            return dict(db.execute("SELECT kind, COUNT(*) FROM records WHERE device = ? GROUP BY kind", (device,)).fetchall())

    def stop(self) -> None:
        self.worker.stop()


def fleet_view(broker: str):
    """The fleet view (from the retained reported state), as `edge-sdk cloud status` reads it."""
    from edge_sdk.cloud.connection import connect
    from edge_sdk.cloud.fleet import read_fleet

    with connect(broker, "test-status") as transport:
        return read_fleet(transport, Topics(FLEET), timeout=10)


def sync_config(tmp_path: Path, broker, keys, **extra) -> Path:
    return write_config(tmp_path, [{"name": "fusion", "profile": "generic-x86_64", "precision": "fp32"}],
                        sync={"broker": broker.url, "fleet": FLEET, "public_key": str(keys[1]), "telemetry_interval_s": 0.3,
                              "labels": {"site": "plant1"}},
                        **extra)


def test_sync_hot_swap_telemetry_and_offline(fusion_release: Path, fusion_v2: Path, keys, mosquitto, tmp_path: Path,
                                             start_daemon) -> None:
    report = publish_release(fusion_release, mosquitto.url, FLEET, sign_key=keys[0])
    assert report.signed and report.chunks_published > 0
    write_desired(mosquitto.url, FLEET, build_desired("fusion", 1))
    ingest = Ingest(mosquitto, tmp_path / "ingest.db")
    try:
        # 1. No local release: the daemon starts (not ready), syncs v1 over MQTT, then serves it.
        # Device checks on (the suite turns them off): the activation measures and benchmarks here.
        checks = {"policy": {"enabled": False, "device_checks": {"acceptance_budget_s": 3}}}
        daemon = start_daemon(sync_config(tmp_path, mosquitto, keys, **checks)).wait_ready(timeout=120)
        meta = httpx.get(daemon.url + "/v2/models/fusion").json()
        assert meta["versions"] == ["1"] and "/sync/releases/fusion@v1" in meta["parameters"]["release_dir"]
        # What the device measured itself reaches its reported state, beside the build machine's figures.
        found: list[list[dict]] = []
        wait_for(lambda: found.append(fleet_view(mosquitto.url).figures("fusion")) or any(
            r["device_footprint_mb"] for r in found[-1]), timeout=30, what="device figures in the reported state")
        figures = {r["variant"]: r for r in found[-1]}
        assert all(r["device_footprint_mb"] for r in figures.values()), figures
        # ...grouped by the profile the daemon reports, with its labels (what rollout groups match).
        assert {r["profile"] for r in figures.values()} == {"generic-x86_64"}, figures
        device = fleet_view(mosquitto.url).devices["dev-test"]
        assert device.matches({"site": "plant1", "profile": "generic-x86_64"}) and not device.matches({"site": "plant2"})
        assert figures["onnx-fp32"]["device_p50_ms"] > 0 and figures["onnx-fp32"]["build_latency_ms"] > 0
        text = httpx.get(daemon.url + "/metrics").text
        assert 0 < metric_value(text, "edge_sync_bytes_fetched_total") <= report.bytes_total
        assert metric_value(text, "edge_sync_chunks_fetched_total") > 0
        assert metric_value(text, "edge_sync_active_release_version", model="fusion") == 1.0
        assert metric_value(text, "edge_sync_connected") == 1.0
        assert time.time() - 300 < metric_value(text, "edge_sync_last_success_timestamp_seconds") <= time.time()
        assert metric_value(text, "edge_sync_outbox_dropped_total") == 0.0
        assert metric_value(text, "edge_sync_telemetry_records_lost_total") == 0.0
        for seed in range(3):
            assert httpx.post(daemon.url + "/v2/models/fusion/infer", json=v2_request(fusion_inputs(seed))).status_code == 200
        # 2. Telemetry reaches ingest and is acked (the outbox drains).
        wait_for(lambda: ingest.kinds().get("stats", 0) >= 2, timeout=30, what="stats records at ingest")
        assert ingest.kinds().get("release_activated") == 1
        # 3. A new release: published, desired, synced, hot-swapped while serving.
        stop = threading.Event()
        statuses: list[int] = []

        def load() -> None:
            with httpx.Client() as client:
                while not stop.is_set():
                    statuses.append(client.post(daemon.url + "/v2/models/fusion/infer", json=v2_request(fusion_inputs())).status_code)

        caller = threading.Thread(target=load)
        caller.start()
        publish_release(fusion_v2, mosquitto.url, FLEET, sign_key=keys[0])
        write_desired(mosquitto.url, FLEET, build_desired("fusion", 2))
        # (versions lists every release on the device: v2 active, v1 kept as previous)
        wait_for(lambda: httpx.get(daemon.url + "/v2/models/fusion").json()["parameters"]["release_version"] == 2,
                 timeout=120, what="v2 served")
        stop.set()
        caller.join(30)
        assert statuses and set(statuses) == {200}  # no call failed during the swap
        text = httpx.get(daemon.url + "/metrics").text
        assert metric_value(text, "edge_model_active", model="fusion", version="2", backend="onnxruntime", precision="fp32") == 1.0
        assert metric_value(text, "edge_sync_results_total", status="activated") == 2.0
        # Each synced release was loaded (hashed, self-tested) once: the self-test's load is what serves.
        loads = [r["msg"] for r in daemon.log_records() if r["msg"].startswith("model fusion: loaded ")]
        assert [m.split()[3] for m in loads] == ["v1", "v2"], loads
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        # 4. Offline-first: broker gone; the daemon starts from the synced store and queues telemetry.
        mosquitto.kill()
        daemon = start_daemon(sync_config(tmp_path, mosquitto, keys)).wait_ready(timeout=60)
        assert httpx.get(daemon.url + "/v2/models/fusion").json()["parameters"]["release_version"] == 2
        assert httpx.post(daemon.url + "/v2/models/fusion/infer", json=v2_request(fusion_inputs())).status_code == 200
        wait_for(lambda: (metric_value(httpx.get(daemon.url + "/metrics").text, "edge_sync_outbox_records") or 0) >= 3,
                 timeout=30, what="telemetry queued offline")
        text = httpx.get(daemon.url + "/metrics").text
        assert metric_value(text, "edge_sync_connected") == 0.0
        before = ingest.kinds().get("stats", 0)
        # 5. Broker back: the queued records are uploaded, acked by ingest and removed on the device.
        mosquitto.start()
        wait_for(lambda: ingest.kinds().get("stats", 0) >= before + 3, timeout=60, what="offline records ingested")
        wait_for(lambda: metric_value(httpx.get(daemon.url + "/metrics").text, "edge_sync_outbox_acked_total") > 0,
                 timeout=30, what="acks")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        ingest.stop()


def test_unreachable_broker_at_start_still_serves_the_local_release(fusion_release: Path, tmp_path: Path,
                                                                    start_daemon) -> None:
    # (With a public_key configured, local releases must be signed too; this one is not.)
    config = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release)}],
                          sync={"broker": "mqtt://127.0.0.1:1", "fleet": FLEET, "allow_unsigned": True,
                                "telemetry_interval_s": 0.2})
    daemon = start_daemon(config).wait_ready(timeout=60)
    assert httpx.post(daemon.url + "/v2/models/fusion/infer", json=v2_request(fusion_inputs())).status_code == 200
    wait_for(lambda: (metric_value(httpx.get(daemon.url + "/metrics").text, "edge_sync_outbox_records") or 0) >= 2,
             timeout=30, what="telemetry queued")
    text = httpx.get(daemon.url + "/metrics").text
    assert metric_value(text, "edge_sync_outbox_bytes") > 0
    assert metric_value(text, "edge_sync_last_success_timestamp_seconds") is None  # nothing synced yet
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    # Queued records survive the restart on disk (the outbox is a SQLite file).
    with sqlite3.connect(tmp_path / "state" / "outbox.db") as db:
        assert db.execute("SELECT COUNT(*) FROM records").fetchone()[0] >= 2


def test_sigterm_during_a_download_exits_cleanly_and_keeps_the_old_release(
        fusion_release: Path, fusion_v2: Path, keys, mosquitto, tmp_path: Path, start_daemon) -> None:
    import json as _json

    publish_release(fusion_release, mosquitto.url, FLEET, sign_key=keys[0])
    write_desired(mosquitto.url, FLEET, build_desired("fusion", 1))
    config = sync_config(tmp_path, mosquitto, keys)
    daemon = start_daemon(config).wait_ready(timeout=120)
    # v2 with one chunk gone from the broker: its download can never finish.
    publish_release(fusion_v2, mosquitto.url, FLEET, sign_key=keys[0])
    manifest = _json.loads((fusion_v2 / "manifest.json").read_text())
    missing = manifest["variants"][0]["files"][0]["chunks"][0]["sha256"]
    from edge_sdk.cloud.connection import connect

    with connect(mosquitto.url, "test") as transport:
        assert transport.publish(Topics(FLEET).blob(missing), b"", qos=1, retain=True, wait=10)
    write_desired(mosquitto.url, FLEET, build_desired("fusion", 2))
    time.sleep(1.5)  # the transfer is under way (and cannot complete)
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert time.monotonic() - started < 20
    # The transfer was cut short: stopped by sync itself, or (if that took too long) by cutting the link.
    assert any("stopped with" in r["msg"] or "mid-transfer" in r["msg"] for r in daemon.log_records())
    # The old release is still the active one on disk, and serves after a restart (broker gone).
    assert (tmp_path / "state" / "sync" / "current" / "fusion").resolve().name == "fusion@v1"
    mosquitto.kill()
    daemon = start_daemon(config).wait_ready(timeout=60)
    assert httpx.get(daemon.url + "/v2/models/fusion").json()["versions"] == ["1"]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0


def test_daemon_connects_over_tls(fusion_release: Path, mosquitto_factory, tmp_path: Path, start_daemon, make_certs) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = make_certs(certs, clients=())
    # The broker's one listener speaks TLS only.
    broker = mosquitto_factory(extra_conf=f"certfile {certs / 'server.crt'}\nkeyfile {certs / 'server.key'}\n")
    config = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release)}],
                          sync={"broker": f"mqtts://127.0.0.1:{broker.port}", "tls": {"ca": str(ca)}, "fleet": FLEET,
                                "allow_unsigned": True, "telemetry_interval_s": 0.3})
    daemon = start_daemon(config).wait_ready(timeout=60)
    wait_for(lambda: metric_value(httpx.get(daemon.url + "/metrics").text, "edge_sync_connected") == 1.0,
             timeout=30, what="a TLS connection to the broker")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0


@pytest.fixture(scope="module")
def classifier_releases(tmp_path_factory: pytest.TempPathFactory, keys) -> dict[str, Path]:
    """A second model, "classifier" (the sample CNN): v1, and a v2 whose self-test cannot pass
    (expected outputs shifted, correctly signed), so only the self-test stops it."""
    import shutil

    import numpy as np

    from edge_sdk.chunking import sha256_file
    from edge_sdk.manifest import FileEntry, load_manifest, write_manifest
    from edge_sdk.signing import load_private_key

    root = tmp_path_factory.mktemp("classifier")
    v1 = _convert(samples.save(samples.make_cnn(), root / "cnn.onnx"), root / "classifier-v1", 1, "classifier")
    v2 = root / "classifier-v2"
    shutil.copytree(v1, v2)
    manifest = load_manifest(v2)
    expected = v2 / manifest.self_test.expected.path
    with np.load(expected) as data:
        shifted = {k: data[k] + 1.0 for k in data.files}
    np.savez(expected, **shifted)
    manifest = manifest.model_copy(update={"version": 2, "self_test": manifest.self_test.model_copy(update={
        "expected": FileEntry.from_file(v2, expected), "digest": sha256_file(expected)})})
    write_manifest(v2, manifest, load_private_key(keys[0]))
    write_manifest(v1, load_manifest(v1), load_private_key(keys[0]))
    return {"v1": v1, "v2": v2}


def test_two_models_served_under_their_names_and_a_bad_release_of_one_leaves_the_other_serving(
        fusion_release: Path, classifier_releases, keys, mosquitto, nginx, tmp_path: Path, start_daemon) -> None:
    publish_release(fusion_release, mosquitto.url, FLEET, sign_key=keys[0])
    for name in ("v1", "v2"):  # the classifier's chunks come from a web server, not the broker
        publish_release(classifier_releases[name], mosquitto.url, FLEET, store=f"file://{nginx.root}")
    desired = build_desired("fusion", 1, base=build_desired("classifier", 1, store=nginx.url))
    write_desired(mosquitto.url, FLEET, desired)
    daemon = start_daemon(sync_config(tmp_path, mosquitto, keys)).wait_ready(timeout=120)
    try:
        # "classifier" is not in the daemon's config: it is served under its own name.
        wait_for(lambda: httpx.get(daemon.url + "/v2/models/classifier").status_code == 200, timeout=120,
                 what="the classifier served")
        image = {"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.5] * (3 * 32 * 32)}
        assert httpx.post(daemon.url + "/v2/models/classifier/infer", json={"inputs": [image]}).status_code == 200
        assert httpx.post(daemon.url + "/v2/models/fusion/infer", json=v2_request(fusion_inputs())).status_code == 200
        assert [r.status for r in nginx.requests()].count(200) > 0  # its chunks came from nginx
        # The classifier's v2 fails its self-test: it is refused, fusion is not touched.
        write_desired(mosquitto.url, FLEET, desired.with_model("classifier", 2, nginx.url))
        wait_for(lambda: any("self-test" in r.get("msg", "") and "classifier" in r.get("msg", "")
                             for r in daemon.log_records()), timeout=120, what="the classifier's v2 refused")
        assert httpx.get(daemon.url + "/v2/models/classifier").json()["parameters"]["release_version"] == 1
        assert httpx.get(daemon.url + "/v2/models/fusion").json()["parameters"]["release_version"] == 1
        assert httpx.post(daemon.url + "/v2/models/fusion/infer", json=v2_request(fusion_inputs())).status_code == 200
        assert httpx.post(daemon.url + "/v2/models/classifier/infer", json={"inputs": [image]}).status_code == 200
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
