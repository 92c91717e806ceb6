"""Staged rollouts: a release goes out in waves and halts itself when devices fail.

A rollout of ``model`` ``version`` to a fleet is planned once, from the fleet view (the devices
that report ``model``, optionally only those matching a label group), into waves: explicit
canary devices, then cumulative percentages (``20%``: a fifth of the devices have been touched
once this wave is out) or label groups (``site=plant1``: every remaining device with that label).
For the current wave the controller writes the per-device desired state (``model`` at
``version``; the rest of that device's desired state is kept) and then watches the devices'
retained reported state. A device **passes** once it has reported the release active (devices
activate only after the self-test passed) for ``soak_s`` with its error rate and p99 latency
within bounds; it **fails** when its sync or self-test of the release failed, a bound is broken,
or it is not active within ``wave_timeout_s``. When the failure share of a wave exceeds
``max_failure`` the rollout **halts** and writes back, for every device it touched, the desired
state it found there with ``model`` at the version the device ran before; when every device of a
wave has passed (or too few failed) the next wave starts; after the last it is **done**.

State lives in a SQLite file (:class:`RolloutStore`), committed before each action it describes,
so a controller killed at any point resumes where it was (``rollout resume``): desired states of
the current wave are written again (retained and idempotent), and a halt or abort whose reverts
were cut short finishes them. ``pause`` stops a running controller at its next tick; ``abort``
reverts every touched device and ends the rollout. Another process may pause or abort while a
controller runs: SQLite serialises them, and a controller re-checks the state after each write.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import re
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from edge_sdk.config import StrictModel, describe_validation_error
from edge_sdk.errors import ConfigError, SyncError
from edge_sdk.runtime.sync.topics import TopicKind, Topics, check_device, check_level
from edge_sdk.runtime.sync.transport import Transport
from edge_sdk.runtime.sync.desired import DesiredState

from .connection import collect_retained
from .fleet import DeviceReport, FleetView, every_device, read_fleet

log = logging.getLogger(__name__)


class RolloutState(str, enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"  # a wave failed; touched devices were set back
    ABORTED = "aborted"  # stopped by the operator; touched devices were set back
    DONE = "done"


class DeviceStep(str, enum.Enum):
    PENDING = "pending"  # in a later wave
    TOUCHED = "touched"  # desired state written; waiting for a verdict
    PASSED = "passed"
    FAILED = "failed"
    REVERTED = "reverted"  # desired state set back after a halt or abort


# -- the plan ---------------------------------------------------------------------------------------
class HealthBounds(StrictModel):
    """When a device that runs the release counts as healthy."""

    max_error_rate: float = Field(0.05, ge=0.0, le=1.0, description="failed calls / calls since the release became active")
    max_p99_ms: float | None = Field(None, gt=0, description="device-measured p99 latency bound")
    min_calls: int = Field(0, ge=0, description="calls needed before error rate and p99 are judged")
    soak_s: float = Field(60.0, ge=0, description="time a device must run the release within bounds")
    wave_timeout_s: float = Field(900.0, gt=0, description="a device not active (and soaked) by then fails")


class Wave(StrictModel):
    """One wave: named devices, a cumulative percentage of the rollout's devices, or a label group."""

    devices: list[str] | None = None
    percent: float | None = Field(None, gt=0, le=100)
    group: dict[str, str] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Wave:
        if sum(x is not None for x in (self.devices, self.percent, self.group)) != 1:
            raise ValueError("a wave is either devices, a percentage or a label group")
        return self

    @classmethod
    def parse(cls, text: str) -> Wave:
        """``"20%"``, ``"site=plant1[,profile=rk3588]"`` or ``"cam-1,cam-2"`` (devices)."""
        text = text.strip()
        if re.fullmatch(r"\d+(\.\d+)?%", text):
            percent = float(text[:-1])
            if not 0 < percent <= 100:
                raise ConfigError(f"wave {text!r}: a percentage must be above 0 and at most 100")
            return cls(percent=percent)
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise ConfigError(f"wave {text!r}: expected N%, label=value or device ids")
        if all("=" in p for p in parts):
            from .fleet import parse_group

            return cls(group=parse_group(parts))
        return cls(devices=[check_device(p) for p in parts])

    def describe(self) -> str:
        if self.devices is not None:
            return ",".join(self.devices)
        return f"{self.percent:g}%" if self.percent is not None else ",".join(f"{k}={v}" for k, v in self.group.items())


class RolloutSpec(StrictModel):
    """What to roll out, to whom, in which waves, and when to stop."""

    model: str
    version: int = Field(ge=1)
    waves: list[Wave] = Field(min_length=1)
    group: dict[str, str] = Field(default_factory=dict, description="only devices with these labels")
    store: str | None = Field(None, description="chunk store of the release (default: what each device's desired state names)")
    max_failure: float = Field(0.0, ge=0.0, le=1.0, description="failure share of a wave above which the rollout halts")
    bounds: HealthBounds = HealthBounds()

    @field_validator("model")
    @classmethod
    def _model_level(cls, value: str) -> str:
        try:
            return check_level(value, "model name")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def build(cls, **fields: Any) -> RolloutSpec:
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error("rollout", exc)) from None


def _order_key(rollout_id: str, device: str) -> str:
    """A stable shuffle: percentage waves spread over sites rather than following device names."""
    return hashlib.sha256(f"{rollout_id}/{device}".encode()).hexdigest()


def plan_waves(spec: RolloutSpec, view: FleetView, rollout_id: str) -> list[list[str]]:
    """Assign the rollout's devices to waves; raises :class:`ConfigError` for a wave that names an
    unknown device or a group no device of the rollout matches."""
    population = [d.device for d in view.select(spec.model, spec.group)]
    if not population:
        raise ConfigError(f"no device of fleet {view.fleet!r} reports model {spec.model!r}"
                          + (f" with labels {spec.group}" if spec.group else ""))
    members = set(population)
    remaining = sorted(population, key=lambda d: _order_key(rollout_id, d))
    assigned: list[list[str]] = []
    done = 0
    for wave in spec.waves:
        if wave.devices is not None:
            unknown = [d for d in wave.devices if d not in members]
            if unknown:
                raise ConfigError(f"wave {wave.describe()!r}: {', '.join(unknown)} "
                                  f"{'is' if len(unknown) == 1 else 'are'} not a device of this rollout "
                                  f"(devices that report model {spec.model!r})")
            chosen = [d for d in wave.devices if d in remaining]
        elif wave.percent is not None:
            target = min(len(population), math.ceil(len(population) * wave.percent / 100))
            chosen = remaining[: max(0, target - done)]
        else:
            matching = {d.device for d in view.select(spec.model, {**spec.group, **wave.group})}
            if not matching:
                raise ConfigError(f"wave {wave.describe()!r}: no device of this rollout has these labels")
            chosen = [d for d in remaining if d in matching]
        remaining = [d for d in remaining if d not in chosen]
        done += len(chosen)
        if chosen:
            assigned.append(sorted(chosen))
    return assigned


# -- durable state ----------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, fleet TEXT NOT NULL, prefix TEXT NOT NULL, spec TEXT NOT NULL,
    state TEXT NOT NULL, wave INTEGER NOT NULL, waves INTEGER NOT NULL, reason TEXT,
    created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    rollout TEXT NOT NULL, device TEXT NOT NULL, wave INTEGER NOT NULL, step TEXT NOT NULL,
    previous_desired BLOB, previous_version INTEGER, touched REAL, active_since REAL,
    calls0 INTEGER, errors0 INTEGER, verdict TEXT,
    PRIMARY KEY (rollout, device)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rollout TEXT NOT NULL, at REAL NOT NULL, message TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Rollout:
    id: str
    fleet: str
    prefix: str
    spec: RolloutSpec
    state: RolloutState
    wave: int  # index of the current wave
    waves: int
    reason: str | None
    created: float
    updated: float


@dataclass(frozen=True)
class DeviceRecord:
    device: str
    wave: int
    step: DeviceStep
    previous_desired: bytes | None
    previous_version: int | None
    touched: float | None
    active_since: float | None
    calls0: int | None
    errors0: int | None
    verdict: str | None


class RolloutStore:
    """Rollouts, their devices and events in one SQLite file (WAL; several processes may share it)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"rollout state {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def _tx(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._db)
                self._db.execute("COMMIT")
                return result
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise SyncError(f"rollout state {self.path}: {exc}") from None

    def create(self, fleet: str, prefix: str, spec: RolloutSpec, waves: list[list[str]], rollout_id: str) -> Rollout:
        now = time.time()

        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO rollouts VALUES (?, ?, ?, ?, ?, 0, ?, NULL, ?, ?)",
                       (rollout_id, fleet, prefix, spec.model_dump_json(), RolloutState.RUNNING.value, len(waves), now, now))
            db.executemany("INSERT INTO devices (rollout, device, wave, step) VALUES (?, ?, ?, ?)",
                           [(rollout_id, d, i, DeviceStep.PENDING.value) for i, wave in enumerate(waves) for d in wave])
            db.execute("INSERT INTO events (rollout, at, message) VALUES (?, ?, ?)",
                       (rollout_id, now, f"planned {spec.model} v{spec.version}: "
                                         + " → ".join(f"{len(w)} devices" for w in waves)))

        self._tx(work)
        return self.get(rollout_id)

    def get(self, rollout_id: str) -> Rollout:
        row = self._db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        if row is None:
            known = [r for (r,) in self._db.execute("SELECT id FROM rollouts ORDER BY created DESC LIMIT 5")]
            raise ConfigError(f"no rollout {rollout_id!r} in {self.path}" + (f" (recent: {', '.join(known)})" if known else ""))
        rid, fleet, prefix, spec, state, wave, waves, reason, created, updated = row
        return Rollout(rid, fleet, prefix, RolloutSpec.model_validate_json(spec), RolloutState(state), wave, waves,
                       reason, created, updated)

    def list(self) -> list[Rollout]:
        return [self.get(rid) for (rid,) in self._db.execute("SELECT id FROM rollouts ORDER BY created")]

    def devices(self, rollout_id: str, wave: int | None = None) -> list[DeviceRecord]:
        sql = "SELECT device, wave, step, previous_desired, previous_version, touched, active_since, calls0, errors0, " \
              "verdict FROM devices WHERE rollout = ?" + (" AND wave = ?" if wave is not None else "") + " ORDER BY wave, device"
        args = (rollout_id,) if wave is None else (rollout_id, wave)
        return [DeviceRecord(d, w, DeviceStep(s), p, pv, t, a, c, e, v) for d, w, s, p, pv, t, a, c, e, v in self._db.execute(sql, args)]

    def events(self, rollout_id: str) -> list[tuple[float, str]]:
        return list(self._db.execute("SELECT at, message FROM events WHERE rollout = ? ORDER BY id", (rollout_id,)))

    def event(self, rollout_id: str, message: str) -> None:
        log.info("rollout %s: %s", rollout_id, message)
        self._tx(lambda db: db.execute("INSERT INTO events (rollout, at, message) VALUES (?, ?, ?)",
                                       (rollout_id, time.time(), message)))

    def set_state(self, rollout_id: str, state: RolloutState, reason: str | None = None,
                  only_from: tuple[RolloutState, ...] | None = None) -> bool:
        """Move to ``state`` (only from one of ``only_from`` when given); returns whether it moved."""

        def work(db: sqlite3.Connection) -> bool:
            current = RolloutState(db.execute("SELECT state FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()[0])
            if only_from is not None and current not in only_from:
                return False
            db.execute("UPDATE rollouts SET state = ?, reason = coalesce(?, reason), updated = ? WHERE id = ?",
                       (state.value, reason, time.time(), rollout_id))
            db.execute("INSERT INTO events (rollout, at, message) VALUES (?, ?, ?)",
                       (rollout_id, time.time(), f"{state.value}" + (f": {reason}" if reason else "")))
            return True

        self.get(rollout_id)
        return self._tx(work)

    def touch(self, rollout_id: str, device: str, previous: bytes | None, previous_version: int | None) -> bool:
        """Record what a device had before it is touched — only while the rollout runs."""

        def work(db: sqlite3.Connection) -> bool:
            state = db.execute("SELECT state FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()[0]
            if state != RolloutState.RUNNING.value:
                return False
            db.execute("UPDATE devices SET step = ?, previous_desired = ?, previous_version = ?, touched = ? "
                       "WHERE rollout = ? AND device = ? AND step = ?",
                       (DeviceStep.TOUCHED.value, previous, previous_version, time.time(), rollout_id, device,
                        DeviceStep.PENDING.value))
            return True

        return self._tx(work)

    def update_device(self, rollout_id: str, device: str, **fields: Any) -> None:
        if "step" in fields:
            fields["step"] = DeviceStep(fields["step"]).value
        assignments = ", ".join(f"{k} = ?" for k in fields)
        self._tx(lambda db: db.execute(f"UPDATE devices SET {assignments} WHERE rollout = ? AND device = ?",
                                       (*fields.values(), rollout_id, device)))

    def advance(self, rollout_id: str, wave: int) -> None:
        self._tx(lambda db: db.execute("UPDATE rollouts SET wave = ?, updated = ? WHERE id = ?", (wave, time.time(), rollout_id)))


# -- desired state ----------------------------------------------------------------------------------
def desired_with(previous: bytes | None, model: str, version: int, store: str | None = None) -> bytes:
    """A device's desired state ``previous`` with ``model`` at ``version`` (from ``store``, else the
    store that entry named before), every other model and the policy kept."""
    current = DesiredState.from_payload(previous or b"", "desired state") or DesiredState()
    entry = current.models.get(model)
    return current.with_model(model, version, store or (entry.store if entry is not None else None)).to_payload()


def desired_restored(record: DeviceRecord, model: str) -> bytes:
    """What to write back to a touched device: its earlier desired state, with ``model`` at the
    version it ran before the rollout (when it reported one)."""
    if record.previous_version is None:
        return record.previous_desired or b""  # nothing to go back to: its own desired state, or none
    try:
        return desired_with(record.previous_desired, model, record.previous_version)
    except ConfigError:  # an unreadable earlier desired state: the previous release alone
        return desired_with(None, model, record.previous_version)


# -- the controller -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str


def judge(report: DeviceReport | None, spec: RolloutSpec, record: DeviceRecord, now: float,
          store: RolloutStore, rollout_id: str) -> Verdict | None:
    """Pass, fail, or (None) not yet, for one touched device; remembers when it became active."""
    bounds = spec.bounds
    waited = now - (record.touched or now)
    model = report.models.get(spec.model) if report is not None else None
    if model is not None and model.failed_version == spec.version:
        return Verdict(False, f"sync of v{spec.version} failed: {model.sync_reason or 'no reason given'}")
    if model is None or model.version != spec.version:
        if waited > bounds.wave_timeout_s:
            return Verdict(False, f"not active within {bounds.wave_timeout_s:g}s"
                                  + (f" (runs v{model.version})" if model and model.version else ""))
        return None
    active_since, calls0, errors0 = record.active_since, record.calls0, record.errors0
    if active_since is None:
        active_since, calls0, errors0 = now, model.calls, model.errors
        store.update_device(rollout_id, record.device, active_since=now, calls0=calls0, errors0=errors0)
    calls = (model.calls or 0) - (calls0 or 0) if model.calls is not None else None
    errors = (model.errors or 0) - (errors0 or 0) if model.errors is not None else None
    judged = calls is not None and calls >= max(1, bounds.min_calls)
    if judged and errors is not None and errors / calls > bounds.max_error_rate:
        return Verdict(False, f"error rate {errors}/{calls} = {errors / calls:.3f} > {bounds.max_error_rate:g}")
    if bounds.max_p99_ms is not None and model.p99_ms is not None and (judged or bounds.min_calls == 0) \
            and model.p99_ms > bounds.max_p99_ms:
        return Verdict(False, f"p99 {model.p99_ms:.2f} ms > {bounds.max_p99_ms:g} ms")
    if now - active_since >= bounds.soak_s:
        if bounds.min_calls and (calls or 0) < bounds.min_calls:
            if waited > bounds.wave_timeout_s:
                return Verdict(False, f"only {calls or 0} calls (needs {bounds.min_calls}) within {bounds.wave_timeout_s:g}s")
            return None
        return Verdict(True, f"active {now - active_since:.0f}s" + (f", {calls} calls" if calls is not None else ""))
    return None


class RolloutController:
    """Drives one rollout over a connected :class:`Transport` (see :func:`run_rollout`)."""

    def __init__(self, store: RolloutStore, transport: Transport, rollout_id: str,
                 clock: Callable[[], float] = time.time, stale_after_s: float = 300.0) -> None:
        self.store = store
        self.transport = transport
        self.rollout_id = rollout_id
        self.clock = clock
        self.stale_after_s = stale_after_s
        rollout = store.get(rollout_id)
        self.topics = Topics(rollout.fleet, rollout.prefix)
        self._rewritten = False

    def _publish_desired(self, device: str, payload: bytes) -> None:
        topic = self.topics.desired(device)
        if not self.transport.publish(topic, payload, qos=1, retain=True, wait=30.0):
            raise SyncError(f"broker did not acknowledge desired state at {topic}")

    def _current_desired(self) -> dict[str, bytes]:
        found = collect_retained(self.transport, self.topics, every_device(self.topics, "desired"))
        return {d: payload for topic, payload in found.items()
                if (d := self.topics.device_of(topic, TopicKind.DEVICE_DESIRED)) is not None}

    def revert(self, rollout: Rollout) -> int:
        """Set every touched device's desired state back; returns how many were reverted."""
        reverted = 0
        for record in self.store.devices(rollout.id):
            if record.step in (DeviceStep.TOUCHED, DeviceStep.PASSED, DeviceStep.FAILED):
                self._publish_desired(record.device, desired_restored(record, rollout.spec.model))
                self.store.update_device(rollout.id, record.device, step=DeviceStep.REVERTED)
                reverted += 1
        return reverted

    def step(self, view: FleetView | None = None) -> RolloutState:
        """One tick: finish reverts, touch the current wave, judge it, halt or advance."""
        rollout = self.store.get(self.rollout_id)
        if rollout.state in (RolloutState.HALTED, RolloutState.ABORTED):
            if self.revert(rollout):
                self.store.event(rollout.id, "touched devices set back to their previous release")
            return rollout.state
        if rollout.state is not RolloutState.RUNNING:
            return rollout.state
        spec = rollout.spec
        view = view or read_fleet(self.transport, self.topics, self.stale_after_s)
        records = self.store.devices(rollout.id, rollout.wave)
        if not self._rewritten:  # after a restart: a desired state may not have reached the broker
            for record in records:
                if record.step is DeviceStep.TOUCHED:
                    self._publish_desired(record.device, desired_with(record.previous_desired, spec.model, spec.version,
                                                                      spec.store))
            self._rewritten = True
        pending = [r for r in records if r.step is DeviceStep.PENDING]
        if pending:
            desired = self._current_desired()
            for record in pending:
                report = view.devices.get(record.device)
                running = report.models.get(spec.model) if report is not None else None
                previous = desired.get(record.device)
                if not self.store.touch(rollout.id, record.device, previous, running.version if running else None):
                    return self.store.get(rollout.id).state  # paused or aborted meanwhile
                self._publish_desired(record.device, desired_with(previous, spec.model, spec.version, spec.store))
            self.store.event(rollout.id, f"wave {rollout.wave + 1}/{rollout.waves}: desired "
                                         f"{spec.model} v{spec.version} for {len(pending)} devices")
            state = self.store.get(rollout.id).state
            if state is not RolloutState.RUNNING:  # aborted while we wrote: our writes are reverted too
                return self.step(view)
            records = self.store.devices(rollout.id, rollout.wave)
        now = self.clock()
        for record in records:
            if record.step is not DeviceStep.TOUCHED:
                continue
            verdict = judge(view.devices.get(record.device), spec, record, now, self.store, rollout.id)
            if verdict is not None:
                step = DeviceStep.PASSED if verdict.passed else DeviceStep.FAILED
                self.store.update_device(rollout.id, record.device, step=step, verdict=verdict.reason)
                if not verdict.passed:
                    self.store.event(rollout.id, f"{record.device} failed: {verdict.reason}")
        records = self.store.devices(rollout.id, rollout.wave)
        failed = sum(r.step is DeviceStep.FAILED for r in records)
        if failed / len(records) > spec.max_failure:
            reason = (f"wave {rollout.wave + 1}: {failed} of {len(records)} devices failed "
                      f"(more than {spec.max_failure:.0%})")
            if self.store.set_state(rollout.id, RolloutState.HALTED, reason, only_from=(RolloutState.RUNNING,)):
                return self.step(view)
            return self.store.get(rollout.id).state
        if all(r.step in (DeviceStep.PASSED, DeviceStep.FAILED) for r in records):
            if rollout.wave + 1 >= rollout.waves:
                self.store.set_state(rollout.id, RolloutState.DONE, f"{spec.model} v{spec.version} on every wave",
                                     only_from=(RolloutState.RUNNING,))
            else:
                self.store.advance(rollout.id, rollout.wave + 1)
                self.store.event(rollout.id, f"wave {rollout.wave + 1} passed ({failed} failed)")
        return self.store.get(rollout.id).state

    def run(self, poll_s: float = 2.0, on_tick: Callable[[RolloutState], None] | None = None) -> RolloutState:
        """Tick until the rollout is done, halted, aborted or paused."""
        while True:
            state = self.step()
            if on_tick is not None:
                on_tick(state)
            if state is not RolloutState.RUNNING:
                return state
            time.sleep(poll_s)


# -- entry points (the CLI's) ------------------------------------------------------------------------
def start_rollout(store: RolloutStore, transport: Transport, topics: Topics, spec: RolloutSpec,
                  rollout_id: str | None = None, stale_after_s: float = 300.0) -> Rollout:
    """Check the release is published, plan the waves from the fleet view, and record the rollout."""
    manifest_topic = topics.manifest(spec.model, spec.version)
    if not collect_retained(transport, topics, manifest_topic):
        raise ConfigError(f"release {spec.model} v{spec.version} is not published in fleet {topics.fleet!r} "
                          f"(no retained manifest at {manifest_topic}); run `edge-sdk cloud publish` first")
    rollout_id = rollout_id or f"{spec.model}-v{spec.version}-{uuid.uuid4().hex[:6]}"
    check_level(rollout_id, "rollout id")
    view = read_fleet(transport, topics, stale_after_s)
    waves = plan_waves(spec, view, rollout_id)
    return store.create(topics.fleet, topics.prefix, spec, waves, rollout_id)


def rollout_status(store: RolloutStore, rollout_id: str) -> dict[str, Any]:
    """Everything ``rollout status`` shows: state, waves, per-device steps and verdicts, events."""
    rollout = store.get(rollout_id)
    devices = store.devices(rollout_id)
    waves = []
    for i in range(rollout.waves):
        members = [d for d in devices if d.wave == i]
        waves.append({"wave": i + 1, "devices": len(members),
                      "steps": {s.value: sum(d.step is s for d in members) for s in DeviceStep if any(d.step is s for d in members)}})
    return {
        "id": rollout.id, "fleet": rollout.fleet, "model": rollout.spec.model, "version": rollout.spec.version,
        "state": rollout.state.value, "reason": rollout.reason, "wave": rollout.wave + 1, "waves": waves,
        "spec": json.loads(rollout.spec.model_dump_json()),
        "devices": [{"device": d.device, "wave": d.wave + 1, "step": d.step.value, "verdict": d.verdict,
                     "previous_version": d.previous_version} for d in devices],
        "events": [{"at": at, "message": message} for at, message in store.events(rollout_id)],
    }
