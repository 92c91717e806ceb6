"""Cloud ingest against a real Mosquitto: dedup, malformed input, watermarks, shared workers, CLI."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from polling import wait_until

from edge_sdk.cloud.ingest import IngestLimits, IngestWorker, SqliteSink, prepare
from edge_sdk.runtime.sync.telemetry import decode_ack
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.transport import Message, Transport, TransportConfig

T = Topics("f")
BOOT = "b" * 32


def transport(broker, cid: str, **kw) -> Transport:
    return Transport(TransportConfig.from_url(broker.url, client_id=cid, reconnect_min_s=0.05, reconnect_max_s=0.3, **kw))


def batch(seqs, floor=None, boot=BOOT, data=lambda s: {"i": s}) -> bytes:
    seqs = list(seqs)
    return json.dumps({"v": 1, "boot": boot, "floor": floor or seqs[0],
                       "records": [[s, 1000.0 + s, 1, "m", data(s)] for s in seqs]}).encode()


class Acks:
    def __init__(self) -> None:
        self.items: list[tuple[str, str, int]] = []
        self.cond = threading.Condition()

    def __call__(self, m: Message) -> None:
        with self.cond:
            self.items.append((T.parse(m.topic).device, *decode_ack(m.payload)))
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list:
        with self.cond:
            self.cond.wait_for(lambda: len(self.items) >= n, timeout)
            return list(self.items)


@pytest.fixture
def rig(mosquitto, tmp_path):
    """A running worker on a fresh DB, plus a 'device' transport that also collects acks."""
    sink = SqliteSink(tmp_path / "ingest.db")
    worker = IngestWorker(transport(mosquitto, "ingest-1"), T, sink)
    worker.start()
    assert worker.transport.wait_connected(5)
    acks = Acks()
    dev = transport(mosquitto, "dev")
    dev.subscribe("edge/f/+/telemetry/ack", acks)
    dev.start()
    assert dev.wait_connected(5)
    time.sleep(0.2)
    yield worker, sink, dev, acks
    dev.stop()
    worker.stop()
    sink.close()


def rows(sink) -> list[tuple]:
    return sink._db.execute("SELECT device, boot, seq, data FROM records ORDER BY device, boot, seq").fetchall()


def test_commit_then_ack_and_duplicates_dropped(rig):
    worker, sink, dev, acks = rig
    for _ in range(3):  # the same batch delivered three times
        dev.publish(T.telemetry("d1"), batch(range(1, 11)), qos=1, wait=5)
    assert acks.wait_for(3) == [("d1", BOOT, 10)] * 3  # every delivery is acked again
    assert [r[2] for r in rows(sink)] == list(range(1, 11))
    c = sink.counters()
    assert (c["batches"], c["received"], c["records"], c["duplicates"], c["malformed"]) == (3, 30, 10, 20, 0)
    assert (worker.records, worker.duplicates) == (10, 20)


def test_ack_is_highest_contiguous_sequence(rig):
    worker, sink, dev, acks = rig
    sends = [("d1", batch([1, 2, 3])), ("d1", batch([6, 7], floor=1)),  # 4, 5 missing
             ("d1", batch([4, 5], floor=1)), ("d2", batch([20, 21], floor=20))]  # 1..19 settled on device
    for n, (device, payload) in enumerate(sends, 1):
        dev.publish(T.telemetry(device), payload, qos=1, wait=5)
        got = acks.wait_for(n)  # one at a time: each batch is its own commit
    assert got == [("d1", BOOT, 3), ("d1", BOOT, 3), ("d1", BOOT, 7), ("d2", BOOT, 21)]
    assert sink._db.execute("SELECT device, upto FROM watermarks ORDER BY device").fetchall() == [("d1", 7), ("d2", 21)]


def test_malformed_payloads_are_counted_and_never_stop_good_records(rig):
    worker, sink, dev, acks = rig
    bad = [
        b"\xff\xfe\x00binary",
        b"not json",
        b"[1, 2]",
        json.dumps({"v": 2, "boot": BOOT, "floor": 1, "records": [[1, 0, 1, "m", 1]]}).encode(),
        json.dumps({"v": 1, "boot": "../etc", "floor": 1, "records": [[1, 0, 1, "m", 1]]}).encode(),
        json.dumps({"v": 1, "boot": BOOT, "floor": 0, "records": [[1, 0, 1, "m", 1]]}).encode(),
        json.dumps({"v": 1, "boot": BOOT, "floor": 1, "records": []}).encode(),
        json.dumps({"v": 1, "boot": BOOT, "floor": 1, "records": [[2, 0, 1, "m", 1], [2, 0, 1, "m", 1]]}).encode(),
        json.dumps({"v": 1, "boot": BOOT, "floor": 5, "records": [[3, 0, 1, "m", 1]]}).encode(),
        json.dumps({"v": 1, "boot": BOOT, "floor": 1, "records": [[1, "noon", 1, "m", 1]]}).encode(),
        json.dumps({"v": 1, "boot": BOOT, "floor": 1, "records": [[1, 0, 1, "m"]]}).encode(),
        b'{"v": 1, "boot": "' + b"b" * 32 + b'", "floor": 1, "records": [[1, NaN, 1, "m", 1]]}',
        b"",
    ]
    for i, payload in enumerate(bad):
        dev.publish(T.telemetry("d1"), payload, qos=1, wait=5)
        dev.publish(T.telemetry("d1"), batch([i + 1], floor=1), qos=1, wait=5)
    assert wait_until(lambda: sink.counters()["malformed"] == len(bad))
    assert acks.wait_for(len(bad))[-1] == ("d1", BOOT, len(bad))
    assert [r[2] for r in rows(sink)] == list(range(1, len(bad) + 1))
    reasons = [r for (r,) in sink._db.execute("SELECT reason FROM malformed ORDER BY id")]
    assert any("not JSON" in r for r in reasons) and any("version" in r for r in reasons)
    assert any("boot id" in r for r in reasons) and any("seq" in r for r in reasons)
    assert worker.malformed == len(bad) and worker.transport.handler_errors == 0


def test_two_workers_share_the_load_into_one_db(mosquitto, tmp_path):
    db = tmp_path / "shared.db"
    sinks = [SqliteSink(db), SqliteSink(db)]
    workers = [IngestWorker(transport(mosquitto, f"w{i}"), T, s, group="g") for i, s in enumerate(sinks)]
    for w in workers:
        w.start()
        assert w.transport.wait_connected(5)
    time.sleep(0.3)
    with transport(mosquitto, "devs") as dev:
        assert dev.wait_connected(5)
        for d in range(4):
            for start in range(1, 201, 20):
                dev.publish(T.telemetry(f"d{d}"), batch(range(start, start + 20)), qos=1)
        assert wait_until(lambda: sinks[0].counters()["records"] == 800)
    for w in workers:
        w.stop()
    assert all(w.batches > 0 for w in workers)
    assert sum(w.batches for w in workers) == 40
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT device) FROM records").fetchone() == (800, 4)
        assert conn.execute("SELECT MIN(upto), MAX(upto) FROM watermarks").fetchone() == (200, 200)


def test_cli_ingest_runs_until_sigterm(mosquitto, tmp_path):
    db = tmp_path / "cli.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_sdk", "cloud", "ingest", "--broker", mosquitto.url, "--fleet", "f",
         "--db", str(db), "--group", "cli", "--report-every", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        acks = Acks()
        with transport(mosquitto, "dev") as dev:
            dev.subscribe(T.telemetry_ack("d1"), acks)
            assert dev.wait_connected(5)
            # the worker subscribes a moment after it starts: keep offering until it acks
            assert wait_until(lambda: dev.publish(T.telemetry("d1"), batch([1, 2]), qos=1) and acks.wait_for(1, 0.3), 20)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "records" in out and "duplicates" in out
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT seq FROM records ORDER BY seq").fetchall() == [(1,), (2,)]


def test_cli_ingest_bad_broker_url_is_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edge_sdk", "cloud", "ingest", "--broker", "http://x", "--fleet", "f", "--db", str(tmp_path / "x.db")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "broker URL" in proc.stderr and "Traceback" not in proc.stderr


def test_watermark_is_highest_contiguous_for_any_delivery_order(tmp_path):
    """Property: whatever order and duplication batches arrive in, the ack equals the highest
    contiguous committed sequence (from the batch floor), and records are stored once."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    counter = iter(range(10**6))
    sink = SqliteSink(tmp_path / "p.db")

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.randoms(use_true_random=False))
    def check(seqs, rnd):
        device = f"d{next(counter)}"  # a fresh device per example, one database for speed
        groups = [sorted(set(seqs[i:i + 3])) for i in range(0, len(seqs), 3)]
        rnd.shuffle(groups)
        seen: set[int] = set()
        for g in groups:
            result = sink.commit([prepare(device, batch(g, floor=1), IngestLimits())])
            seen |= set(g)
            expected = 0
            while expected + 1 in seen:
                expected += 1
            assert result.upto == {(device, BOOT): expected}
        stored = [s for (d, _, s, _) in rows(sink) if d == device]
        assert stored == sorted(seen)

    try:
        check()
    finally:
        sink.close()


# -- the fast decoding path (msgspec) against the reference path ---------------------------------------
ODD = [{"a": 1}, "x" * 2000, "nul\u0000", {"t": "tab\there\nnl \\ back"}, [1, 2.5, None, True], "ünï€😀",
       12345678901234567890123, {"k": {"n": [{}]}}, "\\u0000 spelled out"]


@pytest.mark.parametrize("payload, fast", [
    (json.dumps({"v": 1, "boot": BOOT, "floor": 1, "records": [[i + 1, 5.0 + i, i % 3, "k\t" * (i % 2) + "m", d]
                                                               for i, d in enumerate(ODD)]}).encode(), True),
    (b'{"v": 1, "boot": "' + BOOT.encode() + b'", "floor": 1, "records": [[1, 0, 1, "m", {"x": NaN}], [2, 0, 1, "m", 2]]}',
     False),  # NaN: not JSON, so the reference path rejects that one record
    (json.dumps({"records": [[1, 0.0, 1, "m", 1]], "floor": 1, "boot": BOOT, "v": 1}).encode(), True),  # any key order
])
def test_fast_path_stores_what_the_reference_path_stores(payload, fast):
    from needs import need_module

    need_module("msgspec", "pip install 'edge-sdk[cloud]'")
    from edge_sdk.cloud import ingest

    limits = IngestLimits(max_record_bytes=1000)
    ref = ingest._prepare_stdlib("d1", payload, limits)
    assert (ingest._prepare_fast("d1", payload, limits) is not None) is fast
    got = prepare("d1", payload, limits)
    assert (got.boot, got.floor, got.rejected) == (ref.boot, ref.floor, ref.rejected)
    assert [r[:4] for r in got.records] == [r[:4] for r in ref.records]
    assert [json.loads(r.data) for r in got.records] == [json.loads(r.data) for r in ref.records]


@pytest.mark.parametrize("payload, message", [
    (batch([1, 1]), "record 1 seq must be an integer ≥ 2"),
    (b'{"v": 1, "boot": "' + BOOT.encode() + b'", "floor": 1, "records": [[true, 0, 1, "m", 1]]}', "record 0 seq"),
    (batch([3], floor=5), "record 0 seq must be an integer ≥ 5"),
    (json.dumps({"v": 2, "boot": BOOT, "floor": 1, "records": [[1, 0.0, 1, "m", 1]]}).encode(), "unsupported version 2"),
    (json.dumps({"v": 1, "boot": "a b", "floor": 1, "records": [[1, 0.0, 1, "m", 1]]}).encode(), "boot id"),
    (json.dumps({"v": 1, "boot": BOOT, "floor": 1, "records": [[1, 1e308 * 10, 1, "m", 1]]}).encode(), "finite"),
    (json.dumps({"v": 1, "boot": BOOT, "floor": 1, "records": []}).encode(), "records must be a list"),
    (json.dumps({"v": 1, "boot": BOOT, "floor": 1, "records": [[1, 0.0, 1, "k" * 129, 1]]}).encode(), "kind"),
])
def test_every_defect_is_named_whichever_path_decodes(payload, message):
    from edge_sdk.errors import SyncError

    with pytest.raises(SyncError, match=message):
        prepare("d1", payload, IngestLimits())
