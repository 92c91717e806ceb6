"""Garbage-collect a fleet's release data: retained manifests on the broker, chunks in a chunk store.

Optionally drops old release manifests first (``keep`` newest versions per model, never one a
retained desired state still asks for), then removes every chunk of the chunk store (``mqtt``:
retained blobs, cleared with an empty retained payload; ``s3://…``, ``file://…``: objects or
files) that no remaining manifest references. An ``http(s)`` store cannot be listed: collect on
the folder or bucket behind it.

A publish in progress has no manifest yet: its ``…/pending`` marker (see
:mod:`edge_sdk.cloud.publish`) holds its chunks. The chunks are listed *before* the manifests and
markers, so a chunk seen here was published after its marker was stored and cannot be taken for
garbage. Markers older than ``pending_grace_s`` are left by publishes that died: they are
cleared and hold nothing. Chunk payloads are never kept in memory, only their sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from edge_sdk.errors import SyncError
from edge_sdk.runtime.sync.stores import MQTT_STORE, StoreOptions, open_store, store_scheme
from edge_sdk.runtime.sync.topics import Topics, TopicKind
from edge_sdk.runtime.sync.transport import TlsConfig
from edge_sdk.runtime.sync.twin import DesiredState

from .connection import collect_retained, connect
from .publish import chunk_refs_of, parse_pending_marker, published_chunks

#: how long an unfinished publish's chunks are protected (a publish of many GB over a slow link
#: may take hours; a stale marker only delays collecting its chunks)
PENDING_GRACE_S = 24 * 3600.0


@dataclass
class GcReport:
    manifests_kept: list[str] = field(default_factory=list)
    manifests_removed: list[str] = field(default_factory=list)
    pending_kept: list[str] = field(default_factory=list)
    pending_removed: list[str] = field(default_factory=list)
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
        if state is not None:
            wanted.update((model, entry.version) for model, entry in state.wanted.items())
    return wanted


def collect_garbage(broker: str, fleet: str, *, prefix: str = "", keep: int | None = None, dry_run: bool = False,
                    tls: TlsConfig | None = None, progress: Callable[[int, int], None] | None = None,
                    pending_grace_s: float = PENDING_GRACE_S, store: str = MQTT_STORE,
                    store_options: StoreOptions | None = None) -> GcReport:
    """See the module docstring. ``keep`` None keeps every manifest."""
    if keep is not None and keep < 1:
        raise SyncError("--keep must be at least 1")
    store_scheme(store)
    topics = Topics(fleet, prefix)
    report = GcReport(dry_run=dry_run)
    with connect(broker, "gc", tls) as transport:
        chunk_store = open_store(store, replace(store_options or StoreOptions(), transport=transport, topics=topics))
        try:
            return _collect(transport, topics, chunk_store, report, keep, dry_run, progress, pending_grace_s)
        finally:
            chunk_store.close()


def _collect(transport, topics: Topics, chunk_store, report: GcReport, keep: int | None, dry_run: bool,
             progress: Callable[[int, int], None] | None, pending_grace_s: float) -> GcReport:
    blobs = {chunk.sha256: chunk.size for chunk in chunk_store.listing()}  # first: see the module docstring
    _, manifests = published_chunks(transport, topics)
    protected: set[str] = set()
    stale: list[str] = []
    for topic, payload in collect_retained(transport, topics, topics.all_pending()).items():
        marker = parse_pending_marker(payload)
        if marker is not None and time.time() - marker[0] < pending_grace_s:
            protected |= marker[1]
            report.pending_kept.append(topic)
        else:
            stale.append(topic)
    report.pending_removed = sorted(stale)
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
    referenced = protected.union(*(chunk_refs_of(m) for m in kept.values()))
    report.manifests_kept = sorted(kept)
    report.manifests_removed = sorted(drop)
    report.blobs_seen = len(blobs)
    garbage = [(sha, size) for sha, size in blobs.items() if sha not in referenced]
    if dry_run:
        report.blobs_removed = len(garbage)
        report.bytes_freed = sum(n for _, n in garbage)
        return report
    # Manifests first, acknowledged: a device must never see a manifest whose chunks are gone.
    cleared = sorted(drop) + report.pending_removed
    for i, topic in enumerate(cleared, 1):
        if not transport.publish(topic, b"", qos=1, retain=True, wait=30.0 if i == len(cleared) else None):
            raise SyncError(f"broker did not acknowledge clearing {topic} within 30s; no chunk was removed")
    for i, (sha, size) in enumerate(garbage, 1):
        chunk_store.delete(sha)
        report.blobs_removed += 1
        report.bytes_freed += size
        if progress:
            progress(i, len(garbage))
    chunk_store.flush()
    return report
