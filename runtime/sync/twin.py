"""The device twin: desired state (cloud → device) and reported state (device → cloud).

Desired state (the models to run, each with its version and chunk store, and the runtime
policy) is in :mod:`edge_sdk.runtime.sync.desired`.

Reported state is one retained JSON object at ``…/<device>/reported``: ``models`` (per model:
its active ``release``, ``backend``, ``precision`` and ``sync`` progress), resource figures, the
last error, per-kind error counters; the top-level ``release``/``backend``/``precision``/``sync``
repeat the model reported last (what single-model readers of earlier versions read).
:class:`Twin` publishes it on change, throttled for progress updates.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from edge_sdk.errors import ConfigError

from .desired import DesiredState, ModelDesired, merge_desired  # noqa: F401  (the twin's desired side)

log = logging.getLogger(__name__)


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["pin_precision=int8", "thresholds.fp32.max_cpu_percent=80"]`` → a typed policy mapping.

    Values are JSON scalars (else strings); dotted keys build nested mappings, so every policy
    key (see :class:`~edge_sdk.runtime.policy.PolicyOverride`) can be set from a command line.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        path = key.split(".")
        if not sep or not key or not all(path):
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if isinstance(value, (list, dict)):
            raise ConfigError(f"--set {item!r}: only scalar values (string, number, true/false, null)")
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is already set to a value")
            node = child
        if isinstance(node.get(path[-1]), dict):
            raise ConfigError(f"--set {item!r}: {key!r} already holds nested keys")
        node[path[-1]] = value
    return out


def resource_snapshot() -> dict[str, float | None]:
    """CPU, memory and (where the kernel exposes it) temperature figures for the twin."""
    import psutil

    mem = psutil.virtual_memory()
    temperature = None
    try:
        temps = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
        readings = [t.current for group in temps.values() for t in group if t.current]
        temperature = max(readings) if readings else None
    except (OSError, RuntimeError):
        pass
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory_available_mb": round(mem.available / 2**20, 1),
        "memory_percent": mem.percent,
        "temperature_c": temperature,
    }


class Twin:
    """Reported state of one device, published retained through ``publish(topic, payload)``.

    ``publish`` is any callable taking (topic, payload bytes) — normally a bound
    ``Transport.publish`` with ``retain=True`` — so the twin also works offline (paho queues it).
    """

    def __init__(self, topic: str, publish: Callable[[str, bytes], Any], throttle_s: float = 0.5) -> None:
        self.topic = topic
        self._publish = publish
        self.throttle_s = throttle_s
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"release": None, "backend": None, "precision": None, "last_error": None,
                                       "sync": {"state": "idle"}, "policy": {}, "models": {}}
        self.errors: Counter[str] = Counter()
        self._last_sent = 0.0
        self.published = 0

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            state = json.loads(json.dumps(self._state))
            state["errors"] = dict(self.errors)
        return state

    def set(self, **fields: Any) -> None:
        """Update top-level fields (``release``, ``backend``, ``precision``, ``policy``…) and publish."""
        with self._lock:
            self._state.update(fields)
        self.publish()

    def set_model(self, model: str, **fields: Any) -> None:
        """Update ``models.<model>`` (``release``, ``backend``, ``precision``…) and the top-level copies; publish."""
        with self._lock:
            self._state["models"].setdefault(model, {}).update(fields)
            self._state.update(fields)
        self.publish()

    def progress(self, **fields: Any) -> None:
        """Update ``sync`` progress (of ``fields["model"]`` when given, also under ``models``);
        published at most every ``throttle_s`` unless the state changes."""
        with self._lock:
            model = fields.get("model")
            entry = self._state["models"].setdefault(model, {}) if model is not None else {}
            before = entry.get("sync", {}) if model is not None else self._state["sync"]
            changed_state = fields.get("state", before.get("state")) != before.get("state")
            current = {**before, **fields} if not changed_state else dict(fields)
            if model is not None:
                entry["sync"] = current
            self._state["sync"] = current
        self.publish(force=changed_state)

    def error(self, kind: str, reason: str) -> None:
        """Count an error of ``kind`` and make it the reported ``last_error``."""
        log.warning("%s: %s", kind, reason)
        with self._lock:
            self.errors[kind] += 1
            self._state["last_error"] = {"kind": kind, "reason": reason, "time": time.time()}
        self.publish()

    def publish(self, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last_sent < self.throttle_s:
            return
        self._last_sent = now
        state = self.snapshot()
        try:
            state["resources"] = resource_snapshot()
        except Exception:  # figures are a nicety; never let them stop the report
            state["resources"] = None
        state["updated"] = time.time()
        try:
            self._publish(self.topic, json.dumps(state, sort_keys=True).encode())
            self.published += 1
        except Exception as exc:  # offline or refused: the next change publishes again
            log.warning("could not publish reported state: %s", exc)
