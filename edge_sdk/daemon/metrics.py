"""Prometheus metrics of one daemon (served at ``/metrics``).

Figures the daemon itself produces (latency, requests, switches) are prometheus-client
instruments updated where they happen. Figures other components own (outbox depth, sync state,
aligner counters, resources) are read from snapshot callables at scrape time, so there is one
source of truth and nothing to keep in step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..errors import MissingDependencyError

log = logging.getLogger(__name__)

# Latency buckets for edge inference: 0.5 ms .. 10 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _prom():
    try:
        import prometheus_client
    except ImportError:  # pragma: no cover - depends on the install
        raise MissingDependencyError("prometheus-client", "daemon", "The daemon's metrics") from None
    return prometheus_client


@dataclass
class Snapshot:
    """What a component reports at scrape time: gauges and monotonically growing counters.

    Keys are metric suffixes; values are a number, or a dict ``{label_value: number}`` with the
    label named by ``labels[key]``.
    """

    gauges: dict[str, float | dict[str, float]] = field(default_factory=dict)
    counters: dict[str, float | dict[str, float]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    help: dict[str, str] = field(default_factory=dict)


class _SnapshotCollector:
    """A custom collector: asks each registered source for a :class:`Snapshot` per scrape."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.sources: dict[str, Callable[[], Snapshot]] = {}

    def describe(self) -> list:
        return []  # unknown until scraped: keeps registration free of side effects

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for group, source in list(self.sources.items()):
            try:
                snap = source()
            except Exception:  # a broken source must not break /metrics for everything else
                log.exception("metrics source %r failed", group)
                continue
            for kind, values in (("gauge", snap.gauges), ("counter", snap.counters)):
                for key, value in values.items():
                    name = f"{self.prefix}_{group}_{key}"
                    doc = snap.help.get(key, f"{group} {key.replace('_', ' ')}")
                    label = snap.labels.get(key)
                    cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                    family = cls(name, doc, labels=[label] if label else None)
                    if isinstance(value, dict):
                        for lv, v in value.items():
                            family.add_metric([str(lv)], float(v))
                    elif value is not None:
                        family.add_metric([], float(value))
                    yield family


class DaemonMetrics:
    """All metrics of one daemon, in their own registry (several daemons may share a process in tests)."""

    def __init__(self, prefix: str = "edge") -> None:
        prom = _prom()
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.infer_latency = prom.Histogram(
            f"{prefix}_inference_latency_seconds", "Model run time per call (excludes HTTP parsing)",
            ["model", "backend", "precision"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = prom.Counter(
            f"{prefix}_http_requests", "HTTP API requests by route and status code", ["route", "code"], registry=r)
        self.infer_errors = prom.Counter(
            f"{prefix}_inference_errors", "Failed inference calls by model and reason", ["model", "reason"], registry=r)
        self.grpc_requests = prom.Counter(
            f"{prefix}_grpc_requests", "gRPC API calls by method and status code", ["method", "code"], registry=r)
        self.timeouts = prom.Counter(
            f"{prefix}_api_timeouts", "Connections and requests cut for being too slow, by phase (header, body)",
            ["phase"], registry=r)
        self.in_flight = prom.Gauge(f"{prefix}_inference_in_flight", "Inference calls running now", registry=r)
        self.precision_switches = prom.Counter(
            f"{prefix}_precision_switches", "Precision changes by model, direction and decision kind (step_down, step_up, pin, unpin)",
            ["model", "from_precision", "to_precision", "kind"], registry=r)
        self.model_info = prom.Gauge(
            f"{prefix}_model_active", "1 for the release/backend/precision each model serves now",
            ["model", "version", "backend", "precision"], registry=r)
        self.reloads = prom.Counter(f"{prefix}_config_reloads", "SIGHUP reloads by result", ["result"], registry=r)
        self.start_time = prom.Gauge(f"{prefix}_start_time_seconds", "Unix time the daemon started", registry=r)
        self.start_time.set_to_current_time()
        self._snapshots = _SnapshotCollector(prefix)
        r.register(self._snapshots)
        # Process RSS/CPU/fds of this daemon (Linux /proc).
        prom.ProcessCollector(registry=r)

    def add_source(self, group: str, source: Callable[[], Snapshot]) -> None:
        """Report ``group``'s figures (``<prefix>_<group>_<key>``) from ``source()`` at each scrape."""
        self._snapshots.sources[group] = source

    def set_active(self, model: str, version: str, backend: str, precision: str) -> None:
        """Mark what ``model`` serves now (old label sets of that model are removed)."""
        for sample in list(self.model_info.collect()[0].samples):
            if sample.labels.get("model") == model:
                self.model_info.remove(model, sample.labels["version"], sample.labels["backend"], sample.labels["precision"])
        self.model_info.labels(model, version, backend, precision).set(1)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST
