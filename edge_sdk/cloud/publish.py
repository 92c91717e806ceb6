"""Publish a release folder to a fleet: content-addressed chunks to a chunk store, then the signed
manifest to the broker.

Chunks go to the chunk store named by ``store`` (see :mod:`edge_sdk.runtime.sync.stores`):
``mqtt`` (default) as retained messages at ``…/blobs/<sha256>``, or ``s3://bucket/prefix``,
``http(s)://…`` (``PUT``) or ``file:///dir`` (a folder a web server or CDN serves), *before* the
manifest, so a device that sees a manifest can fetch all of it. Devices learn where to fetch
from the desired state (``edge-sdk cloud desire --store URL``); MQTT then carries only control
messages.

A chunk is skipped only if the store holds it *and* a retained manifest references it: probing
the store catches a chunk lost there (a broker ``kill -9`` loses what changed since the last
autosave) even though a manifest still lists it, and an unreferenced chunk is an orphan that a
concurrent ``cloud gc`` may be removing, so it is sent again. ``force`` publishes every chunk
regardless.

Against ``cloud gc``: before the first chunk, a retained marker ``…/releases/<m>/<v>/pending``
holding the release's chunk list is stored (acknowledged), and it is cleared once the manifest
is out. gc lists the blobs first and the manifests and markers after, so every chunk it sees
was published after its marker was stored, and it keeps the chunks of markers younger than its
grace period. A publish that dies leaves its marker; gc clears it (and then those chunks) once
it is older than the grace period, or the next publish of that release replaces it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edge_sdk.chunking import sha256_bytes
from edge_sdk.errors import IntegrityError, SyncError
from edge_sdk.manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest, verify_file
from edge_sdk.runtime.sync.envelope import open_envelope, seal
from edge_sdk.runtime.sync.stores import MQTT_STORE, StoreOptions, open_store, store_scheme
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.transport import TlsConfig, Transport
from edge_sdk.signing import load_private_key
from edge_sdk.trust import sign_release

from .connection import collect_retained, connect

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass
class PublishReport:
    model: str
    version: int
    manifest_topic: str
    signed: bool
    chunks_total: int
    chunks_published: int
    chunks_skipped: int
    bytes_total: int
    bytes_published: int
    duration_s: float = 0.0
    store: str = MQTT_STORE

    def to_dict(self) -> dict:
        return asdict(self)


def chunk_refs_of(manifest: Manifest) -> set[str]:
    return {c.sha256 for entry in manifest.files() for c in entry.chunks}


def published_chunks(transport: Transport, topics: Topics) -> tuple[set[str], dict[str, Manifest]]:
    """(chunks referenced by retained manifests, those manifests by topic); unreadable ones skipped."""
    manifests: dict[str, Manifest] = {}
    for topic, payload in collect_retained(transport, topics, topics.all_manifests()).items():
        try:
            data, _ = open_envelope(payload)
            manifests[topic] = Manifest.from_bytes(data, topic)
        except IntegrityError as exc:
            log.warning("ignoring unreadable manifest at %s: %s", topic, exc)
    shas = set().union(*(chunk_refs_of(m) for m in manifests.values())) if manifests else set()
    return shas, manifests


def pending_marker(chunks: set[str], started: float | None = None) -> bytes:
    return json.dumps({"v": 1, "started": time.time() if started is None else started,
                       "chunks": sorted(chunks)}).encode()


def parse_pending_marker(payload: bytes) -> tuple[float, set[str]] | None:
    """(start time, chunk shas) of a marker; None if it is not one."""
    try:
        data = json.loads(payload)
        started, chunks = float(data["started"]), data["chunks"]
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return None
    if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks):
        return None
    return started, set(chunks)


def refuse_replay(manifest: Manifest, published: Iterable[Manifest]) -> None:
    """Versions only go up: refuse a new release numbered below the fleet's highest, or a different
    release under a number already used.

    Devices refuse such a manifest anyway (rollback protection), so publishing it could only
    confuse. Republishing a release exactly as already published is allowed: it repairs chunks
    the broker lost.
    """
    same_model = [m for m in published if m.model == manifest.model]
    if manifest in same_model:
        return
    highest = max((m.version for m in same_model), default=0)
    if manifest.version < highest:
        raise IntegrityError(f"{manifest.model} v{manifest.version} is lower than v{highest}, which this fleet already "
                             f"has; convert with --release-version {highest + 1} or higher")
    if manifest.version == highest:
        raise IntegrityError(f"{manifest.model} v{manifest.version} is already published to this fleet with different "
                             f"content; convert with --release-version {highest + 1}")


def _iter_chunks(release_dir: Path, entry: FileEntry):
    """(sha256, bytes) of each chunk of ``entry``, checked against the manifest."""
    path = verify_file(release_dir, entry)
    if sum(c.size for c in entry.chunks) != entry.size:
        raise IntegrityError(f"{entry.path}: manifest chunk sizes do not add up to the file size")
    with open(path, "rb") as handle:
        for ref in entry.chunks:
            data = handle.read(ref.size)
            if sha256_bytes(data) != ref.sha256:
                raise IntegrityError(f"{entry.path}: chunk {ref.sha256[:12]}… does not match the file")
            yield ref.sha256, data


def publish_release(release_dir: Path | str, broker: str, fleet: str, *, prefix: str = "",
                    sign_key: Path | str | None = None, force: bool = False, tls: TlsConfig | None = None,
                    progress: Progress | None = None, store: str = MQTT_STORE,
                    store_options: StoreOptions | None = None) -> PublishReport:
    """Publish ``release_dir`` to ``fleet`` on ``broker``, its chunks to ``store``; see the module docstring."""
    release_dir = Path(release_dir)
    started = time.monotonic()
    store_scheme(store)  # an unknown store fails before anything is read or sent
    try:
        data = (release_dir / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{release_dir}: no {MANIFEST_NAME}; is this a release folder?") from None
    sig_path = release_dir / SIGNATURE_NAME
    if sign_key is not None:
        signature: bytes | None = sign_release(data, [load_private_key(sign_key)])
    else:
        signature = sig_path.read_bytes() if sig_path.exists() else None
        if signature is None:
            log.warning("publishing %s unsigned: devices with a public key will refuse it", release_dir)
    manifest = Manifest.from_bytes(data, str(release_dir / MANIFEST_NAME))
    files = manifest.files()
    for entry in files:
        verify_file(release_dir, entry)  # fail before anything goes out
    topics = Topics(fleet, prefix)
    manifest_topic = topics.manifest(manifest.model, manifest.version)
    needed: dict[str, int] = {}
    for entry in files:
        for ref in entry.chunks:
            needed.setdefault(ref.sha256, ref.size)
    pending_topic = topics.pending(manifest.model, manifest.version)
    with connect(broker, "publish", tls) as transport:
        referenced, retained = published_chunks(transport, topics)
        refuse_replay(manifest, retained.values())
        # Stored before the blobs are listed, so a concurrent gc keeps what this publish relies on.
        if not transport.publish(pending_topic, pending_marker(set(needed)), qos=1, retain=True, wait=60.0):
            raise SyncError(f"broker did not acknowledge {pending_topic} within 60s")
        options = replace(store_options or StoreOptions(), transport=transport, topics=topics)
        chunk_store = open_store(store, options)
        try:
            existing = set() if force else referenced & chunk_store.present(needed)
            todo = {sha for sha in needed if sha not in existing}
            total = sum(needed[sha] for sha in todo)
            report = PublishReport(manifest.model, manifest.version, manifest_topic, signature is not None,
                                   chunks_total=len(needed), chunks_published=0,
                                   chunks_skipped=len(needed) - len(todo), bytes_total=sum(needed.values()),
                                   bytes_published=0, store=store)
            if progress:
                progress(0, total)
            for entry in files:
                for sha, chunk in _iter_chunks(release_dir, entry):
                    if sha not in todo:
                        continue
                    todo.discard(sha)
                    chunk_store.put(sha, chunk)
                    report.chunks_published += 1
                    report.bytes_published += len(chunk)
                    if progress:
                        progress(report.bytes_published, total)
            chunk_store.flush()  # every chunk durable on the store before the manifest names it
        finally:
            chunk_store.close()
        if not transport.publish(manifest_topic, seal(data, signature), qos=1, retain=True, wait=60.0):
            raise SyncError(f"broker did not acknowledge the manifest at {manifest_topic} within 60s")
        transport.publish(pending_topic, b"", qos=1, retain=True, wait=60.0)  # the manifest holds them now
    report.duration_s = round(time.monotonic() - started, 3)
    return report
