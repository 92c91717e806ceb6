"""The fleet view: one row per device from its retained reported state, and a summary per release.

Every device publishes its reported state retained at ``<prefix>/<device>/reported`` and its
online flag at ``<prefix>/<device>/status``; :func:`read_fleet` collects both (no device is asked
anything) and parses each report tolerantly: a field a device does not send is unknown, and a
report that is not a JSON object of the expected shape is left out of the view and counted in
:attr:`FleetView.garbage`, naming the device and what is wrong.

Reported state read here (``runtime/sync/twin.py`` writes it):

* ``models: {name: {release: {model, version}, backend, precision, sync: {state, version, reason},
  stats: {calls, errors, p50_ms, p99_ms}}}`` — one entry per model; a device of the single-model
  shape reports ``release``/``backend``/``precision``/``sync``/``stats`` at the top level instead;
* ``profile``, ``labels`` (str → str: what rollout groups match; ``profile`` counts as a label);
* ``telemetry.queued_rows`` (outbox depth), ``updated`` (unix time of the report: last seen);
* ``models.<m>.device.variants.<variant id>``: what the device measured itself at activation
  (``p50_ms``, ``p99_ms``, ``footprint_mb``, ``verdict``, ``used``) and the build machine's figures
  it was shipped with (``build``: ``latency_ms``, ``footprint_mb``); :meth:`FleetView.figures`
  sets them side by side per profile.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_sdk.config import json_object
from edge_sdk.errors import ConfigError, SyncError
from edge_sdk.runtime.sync.topics import TopicKind, Topics
from edge_sdk.runtime.sync.transport import Transport

from .connection import collect_retained


@dataclass(frozen=True)
class ModelReport:
    """What one device reports about one model."""

    model: str
    version: int | None = None  # the active release
    backend: str | None = None
    precision: str | None = None
    sync_state: str | None = None
    sync_version: int | None = None
    sync_reason: str | None = None
    calls: int | None = None
    errors: int | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    #: variant id -> figures the device measured itself (and the build machine's, under ``build``)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def failed_version(self) -> int | None:
        """The version whose sync, self-test or activation failed, if the latest attempt failed."""
        return self.sync_version if self.sync_state == "failed" else None


@dataclass(frozen=True)
class DeviceReport:
    device: str
    models: dict[str, ModelReport]
    profile: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    updated: float | None = None
    online: bool | None = None
    outbox_depth: int | None = None
    last_error: str | None = None

    def matches(self, group: Mapping[str, str]) -> bool:
        """Whether every ``key=value`` of ``group`` holds (``profile`` is a label too)."""
        labels = {**self.labels, **({"profile": self.profile} if self.profile else {})}
        return all(labels.get(k) == v for k, v in group.items())

    def stale(self, now: float, stale_after_s: float) -> bool:
        return self.updated is None or now - self.updated > stale_after_s

    def health(self, now: float, stale_after_s: float) -> str:
        """``offline``, ``stale`` (no report within ``stale_after_s``), ``failing`` (a model's last sync failed) or ``ok``."""
        if self.online is False:
            return "offline"
        if self.stale(now, stale_after_s):
            return "stale"
        if any(m.sync_state == "failed" for m in self.models.values()):
            return "failing"
        return "ok"


# -- parsing (payloads come from devices: trust nothing) ----------------------------------------------
def _opt(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise SyncError(f"{what} must be {getattr(kind, '__name__', kind)}, got {value!r:.60}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SyncError(f"{what} must be finite, got {value!r}")
    return value


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SyncError(f"{what} must be an object, got {type(value).__name__}")
    return value


_FIGURES = ("p50_ms", "p99_ms", "footprint_mb", "footprint_lean_mb", "latency_ratio")
_BUILD_FIGURES = ("latency_ms", "latency_ratio", "footprint_mb")


def _variant_figures(device: dict, what: str) -> dict[str, dict[str, Any]]:
    number = (int, float)
    out = {}
    for variant_id, entry in _mapping(device.get("variants"), f"{what}.variants").items():
        entry = _mapping(entry, f"{what}.variants.{variant_id}")
        figures: dict[str, Any] = {k: _opt(entry.get(k), number, f"{what}.variants.{variant_id}.{k}") for k in _FIGURES}
        figures["verdict"] = _opt(entry.get("verdict"), str, f"{what}.variants.{variant_id}.verdict")
        figures["used"] = _opt(entry.get("used"), bool, f"{what}.variants.{variant_id}.used")
        build = _mapping(entry.get("build"), f"{what}.variants.{variant_id}.build")
        figures["build"] = {k: _opt(build.get(k), number, f"{what}.variants.{variant_id}.build.{k}") for k in _BUILD_FIGURES}
        out[str(variant_id)] = figures
    return out


def _model_report(name: str, entry: dict, what: str) -> ModelReport:
    release = _mapping(entry.get("release"), f"{what}.release")
    sync = _mapping(entry.get("sync"), f"{what}.sync")
    stats = _mapping(entry.get("stats"), f"{what}.stats")
    number = (int, float)
    return ModelReport(
        model=name,
        version=_opt(release.get("version"), int, f"{what}.release.version"),
        backend=_opt(entry.get("backend"), str, f"{what}.backend"),
        precision=_opt(entry.get("precision"), str, f"{what}.precision"),
        sync_state=_opt(sync.get("state"), str, f"{what}.sync.state"),
        sync_version=_opt(sync.get("version"), int, f"{what}.sync.version"),
        sync_reason=_opt(sync.get("reason"), str, f"{what}.sync.reason"),
        calls=_opt(stats.get("calls"), int, f"{what}.stats.calls"),
        errors=_opt(stats.get("errors"), int, f"{what}.stats.errors"),
        p50_ms=_opt(stats.get("p50_ms"), number, f"{what}.stats.p50_ms"),
        p99_ms=_opt(stats.get("p99_ms"), number, f"{what}.stats.p99_ms"),
        variants=_variant_figures(_mapping(entry.get("device"), f"{what}.device"), f"{what}.device"),
    )


def parse_reported(device: str, payload: bytes, online: bool | None = None) -> DeviceReport:
    """A device's reported state; :class:`SyncError` naming the problem if it is garbage."""
    state = json_object(payload, "reported state", SyncError)
    models: dict[str, ModelReport] = {}
    for name, entry in _mapping(state.get("models"), "models").items():
        models[name] = _model_report(name, _mapping(entry, f"models.{name}"), f"models.{name}")
    release = _mapping(state.get("release"), "release")
    sync = _mapping(state.get("sync"), "sync")
    single = release.get("model") or sync.get("model")  # the single-model shape of today
    if isinstance(single, str) and single not in models:
        entry = {**state, "sync": sync if sync.get("model") in (None, single) else {}}
        models[single] = _model_report(single, entry, "(top level)")
    labels = _mapping(state.get("labels"), "labels")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise SyncError("labels must map strings to strings")
    last_error = _mapping(state.get("last_error"), "last_error")
    telemetry = _mapping(state.get("telemetry"), "telemetry")
    return DeviceReport(
        device=device, models=models, profile=_opt(state.get("profile"), str, "profile"), labels=dict(labels),
        updated=_opt(state.get("updated"), (int, float), "updated"), online=online,
        outbox_depth=_opt(telemetry.get("queued_rows"), int, "telemetry.queued_rows"),
        last_error=_opt(last_error.get("reason"), str, "last_error.reason"),
    )


def parse_group(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["site=plant1", "profile=raspberry-pi-4"]`` → ``{"site": "plant1", …}``."""
    group: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"group {item!r}: expected label=value (e.g. site=plant1)")
        group[key.strip()] = value.strip()
    return group


# -- the view -----------------------------------------------------------------------------------------
@dataclass
class FleetView:
    """Every device's report, the garbage that was left out, and when it was read."""

    fleet: str
    devices: dict[str, DeviceReport]
    garbage: dict[str, str] = field(default_factory=dict)
    read_at: float = field(default_factory=time.time)
    stale_after_s: float = 300.0

    def select(self, model: str | None = None, group: Mapping[str, str] | None = None) -> list[DeviceReport]:
        """Devices that report ``model`` (any model when None) and match ``group``, sorted by id."""
        return [d for _, d in sorted(self.devices.items())
                if (model is None or model in d.models) and d.matches(group or {})]

    def rows(self, model: str | None = None, group: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """One row per (device, model)."""
        rows = []
        for d in self.select(model, group):
            health = d.health(self.read_at, self.stale_after_s)
            for m in (d.models[model],) if model else tuple(d.models.values()) or (None,):
                rows.append({
                    "device": d.device, "model": m.model if m else None, "version": m.version if m else None,
                    "backend": m.backend if m else None, "precision": m.precision if m else None,
                    "health": health if not (m and m.sync_state == "failed") else "failing",
                    "sync": m.sync_state if m else None, "reason": (m.sync_reason if m else None) or d.last_error,
                    "p50_ms": m.p50_ms if m else None, "p99_ms": m.p99_ms if m else None,
                    "profile": d.profile, "labels": d.labels, "outbox_depth": d.outbox_depth,
                    "last_seen": d.updated, "age_s": round(self.read_at - d.updated, 1) if d.updated else None,
                    "stale": d.stale(self.read_at, self.stale_after_s),
                })
        return rows

    def summary(self, model: str | None = None, group: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """Per (model, release version, profile): devices, health counts, median of device p50, backends/precisions."""
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for row in self.rows(model, group):
            if row["model"] is not None:
                groups[(row["model"], row["version"], row["profile"])].append(row)
        out = []
        for (name, version, profile), rows in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
            p50s = [r["p50_ms"] for r in rows if r["p50_ms"] is not None]
            out.append({
                "model": name, "version": version, "profile": profile, "devices": len(rows),
                "health": dict(Counter(r["health"] for r in rows)),
                "p50_ms_median": round(statistics.median(p50s), 3) if p50s else None,
                "backends": dict(Counter(r["backend"] for r in rows if r["backend"])),
                "precisions": dict(Counter(r["precision"] for r in rows if r["precision"])),
            })
        return out

    def figures(self, model: str | None = None, group: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """Per (model, version, profile, variant): the medians of what devices measured themselves
        (p50/p99 latency, footprint), their verdicts, beside the build machine's figures."""
        groups: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
        for d in self.select(model, group):
            for m in (d.models[model],) if model else tuple(d.models.values()):
                for variant_id, figures in m.variants.items():
                    groups[(m.model, m.version, d.profile, variant_id)].append((figures, figures.get("build") or {}))
        out = []
        for (name, version, profile, variant_id), entries in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
            def median(key: str, source: int = 0) -> float | None:
                values = [e[source][key] for e in entries if e[source].get(key) is not None]
                return round(statistics.median(values), 3) if values else None

            out.append({
                "model": name, "version": version, "profile": profile, "variant": variant_id, "devices": len(entries),
                "device_p50_ms": median("p50_ms"), "device_p99_ms": median("p99_ms"),
                "device_footprint_mb": median("footprint_mb"), "device_ratio": median("latency_ratio"),
                "verdicts": dict(Counter(e[0]["verdict"] for e in entries if e[0].get("verdict"))),
                "used_on": sum(1 for e in entries if e[0].get("used")),
                "build_latency_ms": median("latency_ms", 1), "build_ratio": median("latency_ratio", 1),
                "build_footprint_mb": median("footprint_mb", 1),
            })
        return out

    def to_dict(self, model: str | None = None, group: Mapping[str, str] | None = None) -> dict[str, Any]:
        return {"fleet": self.fleet, "read_at": self.read_at, "stale_after_s": self.stale_after_s,
                "devices": self.rows(model, group), "summary": self.summary(model, group),
                "figures": self.figures(model, group), "garbage": self.garbage}


def every_device(topics: Topics, leaf: str) -> str:
    """The filter of one device-level topic of every device: ``<prefix>/+/<leaf>``."""
    return f"{topics.prefix}/+/{leaf}"


def read_fleet(transport: Transport, topics: Topics, stale_after_s: float = 300.0, timeout: float = 30.0) -> FleetView:
    """Collect every retained status and reported state of the fleet into a :class:`FleetView`."""
    online: dict[str, bool] = {}
    for topic, payload in collect_retained(transport, topics, every_device(topics, "status"), timeout).items():
        device = topics.device_of(topic, TopicKind.STATUS)
        try:
            flag = json.loads(payload).get("online")
        except (ValueError, UnicodeDecodeError, AttributeError):
            flag = None
        if device is not None and isinstance(flag, bool):
            online[device] = flag
    devices: dict[str, DeviceReport] = {}
    garbage: dict[str, str] = {}
    for topic, payload in collect_retained(transport, topics, every_device(topics, "reported"), timeout).items():
        device = topics.device_of(topic, TopicKind.REPORTED)
        if device is None:
            continue
        try:
            devices[device] = parse_reported(device, payload, online.get(device))
        except SyncError as exc:
            garbage[device] = str(exc)
    return FleetView(topics.fleet, devices, garbage, time.time(), stale_after_s)


def report_json(view: FleetView, model: str | None = None, group: Mapping[str, str] | None = None) -> str:
    return json.dumps(view.to_dict(model, group), indent=2, default=lambda o: asdict(o))
