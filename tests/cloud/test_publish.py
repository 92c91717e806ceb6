"""`edge-sdk cloud publish` against a real Mosquitto: chunks once, signed manifest envelope."""

from __future__ import annotations

import json
import shutil

import pytest

from edge_sdk.cli import main

from edge_sdk.cloud.connection import collect_retained, connect
from edge_sdk.cloud.publish import publish_release
from edge_sdk.errors import IntegrityError
from edge_sdk.manifest import load_manifest
from edge_sdk.runtime.sync.envelope import verify_envelope
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.signing import generate_keypair, load_public_key


def _ok(args: list[str]) -> None:
    """Run the CLI; it exits (status 0 on success)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0


def _chunks(release) -> dict[str, int]:
    return {c.sha256: c.size for e in load_manifest(release).files() for c in e.chunks}


def test_publish_then_update_sends_only_new_chunks(mosquitto, sync_releases, release_keypair):
    first = publish_release(sync_releases["v1"], mosquitto.url, "f1")
    v1 = _chunks(sync_releases["v1"])
    assert first.chunks_published == len(v1) == first.chunks_total and first.chunks_skipped == 0
    assert first.bytes_published == sum(v1.values()) and first.signed
    second = publish_release(sync_releases["v2"], mosquitto.url, "f1")
    v2 = _chunks(sync_releases["v2"])
    assert second.chunks_published == len(set(v2) - set(v1)) > 0
    assert second.chunks_skipped == len(set(v2) & set(v1)) > 0
    topics = Topics("f1")
    with connect(mosquitto.url, "test") as t:
        blobs = collect_retained(t, topics, topics.all_blobs())
        manifests = collect_retained(t, topics, topics.all_manifests())
    assert {topics.parse(k).sha256 for k in blobs} == set(v1) | set(v2)
    payload = manifests[topics.manifest("cnn", 2)]
    manifest, data, signature = verify_envelope(payload, load_public_key(release_keypair[1]))
    assert manifest.version == 2 and data == (sync_releases["v2"] / "manifest.json").read_bytes()
    # A republish of an already published release moves nothing but the manifest.
    again = publish_release(sync_releases["v2"], mosquitto.url, "f1")
    assert again.chunks_published == 0 and again.chunks_skipped == again.chunks_total


def test_cli_publish_signs_with_the_given_key(mosquitto, sync_releases, tmp_path, capsys):
    release = tmp_path / "unsigned"
    shutil.copytree(sync_releases["v1"], release)
    (release / "manifest.sig").unlink()
    key, pub = generate_keypair(tmp_path / "k.key")
    _ok(["cloud", "publish", str(release), "--broker", mosquitto.url, "--fleet", "f2", "--sign-key", str(key), "--json"])
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert report["signed"] and report["chunks_published"] == report["chunks_total"]
    topics = Topics("f2")
    with connect(mosquitto.url, "test") as t:
        payload = collect_retained(t, topics, topics.all_manifests())[topics.manifest("cnn", 1)]
    assert verify_envelope(payload, load_public_key(pub))[0].model == "cnn"
    _, other_pub = generate_keypair(tmp_path / "other.key")
    with pytest.raises(IntegrityError, match="signature"):
        verify_envelope(payload, load_public_key(other_pub))


def test_tampered_artifact_is_refused_before_anything_is_sent(mosquitto, sync_releases, tmp_path):
    release = tmp_path / "tampered"
    shutil.copytree(sync_releases["v1"], release)
    victim = next(release.glob("onnx/*.onnx"))
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        publish_release(release, mosquitto.url, "f3")
    topics = Topics("f3")
    with connect(mosquitto.url, "test") as t:
        assert collect_retained(t, topics, topics.all_blobs()) == {}


def test_unreachable_broker_is_one_clear_error(sync_releases, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["cloud", "publish", str(sync_releases["v1"]), "--broker", "mqtt://127.0.0.1:9", "--fleet", "f"])
    assert exit_info.value.code == 1
    assert "cannot reach the broker" in capsys.readouterr().err


def test_chunk_lost_on_the_broker_is_republished(mosquitto, sync_releases):
    """A manifest still lists a chunk the broker no longer retains (lost in a kill -9 between
    autosaves; simulated by clearing it): a plain re-publish probes the blobs and sends it again."""
    topics = Topics("f3")
    publish_release(sync_releases["v1"], mosquitto.url, "f3")
    lost = sorted(_chunks(sync_releases["v1"]))[0]
    with connect(mosquitto.url, "test") as t:
        assert t.publish(topics.blob(lost), b"", qos=1, retain=True, wait=5)
    again = publish_release(sync_releases["v1"], mosquitto.url, "f3")
    assert (again.chunks_published, again.chunks_skipped) == (1, len(_chunks(sync_releases["v1"])) - 1)
    with connect(mosquitto.url, "test") as t:
        assert {topics.parse(k).sha256 for k in collect_retained(t, topics, topics.all_blobs())} == set(_chunks(sync_releases["v1"]))
        assert collect_retained(t, topics, topics.all_pending()) == {}  # the publish marker is cleared when done


def test_lower_or_reused_version_is_refused_before_anything_is_sent(mosquitto, sync_releases, tmp_path):
    publish_release(sync_releases["v2"], mosquitto.url, "f5")
    topics = Topics("f5")
    with connect(mosquitto.url, "test") as t:
        before = collect_retained(t, topics, "#")
    with pytest.raises(IntegrityError, match=r"cnn v1 is lower than v2.*--release-version 3"):
        publish_release(sync_releases["v1"], mosquitto.url, "f5")
    # v3 renumbered as 2: same number, other content.
    manifest = json.loads((sync_releases["v3"] / "manifest.json").read_text())
    renumbered = tmp_path / "v3-as-v2"
    shutil.copytree(sync_releases["v3"], renumbered)
    manifest["version"] = 2
    (renumbered / "manifest.json").write_text(json.dumps(manifest))
    (renumbered / "manifest.sig").unlink(missing_ok=True)
    with pytest.raises(IntegrityError, match="already published to this fleet with different content"):
        publish_release(renumbered, mosquitto.url, "f5")
    with connect(mosquitto.url, "test") as t:
        assert collect_retained(t, topics, "#") == before
    # The same release again is a repair, not a replay.
    assert publish_release(sync_releases["v2"], mosquitto.url, "f5").chunks_published == 0


# --- chunk stores other than the broker: only control messages on MQTT ------------------------

def _retained_blobs(url: str, fleet: str) -> dict:
    topics = Topics(fleet)
    with connect(url, "test") as t:
        return collect_retained(t, topics, topics.all_blobs())


def test_publish_to_s3_uploads_only_chunks_the_store_lacks(mosquitto, seaweedfs, s3_bucket, sync_releases, monkeypatch,
                                                         capsys):
    for name, value in seaweedfs.environ().items():
        monkeypatch.setenv(name, value)
    store = f"s3://{s3_bucket}/publish-s3"
    v1, v2 = _chunks(sync_releases["v1"]), _chunks(sync_releases["v2"])
    before = seaweedfs.request_counts()
    _ok(["cloud", "publish", str(sync_releases["v1"]), "--broker", mosquitto.url, "--fleet", "s3f", "--store", store,
         "--json"])
    out = capsys.readouterr().out
    first = json.loads(out[out.index("{"):])  # after the progress bar
    assert (first["store"], first["chunks_published"], first["bytes_published"]) == (store, len(v1), sum(v1.values()))
    second = publish_release(sync_releases["v2"], mosquitto.url, "s3f", store=store)
    after = seaweedfs.request_counts()
    assert second.chunks_published == len(set(v2) - set(v1)) and second.chunks_skipped == len(set(v2) & set(v1))
    assert after["PUT"] - before.get("PUT", 0) == len(v1) + len(set(v2) - set(v1))  # counted by the store
    assert _retained_blobs(mosquitto.url, "s3f") == {}  # the broker holds manifests only
    # A chunk lost in the store is uploaded again even though a manifest references it.
    lost = sorted(v2)[0]
    seaweedfs.client().delete_object(Bucket=s3_bucket, Key=f"publish-s3/{lost}")
    repair = publish_release(sync_releases["v2"], mosquitto.url, "s3f", store=store)
    assert repair.chunks_published == 1 and repair.bytes_published == v2[lost]


def test_publish_to_a_folder_nginx_serves(mosquitto, nginx, sync_releases):
    root, server = nginx.root, nginx
    report = publish_release(sync_releases["v1"], mosquitto.url, "filef", store=f"file://{root}")
    v1 = _chunks(sync_releases["v1"])
    assert report.chunks_published == len(v1) and {p.name for p in root.iterdir()} == set(v1)
    assert _retained_blobs(mosquitto.url, "filef") == {}
    import urllib.request

    sha = next(iter(v1))
    assert len(urllib.request.urlopen(f"{server.url}/{sha}").read()) == v1[sha]


def test_publish_refuses_a_chunk_over_the_mqtt_cap_and_an_unknown_store(mosquitto, sync_releases):
    from edge_sdk.errors import ConfigError
    from edge_sdk.runtime.sync.stores import StoreError, StoreOptions

    biggest = max(_chunks(sync_releases["v1"]).values())
    with pytest.raises(StoreError, match="message cap: publish to an s3:// or http"):
        publish_release(sync_releases["v1"], mosquitto.url, "capf", store_options=StoreOptions(max_message_bytes=biggest - 1))
    with pytest.raises(ConfigError, match="unknown scheme 'ftp'"):
        publish_release(sync_releases["v1"], mosquitto.url, "capf", store="ftp://x/y")
