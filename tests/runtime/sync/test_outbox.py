"""The durable outbox on real SQLite files, including a writer process killed with SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from disk import fill_disk

from edge_sdk.errors import OutboxFullError, SyncError
from edge_sdk.runtime.sync.outbox import ROW_OVERHEAD, Outbox, OutboxConfig, Priority
from edge_sdk.types import OutboxPolicy


def box(tmp_path, **kw) -> Outbox:
    return Outbox(OutboxConfig(path=tmp_path / "outbox.db", **kw))


def test_append_batch_ack_roundtrip_and_counters(tmp_path):
    b = box(tmp_path)
    assert b.append({"t": 1.5}, kind="sensor") == 1
    assert b.append_many([{"i": i} for i in range(2, 6)]) == [2, 3, 4, 5]
    batch = b.next_batch(0, max_records=3)
    assert (batch.boot, batch.floor, [r.seq for r in batch.records]) == (b.boot_id, 1, [1, 2, 3])
    assert batch.records[0].kind == "sensor" and json.loads(batch.records[0].data) == {"t": 1.5}
    assert [r.seq for r in b.next_batch(batch.last_id).records] == [4, 5]
    assert b.next_batch(b.next_batch(batch.last_id).last_id) is None
    assert b.ack(b.boot_id, 3) == 3
    assert b.ack(b.boot_id, 3) == 0  # acks are idempotent
    s = b.stats()
    assert (s.rows, s.appended, s.acked, s.dropped, s.rejected) == (2, 5, 3, 0, 0)
    assert b.next_batch(0).floor == 4
    b.ack(b.boot_id, 5)
    assert b.stats().bytes == 0 and len(b) == 0


def test_pragmas_are_durable_ones(tmp_path):
    b = box(tmp_path)
    b.append(1)
    assert b._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert b._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_reopen_keeps_records_and_starts_a_new_boot(tmp_path):
    first = box(tmp_path)
    first.append_many(["a", "b"])
    first.close()
    second = box(tmp_path)
    assert second.boot_id != first.boot_id
    assert second.append("c") == 1  # a new boot restarts its sequence
    b1 = second.next_batch(0)
    assert (b1.boot, [json.loads(r.data) for r in b1.records]) == (first.boot_id, ["a", "b"])  # one boot per batch
    b2 = second.next_batch(b1.last_id)
    assert (b2.boot, b2.floor, [r.seq for r in b2.records]) == (second.boot_id, 1, [1])
    second.ack(first.boot_id, 2)
    assert second._db.execute("SELECT boot FROM boots").fetchall() == [(second.boot_id,)]


def test_reject_policy_raises_and_counts_and_keeps_everything(tmp_path):
    b = box(tmp_path, max_rows=3, on_full=OutboxPolicy.REJECT)
    b.append_many([1, 2, 3])
    with pytest.raises(OutboxFullError, match="full"):
        b.append(4)
    with pytest.raises(OutboxFullError):
        b.append_many([5, 6, 7, 8])  # larger than the whole quota
    s = b.stats()
    assert (s.rows, s.rejected, s.dropped) == (3, 5, 0)
    assert [json.loads(r.data) for r in b.next_batch(0).records] == [1, 2, 3]
    assert b.ack(b.boot_id, 1) == 1
    assert b.append(9) == 4  # room again after an ack; the refused appends consumed no sequence
    assert [json.loads(r.data) for r in b.next_batch(0).records] == [2, 3, 9]


def test_drop_oldest_drops_low_priority_first_and_counts(tmp_path):
    b = box(tmp_path, max_rows=4, on_full=OutboxPolicy.DROP_OLDEST)
    b.append("h1", priority=Priority.HIGH)
    b.append("l1", priority=Priority.LOW)
    b.append("n1", priority=Priority.NORMAL)
    b.append("l2", priority=Priority.LOW)
    b.append("n2", priority=Priority.NORMAL)  # drops l1 (lowest priority, oldest)
    b.append("n3", priority=Priority.NORMAL)  # drops l2
    b.append("n4", priority=Priority.NORMAL)  # drops n1 (no LOW left; oldest NORMAL)
    assert [json.loads(r.data) for r in b.next_batch(0).records] == ["h1", "n2", "n3", "n4"]
    with pytest.raises(OutboxFullError, match="priority"):
        b.append("l3", priority=Priority.LOW)  # may not push out NORMAL/HIGH records
    s = b.stats()
    assert (s.rows, s.dropped, s.rejected, s.appended) == (4, 3, 1, 7)


@pytest.mark.parametrize("policy", [OutboxPolicy.DROP_OLDEST, OutboxPolicy.REJECT])
def test_byte_quota_covers_the_whole_footprint_on_disk(tmp_path, policy):
    """max_bytes bounds database + WAL + WAL index, measured on disk after every append."""
    b = box(tmp_path, max_bytes=512 * 1024, on_full=policy)
    refused, biggest = 0, 0
    for i in range(800):
        try:
            b.append({"i": i, "pad": "x" * 900})
        except OutboxFullError:
            refused += 1
        biggest = max(biggest, b.stats().file_bytes)
    s = b.stats()
    assert biggest <= 512 * 1024
    assert s.appended + s.rejected == 800 and s.rejected == refused
    assert s.rows == s.appended - s.dropped and s.rows > 200  # the quota is used, not wasted
    if policy is OutboxPolicy.DROP_OLDEST:
        assert (s.rejected, s.dropped) == (0, 800 - s.rows)
        assert json.loads(b.next_batch(0, max_records=1).records[0].data)["i"] == s.dropped  # the oldest went
    else:
        assert s.dropped == 0 and refused == 800 - s.rows
    with pytest.raises(OutboxFullError, match="max_record_bytes"):
        b.append("y" * (600 * 1024))


def _free(folder) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def test_drop_oldest_runs_before_a_1mib_disk_fills(tiny_disk):
    """The disk, not max_bytes, is the limit here: the policy still runs, and the disk never fills."""
    disk = tiny_disk("1m")
    b = Outbox(OutboxConfig(path=disk / "outbox.db", on_full=OutboxPolicy.DROP_OLDEST))
    lowest = 1 << 30
    for i in range(2500):
        b.append({"i": i, "pad": "x" * 200})
        lowest = min(lowest, _free(disk))
    s = b.stats()
    assert (s.appended, s.rejected) == (2500, 0) and s.dropped > 0 and s.rows == 2500 - s.dropped
    assert lowest >= b.config.reserve_bytes // 2  # only one commit's WAL pages dip into the reserve
    batch = b.next_batch(0, max_records=100)
    assert json.loads(batch.records[0].data)["i"] == s.dropped  # the oldest ones went
    assert b.ack(batch.boot, batch.last_seq) == 100  # acks commit on the "full" disk


def test_reject_on_a_full_disk_counts_and_persists_every_refusal(tiny_disk):
    disk = tiny_disk("1m")
    b = Outbox(OutboxConfig(path=disk / "outbox.db", on_full=OutboxPolicy.REJECT))
    refused = 0
    for i in range(2500):
        try:
            b.append({"i": i, "pad": "x" * 200})
        except OutboxFullError as exc:
            assert "disk" in str(exc)
            refused += 1
    s = b.stats()
    assert refused > 0 and (s.rejected, s.dropped, s.appended + s.rejected) == (refused, 0, 2500)
    b.close()
    assert Outbox(OutboxConfig(path=disk / "outbox.db")).stats().rejected == refused  # on disk, not in memory


def test_an_ack_on_a_full_disk_is_kept_and_its_records_are_not_sent_again(tiny_disk):
    disk = tiny_disk("1m")
    b = Outbox(OutboxConfig(path=disk / "outbox.db", on_full=OutboxPolicy.REJECT))
    try:
        for i in range(5000):
            b.append({"i": i, "pad": "x" * 200})
    except OutboxFullError:
        pass
    fill_disk(disk)  # another process takes the rest, the reserve included
    rows = b.stats().rows
    batch = b.next_batch(0, max_records=50)
    committed = b.ack(batch.boot, batch.last_seq)
    assert committed in (0, 50)  # 0: remembered until the disk has room
    assert b.next_batch(0).records[0].seq == batch.last_seq + 1  # acked records are not sent again
    assert b.next_batch(0).floor == batch.last_seq + 1
    with pytest.raises(OutboxFullError):
        b.append({"more": 1})
    (disk / "ballast").unlink()
    b.append({"more": 2})  # space again: the remembered ack and the refusal counter are committed
    b.close()
    s = Outbox(OutboxConfig(path=disk / "outbox.db")).stats()
    assert (s.rows, s.acked) == (rows - 50 + 1, 50) and s.rejected >= 1


def test_no_room_to_create_the_outbox_disables_it_until_space_returns(tiny_disk, monkeypatch):
    """A full disk and no outbox file yet used to fail the constructor (and with it sync)."""
    import edge_sdk.runtime.sync.outbox as outbox_module

    monkeypatch.setattr(outbox_module, "REOPEN_S", 0.0, raising=False)
    disk = tiny_disk("1m")
    fill_disk(disk)
    b = Outbox(OutboxConfig(path=disk / "outbox.db"))
    assert b.disabled is not None and "disk is full" in b.disabled
    with pytest.raises(OutboxFullError, match="disabled: the disk is full"):
        b.append({"lost": 1})
    assert b.next_batch(0) is None and b.ack("other-boot", 5) == 0
    s = b.stats()
    assert (s.rows, s.rejected, s.disabled) == (0, 1, b.disabled)
    (disk / "ballast").unlink()
    seq = b.append({"kept": 1})  # opens itself: no restart needed
    assert b.disabled is None and seq == 1
    assert b.next_batch(0).records[0].data == '{"kept":1}'
    b.close()
    s = Outbox(OutboxConfig(path=disk / "outbox.db")).stats()
    assert (s.rows, s.appended, s.rejected, s.disabled) == (1, 1, 1, None)  # the refusal is on disk too


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_outbox_is_moved_aside_and_recreated(tmp_path, damage):
    path = tmp_path / "outbox.db"
    first = Outbox(OutboxConfig(path=path))
    first.append_many([{"i": i, "pad": "p" * 500} for i in range(200)])
    first.close()
    data = path.read_bytes()
    path.write_bytes(os.urandom(8192) if damage == "garbage" else data[:100])
    b = Outbox(OutboxConfig(path=path))
    assert b.recovered is not None and "corrupt" in b.recovered["moved_to"]
    assert os.path.exists(b.recovered["moved_to"])  # kept for inspection
    assert b.append({"after": 1}) == 1 and b.stats().rows == 1


def test_bad_records_are_sync_errors_and_store_nothing(tmp_path):
    b = box(tmp_path)
    for bad in (object(), float("nan"), {"a": {1, 2}}):
        with pytest.raises(SyncError, match="JSON"):
            b.append(bad)
    with pytest.raises(SyncError, match="kind"):
        b.append(1, kind="")
    with pytest.raises(ValueError):
        b.append(1, priority=7)
    assert b.stats().appended == 0 and b.append(1) == 1


def test_acked_space_is_given_back(tmp_path):
    b = box(tmp_path)
    b.append_many([{"blob": "z" * 1000, "i": i} for i in range(3000)])
    db = b._db
    pages_full = db.execute("PRAGMA page_count").fetchone()[0]
    b.ack(b.boot_id, 3000)
    pages_after = db.execute("PRAGMA page_count").fetchone()[0]
    assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0
    assert pages_after < pages_full / 10


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from edge_sdk.runtime.sync.outbox import Outbox, OutboxConfig
    box = Outbox(OutboxConfig(path=Path(sys.argv[1])))
    print("boot", box.boot_id, flush=True)
    i = 0
    while True:
        i += 1
        seq = box.append({"i": i, "pad": "p" * (i % 300)})
        print(seq, flush=True)   # printed only after append() returned
""")


def test_records_survive_sigkill_of_the_writer(tmp_path):
    path = tmp_path / "outbox.db"
    rng = random.Random(7)
    promised: dict[str, int] = {}
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        boot = proc.stdout.readline().split()[1]
        last = 0
        for _ in range(rng.randint(5, 120)):
            last = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # The writer runs ahead of our reads: what it printed before the kill is promised too.
        promised[boot] = max([last, *(int(line) for line in proc.stdout.read().split())])
        proc.stdout.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for boot, last in promised.items():
            seqs = [s for (s,) in db.execute("SELECT seq FROM records WHERE boot = ? ORDER BY seq", (boot,))]
            # every promised record is there, contiguous; at most one more was committed unprinted
            assert seqs[:last] == list(range(1, last + 1))
            assert len(seqs) - last in (0, 1)
        rows = db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        assert db.execute("SELECT value FROM counters WHERE name = 'rows'").fetchone()[0] == rows
    reopened = Outbox(OutboxConfig(path=path))
    assert reopened.stats().rows == rows
