"""Outbox → MQTT telemetry uploader, and the wire format it shares with cloud ingest.

Wire format (UTF-8 JSON, QoS 1, not retained):

* ``<prefix>/<device>/telemetry``:
  ``{"v": 1, "boot": "<boot id>", "floor": F, "records": [[seq, ts, priority, kind, data], …]}``
  — records of one boot in ascending ``seq``; ``floor`` is the smallest seq of that boot still
  on the device (all below were acked or dropped by quota, so ingest counts them as settled).
  The device id is taken from the topic, which the broker's ACL ties to the client.
* ``<prefix>/<device>/telemetry/ack``: ``{"v": 1, "boot": "<boot id>", "upto": N}`` — ingest has
  committed every record of that boot with ``floor ≤ seq ≤ N``.

Uploader behaviour: records leave the outbox only when an ack arrives (a broker PUBACK is not
durable), and an ack deletes only what was sent: its ``upto`` is clamped to the highest
sequence of that boot the uploader published (a forged or confused ack beyond it is counted
in ``clamped_acks``). Losses (quota drops, refused appends) reach the cloud twice: in the
reported state, and as an ``outbox.loss`` record whenever the persisted totals grew. Up to ``window`` batches are in flight; if the oldest gets no ack within
``ack_timeout_s``, or after every reconnect, everything unacked is sent again from the start of
the outbox (ingest drops the duplicates by ``(device, boot, seq)``). Nothing is published while
disconnected, so an outage only grows the outbox on disk, never memory.

Usage::

    up = TelemetryUploader(outbox, transport, Topics("plant1"), "cam-7", twin=sync_client.twin)
    up.start()             # subscribes to the ack topic, starts the upload thread
    outbox.append({...}); up.notify()     # notify() just wakes the thread early
    up.stop()
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from edge_sdk.config import StrictModel, json_object
from edge_sdk.errors import SyncError

from .outbox import MAX_RECORD_BYTES, Batch, Outbox, Priority
from .topics import Topics, check_device
from .transport import Message
from .twin import Twin

log = logging.getLogger(__name__)

WIRE_VERSION = 1
MAX_RECORDS_PER_BATCH = 10_000
#: Largest telemetry batch on the wire (a batch holds at most ``batch_bytes`` plus one record).
MAX_BATCH_BYTES = 2 * MAX_RECORD_BYTES + 64 * 1024
LOSS_KIND = "outbox.loss"
BOOT_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")  # what a boot id may be


# -- wire format ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WireRecord:
    seq: int
    ts: float
    priority: int
    kind: str
    data: Any


@dataclass(frozen=True)
class WireBatch:
    boot: str
    floor: int
    records: tuple[WireRecord, ...]


def encode_batch(batch: Batch) -> bytes:
    """Serialise an outbox batch; record data is spliced in as the JSON text already stored."""
    head = json.dumps({"v": WIRE_VERSION, "boot": batch.boot, "floor": batch.floor})[:-1]
    body = ",".join(
        f"[{r.seq},{json.dumps(r.ts)},{r.priority},{json.dumps(r.kind)},{r.data}]" for r in batch.records
    )
    return f'{head}, "records": [{body}]}}'.encode()


def _int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SyncError(f"{what} must be an integer ≥ {minimum}, got {value!r}")
    return value


def _boot(value: object) -> str:
    if not isinstance(value, str) or not BOOT_ID.fullmatch(value):
        raise SyncError(f"boot id must be 1-64 characters of [0-9A-Za-z_-], got {value!r:.80}")
    return value


def _object(payload: bytes, what: str) -> dict:
    obj = json_object(payload, what, SyncError)
    if obj.get("v") != WIRE_VERSION:
        raise SyncError(f"{what} has unsupported version {obj.get('v')!r} (expected {WIRE_VERSION})")
    return obj


def decode_batch(payload: bytes) -> WireBatch:
    """Parse and check a telemetry batch; any defect raises :class:`SyncError` naming it."""
    if len(payload) > MAX_BATCH_BYTES:
        raise SyncError(f"telemetry batch of {len(payload)} bytes is oversized (limit {MAX_BATCH_BYTES} bytes)")
    obj = _object(payload, "telemetry batch")
    boot = _boot(obj.get("boot"))
    floor = _int(obj.get("floor"), "floor", 1)
    raw = obj.get("records")
    if not isinstance(raw, list) or not raw or len(raw) > MAX_RECORDS_PER_BATCH:
        raise SyncError(f"records must be a list of 1-{MAX_RECORDS_PER_BATCH} entries")
    records = []
    last = floor - 1
    for i, item in enumerate(raw):
        if not isinstance(item, list) or len(item) != 5:
            raise SyncError(f"record {i} must be [seq, ts, priority, kind, data]")
        seq, ts, prio, kind, data = item
        # Fast paths first (ingest decodes every record; building the messages costs more than the checks).
        if type(seq) is not int or seq <= last:
            seq = _int(seq, f"record {i} seq", last + 1)  # ascending, and never below the floor
        if type(ts) is not float and (isinstance(ts, bool) or not isinstance(ts, int)) or not math.isfinite(ts):
            raise SyncError(f"record {i} ts must be a finite number, got {ts!r}")
        if type(prio) is not int or prio < 0:
            prio = _int(prio, f"record {i} priority", 0)
        if type(kind) is not str or not kind or len(kind) > 128:
            raise SyncError(f"record {i} kind must be a non-empty string")
        records.append(WireRecord(seq, float(ts), prio, kind, data))
        last = seq
    return WireBatch(boot, floor, tuple(records))


def encode_ack(boot: str, upto: int) -> bytes:
    return json.dumps({"v": WIRE_VERSION, "boot": boot, "upto": upto}).encode()


def decode_ack(payload: bytes) -> tuple[str, int]:
    if len(payload) > 1024:
        raise SyncError(f"telemetry ack of {len(payload)} bytes is oversized")
    obj = _object(payload, "telemetry ack")
    return _boot(obj.get("boot")), _int(obj.get("upto"), "upto", 0)


# -- uploader ------------------------------------------------------------------------------------
class UploaderConfig(StrictModel):
    batch_records: int = Field(500, ge=1, le=MAX_RECORDS_PER_BATCH)
    batch_bytes: int = Field(256 * 1024, ge=1024, le=MAX_RECORD_BYTES)
    #: batches sent and not yet acked by ingest before the uploader waits
    window: int = Field(8, ge=1)
    #: resend everything unacked if the oldest batch in flight got no ack for this long
    ack_timeout_s: float = Field(10.0, gt=0)
    idle_poll_s: float = Field(0.5, gt=0)
    #: publish changed outbox/upload figures to the twin at most this often (each publish
    #: re-sends the whole retained reported state, so not on every record)
    report_interval_s: float = Field(5.0, gt=0)


@dataclass
class _InFlight:
    boot: str
    last_seq: int
    sent: float


class TelemetryUploader:
    """Moves outbox records to ``<prefix>/<device>/telemetry``; deletes them on ingest acks.

    ``transport`` is anything with ``subscribe(filter, handler, qos)``, ``publish(topic,
    payload, qos=…)``, ``connected`` and ``connects`` (see :mod:`.transport`). With a ``twin``
    (the sync client's :class:`~.twin.Twin`), :meth:`report` is published as
    ``reported.telemetry`` whenever it changed, at most every ``report_interval_s`` and once more
    on :meth:`stop`, so quota drops and rejections reach the cloud.
    """

    def __init__(self, outbox: Outbox, transport, topics: Topics, device: str, config: UploaderConfig | None = None,
                 twin: Twin | None = None) -> None:
        self.outbox = outbox
        self.transport = transport
        self.config = config or UploaderConfig()
        self.device = check_device(device)
        self.topic = topics.telemetry(device)
        self.ack_topic = topics.telemetry_ack(device)
        self._acks: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: deque[_InFlight] = deque()
        self._cursor = 0  # outbox id of the last record sent
        self._sent: dict[str, int] = {}  # boot -> highest seq published (what an ack may cover)
        self._loss_reported = (0, 0)  # (dropped, rejected) totals last sent as a record
        self._seen_connects = -1
        self.twin = twin
        self._reported: dict | None = None
        self._reported_at = -math.inf
        #: counters (part of :meth:`report`)
        self.batches_sent = 0
        self.records_sent = 0
        self.resends = 0
        self.acked = 0
        self.bad_acks = 0
        self.clamped_acks = 0
        self.errors = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self.transport.subscribe(self.ack_topic, self._on_ack, qos=1)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"telemetry-{self.device}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def notify(self) -> None:
        """Wake the upload thread now (e.g. right after an append)."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def report(self) -> dict[str, Any]:
        """Outbox and upload figures for the device twin (``reported.telemetry``)."""
        s = self.outbox.stats()
        return {
            "boot": s.boot_id, "queued_rows": s.rows, "queued_bytes": s.bytes, "file_bytes": s.file_bytes,
            "appended": s.appended, "acked": s.acked, "dropped": s.dropped, "rejected": s.rejected,
            "batches_sent": self.batches_sent, "resends": self.resends, "bad_acks": self.bad_acks,
            "clamped_acks": self.clamped_acks, "oversized_messages": getattr(self.transport, "oversized", 0),
            "errors": self.errors, "in_flight": self.in_flight, "recovered": self.outbox.recovered,
            "disabled": s.disabled,
        }

    # -- network thread ------------------------------------------------------------------------
    def _on_ack(self, message: Message) -> None:
        try:
            self._acks.put(decode_ack(message.payload))
        except SyncError as exc:
            self.bad_acks += 1
            log.warning("ignoring malformed ack on %s: %s", message.topic, exc)
            return
        self._wake.set()

    # -- upload thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self._step()
            except Exception:  # storage or transport trouble: keep the device running, retry later
                self.errors += 1
                log.exception("telemetry upload step failed")
                busy = False
            self._report()
            if not busy:
                self._wake.wait(self.config.idle_poll_s)
                self._wake.clear()
        self._apply_acks()
        self._report(force=True)

    def _report(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._reported_at < self.config.report_interval_s:
            return
        try:
            report = self.report()
        except Exception:  # storage trouble: the figures wait for the next round
            self.errors += 1
            log.exception("telemetry figures for the twin failed")
            return
        self._reported_at = time.monotonic()
        if self.twin is not None and report != self._reported:
            self._reported = report
            self.twin.set(telemetry=report)
        self._record_losses(report)

    def _record_losses(self, report: dict[str, Any]) -> None:
        """Append an ``outbox.loss`` record when the persisted loss totals grew, so the cloud's
        telemetry store holds them too (essential: it may use the disk reserve, skips the quota)."""
        totals = (report["dropped"], report["rejected"])
        if totals == self._loss_reported or totals == (0, 0):
            return
        try:
            self.outbox.append_many([{"dropped": totals[0], "rejected": totals[1], "boot": report["boot"]}],
                                    kind=LOSS_KIND, priority=Priority.HIGH, essential=True)
        except SyncError as exc:  # the twin has the figures; the record waits for room
            log.warning("could not record outbox losses: %s", exc)
            return
        self._loss_reported = totals

    def _apply_acks(self) -> None:
        while True:
            try:
                boot, upto = self._acks.get_nowait()
            except queue.Empty:
                return
            sent = self._sent.get(boot, 0)
            if upto > sent:  # never delete what was not sent: the ack is forged or confused
                self.clamped_acks += 1
                log.warning("telemetry ack for %s up to %d, but only %d were sent: clamped", boot, upto, sent)
                upto = sent
            if upto:
                self.acked += self.outbox.ack(boot, upto)
            self._inflight = deque(f for f in self._inflight if not (f.boot == boot and f.last_seq <= upto))

    def _step(self) -> bool:
        """One round; True if it sent something (so the loop goes on without sleeping)."""
        self._apply_acks()
        if not self.transport.connected:
            return False
        now = time.monotonic()
        connects = self.transport.connects
        if connects != self._seen_connects:
            self._seen_connects = connects
            self._rewind("reconnected")
        elif self._inflight and now - self._inflight[0].sent > self.config.ack_timeout_s:
            self._rewind(f"no ack for {self.config.ack_timeout_s:g}s")
            self.resends += 1
        if len(self._inflight) >= self.config.window:
            return False
        batch = self.outbox.next_batch(self._cursor, self.config.batch_records, self.config.batch_bytes)
        if batch is None:
            return False
        if not self.transport.publish(self.topic, encode_batch(batch), qos=1):
            return False
        self._cursor = batch.last_id
        self._sent[batch.boot] = max(self._sent.get(batch.boot, 0), batch.last_seq)
        self._inflight.append(_InFlight(batch.boot, batch.last_seq, now))
        self.batches_sent += 1
        self.records_sent += len(batch.records)
        return True

    def _rewind(self, why: str) -> None:
        if self._cursor:
            log.info("telemetry: resending unacked records (%s)", why)
        self._cursor = 0
        self._inflight.clear()
