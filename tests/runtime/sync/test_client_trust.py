"""Key rotation reaches devices over MQTT (issue 15, trust): a device configured with root v1
follows the fleet's retained roots, verifies releases with the newest one that chains, keeps it
across restarts, and refuses roots that do not chain. Real Mosquitto, real SyncClient."""

from __future__ import annotations


from edge_sdk.cloud.desire import build_desired, write_desired
from edge_sdk.cloud.publish import publish_release, publish_root
from edge_sdk.runtime.sync.client import SyncClient, SyncConfig
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.transport import Transport, TransportConfig
from edge_sdk.signing import generate_keypair, load_private_key, load_public_key
from edge_sdk.trust import key_id, new_root, rotate_root
from polling import wait_until

PROFILE = "intel-nuc"


def _client(broker, fleet: str, root, public_key) -> SyncClient:
    return SyncClient(SyncConfig(broker=broker.url, fleet=fleet, device="cam-1", root=root, profile=PROFILE,
                                 public_key=public_key, stall_timeout_s=2.0, manifest_timeout_s=5.0, retry_min_s=0.2,
                                 retry_max_s=1.0, self_test=False))


def test_a_rotated_root_from_the_fleet_lets_the_device_take_releases_of_the_new_key(
        mosquitto, sync_releases, release_keypair, tmp_path):
    fleet = "rotation"
    root_key, _ = generate_keypair(tmp_path / "root.key")
    old_release_key, old_release_pub = generate_keypair(tmp_path / "old-release.key")
    stranger, stranger_pub = generate_keypair(tmp_path / "stranger.key")
    v1 = new_root([load_private_key(root_key)], [load_public_key(old_release_pub)])
    configured = tmp_path / "root.json"
    configured.write_bytes(v1)
    publish_root(v1, mosquitto.url, fleet)
    # The release is signed with the fleet's new release key, which root v1 does not list yet.
    publish_release(sync_releases["v1"], mosquitto.url, fleet)
    write_desired(mosquitto.url, fleet, build_desired("cnn", 1))
    device = tmp_path / "dev"
    client = _client(mosquitto, fleet, device, configured)
    client.start()
    try:
        assert wait_until(lambda: client.twin.errors["bad_signature"] == 1)
        assert client.releases.active("cnn") is None and client.public_key.version == 1
        # A root v3 signed by a key root v1 never listed: refused, counted, trust unchanged.
        forged = rotate_root(rotate_root(v1, [load_private_key(stranger)]), [load_private_key(stranger)],
                             add_root=[load_public_key(stranger_pub)])
        writer = Transport(TransportConfig.from_url(mosquitto.url, client_id="evil", session_expiry_s=0))
        writer.start()
        assert writer.wait_connected(5)
        assert writer.publish(Topics(fleet).trust_root(2), rotate_root(v1, [load_private_key(stranger)]), qos=1,
                              retain=True, wait=5)
        assert writer.publish(Topics(fleet).trust_root(3), forged, qos=1, retain=True, wait=5)
        writer.stop()
        assert wait_until(lambda: client.twin.errors["trust_root"] >= 1)
        assert client.public_key.version == 1 and client.releases.active("cnn") is None
        # The genuine v2 (signed by the root key; adds the new release key, revokes the old one)
        # replaces the forgery: the device rotates and takes the release it refused, no desired change.
        v2 = rotate_root(v1, [load_private_key(root_key)], add_release=[load_public_key(release_keypair[1])],
                         revoke=[key_id(load_public_key(old_release_pub))])
        publish_root(v2, mosquitto.url, fleet)
        assert client.wait_active("cnn", 1, timeout=60)
        assert client.public_key.version == 2 and client.twin.snapshot()["trust_root"] == 2
        assert (device / "trust" / "root.2.json").read_bytes() == v2
    finally:
        client.stop()
    # After a restart (no broker needed for it) the device still trusts v2, walked from its root v1.
    assert _client(mosquitto, fleet, device, configured).public_key.version == 2
    # A root file swapped on disk that does not chain is not trusted.
    (device / "trust" / "root.2.json").write_bytes(rotate_root(v1, [load_private_key(stranger)]))
    assert _client(mosquitto, fleet, device, configured).public_key.version == 1
