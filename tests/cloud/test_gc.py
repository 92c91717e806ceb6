"""`edge-sdk cloud gc`: clears retained chunks nothing references; keeps desired releases."""

from __future__ import annotations

import pytest

from edge_sdk.cloud.connection import collect_retained, connect
from edge_sdk.cloud.desire import build_desired, write_desired
from edge_sdk.cloud.gc import collect_garbage
from edge_sdk.cloud.publish import publish_release
from edge_sdk.cli import main


def _ok(args: list[str]) -> None:
    """Run the CLI; it exits (status 0 on success)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
from edge_sdk.manifest import load_manifest
from edge_sdk.runtime.sync.topics import Topics


def _chunks(release) -> set[str]:
    return {c.sha256 for e in load_manifest(release).files() for c in e.chunks}


def _on_broker(broker, fleet: str) -> tuple[set[str], set[str]]:
    topics = Topics(fleet)
    with connect(broker.url, "test") as t:
        blobs = {topics.parse(k).sha256 for k in collect_retained(t, topics, topics.all_blobs())}
        manifests = set(collect_retained(t, topics, topics.all_manifests()))
    return blobs, manifests


def test_gc_keeps_referenced_and_desired_releases(mosquitto, sync_releases):
    for name in ("v1", "v2", "v3"):
        publish_release(sync_releases[name], mosquitto.url, "f")
    topics = Topics("f")
    # An orphan chunk from an interrupted publish.
    with connect(mosquitto.url, "test") as t:
        orphan = "ab" * 32
        t.publish(topics.blob(orphan), b"orphan", qos=1, retain=True, wait=5)
    v1, v2, v3 = (_chunks(sync_releases[n]) for n in ("v1", "v2", "v3"))

    nothing = collect_garbage(mosquitto.url, "f", dry_run=True)
    assert nothing.blobs_removed == 1 and nothing.bytes_freed == len(b"orphan")
    assert orphan in _on_broker(mosquitto, "f")[0]  # dry run changed nothing

    report = collect_garbage(mosquitto.url, "f")
    assert report.blobs_removed == 1 and report.manifests_removed == []
    assert _on_broker(mosquitto, "f")[0] == v1 | v2 | v3

    # Keep the newest version, but a device still wants v1: v2 goes, v1 and v3 stay.
    write_desired(mosquitto.url, "f", build_desired("cnn", 1), device="old-cam")
    report = collect_garbage(mosquitto.url, "f", keep=1)
    assert report.manifests_removed == [topics.manifest("cnn", 2)]
    blobs, manifests = _on_broker(mosquitto, "f")
    assert manifests == {topics.manifest("cnn", 1), topics.manifest("cnn", 3)}
    assert blobs == v1 | v3 and report.blobs_removed == len((v2) - (v1 | v3))


def test_cli_gc(mosquitto, sync_releases, capsys):
    publish_release(sync_releases["v1"], mosquitto.url, "g")
    publish_release(sync_releases["v2"], mosquitto.url, "g")
    _ok(["cloud", "gc", "--broker", mosquitto.url, "--fleet", "g", "--keep", "1"])
    out = capsys.readouterr().out
    assert "removed 1 manifests" in out
    blobs, manifests = _on_broker(mosquitto, "g")
    assert manifests == {Topics("g").manifest("cnn", 2)} and blobs == _chunks(sync_releases["v2"])


def test_gc_keeps_chunks_of_a_publish_in_progress(mosquitto, sync_releases):
    """Chunks whose manifest is not out yet are held by the publish's pending marker; a marker
    older than the grace period (a publish that died) is cleared together with its chunks."""
    import time

    from edge_sdk.cloud.publish import pending_marker

    topics = Topics("p")
    publish_release(sync_releases["v1"], mosquitto.url, "p")
    fresh, old = "cd" * 32, "ef" * 32
    with connect(mosquitto.url, "test") as t:
        # what a publish of v5 that is still sending chunks, and one of v6 that died, look like
        t.publish(topics.pending("cnn", 5), pending_marker({fresh}), qos=1, retain=True, wait=5)
        t.publish(topics.pending("cnn", 6), pending_marker({old}, started=time.time() - 7200), qos=1, retain=True,
                  wait=5)
        t.publish(topics.blob(fresh), b"in progress", qos=1, retain=True, wait=5)
        t.publish(topics.blob(old), b"abandoned", qos=1, retain=True, wait=5)
    report = collect_garbage(mosquitto.url, "p", pending_grace_s=3600)
    assert report.pending_kept == [topics.pending("cnn", 5)] and report.pending_removed == [topics.pending("cnn", 6)]
    assert report.blobs_removed == 1 and report.bytes_freed == len(b"abandoned")
    assert _on_broker(mosquitto, "p")[0] == _chunks(sync_releases["v1"]) | {fresh}
    with connect(mosquitto.url, "test") as t:
        assert set(collect_retained(t, topics, topics.all_pending())) == {topics.pending("cnn", 5)}


def test_gc_of_an_s3_store_removes_only_unreferenced_objects(mosquitto, seaweedfs, s3_bucket, sync_releases,
                                                             monkeypatch):
    for name, value in seaweedfs.environ().items():
        monkeypatch.setenv(name, value)
    store = f"s3://{s3_bucket}/gc"
    for name in ("v1", "v2"):
        publish_release(sync_releases[name], mosquitto.url, "s3gc", store=store)
    client = seaweedfs.client()
    orphan = "cd" * 32
    client.put_object(Bucket=s3_bucket, Key=f"gc/{orphan}", Body=b"orphan")
    client.put_object(Bucket=s3_bucket, Key="elsewhere/not-a-chunk", Body=b"x")  # outside the prefix: untouched

    def objects() -> set[str]:
        return {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])}

    v1, v2 = _chunks(sync_releases["v1"]), _chunks(sync_releases["v2"])
    report = collect_garbage(mosquitto.url, "s3gc", keep=1, store=store)
    assert report.manifests_removed == [Topics("s3gc").manifest("cnn", 1)]
    assert report.blobs_removed == len(v1 - v2) + 1
    assert objects() == {f"gc/{sha}" for sha in v2} | {"elsewhere/not-a-chunk"}
    assert _on_broker(mosquitto, "s3gc") == (set(), {Topics("s3gc").manifest("cnn", 2)})


def test_gc_of_an_http_store_says_where_to_collect(mosquitto):
    from edge_sdk.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot list its chunks"):
        collect_garbage(mosquitto.url, "httpgc", store="https://cdn.example.com/chunks")
