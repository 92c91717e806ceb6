"""Garbage-collect a fleet's retained release data on the broker.

Optionally drops old release manifests first (``keep`` newest versions per model, never one a
retained desired state still asks for), then clears every retained chunk that no remaining
manifest references. Clearing a retained message means publishing an empty retained payload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from edge_sdk.errors import SyncError
from edge_sdk.runtime.sync.topics import Topics, TopicKind
from edge_sdk.runtime.sync.transport import TlsConfig
from edge_sdk.runtime.sync.twin import DesiredState

from .connection import collect_retained, connect
from .publish import chunk_refs_of, published_chunks


@dataclass
class GcReport:
    manifests_kept: list[str] = field(default_factory=list)
    manifests_removed: list[str] = field(default_factory=list)
    blobs_seen: int = 0
    blobs_removed: int = 0
    bytes_freed: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _desired_versions(transport, topics: Topics) -> set[tuple[str, int]]:
    wanted = set()
    messages = collect_retained(transport, topics, f"{topics.prefix}/+/desired")
    messages.update(collect_retained(transport, topics, topics.desired(None)))
    for topic, payload in messages.items():
        match = topics.parse(topic)
        if match is None or match.kind not in (TopicKind.DEVICE_DESIRED, TopicKind.FLEET_DESIRED):
            continue
        try:
            state = DesiredState.from_payload(payload, topic)
        except Exception:  # someone else's garbage is not a reason to stop collecting
            continue
        if state is not None and state.model and state.version:
            wanted.add((state.model, state.version))
    return wanted


def collect_garbage(broker: str, fleet: str, *, prefix: str = "", keep: int | None = None, dry_run: bool = False,
                    tls: TlsConfig | None = None, progress: Callable[[int, int], None] | None = None) -> GcReport:
    """See the module docstring. ``keep`` None keeps every manifest."""
    if keep is not None and keep < 1:
        raise SyncError("--keep must be at least 1")
    topics = Topics(fleet, prefix)
    report = GcReport(dry_run=dry_run)
    with connect(broker, "gc", tls) as transport:
        _, manifests = published_chunks(transport, topics)
        drop: set[str] = set()
        if keep is not None:
            wanted = _desired_versions(transport, topics)
            by_model: dict[str, list[tuple[int, str]]] = {}
            for topic, manifest in manifests.items():
                by_model.setdefault(manifest.model, []).append((manifest.version, topic))
            for model, versions in by_model.items():
                for version, topic in sorted(versions, reverse=True)[keep:]:
                    if (model, version) not in wanted:
                        drop.add(topic)
        kept = {t: m for t, m in manifests.items() if t not in drop}
        referenced = set().union(*(chunk_refs_of(m) for m in kept.values())) if kept else set()
        report.manifests_kept = sorted(kept)
        report.manifests_removed = sorted(drop)
        blobs = collect_retained(transport, topics, topics.all_blobs(), timeout=120.0)
        report.blobs_seen = len(blobs)
        garbage = []
        for topic, payload in blobs.items():
            match = topics.parse(topic)
            if match is not None and match.kind is TopicKind.BLOB and match.sha256 not in referenced:
                garbage.append((topic, len(payload)))
        if dry_run:
            report.blobs_removed = len(garbage)
            report.bytes_freed = sum(n for _, n in garbage)
            return report
        # Manifests first: a device must never see a manifest whose chunks are gone.
        for topic in sorted(drop):
            transport.publish(topic, b"", qos=1, retain=True)
        for i, (topic, size) in enumerate(garbage, 1):
            transport.publish(topic, b"", qos=1, retain=True, wait=30.0 if i == len(garbage) else None)
            report.blobs_removed += 1
            report.bytes_freed += size
            if progress:
                progress(i, len(garbage))
        if drop and not garbage:
            transport.publish(sorted(drop)[-1], b"", qos=1, retain=True, wait=30.0)
    return report
