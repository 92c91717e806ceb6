"""The device client with each chunk store, several models per device, and stores that misbehave.

Real parts throughout: Mosquitto for control messages, nginx (http) and SeaweedFS (s3) for chunks,
real signed releases, the real self-test. Chunk counts are taken on the store's side.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from edge_sdk.cloud.desire import build_desired, write_desired
from edge_sdk.cloud.publish import publish_release
from edge_sdk.errors import SyncError
from edge_sdk.manifest import load_manifest, write_manifest
from edge_sdk.runtime.sync.client import SyncClient, SyncConfig, select_variants
from edge_sdk.signing import load_private_key

FLEET = "stores"
PROFILE = "intel-nuc"


def device(broker, root: Path, pub: Path, **overrides) -> SyncClient:
    settings = {"store_timeout_s": 5.0, "store_retries": 2, "retry_min_s": 0.2, "retry_max_s": 1.0, **overrides}
    return SyncClient(SyncConfig(broker=broker.url, fleet=FLEET, device="cam-1", root=root, profile=PROFILE,
                                 public_key=pub, **settings))


def device_chunks(release: Path) -> dict[str, int]:
    manifest = load_manifest(release)
    return {c.sha256: c.size for e in manifest.files(select_variants(manifest, PROFILE)) for c in e.chunks}


def logged_gets(nginx, at_least: int, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout  # nginx logs a request just after its last byte went out
    while len(records := [r for r in nginx.requests() if r.method == "GET"]) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return records


@pytest.fixture(scope="module")
def detector_releases(tmp_path_factory, sync_releases, release_keypair) -> dict[str, Path]:
    """A second model, "detector": the CNN's v1 and v2 files under another name, signed."""
    out = {}
    for name in ("v1", "v2"):
        folder = tmp_path_factory.mktemp("detector") / name
        shutil.copytree(sync_releases[name], folder)
        manifest = load_manifest(folder).model_copy(update={"model": "detector"})
        write_manifest(folder, manifest, load_private_key(release_keypair[0]))
        out[name] = folder
    return out


@pytest.fixture
def aws(monkeypatch, seaweedfs):
    for key, value in seaweedfs.environ().items():
        monkeypatch.setenv(key, value)
    return seaweedfs


# --- update flow on each store: only the missing chunks move ----------------------------------------

@pytest.mark.parametrize("kind", ["mqtt", "http", "s3"])
def test_update_flow_moves_only_missing_chunks_on_each_store(kind, request, mosquitto, sync_releases, release_keypair,
                                                             tmp_path):
    if kind == "http":
        nginx = request.getfixturevalue("nginx")
        publish_to, fetch_from = f"file://{nginx.root}", nginx.url
    elif kind == "s3":
        server, bucket = request.getfixturevalue("aws"), request.getfixturevalue("s3_bucket")
        publish_to = fetch_from = f"s3://{bucket}/chunks"
    else:
        publish_to = fetch_from = "mqtt"
    for name in ("v1", "v2"):
        publish_release(sync_releases[name], mosquitto.url, FLEET, store=publish_to)
    v1, v2 = device_chunks(sync_releases["v1"]), device_chunks(sync_releases["v2"])
    new = set(v2) - set(v1)
    client = device(mosquitto, tmp_path / "dev", release_keypair[1], store=fetch_from)
    client.transport.start()
    try:
        first = client.sync("cnn", 1, timeout=120)
        assert (first.status, first.chunks_fetched) == ("activated", len(v1))
        before = {"http": lambda: len(logged_gets(nginx, len(v1))), "s3": lambda: server.request_counts()["GET"],
                  "mqtt": lambda: client.store("mqtt").counters["chunks_fetched"]}[kind]()
        second = client.sync("cnn", 2, timeout=120)
        assert second.status == "activated", second.reason
        assert second.chunks_fetched == len(new) and second.bytes_fetched == sum(v2[s] for s in new)
        assert second.chunks_reused == len(set(v2) & set(v1))
        if kind == "http":  # counted by nginx: exactly the new chunks, each once
            gets = logged_gets(nginx, before + len(new))[before:]
            assert sorted(r.path.lstrip("/") for r in gets) == sorted(new)
            assert sum(r.bytes_sent for r in gets) == second.bytes_fetched
        elif kind == "s3":  # counted by SeaweedFS
            assert server.request_counts()["GET"] - before == len(new)
        else:
            assert client.store("mqtt").counters["chunks_fetched"] - before == len(new)
        assert client.twin.snapshot()["models"]["cnn"]["release"] == {"model": "cnn", "version": 2}
    finally:
        client.transport.stop()


# --- several models per device -------------------------------------------------------------------

def test_two_models_sync_independently_and_a_failed_self_test_leaves_the_other_serving(
        mosquitto, nginx, aws, s3_bucket, sync_releases, detector_releases, release_keypair, tmp_path):
    s3 = f"s3://{s3_bucket}/chunks"
    for name in ("v1", "v3"):
        publish_release(sync_releases[name], mosquitto.url, FLEET, store=f"file://{nginx.root}")
    for name in ("v1", "v2"):
        publish_release(detector_releases[name], mosquitto.url, FLEET, store=s3)
    desired = build_desired("cnn", 1, store=nginx.url)
    write_desired(mosquitto.url, FLEET, build_desired("detector", 1, store=s3, base=desired))
    client = device(mosquitto, tmp_path / "dev", release_keypair[1])
    with client:
        assert client.wait_active("cnn", 1, 120) and client.wait_active("detector", 1, 120)
        assert client.releases.models() == ["cnn", "detector"]
        # The detector's v1 files are the CNN's: one copy of each chunk on the device.
        assert client.chunks.bytes_used() == sum(device_chunks(sync_releases["v1"]).values())
        # cnn → v3, whose self-test fails; detector → v2 at the same time.
        state = build_desired("cnn", 3, store=nginx.url, base=build_desired("detector", 2, store=s3))
        write_desired(mosquitto.url, FLEET, state, device="cam-1")
        assert client.wait_active("detector", 2, 120)

        def settled(models: dict) -> bool:  # the report follows the switch on disk
            return (models["cnn"].get("sync", {}).get("state") == "failed"
                    and models["detector"].get("release", {}).get("version") == 2)

        deadline = time.monotonic() + 60
        while not settled(client.twin.snapshot()["models"]):
            assert time.monotonic() < deadline, client.twin.snapshot()["models"]
            time.sleep(0.1)
        reported = client.twin.snapshot()["models"]
        assert reported["cnn"]["sync"]["version"] == 3 and "self-test" in reported["cnn"]["sync"]["reason"]
        assert reported["cnn"]["release"] == {"model": "cnn", "version": 1}  # still serving v1
        assert reported["detector"]["release"] == {"model": "detector", "version": 2}
        assert client.releases.active_ref("cnn") == ("cnn", 1)
        client.releases.verify(client.releases.active("cnn"))  # the chunk cleanup after detector v2 kept cnn's
        client.releases.verify(client.releases.active("detector"))


# --- stores that misbehave: reported, the old release keeps serving -----------------------------------

@pytest.fixture
def on_v1(mosquitto, sync_releases, release_keypair, tmp_path):
    """A device with cnn v1 active (from the broker), v2's manifest published, v2's chunks nowhere yet."""
    publish_release(sync_releases["v1"], mosquitto.url, FLEET)
    client = device(mosquitto, tmp_path / "dev", release_keypair[1])
    client.transport.start()
    assert client.sync("cnn", 1, timeout=120).status == "activated"
    yield client
    client.transport.stop()


def _assert_reported_and_still_on_v1(client: SyncClient, kind: str, attempt) -> None:
    with pytest.raises(SyncError) as info:
        attempt()
    assert getattr(info.value, "kind", None) == kind, info.value
    assert client.twin.errors[kind] >= 1 and client.twin.snapshot()["last_error"]["kind"] == kind
    assert client.releases.active_ref("cnn") == ("cnn", 1)
    client.releases.verify(client.releases.active("cnn"))


def test_store_not_answering_is_retried_with_backoff_reported_and_v1_keeps_serving(on_v1, mosquitto, sync_releases,
                                                                                   nginx_factory, tmp_path):
    root = tmp_path / "www"
    publish_release(sync_releases["v2"], mosquitto.url, FLEET, store=f"file://{root}")
    server = nginx_factory(root, start=False)  # its address is known; nothing answers there yet
    _assert_reported_and_still_on_v1(on_v1, "store_unreachable",
                                     lambda: on_v1.sync("cnn", 2, timeout=60, store=server.url))
    assert on_v1.store(server.url).counters["retries"] >= 2  # backed off and retried before reporting
    # Following the desired state, the device keeps retrying with backoff until the store answers.
    write_desired(mosquitto.url, FLEET, build_desired("cnn", 2, store=server.url))
    on_v1.start()
    time.sleep(2.0)
    assert on_v1.releases.active_ref("cnn") == ("cnn", 1) and on_v1.twin.errors["store_unreachable"] >= 2
    server.start()
    assert on_v1.wait_active("cnn", 2, 60)


def test_404_for_one_chunk_is_reported(on_v1, mosquitto, nginx, sync_releases):
    publish_release(sync_releases["v2"], mosquitto.url, FLEET, store=f"file://{nginx.root}")
    missing = sorted(set(device_chunks(sync_releases["v2"])) - set(device_chunks(sync_releases["v1"])))[0]
    (nginx.root / missing).unlink()
    _assert_reported_and_still_on_v1(on_v1, "chunk_missing", lambda: on_v1.sync("cnn", 2, timeout=60, store=nginx.url))


def test_store_serving_wrong_bytes_is_refused_counted_and_recovers(on_v1, mosquitto, nginx, sync_releases):
    publish_release(sync_releases["v2"], mosquitto.url, FLEET, store=f"file://{nginx.root}")
    sizes = device_chunks(sync_releases["v2"])
    bad = sorted(set(sizes) - set(device_chunks(sync_releases["v1"])))[0]
    good = (nginx.root / bad).read_bytes()
    (nginx.root / bad).write_bytes(bytes(len(good)))
    _assert_reported_and_still_on_v1(on_v1, "corrupt_chunk", lambda: on_v1.sync("cnn", 2, timeout=60, store=nginx.url))
    assert on_v1.twin.errors["corrupt_chunk"] == 2 and not on_v1.chunks.has(bad)
    (nginx.root / bad).write_bytes(good)  # repaired on the store: the next attempt completes
    result = on_v1.sync("cnn", 2, timeout=60, store=nginx.url)
    assert result.status == "activated" and result.chunks_fetched >= 1


def test_credentials_refused_are_reported(on_v1, mosquitto, aws, s3_bucket, sync_releases, monkeypatch):
    store = f"s3://{s3_bucket}/chunks"
    publish_release(sync_releases["v2"], mosquitto.url, FLEET, store=store)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    _assert_reported_and_still_on_v1(on_v1, "store_denied", lambda: on_v1.sync("cnn", 2, timeout=60, store=store))


def test_mqtt_chunk_over_the_cap_is_refused(mosquitto, sync_releases, release_keypair, tmp_path):
    publish_release(sync_releases["v1"], mosquitto.url, FLEET)
    biggest = max(device_chunks(sync_releases["v1"]).values())
    client = device(mosquitto, tmp_path / "dev", release_keypair[1], max_message_bytes=biggest - 1)
    client.transport.start()
    try:
        with pytest.raises(SyncError, match="cap; refused") as info:
            client.sync("cnn", 1, timeout=60)
        assert info.value.kind == "oversized_message" and client.twin.errors["oversized_message"] == 1
        assert client.releases.active("cnn") is None
    finally:
        client.transport.stop()


def test_desired_store_reaches_the_report(mosquitto, nginx, sync_releases, release_keypair, tmp_path):
    publish_release(sync_releases["v1"], mosquitto.url, FLEET, store=f"file://{nginx.root}")
    write_desired(mosquitto.url, FLEET, build_desired("cnn", 1, store=nginx.url))
    with device(mosquitto, tmp_path / "dev", release_keypair[1]) as client:
        assert client.wait_active("cnn", 1, 120)
    assert json.loads(json.dumps(client.twin.snapshot()))["models"]["cnn"]["release"]["version"] == 1
    assert all(r.method == "GET" for r in nginx.requests())


def test_https_stores_use_the_fleet_tls_identity(mosquitto, release_keypair, tmp_path, make_certs):
    from edge_sdk.runtime.sync.transport import TlsConfig

    ca = make_certs(tmp_path, clients=("cam-1",))
    tls = TlsConfig(ca=ca, cert=tmp_path / "cam-1.crt", key=tmp_path / "cam-1.key")
    client = device(mosquitto, tmp_path / "dev", release_keypair[1], tls=tls)
    options = client.store("https://cdn.example.com/chunks").options
    assert (options.ca_certs, options.certfile, options.keyfile) == (tls.ca, tls.cert, tls.key)
    own = device(mosquitto, tmp_path / "dev2", release_keypair[1], tls=tls, store_ca=tmp_path / "server.crt")
    assert own.store("https://cdn.example.com/chunks").options.ca_certs == tmp_path / "server.crt"
