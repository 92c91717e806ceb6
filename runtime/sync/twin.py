"""The device twin: desired state (cloud → device) and reported state (device → cloud).

Desired state (the models to run, each with its version and chunk store, and the runtime
policy) is in :mod:`edge_sdk.runtime.sync.desired`.

Reported state is one retained JSON object at ``…/<device>/reported``: ``models`` (per model:
its active ``release``, ``backend``, ``precision`` and ``sync`` progress, :class:`~edge_sdk.types.SyncState`),
resource figures (:meth:`~edge_sdk.runtime.monitor.ResourceSample.report`), the last error,
per-kind error counters (:class:`~edge_sdk.types.ErrorKind`); the top-level
``release``/``backend``/``precision``/``sync`` repeat the model reported last (what single-model
readers of earlier versions read). :class:`Twin` publishes it on change, throttled for progress updates.
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
from edge_sdk.types import ErrorKind, SyncState

from ..monitor import ResourceSource, SystemSource
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


class Twin:
    """Reported state of one device, published retained through ``publish(topic, payload)``.

    ``publish`` is any callable taking (topic, payload bytes) — normally a bound
    ``Transport.publish`` with ``retain=True`` — so the twin also works offline (paho queues it).
    ``resources`` is read at each publish for the ``resources`` figures: the same reader the
    precision policy decides on (cgroup-aware), so the cloud sees what the device acts on.
    """

    def __init__(self, topic: str, publish: Callable[[str, bytes], Any], throttle_s: float = 0.5,
                 resources: ResourceSource | None = None, identity: dict[str, Any] | None = None) -> None:
        self.topic = topic
        self._publish = publish
        self.throttle_s = throttle_s
        self.resources = resources if resources is not None else SystemSource()
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"release": None, "backend": None, "precision": None, "last_error": None,
                                       "sync": {"state": SyncState.IDLE.value}, "policy": {}, "models": {},
                                       **(identity or {})}  # what the fleet view and rollout groups match on
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

    def progress(self, state: SyncState, **fields: Any) -> None:
        """Update ``sync`` progress (of ``fields["model"]`` when given, also under ``models``);
        published at most every ``throttle_s`` unless the state changes."""
        fields["state"] = SyncState(state).value
        with self._lock:
            model = fields.get("model")
            entry = self._state["models"].setdefault(model, {}) if model is not None else {}
            before = entry.get("sync", {}) if model is not None else self._state["sync"]
            changed_state = fields["state"] != before.get("state")
            current = {**before, **fields} if not changed_state else dict(fields)
            if model is not None:
                entry["sync"] = current
            self._state["sync"] = current
        self.publish(force=changed_state)

    def error(self, kind: ErrorKind, reason: str) -> None:
        """Count an error of ``kind`` and make it the reported ``last_error``."""
        kind = ErrorKind(kind)
        log.warning("%s: %s", kind, reason)
        with self._lock:
            self.errors[kind.value] += 1
            self._state["last_error"] = {"kind": kind.value, "reason": reason, "time": time.time()}
        self.publish()

    def publish(self, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last_sent < self.throttle_s:
            return
        self._last_sent = now
        state = self.snapshot()
        try:
            state["resources"] = self.resources.sample().report()
        except Exception:  # figures are a nicety; never let them stop the report
            state["resources"] = None
        state["updated"] = time.time()
        try:
            self._publish(self.topic, json.dumps(state, sort_keys=True).encode())
            self.published += 1
        except Exception as exc:  # offline or refused: the next change publishes again
            log.warning("could not publish reported state: %s", exc)
