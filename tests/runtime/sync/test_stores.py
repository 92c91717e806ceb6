"""Chunk stores against real servers: nginx (http), SeaweedFS (s3), Mosquitto (mqtt), a folder (file).

Counts are taken on the store's side (nginx access log, SeaweedFS request counters), so "only
the missing chunks moved" is what the server saw, not what the client says it did.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from edge_sdk.chunking import chunk_bytes
from edge_sdk.errors import ConfigError
from edge_sdk.manifest import ChunkRef
from edge_sdk.runtime.sync.chunk_store import ChunkStore
from edge_sdk.runtime.sync.fetch import fetch_missing
from edge_sdk.runtime.sync.stores import StoreError, StoreOptions, open_store, store_scheme
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.transport import Transport, TransportConfig

FAST = StoreOptions(timeout_s=5.0, retries=3, backoff_s=0.05, backoff_max_s=0.2)


def make_chunks(n_bytes: int, seed: int) -> tuple[list[ChunkRef], dict[str, bytes]]:
    data = random.Random(seed).randbytes(n_bytes)
    chunks = chunk_bytes(data)
    payloads = {c.sha256: data[c.offset:c.offset + c.size] for c in chunks}
    refs = list({c.sha256: ChunkRef(sha256=c.sha256, size=c.size) for c in chunks}.values())
    return refs, payloads


def publish(store_url: str, payloads: dict[str, bytes], options: StoreOptions = FAST) -> int:
    """Upload what the store lacks; returns how many chunks were uploaded."""
    store = open_store(store_url, options)
    try:
        todo = set(payloads) - store.present(payloads)
        for sha in sorted(todo):
            store.put(sha, payloads[sha])
        store.flush()
        return len(todo)
    finally:
        store.close()


def logged(server, at_least: int, timeout: float = 10.0) -> list:
    """nginx's access log once it has ``at_least`` lines: nginx writes a line just after the last
    byte of a response went out, so a client may see the whole response before its line."""
    deadline = time.monotonic() + timeout
    while len(records := server.requests()) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return records


def test_registry_names_every_store_and_refuses_unknown_schemes():
    assert [store_scheme(u) for u in ("mqtt", "s3://b/p", "http://h/c", "https://h/c", "file:///srv/c")] == \
        ["mqtt", "s3", "http", "https", "file"]
    with pytest.raises(ConfigError, match="unknown scheme 'ftp'"):
        open_store("ftp://host/chunks")
    with pytest.raises(ConfigError, match="s3://bucket"):
        open_store("s3:///no-bucket")


# --- http: nginx serving a folder ---------------------------------------------------------------

def test_http_update_fetches_only_missing_chunks(tmp_path, nginx_factory):
    root = tmp_path / "www"
    server = nginx_factory(root)
    v1_refs, v1 = make_chunks(1_500_000, seed=1)
    v2_refs, v2 = make_chunks(1_500_000, seed=2)
    shared = v1_refs[:8]  # v2 = some of v1's chunks + new ones
    v2_refs = shared + v2_refs[:10]
    v2 = {**{r.sha256: v1[r.sha256] for r in shared}, **{r.sha256: v2[r.sha256] for r in v2_refs[8:]}}
    assert publish(f"file://{root}", v1) == len(v1)
    assert publish(f"file://{root}", v2) == 10  # the shared ones are already there

    local = ChunkStore(tmp_path / "device")
    store = open_store(server.url + "/", FAST)
    stats = fetch_missing(store, local, local.missing(v1_refs), time.monotonic() + 60)
    assert stats.chunks == len(v1_refs) and stats.corrupt == 0
    before = len(server.requests())
    stats = fetch_missing(store, local, local.missing(v2_refs), time.monotonic() + 60)
    assert stats.chunks == 10
    seen = logged(server, before + 10)[before:]
    assert sorted(r.path.lstrip("/") for r in seen if r.status == 200) == sorted(r.sha256 for r in v2_refs[8:])
    assert sum(r.bytes_sent for r in seen) == sum(r.size for r in v2_refs[8:])
    assert all(local.get(r.sha256) == v2[r.sha256] for r in v2_refs)


def test_http_put_publishes_through_webdav(tmp_path, nginx_factory):
    (tmp_path / "www").mkdir()
    server = nginx_factory(tmp_path / "www", extra_server_conf="dav_methods PUT; dav_access user:rw all:r;")
    _, payloads = make_chunks(400_000, seed=3)
    assert publish(server.url, payloads) == len(payloads)
    assert publish(server.url, payloads) == 0
    methods = [r.method for r in logged(server, 3 * len(payloads))]
    assert methods.count("PUT") == len(payloads) and methods.count("HEAD") == 2 * len(payloads)
    assert {p.name for p in (tmp_path / "www").iterdir()} == set(payloads)


def test_http_tampered_chunk_is_refused_counted_and_reported(tmp_path, nginx_factory):
    root = tmp_path / "www"
    server = nginx_factory(root)
    refs, payloads = make_chunks(600_000, seed=4)
    publish(f"file://{root}", payloads)
    bad = refs[2]
    (root / bad.sha256).write_bytes(bytes(bad.size))  # right size, wrong bytes
    local = ChunkStore(tmp_path / "device")
    refused = []
    with pytest.raises(StoreError) as info:
        fetch_missing(open_store(server.url, FAST), local, refs, time.monotonic() + 60, workers=1,
                      on_corrupt=lambda ref, why: refused.append(ref.sha256))
    assert info.value.kind == "corrupt_chunk"
    assert refused == [bad.sha256, bad.sha256]  # counted each time, asked again once
    assert not local.has(bad.sha256)  # never stored
    # Repaired on the store: the next attempt fetches only what is still missing.
    (root / bad.sha256).write_bytes(payloads[bad.sha256])
    before, still_missing = len(server.requests()), local.missing(refs)
    assert bad in still_missing and len(still_missing) < len(refs)
    stats = fetch_missing(open_store(server.url, FAST), local, still_missing, time.monotonic() + 60)
    assert stats.chunks == len(logged(server, before + len(still_missing))) - before == len(still_missing)


def test_http_404_for_one_chunk_names_it(tmp_path, nginx_factory):
    root = tmp_path / "www"
    server = nginx_factory(root)
    refs, payloads = make_chunks(300_000, seed=5)
    publish(f"file://{root}", payloads)
    (root / refs[-1].sha256).unlink()
    with pytest.raises(StoreError, match="HTTP 404") as info:
        fetch_missing(open_store(server.url, FAST), ChunkStore(tmp_path / "d"), refs, time.monotonic() + 60)
    assert info.value.kind == "chunk_missing" and refs[-1].sha256[:12] in str(info.value)


def test_http_store_not_answering_is_retried_with_backoff_then_reported(tmp_path):
    from servers import free_port  # tests/ is on pytest's pythonpath

    store = open_store(f"http://127.0.0.1:{free_port()}/chunks", FAST)
    refs, _ = make_chunks(50_000, seed=6)
    with pytest.raises(StoreError, match="did not answer after 4 attempts") as info:
        store.fetch(refs[0], time.monotonic() + 60)
    assert info.value.kind == "store_unreachable"
    assert store.counters["retries"] == FAST.retries and store.counters["requests_get"] == FAST.retries + 1


def test_http_range_resume_after_nginx_is_killed_mid_chunk(tmp_path, nginx_factory):
    root = tmp_path / "www"
    server = nginx_factory(root, limit_rate="32k")  # a 128 KiB chunk takes ~4 s
    refs, payloads = make_chunks(400_000, seed=7)
    big = max(refs, key=lambda r: r.size)
    publish(f"file://{root}", {big.sha256: payloads[big.sha256]})
    store = open_store(server.url, StoreOptions(timeout_s=5.0, retries=20, backoff_s=0.2, backoff_max_s=0.5))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(data=store.fetch(big, time.monotonic() + 120)))
    thread.start()
    time.sleep(1.5)
    server.kill()  # SIGKILL to master and worker, mid-body
    time.sleep(0.5)
    server.start()
    thread.join(120)
    assert result["data"] == payloads[big.sha256]
    assert store.counters["resumes"] == 1
    log = logged(server, 1)  # the first, cut-off request was never logged; the resumed one was
    assert len(log) == 1
    first = int(log[0].range.removeprefix("bytes=").rstrip("-"))
    assert (log[0].status, log[0].path) == (206, f"/{big.sha256}") and 0 < first < big.size
    assert log[0].bytes_sent == big.size - first


def test_https_with_the_fleet_ca(tmp_path, nginx_factory, make_certs):
    ca = make_certs(tmp_path)
    root = tmp_path / "www"
    server = nginx_factory(root, tls=(tmp_path / "server.crt", tmp_path / "server.key"))
    refs, payloads = make_chunks(100_000, seed=8)
    publish(f"file://{root}", payloads)
    url = server.url
    trusted = open_store(url, StoreOptions(ca_certs=ca, timeout_s=5, retries=0))
    assert trusted.fetch(refs[0], time.monotonic() + 30) == payloads[refs[0].sha256]
    with pytest.raises(StoreError, match="TLS") as info:  # the system CAs do not know the fleet CA
        open_store(url, StoreOptions(timeout_s=5, retries=0)).fetch(refs[0], time.monotonic() + 30)
    assert info.value.kind == "store_unreachable"


# --- s3: SeaweedFS ------------------------------------------------------------------------------

def aws_env(monkeypatch, server, secret: str | None = None) -> None:
    for key, value in server.environ().items():
        monkeypatch.setenv(key, value)
    if secret is not None:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)


def test_s3_publish_uploads_only_missing_and_device_fetches_only_missing(tmp_path, seaweedfs, s3_bucket, monkeypatch):
    url = f"s3://{s3_bucket}/update-flow"
    v1_refs, v1 = make_chunks(900_000, seed=11)
    v2_refs, new = make_chunks(300_000, seed=12)
    v2 = {**{r.sha256: v1[r.sha256] for r in v1_refs}, **new}
    v2_refs = v1_refs + v2_refs
    aws_env(monkeypatch, seaweedfs)
    before = seaweedfs.request_counts()
    assert publish(url, v1) == len(v1)
    assert publish(url, v2) == len(new)
    after = seaweedfs.request_counts()
    assert after["PUT"] - before.get("PUT", 0) == len(v1) + len(new)

    local = ChunkStore(tmp_path / "device")
    fetch_missing(open_store(url, FAST), local, local.missing(v1_refs), time.monotonic() + 60)
    before = seaweedfs.request_counts()
    stats = fetch_missing(open_store(url, FAST), local, local.missing(v2_refs), time.monotonic() + 60)
    gets = seaweedfs.request_counts()["GET"] - before["GET"]
    assert stats.chunks == gets == len(new)
    assert all(local.get(r.sha256) == v2[r.sha256] for r in v2_refs)


def test_s3_credentials_refused(tmp_path, seaweedfs, s3_bucket, monkeypatch):
    url = f"s3://{s3_bucket}/denied"
    refs, payloads = make_chunks(100_000, seed=13)
    aws_env(monkeypatch, seaweedfs)
    publish(url, payloads)
    aws_env(monkeypatch, seaweedfs, secret="not-the-secret")
    for attempt in (lambda store: store.fetch(refs[0], time.monotonic() + 30),
                    lambda store: store.put("0" * 64, b"x"), lambda store: store.present([refs[0].sha256])):
        with pytest.raises(StoreError, match="refused the credentials") as info:
            attempt(open_store(url, FAST))
        assert info.value.kind == "store_denied"  # at once: wrong credentials are not retried


def test_s3_missing_object_and_wrong_bytes(tmp_path, seaweedfs, s3_bucket, monkeypatch):
    url = f"s3://{s3_bucket}/tamper"
    aws_env(monkeypatch, seaweedfs)
    refs, payloads = make_chunks(300_000, seed=14)
    publish(url, {r.sha256: payloads[r.sha256] for r in refs[1:]})
    with pytest.raises(StoreError, match="not in") as info:
        open_store(url, FAST).fetch(refs[0], time.monotonic() + 30)
    assert info.value.kind == "chunk_missing"
    seaweedfs.client().put_object(Bucket=s3_bucket, Key=f"tamper/{refs[1].sha256}", Body=b"\0" * refs[1].size)
    local = ChunkStore(tmp_path / "device")
    corrupt = []
    with pytest.raises(StoreError) as info:
        fetch_missing(open_store(url, FAST), local, refs[1:], time.monotonic() + 60, on_corrupt=lambda r, why: corrupt.append(r))
    assert info.value.kind == "corrupt_chunk" and len(corrupt) == 2 and not local.has(refs[1].sha256)


# --- mqtt: retained blobs with a size cap -------------------------------------------------------

def test_mqtt_store_roundtrip_and_message_cap(tmp_path, mosquitto):
    topics = Topics("capfleet")
    transport = Transport(TransportConfig.from_url(mosquitto.url, client_id="cap-test"))
    transport.start()
    assert transport.wait_connected(10)
    try:
        options = StoreOptions(transport=transport, topics=topics, max_message_bytes=64 * 1024, timeout_s=5)
        refs, payloads = make_chunks(400_000, seed=21)
        small = {sha: data for sha, data in payloads.items() if len(data) <= 64 * 1024}
        large = next(sha for sha, data in payloads.items() if len(data) > 64 * 1024)
        store = open_store("mqtt", options)
        for sha, data in small.items():
            store.put(sha, data)
        store.flush()
        with pytest.raises(StoreError, match="over the broker's 65536-byte message cap") as info:
            store.put(large, payloads[large])
        assert info.value.kind == "oversized_message"
        assert store.present(payloads) == set(small)
        local = ChunkStore(tmp_path / "device")
        wanted = [r for r in refs if r.sha256 in small]
        assert fetch_missing(store, local, wanted, time.monotonic() + 30).chunks == len(wanted)
        # A device refuses (and counts) a retained chunk over its cap, without storing it.
        transport.publish(topics.blob(large), payloads[large], qos=1, retain=True, wait=10)
        ref = next(r for r in refs if r.sha256 == large)
        with pytest.raises(StoreError, match="over the 65536-byte cap") as info:
            fetch_missing(store, local, [ref], time.monotonic() + 30)
        assert info.value.kind == "oversized_message" and store.counters["oversized_messages"] == 1
        assert not local.has(large)
    finally:
        transport.stop()
