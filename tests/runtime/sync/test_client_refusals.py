"""Refusals are remembered by content, not by version (issue 15, class 6): real Mosquitto, a real
SyncClient following desired state, the real publisher repairing the fleet."""

from __future__ import annotations

import time

from edge_sdk.cloud.desire import build_desired, write_desired
from edge_sdk.cloud.publish import publish_release
from edge_sdk.manifest import load_manifest
from edge_sdk.runtime.sync.client import SyncClient, SyncConfig, select_variants
from edge_sdk.runtime.sync.envelope import seal
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.transport import Transport, TransportConfig
from edge_sdk.signing import generate_keypair, load_private_key
from edge_sdk.trust import sign_release
from polling import wait_until

PROFILE = "intel-nuc"


def _client(broker, fleet: str, root, public_key) -> SyncClient:
    return SyncClient(SyncConfig(broker=broker.url, fleet=fleet, device="cam-1", root=root, profile=PROFILE,
                                 public_key=public_key, stall_timeout_s=2.0, manifest_timeout_s=5.0, retry_min_s=0.2,
                                 retry_max_s=1.0, self_test=False))


def test_a_forged_manifest_does_not_block_the_genuine_one_at_the_same_version(mosquitto, sync_releases,
                                                                           release_keypair, tmp_path):
    fleet = "refusals"
    data = (sync_releases["v1"] / "manifest.json").read_bytes()
    attacker, _ = generate_keypair(tmp_path / "attacker.key")
    writer = Transport(TransportConfig.from_url(mosquitto.url, client_id="evil", session_expiry_s=0))
    writer.start()
    assert writer.wait_connected(5)
    assert writer.publish(Topics(fleet).manifest("cnn", 1), seal(data, sign_release(data, [load_private_key(attacker)])),
                          qos=1, retain=True, wait=5)
    writer.stop()
    write_desired(mosquitto.url, fleet, build_desired("cnn", 1))
    client = _client(mosquitto, fleet, tmp_path / "dev", release_keypair[1])
    client.start()
    try:
        assert wait_until(lambda: client.twin.errors["bad_signature"] == 1)
        # Another desired-state change wakes the follower: the same forged message is not tried again.
        write_desired(mosquitto.url, fleet, build_desired("cnn", 1, {"pin_precision": "fp32"}))
        assert wait_until(lambda: client.twin.snapshot().get("policy") == {"pin_precision": "fp32"})
        time.sleep(0.5)
        assert client.twin.errors["bad_signature"] == 1 and client.releases.active("cnn") is None
        # The genuine v1 replaces it (the publisher ignores the forgery): taken with no desired change.
        publish_release(sync_releases["v1"], mosquitto.url, fleet, trust=release_keypair[1])
        assert client.wait_active("cnn", 1, timeout=60)
        client.releases.verify(client.releases.active("cnn"))
        assert client.twin.errors["bad_signature"] == 1
    finally:
        client.stop()


def test_a_chunk_gone_bad_in_the_local_store_is_fetched_again_not_a_refusal(mosquitto, sync_releases,
                                                                          release_keypair, tmp_path):
    fleet = "rotting"
    publish_release(sync_releases["v1"], mosquitto.url, fleet)
    publish_release(sync_releases["v2"], mosquitto.url, fleet)
    write_desired(mosquitto.url, fleet, build_desired("cnn", 1))
    client = _client(mosquitto, fleet, tmp_path / "dev", release_keypair[1])
    client.start()
    try:
        assert client.wait_active("cnn", 1, timeout=60)
        v2 = load_manifest(sync_releases["v2"])
        shared = next(c for e in v2.files(select_variants(v2, PROFILE)) for c in e.chunks if client.chunks.has(c.sha256))
        client.chunks.path(shared.sha256).write_bytes(b"\0" * shared.size)  # bit rot on the device
        write_desired(mosquitto.url, fleet, build_desired("cnn", 2))
        assert client.wait_active("cnn", 2, timeout=60)  # used to stay refused until the version changed
        assert client.twin.errors["corrupt_chunk"] >= 1
        client.releases.verify(client.releases.active("cnn"))
        assert client.results[-1].chunks_fetched >= 1  # the damaged chunk came from the broker again
    finally:
        client.stop()
