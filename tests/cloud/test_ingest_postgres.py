"""Ingest into PostgreSQL (real server) and the size limits on both sinks: exactly one row per
record through worker processes, broker restarts and kill -9; no ack while the database is down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from polling import wait_until

from edge_sdk.cloud.ingest import IngestLimits, IngestWorker, prepare
from edge_sdk.cloud.sinks import open_sink
from edge_sdk.runtime.sync.telemetry import decode_ack
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.transport import Message, Transport, TransportConfig

T = Topics("f")
BOOT = "b" * 32


def transport(broker, cid: str, **kw) -> Transport:
    return Transport(TransportConfig.from_url(broker.url, client_id=cid, reconnect_min_s=0.05, reconnect_max_s=0.5, **kw))


def batch(seqs, floor=1, data=lambda s: {"i": s}) -> bytes:
    return json.dumps({"v": 1, "boot": BOOT, "floor": floor,
                       "records": [[s, 1000.0 + s, 1, "m", data(s)] for s in seqs]}).encode()


def query(db: str, sql: str) -> list[tuple]:
    """Rows of ``sql`` on a PostgreSQL URL or a SQLite path."""
    if "://" in db:
        import psycopg

        with psycopg.connect(db) as conn:
            return conn.execute(sql).fetchall()
    import sqlite3

    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


class Acks:
    def __init__(self) -> None:
        self.items: list[tuple[str, int]] = []
        self.cond = threading.Condition()

    def __call__(self, m: Message) -> None:
        with self.cond:
            self.items.append(decode_ack(m.payload))
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 15.0) -> list:
        with self.cond:
            self.cond.wait_for(lambda: len(self.items) >= n, timeout)
            return list(self.items)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path) -> str:
    return str(tmp_path / "ingest.db") if request.param == "sqlite" else request.getfixturevalue("postgres")


@pytest.fixture
def rig(mosquitto, db):
    """A worker (small limits) on ``db`` and a device transport that collects acks."""
    sink = open_sink(db, worker="w1")
    worker = IngestWorker(transport(mosquitto, "ingest-1"), T, sink,
                          limits=IngestLimits(max_record_bytes=1000, max_batch_bytes=64 * 1024))
    worker.start()
    acks = Acks()
    dev = transport(mosquitto, "dev")
    dev.subscribe(T.telemetry_ack("d1"), acks)
    dev.start()
    assert worker.transport.wait_connected(5) and dev.wait_connected(5)
    time.sleep(0.2)
    yield worker, sink, dev, acks
    dev.stop()
    worker.stop()
    sink.close()


def test_duplicates_are_dropped_and_counted(rig, db):
    worker, sink, dev, acks = rig
    for _ in range(3):
        dev.publish(T.telemetry("d1"), batch(range(1, 11)), qos=1, wait=5)
    assert acks.wait_for(3)[-1] == (BOOT, 10)
    assert query(db, "SELECT count(*), min(seq), max(seq) FROM records") == [(10, 1, 10)]
    c = sink.counters()
    assert (c["received"], c["records"], c["duplicates"], c["rejected"]) == (30, 10, 20, 0)


def test_records_and_batches_over_the_limits_are_rejected_acked_and_not_stored(rig, db):
    worker, sink, dev, acks = rig
    # a record over max_record_bytes inside a normal batch: the others are stored
    dev.publish(T.telemetry("d1"), batch([1, 2, 3], data=lambda s: "x" * (5000 if s == 2 else 10)), qos=1, wait=5)
    assert acks.wait_for(1) == [(BOOT, 3)]
    # a batch over max_batch_bytes: never parsed, every record in it settled as rejected
    dev.publish(T.telemetry("d1"), batch(range(4, 14), data=lambda s: "y" * 20_000), qos=1, wait=5)
    assert acks.wait_for(2)[-1] == (BOOT, 13)
    # over the limit and not a telemetry batch at all: malformed, not acked
    dev.publish(T.telemetry("d1"), b"z" * 100_000, qos=1, wait=5)
    dev.publish(T.telemetry("d1"), batch([14]), qos=1, wait=5)
    assert acks.wait_for(3)[-1] == (BOOT, 14) and len(acks.items) == 3
    assert [s for (s,) in query(db, "SELECT seq FROM records ORDER BY seq")] == [1, 3, 14]
    rejected = query(db, "SELECT seq, size, reason FROM rejected ORDER BY seq")
    assert [r[0] for r in rejected] == [2, *range(4, 14)]
    assert "5002 bytes" in rejected[0][2] and all("over the 65536-byte limit" in r[2] for r in rejected[1:])
    c = sink.counters()
    assert (c["records"], c["rejected"], c["malformed"]) == (3, 11, 1)
    assert (worker.rejected, worker.malformed) == (11, 1)


def test_unstorable_data_is_rejected_alike_on_every_sink(rig, db):
    worker, sink, dev, acks = rig
    payload = b'{"v": 1, "boot": "' + BOOT.encode() + b'", "floor": 1, "records": [[1, 0, 1, "m", "nul\\u0000"], ' \
              b'[2, 0, 1, "m", {"x": NaN}], [3, 0, 1, "m", 3]]}'
    dev.publish(T.telemetry("d1"), payload, qos=1, wait=5)
    assert acks.wait_for(1) == [(BOOT, 3)]
    assert query(db, "SELECT seq FROM records") == [(3,)]
    assert [r for (r,) in query(db, "SELECT reason FROM rejected ORDER BY seq")] == [
        "data holds a NUL character", "data is not storable JSON (NaN or Infinity)"]


def test_oversized_scan_is_bounded_and_exact():
    big = batch(range(7, 107), floor=5, data=lambda s: {"blob": "q" * 3000, "nested": [[s], {"]": "["}]})
    incoming = prepare("d9", big, IngestLimits(max_batch_bytes=4096))
    assert (incoming.boot, incoming.floor, incoming.records) == (BOOT, 5, ())
    assert [r.seq for r in incoming.rejected] == list(range(7, 107))


def test_postgres_down_holds_acks_and_loses_nothing(mosquitto, postgres_factory):
    server = postgres_factory()
    url = server.create_database("ingest")
    sink = open_sink(url, worker="w1")
    worker = IngestWorker(transport(mosquitto, "ingest-1"), T, sink, retry_max_s=0.5)
    worker.start()
    acks = Acks()
    with transport(mosquitto, "dev") as dev:
        dev.subscribe(T.telemetry_ack("d1"), acks)
        assert dev.wait_connected(5) and worker.transport.wait_connected(5)
        time.sleep(0.2)
        dev.publish(T.telemetry("d1"), batch(range(1, 6)), qos=1, wait=5)
        assert acks.wait_for(1) == [(BOOT, 5)]
        server.kill()
        dev.publish(T.telemetry("d1"), batch(range(6, 11)), qos=1, wait=5)
        assert wait_until(lambda: worker.errors >= 2)  # retried, and nothing acked meanwhile
        assert acks.items == [(BOOT, 5)]
        server.start()
        assert acks.wait_for(2, 30)[-1] == (BOOT, 10)
    worker.stop()
    sink.close()
    assert query(url, "SELECT count(*), count(DISTINCT seq) FROM records") == [(10, 10)]


def test_cli_refuses_an_unreachable_database_in_one_line(mosquitto, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edge_sdk", "cloud", "ingest", "--broker", mosquitto.url, "--fleet", "f",
                           "--db", "postgresql://edge:secret@127.0.0.1:1/telemetry"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "cannot connect to postgresql://edge@127.0.0.1:1/telemetry" in proc.stderr
    assert "Traceback" not in proc.stderr and "secret" not in proc.stderr + proc.stdout


def test_retention_deletes_old_records_on_both_sinks(db):
    sink = open_sink(db, worker="w1")
    try:
        sink.commit([prepare("d1", batch([1, 2]), IngestLimits())])
        time.sleep(1.1)
        sink.commit([prepare("d2", batch([1]), IngestLimits())])
        assert sink.prune(1.0) == 2
        assert query(db, "SELECT device, seq FROM records") == [("d2", 1)]
        assert query(db, "SELECT device FROM watermarks") == [("d2",)]
    finally:
        sink.close()


DEVICES = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    from edge_sdk.runtime.sync.outbox import Outbox, OutboxConfig
    from edge_sdk.runtime.sync.telemetry import TelemetryUploader, UploaderConfig
    from edge_sdk.runtime.sync.topics import Topics
    from edge_sdk.runtime.sync.transport import Transport, TransportConfig

    url, folder, names, per_device = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4])
    topics, devices = Topics("f"), []
    for name in names:
        box = Outbox(OutboxConfig(path=folder / f"{name}.db"))
        box.append_many([{"device": name, "i": i} for i in range(per_device)])
        tr = Transport(TransportConfig.from_url(url, client_id=name, reconnect_min_s=0.05, reconnect_max_s=0.5))
        up = TelemetryUploader(box, tr, topics, name, UploaderConfig(batch_records=100, ack_timeout_s=2.0))
        up.start(); tr.start(); devices.append((box, tr, up))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and any(len(box) for box, _, _ in devices):
        time.sleep(0.1)
    print(json.dumps({"left": sum(len(box) for box, _, _ in devices), "resends": sum(up.resends for _, _, up in devices)}))
    for box, tr, up in devices:
        up.stop(); tr.stop()
''')


@pytest.mark.slow
def test_twenty_thousand_records_two_worker_processes_broker_restart_and_kill9(mosquitto, postgres, tmp_path):
    """20 devices × 1,000 records, 2 `cloud ingest` processes on one $share group into PostgreSQL;
    the broker is killed and restarted, then a worker is killed -9 and replaced → exactly 20,000 rows."""
    script = tmp_path / "devices.py"
    script.write_text(DEVICES)

    def worker(n: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "edge_sdk", "cloud", "ingest", "--broker", mosquitto.url,
                                 "--fleet", "f", "--db", postgres, "--group", "pg", "--client-id", f"w{n}",
                                 "--report-every", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def rows() -> int:
        return query(postgres, "SELECT count(*) FROM records")[0][0] if query(
            postgres, "SELECT count(*) FROM pg_tables WHERE tablename = 'records'")[0][0] else 0

    workers = [worker(0), worker(1)]
    names = [f"dev{i:02d}" for i in range(20)]
    sims = [subprocess.Popen([sys.executable, str(script), mosquitto.url, str(tmp_path), ",".join(part), "1000"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for part in (names[:10], names[10:])]
    try:
        assert wait_until(lambda: rows() >= 3000, 120)
        mosquitto.restart(hard=True)  # kill -9 of the broker; clients reconnect and resend
        assert wait_until(lambda: rows() >= 9000, 120)
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        workers[0] = worker(2)  # a replacement joins the share group
        outs = [json.loads(sim.communicate(timeout=300)[0].strip().splitlines()[-1]) for sim in sims]
        assert [o["left"] for o in outs] == [0, 0]  # every record acked on every device
    finally:
        for p in sims + workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in workers:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    assert query(postgres, "SELECT count(*), count(DISTINCT (device, boot, seq)), count(DISTINCT device) FROM records") == [
        (20_000, 20_000, 20)]
    per_device = query(postgres, "SELECT min((data->>'i')::int), max((data->>'i')::int), count(*) FROM records GROUP BY device")
    assert set(per_device) == {(0, 999, 1000)}
    counters = dict(query(postgres, "SELECT name, sum(value)::bigint FROM counters GROUP BY name"))
    assert counters["records"] == 20_000  # the counters commit with the rows, so they agree
    assert counters["received"] == counters["records"] + counters["duplicates"]
