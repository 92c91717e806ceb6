"""SyncClient against a real Mosquitto: update flow, incremental update, tampering, replay, self-test."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import pytest
from needs import missing, need_root

from edge_sdk.cloud.publish import publish_release
from edge_sdk.errors import SyncError
from edge_sdk.manifest import Manifest, load_manifest
from edge_sdk.runtime.sync.client import SyncClient, SyncConfig, select_variants
from edge_sdk.runtime.sync.envelope import seal
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.transport import Transport, TransportConfig
from edge_sdk.signing import generate_keypair, load_private_key
from edge_sdk.trust import sign_release
from polling import wait_until

FLEET = "plant1"
PROFILE = "intel-nuc"


def _client(broker, root: Path, public_key: Path, device: str = "cam-1", **kw) -> SyncClient:
    config = SyncConfig(broker=broker.url, fleet=FLEET, device=device, root=root, profile=kw.pop("profile", PROFILE),
                        public_key=public_key, stall_timeout_s=2.0, manifest_timeout_s=5.0, **kw)
    return SyncClient(config)


def _device_chunks(release: Path) -> set[str]:
    manifest = load_manifest(release)
    return {c.sha256 for e in manifest.files(select_variants(manifest, PROFILE)) for c in e.chunks}


def _reported(broker, device: str, until, timeout: float = 10.0) -> dict:
    """The device's reported state once ``until(state)`` holds.

    The twin publishes asynchronously, so the retained copy read first may be one update old;
    later publishes arrive on the same subscription.
    """
    box: queue.Queue[dict] = queue.Queue()
    t = Transport(TransportConfig.from_url(broker.url, client_id="reader", session_expiry_s=0))
    t.subscribe(Topics(FLEET).reported(device), lambda m: box.put(json.loads(m.payload)))
    t.start()
    seen: list[dict] = []
    try:
        while True:
            seen.append(box.get(timeout=timeout))
            if until(seen[-1]):
                return seen[-1]
    except queue.Empty:
        raise AssertionError(f"reported state never matched; last seen: {seen[-1:]!r}") from None
    finally:
        t.stop()


@pytest.fixture
def published(mosquitto, sync_releases, release_keypair):
    publish_release(sync_releases["v1"], mosquitto.url, FLEET)
    publish_release(sync_releases["v2"], mosquitto.url, FLEET)
    return mosquitto


def test_update_flow_moves_only_changed_chunks(published, sync_releases, release_keypair, tmp_path):
    client = _client(published, tmp_path / "dev", release_keypair[1])
    client.transport.start()
    try:
        first = client.sync("cnn", 1, timeout=60)
        assert first.status == "activated", first.reason
        v1_chunks = _device_chunks(sync_releases["v1"])
        assert first.chunks_fetched == len(v1_chunks) and first.chunks_reused == 0
        assert client.releases.active().name == "cnn@v1"
        client.releases.verify(client.releases.active())

        second = client.sync("cnn", 2, timeout=60)
        assert second.status == "activated", second.reason
        v2_chunks = _device_chunks(sync_releases["v2"])
        changed = v2_chunks - v1_chunks
        assert second.chunks_fetched == len(changed)  # exactly the chunks the device lacked
        assert second.chunks_reused == len(v2_chunks & v1_chunks) > 0
        assert second.bytes_fetched <= 0.35 * second.bytes_total, (second.bytes_fetched, second.bytes_total)
        assert client.releases.active().name == "cnn@v2" and client.releases.previous().name == "cnn@v1"
        assert client.releases.highest_accepted("cnn") == 2
        # Same version again: nothing moves.
        assert client.sync("cnn", 2).status == "already-active"
        reported = _reported(published, "cam-1", lambda r: r["release"] == {"model": "cnn", "version": 2}
                             and r["sync"]["state"] == "idle")
        assert reported["backend"] == "onnxruntime"
    finally:
        client.transport.stop()
    # backend/precision are what EdgeModel selects for the profile (not the manifest's first
    # variant), and a restarted client still reports them
    from edge_sdk import EdgeModel

    model = EdgeModel.load(client.releases.active(), profile=PROFILE, monitor=False, public_key=release_keypair[1])
    serving = model.info()
    model.close()
    assert (reported["backend"], reported["precision"]) == (serving.backend, serving.precision.value)
    restarted = _client(published, tmp_path / "dev", release_keypair[1])
    assert restarted.twin.snapshot()["precision"] == serving.precision.value


def test_replayed_older_release_is_refused(published, release_keypair, tmp_path):
    client = _client(published, tmp_path / "dev", release_keypair[1])
    client.transport.start()
    try:
        assert client.sync("cnn", 2, timeout=60).status == "activated"
        result = client.sync("cnn", 1, timeout=60)
        assert result.status == "rejected" and "replay" in result.reason
        assert client.twin.errors["replay"] == 1
        assert client.releases.active().name == "cnn@v2"
    finally:
        client.transport.stop()
    # Rollback protection survives a restart of the device (stored durably).
    again = _client(published, tmp_path / "dev", release_keypair[1])
    assert again.releases.highest_accepted("cnn") == 2


def test_the_previous_release_is_taken_back_without_downloading(published, release_keypair, tmp_path):
    """A halted rollout sets an activated device back to the release it ran before: not a replay."""
    client = _client(published, tmp_path / "dev", release_keypair[1])
    client.transport.start()
    try:
        assert client.sync("cnn", 1, timeout=60).status == "activated"
        assert client.sync("cnn", 2, timeout=60).status == "activated"
        back = client.sync("cnn", 1, timeout=60)
        assert back.status == "activated" and back.chunks_fetched == 0, back
        assert client.releases.active().name == "cnn@v1" and client.releases.previous().name == "cnn@v2"
        assert client.releases.highest_accepted("cnn") == 2 and client.twin.errors["replay"] == 0
        _reported(published, "cam-1", lambda r: r["release"] == {"model": "cnn", "version": 1})
        forward = client.sync("cnn", 2, timeout=60)  # and forward again, from what it kept
        assert forward.status == "activated" and forward.chunks_fetched == 0
    finally:
        client.transport.stop()


@pytest.mark.parametrize("case", ["wrong_key", "unsigned", "flipped_byte", "garbage"])
def test_bad_signature_rejected_before_parsing(published, sync_releases, release_keypair, tmp_path, monkeypatch, case):
    v1 = sync_releases["v1"]
    data = (v1 / "manifest.json").read_bytes()
    other_key, _ = generate_keypair(tmp_path / "other.key")
    payload = {
        "wrong_key": seal(data, sign_release(data, [load_private_key(other_key)])),
        "unsigned": seal(data, None),
        "flipped_byte": seal(data.replace(b'"version": 1', b'"version": 9'), (v1 / "manifest.sig").read_bytes()),
        "garbage": b"\x00\xffnot an envelope",
    }[case]
    writer = Transport(TransportConfig.from_url(published.url, client_id="evil", session_expiry_s=0))
    writer.start()
    assert writer.wait_connected(5)
    topic = Topics(FLEET).manifest("cnn", 9 if case == "flipped_byte" else 1)
    assert writer.publish(topic, payload, qos=1, retain=True, wait=5)
    writer.stop()

    parsed = []
    original = Manifest.from_bytes.__func__
    monkeypatch.setattr(Manifest, "from_bytes", classmethod(lambda cls, *a, **k: parsed.append(a) or original(cls, *a, **k)))
    client = _client(published, tmp_path / "dev", release_keypair[1])
    client.transport.start()
    try:
        result = client.sync("cnn", 9 if case == "flipped_byte" else 1, timeout=30)
    finally:
        client.transport.stop()
    assert result.status == "rejected"
    assert client.twin.errors["bad_signature"] == 1
    assert parsed == []  # the manifest parser never saw the bytes
    assert client.releases.active() is None and client.chunks.shas() == set()


def test_corrupt_chunk_on_broker_is_refused_then_recovers(published, sync_releases, release_keypair, tmp_path):
    manifest = load_manifest(sync_releases["v1"])
    victim = manifest.files(select_variants(manifest, PROFILE))[-1].chunks[-1]  # requested last
    writer = Transport(TransportConfig.from_url(published.url, client_id="evil", session_expiry_s=0))
    writer.start()
    assert writer.wait_connected(5)
    assert writer.publish(Topics(FLEET).blob(victim.sha256), b"x" * victim.size, qos=1, retain=True, wait=5)
    writer.stop()
    client = _client(published, tmp_path / "dev", release_keypair[1], fetch_window=1)
    client.transport.start()
    try:
        with pytest.raises(SyncError, match="served wrong bytes for chunk") as info:
            client.sync("cnn", 1, timeout=30)
        assert info.value.kind == "corrupt_chunk"
        assert client.twin.errors["corrupt_chunk"] == 2  # refused, asked for again once, refused again
        assert client.releases.active() is None and not client.chunks.has(victim.sha256)
        # The cloud republishes every chunk; the device resumes and activates.
        publish_release(sync_releases["v1"], published.url, FLEET, force=True)
        result = client.sync("cnn", 1, timeout=60)
        assert result.status == "activated", result.reason
        assert result.chunks_reused == result.chunks_total - 1  # only the bad chunk is fetched again
        assert result.chunks_fetched == 1
    finally:
        client.transport.stop()


def test_failed_self_test_keeps_the_previous_release(published, sync_releases, release_keypair, tmp_path):
    publish_release(sync_releases["v3"], published.url, FLEET)
    client = _client(published, tmp_path / "dev", release_keypair[1])
    client.transport.start()
    try:
        assert client.sync("cnn", 2, timeout=60).status == "activated"
        result = client.sync("cnn", 3, timeout=60)
        assert result.status == "rejected" and "self-test" in result.reason
        assert client.twin.errors["self_test"] == 1
        assert client.releases.active().name == "cnn@v2"
        assert not client.releases.path_of("cnn", 3).exists()
        assert client.releases.highest_accepted("cnn") == 2  # v2 may still be desired again
        reported = _reported(published, "cam-1", lambda r: r.get("last_error") is not None)
        assert "self-test" in reported["last_error"]["reason"] and reported["release"]["version"] == 2
    finally:
        client.transport.stop()


def test_failed_activation_hook_rolls_back(published, release_keypair, tmp_path):
    calls = []

    def on_activate(folder: Path) -> None:
        calls.append(folder.name)
        if folder.name == "cnn@v2":
            raise RuntimeError("hot swap failed: out of memory")

    config = SyncConfig(broker=published.url, fleet=FLEET, device="cam-1", root=tmp_path / "dev", profile=PROFILE,
                        public_key=release_keypair[1])
    client = SyncClient(config, on_activate=on_activate)
    client.transport.start()
    try:
        assert client.sync("cnn", 1, timeout=60).status == "activated"
        result = client.sync("cnn", 2, timeout=60)
        assert result.status == "rolled-back" and "out of memory" in result.reason
        assert client.releases.active().name == "cnn@v1"
        client.releases.verify(client.releases.active())
        assert calls == ["cnn@v1", "cnn@v2"]
    finally:
        client.transport.stop()


def test_release_for_another_profile_is_refused(published, release_keypair, tmp_path):
    client = _client(published, tmp_path / "dev", release_keypair[1], profile="raspberry-pi-zero-2-w")
    client.transport.start()
    try:
        result = client.sync("cnn", 1, timeout=30)
    finally:
        client.transport.stop()
    assert result.status == "rejected" and "no usable variant" in result.reason
    assert client.twin.errors["wrong_profile"] == 1 and client.chunks.shas() == set()


def test_follows_desired_state_device_wins(published, sync_releases, release_keypair, tmp_path):
    """Desired policy reaches a real EdgeModel live: a threshold override steps it down, a pin
    changes what serves; unknown keys and malformed messages are counted, the client keeps going."""
    from edge_sdk.cloud.desire import build_desired, write_desired
    from edge_sdk.runtime.model import EdgeModel
    from edge_sdk.runtime.monitor import FakeSource
    from edge_sdk.types import Precision

    # 8 GB free: intel-nuc's thresholds let FP32 run until the cloud raises FP32's bar.
    model = EdgeModel.load(sync_releases["v1"], profile=PROFILE, monitor=FakeSource(available_memory_mb=8192),
                           interval_s=3600)
    assert model.precision == Precision.FP32
    policies = []

    def on_policy(policy):
        policies.append(policy.as_dict())
        model.set_policy(policy)

    config = SyncConfig(broker=published.url, fleet=FLEET, device="cam-1", root=tmp_path / "dev", profile=PROFILE,
                        public_key=release_keypair[1], retry_min_s=0.2)
    client = SyncClient(config, on_policy=on_policy)
    fp32_bar = {"thresholds": {"fp32": {"min_free_memory_mb": 100_000}}}
    write_desired(published.url, FLEET, build_desired("cnn", 1, fp32_bar))
    client.start()
    try:
        assert client.wait_active("cnn", 1, timeout=60)
        assert wait_until(lambda: model.precision == Precision.FP16)  # the threshold override took effect
        assert not model.info().pinned
        # Malformed desired state and an unknown policy key: counted, and the client keeps following.
        writer = Transport(TransportConfig.from_url(published.url, client_id="evil", session_expiry_s=0))
        writer.start()
        assert writer.wait_connected(5)
        writer.publish(Topics(FLEET).desired("cam-1"), b"{not json", qos=1, retain=True, wait=5)
        assert wait_until(lambda: client.twin.errors["bad_desired"] == 1)
        writer.publish(Topics(FLEET).desired("cam-1"), b'{"policy": {"max_cpu": 80}}', qos=1, retain=True, wait=5)
        assert wait_until(lambda: client.twin.errors["bad_desired"] == 2)
        assert "policy.max_cpu" in client.twin.snapshot()["last_error"]["reason"]
        writer.stop()
        write_desired(published.url, FLEET, build_desired("cnn", 2, {"pin_precision": "int8"}), device="cam-1")
        assert client.wait_active("cnn", 2, timeout=60)
        assert wait_until(lambda: model.precision == Precision.INT8) and model.info().pinned
        merged = {**fp32_bar, "pin_precision": "int8"}
        assert merged in policies  # merged: the fleet's thresholds kept, the device's pin added
        assert client.twin.errors["bad_desired"] == 2 and client.twin.errors["policy"] == 0
        _reported(published, "cam-1", lambda r: r.get("policy") == merged)
        # The device withdraws its pin with an explicit null: back to the policy (FP32 still barred).
        write_desired(published.url, FLEET, build_desired("cnn", 2, {"pin_precision": None}), device="cam-1")
        assert wait_until(lambda: not model.info().pinned and model.precision == Precision.FP16)
    finally:
        client.stop()
        model.close()


def test_broker_killed_mid_download_resumes(mosquitto, sync_releases, release_keypair, tmp_path):
    publish_release(sync_releases["v1"], mosquitto.url, FLEET)
    mosquitto.restart(hard=False)  # clean stop: the retained chunks are saved to disk
    client = _client(mosquitto, tmp_path / "dev", release_keypair[1], fetch_window=1)
    total = len(_device_chunks(sync_releases["v1"]))
    results: list = []
    client.transport.start()
    worker = threading.Thread(target=lambda: results.append(client.sync("cnn", 1, timeout=120)))
    worker.start()
    try:
        import time

        deadline = time.monotonic() + 30
        while len(client.chunks.shas()) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        mosquitto.kill()
        had = len(client.chunks.shas())
        assert 0 < had < total
        time.sleep(0.5)
        mosquitto.start()
        worker.join(120)
        assert results and results[0].status == "activated", results
        assert results[0].chunks_fetched == total  # each chunk stored once, nothing fetched twice
        client.releases.verify(client.releases.active())
    finally:
        client.transport.stop()


def test_disk_full_while_staging_activates_nothing_and_recovers(published, release_keypair, tmp_path):
    import resource
    import signal

    client = _client(published, tmp_path / "dev", release_keypair[1])
    client.transport.start()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG
    try:
        # Chunks (≤ 256 KiB) still fit; the 1.5 MB fp32 artifact cannot be assembled.
        resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, limits[1]))
        try:
            with pytest.raises(SyncError, match="disk full"):
                client.sync("cnn", 1, timeout=60)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        assert client.twin.errors["storage"] == 1 and "disk full" in client.twin.snapshot()["last_error"]["reason"]
        assert client.releases.active() is None
        assert list(client.releases.staging.iterdir()) == [] and list(client.releases.releases.iterdir()) == []
        result = client.sync("cnn", 1, timeout=60)  # space is back: it resumes from the stored chunks
        assert result.status == "activated" and result.chunks_fetched == 0
    finally:
        signal.signal(signal.SIGXFSZ, previous_handler)
        client.transport.stop()


def _retain(broker, topic: str, payload: bytes) -> None:
    writer = Transport(TransportConfig.from_url(broker.url, client_id="evil", session_expiry_s=0))
    writer.start()
    assert writer.wait_connected(5)
    assert writer.publish(topic, payload, qos=1, retain=True, wait=5)
    writer.stop()


def test_signed_manifest_with_oversized_chunk_list_is_refused_end_to_end(published, sync_releases, release_keypair,
                                                                          tmp_path):
    """A correctly signed manifest whose chunk list covers more than a file's declared size:
    refused before any chunk is fetched, counted as ``bad_chunk_list``; the client goes on."""
    from edge_sdk.cloud.desire import build_desired, write_desired

    v1 = sync_releases["v1"]
    data = json.loads((v1 / "manifest.json").read_bytes())
    data["version"] = 7
    victim = select_variants(load_manifest(v1), PROFILE)[0].files[0].path
    for variant in data["variants"]:
        for entry in variant["files"]:
            if entry["path"] == victim:
                entry["chunks"].append(dict(entry["chunks"][0]))  # real chunk, on the broker; too many bytes
    raw = json.dumps(data).encode()
    _retain(published, Topics(FLEET).manifest("cnn", 7), seal(raw, sign_release(raw, [load_private_key(release_keypair[0])])))

    config = SyncConfig(broker=published.url, fleet=FLEET, device="cam-1", root=tmp_path / "dev", profile=PROFILE,
                        public_key=release_keypair[1], retry_min_s=0.2, manifest_timeout_s=5.0)
    client = SyncClient(config)
    write_desired(published.url, FLEET, build_desired("cnn", 7, {}), device="cam-1")
    client.start()
    try:
        assert wait_until(lambda: client.twin.errors["bad_chunk_list"] >= 1)
        assert client.releases.active() is None and client.chunks.shas() == set()
        assert client.releases.highest_accepted("cnn") == 0
        reason = client.twin.snapshot()["last_error"]["reason"]
        assert victim in reason and "declared size" in reason
        # still following desired state
        write_desired(published.url, FLEET, build_desired("cnn", 1, {}), device="cam-1")
        assert client.wait_active("cnn", 1, timeout=60)
        assert client.twin.errors["bad_chunk_list"] == 1  # a refused release is not retried
    finally:
        client.stop()


def test_garbage_fleet_desired_and_cleared_blob_keep_the_client_running(published, sync_releases, release_keypair,
                                                                         tmp_path):
    """Malformed fleet-level desired state is counted and ignored; a blob cleared on the broker
    (empty retained payload) mid-update is waited for, not stored; once republished the update completes."""
    from edge_sdk.cloud.desire import build_desired, write_desired

    topics = Topics(FLEET)
    manifest = load_manifest(sync_releases["v1"])
    victim = manifest.files(select_variants(manifest, PROFILE))[-1].chunks[-1]
    _retain(published, topics.blob(victim.sha256), b"")  # cleared, as gc does
    config = SyncConfig(broker=published.url, fleet=FLEET, device="cam-1", root=tmp_path / "dev", profile=PROFILE,
                        public_key=release_keypair[1], retry_min_s=0.2, stall_timeout_s=0.5)
    client = SyncClient(config)
    client.start()
    try:
        for garbage in (b"{not json", b"\x00\xff\xfe", b"[1, 2]", b'{"model": "cnn", "version": "two"}'):
            before = client.twin.errors["bad_desired"]
            _retain(published, topics.desired(), garbage)
            assert wait_until(lambda: client.twin.errors["bad_desired"] == before + 1), garbage
        write_desired(published.url, FLEET, build_desired("cnn", 1, {}))  # fleet level, well-formed
        assert wait_until(lambda: client.twin.snapshot()["sync"].get("chunks_done", 0) >= 1)
        assert not client.wait_active("cnn", 1, timeout=3)  # waits for the cleared chunk …
        _retain(published, topics.blob(victim.sha256), b"")  # cleared again, now delivered live: ignored
        assert not client.wait_active("cnn", 1, timeout=1)
        assert not client.chunks.has(victim.sha256) and client.releases.active() is None
        publish_release(sync_releases["v1"], published.url, FLEET, force=True)  # … until it is back
        assert client.wait_active("cnn", 1, timeout=60)
        client.releases.verify(client.releases.active())
        assert client.twin.errors["bad_desired"] == 4
    finally:
        client.stop()


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (real ENOSPC); ``grow()`` remounts it bigger, keeping its content."""
    import subprocess

    need_root("mounting a tmpfs")
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode:
        missing(f"mounting a tmpfs: {mounted.stderr.strip()}")

    class Tiny:
        path = folder

        @staticmethod
        def grow() -> None:
            subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)

    yield Tiny
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_disk_full_while_storing_chunks_activates_nothing_and_resumes(published, sync_releases, release_keypair,
                                                                      tmp_path, tiny_fs):
    from edge_sdk.cloud.desire import build_desired, write_desired

    root = tmp_path / "dev"
    root.mkdir()
    (root / "chunks").symlink_to(tiny_fs.path)  # the chunk store lives on the tiny file system
    config = SyncConfig(broker=published.url, fleet=FLEET, device="cam-1", root=root, profile=PROFILE,
                        public_key=release_keypair[1], retry_min_s=0.2, retry_max_s=0.5)
    client = SyncClient(config)
    write_desired(published.url, FLEET, build_desired("cnn", 1, {}), device="cam-1")
    client.start()
    try:
        assert wait_until(lambda: client.twin.errors["storage"] >= 2)  # refused, retried, refused again
        last = client.twin.snapshot()["last_error"]
        assert last["kind"] == "storage" and "disk full" in last["reason"] and "storing chunk" in last["reason"]
        assert client.releases.active() is None and client.releases.highest_accepted("cnn") == 0
        # No half-written chunk left behind: a retry may be writing one right now (its temp name is
        # unique), but none of those seen now may still be there a moment later.
        writing = set(tiny_fs.path.glob("*/*.part"))
        assert wait_until(lambda: not writing & set(tiny_fs.path.glob("*/*.part")), 10), writing
        stored = len(client.chunks.shas())
        assert 0 < stored < len(_device_chunks(sync_releases["v1"]))
        tiny_fs.grow()  # space is freed: the next retry resumes from the stored chunks
        assert client.wait_active("cnn", 1, timeout=60)
        assert wait_until(lambda: bool(client.results))  # appended when sync() returns, just after the switch
        result = client.results[-1]
        assert result.status == "activated" and result.chunks_reused >= stored  # a smaller chunk may have fitted later
        client.releases.verify(client.releases.active())
    finally:
        client.stop()
