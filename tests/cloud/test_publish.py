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


# --- issue 15 class 6: nothing retained is trusted for being there --------------------------

def _chunk_bytes(release, sha: str) -> bytes:
    for entry in load_manifest(release).files():
        offset = 0
        for ref in entry.chunks:
            if ref.sha256 == sha:
                with open(release / entry.path, "rb") as handle:
                    handle.seek(offset)
                    return handle.read(ref.size)
            offset += ref.size
    raise KeyError(sha)


def _flipped(data: bytes) -> bytes:
    """``data`` with one bit changed in the middle: same size, so only a hash tells."""
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x40
    return bytes(bad)


def _retain(url: str, topic: str, payload: bytes) -> None:
    with connect(url, "test") as t:
        assert t.publish(topic, payload, qos=1, retain=True, wait=5)


def _forged_manifest(release, version: int, key) -> tuple[bytes, bytes]:
    """(manifest bytes, statement) of ``release`` renumbered ``version``, signed with ``key``."""
    from edge_sdk.trust import sign_release

    manifest = json.loads((release / "manifest.json").read_text())
    manifest["version"] = version
    data = json.dumps(manifest).encode()
    return data, sign_release(data, [key])


def test_forged_retained_manifests_are_ignored_and_reported_not_a_lock_out(mosquitto, sync_releases, release_keypair,
                                                                          tmp_path, capsys):
    """A forged manifest retained at v999 used to make every later publish fail 'lower than v999'."""
    from edge_sdk.runtime.sync.envelope import seal
    from edge_sdk.signing import load_private_key

    topics = Topics("forged")
    publish_release(sync_releases["v1"], mosquitto.url, "forged")
    attacker, _ = generate_keypair(tmp_path / "attacker.key")
    _retain(mosquitto.url, topics.manifest("cnn", 999),
            seal(*_forged_manifest(sync_releases["v1"], 999, load_private_key(attacker))))
    unsigned, _ = _forged_manifest(sync_releases["v1"], 998, load_private_key(attacker))
    _retain(mosquitto.url, topics.manifest("cnn", 998), seal(unsigned, None))
    genuine_v1 = (sync_releases["v1"] / "manifest.json").read_bytes(), (sync_releases["v1"] / "manifest.sig").read_bytes()
    _retain(mosquitto.url, topics.manifest("cnn", 997), seal(*genuine_v1))  # a real statement, at the wrong topic
    _ok(["cloud", "publish", str(sync_releases["v2"]), "--broker", mosquitto.url, "--fleet", "forged",
         "--sign-key", str(release_keypair[0]), "--json"])  # trusted: the sign key's public half
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    ignored = report["ignored_manifests"]
    assert sorted(ignored) == [topics.manifest("cnn", v) for v in (997, 998, 999)]
    assert "signature does not verify" in ignored[topics.manifest("cnn", 999)]
    assert "not signed" in ignored[topics.manifest("cnn", 998)]
    assert "holds the manifest of cnn v1" in ignored[topics.manifest("cnn", 997)]
    # v2 went out, and v1's verified manifest still let its shared chunks be skipped.
    v1, v2 = _chunks(sync_releases["v1"]), _chunks(sync_releases["v2"])
    assert report["chunks_skipped"] == len(set(v1) & set(v2)) > 0
    with connect(mosquitto.url, "test") as t:
        payload = collect_retained(t, topics, topics.all_manifests())[topics.manifest("cnn", 2)]
    assert verify_envelope(payload, load_public_key(release_keypair[1]))[0].version == 2


def test_publish_refuses_a_release_the_fleet_root_does_not_vouch_for(mosquitto, sync_releases, tmp_path):
    _, other = generate_keypair(tmp_path / "other.key")
    with pytest.raises(IntegrityError, match="signature does not verify"):
        publish_release(sync_releases["v1"], mosquitto.url, "vouch", trust=other)
    topics = Topics("vouch")
    with connect(mosquitto.url, "test") as t:
        assert collect_retained(t, topics, "#") == {}


def test_plain_publish_repairs_a_corrupted_retained_chunk(mosquitto, sync_releases, release_keypair, capsys):
    topics = Topics("repair")
    publish_release(sync_releases["v1"], mosquitto.url, "repair")
    chunks = _chunks(sync_releases["v1"])
    victim = max(chunks, key=chunks.get)
    with connect(mosquitto.url, "test") as t:
        good = collect_retained(t, topics, topics.blob(victim))[topics.blob(victim)]
    _retain(mosquitto.url, topics.blob(victim), _flipped(good))
    _ok(["cloud", "publish", str(sync_releases["v1"]), "--broker", mosquitto.url, "--fleet", "repair", "--json"])
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert (report["chunks_published"], report["bytes_published"]) == (1, len(good))
    assert report["chunks_repaired"] == 1
    with connect(mosquitto.url, "test") as t:
        assert collect_retained(t, topics, topics.blob(victim))[topics.blob(victim)] == good
    assert publish_release(sync_releases["v1"], mosquitto.url, "repair").chunks_published == 0


@pytest.mark.parametrize("kind", ["s3", "http", "file"])
def test_plain_publish_repairs_a_chunk_corrupted_in_the_store(kind, request, mosquitto, sync_releases, tmp_path,
                                                             monkeypatch):
    chunks = _chunks(sync_releases["v1"])
    victim = max(chunks, key=chunks.get)
    if kind == "s3":
        seaweedfs, bucket = request.getfixturevalue("seaweedfs"), request.getfixturevalue("s3_bucket")
        for name, value in seaweedfs.environ().items():
            monkeypatch.setenv(name, value)
        store = f"s3://{bucket}/c"

        def corrupt(data: bytes) -> None:
            seaweedfs.client().put_object(Bucket=bucket, Key=f"c/{victim}", Body=data)
    else:
        root = tmp_path / "www"
        root.mkdir()
        if kind == "http":
            server = request.getfixturevalue("nginx_factory")(root, extra_server_conf="dav_methods PUT; "
                                                                                     "dav_access user:rw all:r;")
            store = server.url
        else:
            store = f"file://{root}"

        def corrupt(data: bytes) -> None:
            (root / victim).write_bytes(data)
    fleet = f"repair-{kind}"
    assert publish_release(sync_releases["v1"], mosquitto.url, fleet, store=store).chunks_published == len(chunks)
    corrupt(_flipped(_chunk_bytes(sync_releases["v1"], victim)))
    again = publish_release(sync_releases["v1"], mosquitto.url, fleet, store=store)
    assert (again.chunks_published, again.bytes_published) == (1, chunks[victim])
    assert again.chunks_repaired == 1
    assert publish_release(sync_releases["v1"], mosquitto.url, fleet, store=store).chunks_published == 0


def test_keys_publish_root_delivers_only_roots_that_chain(mosquitto, tmp_path, capsys):
    from edge_sdk.trust import key_id, new_root, rotate_root

    keys = {n: generate_keypair(tmp_path / f"{n}.key") for n in ("root1", "root2", "rel1", "rel2")}
    from edge_sdk.signing import load_private_key as private

    v1 = new_root([private(keys["root1"][0])], [load_public_key(keys["rel1"][1])])
    v2 = rotate_root(v1, [private(keys["root1"][0])], add_release=[load_public_key(keys["rel2"][1])],
                     revoke=[key_id(load_public_key(keys["rel1"][1]))])
    (tmp_path / "root.1.json").write_bytes(v1)
    (tmp_path / "root.2.json").write_bytes(v2)
    for path in ("root.1.json", "root.2.json"):
        _ok(["keys", "publish-root", str(tmp_path / path), "--broker", mosquitto.url, "--fleet", "roots"])
    topics = Topics("roots")
    assert "trust/root/2" in capsys.readouterr().out
    with connect(mosquitto.url, "test") as t:
        retained = collect_retained(t, topics, topics.all_trust_roots())
    assert retained == {topics.trust_root(1): v1, topics.trust_root(2): v2}
    # v3 signed by a key v2 does not list as a root key: devices would refuse it, so it is not sent
    forged = rotate_root(v2, [private(keys["root2"][0])], add_root=[load_public_key(keys["root2"][1])])
    with pytest.raises(IntegrityError, match="current root keys"):
        from edge_sdk.cloud.publish import publish_root

        publish_root(forged, mosquitto.url, "roots")
    other_v2 = rotate_root(v1, [private(keys["root1"][0])])
    with pytest.raises(IntegrityError, match="different root v2 is already retained"):
        publish_root(other_v2, mosquitto.url, "roots")
    with connect(mosquitto.url, "test") as t:
        assert collect_retained(t, topics, topics.all_trust_roots()) == retained
