"""Publish a release folder to a fleet: content-addressed chunks to a chunk store, then the signed
manifest to the broker.

Chunks go to the chunk store named by ``store`` (see :mod:`edge_sdk.runtime.sync.stores`):
``mqtt`` (default) as retained messages at ``…/blobs/<sha256>``, or ``s3://bucket/prefix``,
``http(s)://…`` (``PUT``) or ``file:///dir`` (a folder a web server or CDN serves), *before* the
manifest, so a device that sees a manifest can fetch all of it. Devices learn where to fetch
from the desired state (``edge-sdk cloud desire --store URL``); MQTT then carries only control
messages.

Nothing retained is trusted for being there. Retained manifests count (for version checks and
for skipping chunks) only if they verify against the fleet's trust root (``trust``, else the
public half of ``sign_key``): a forged manifest, say at v999, is ignored and reported instead of
locking the publisher out. A chunk is skipped only if a verified retained manifest references it
*and* the store holds it byte for byte (:meth:`Store.intact`): a chunk lost in the store (a broker
``kill -9`` loses what changed since the last autosave) or corrupted there is sent again, and an
unreferenced chunk is an orphan that a concurrent ``cloud gc`` may be removing, so it is sent
again too. ``force`` publishes every chunk regardless.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edge_sdk.chunking import sha256_bytes
from edge_sdk.errors import IntegrityError, SyncError
from edge_sdk.manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest, verify_file, verify_manifest_bytes
from edge_sdk.runtime.sync.envelope import open_envelope, seal
from edge_sdk.runtime.sync.stores import MQTT_STORE, StoreOptions, open_store, store_scheme
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.transport import TlsConfig, Transport
from edge_sdk.signing import load_private_key
from edge_sdk.trust import TrustRoot, TrustSource, load_trust, sign_release

from .connection import collect_retained, connect

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
#: local chunks checked against the store per round trip (bounds memory: chunks are ≤ 256 KiB)
CHECK_BATCH_BYTES = 8 << 20


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
    chunks_repaired: int = 0  # listed by a retained manifest but missing or corrupt in the store: sent again
    ignored_manifests: dict[str, str] = field(default_factory=dict)  # retained topic → why it is not trusted

    def to_dict(self) -> dict:
        return asdict(self)


def chunk_refs_of(manifest: Manifest) -> set[str]:
    return {c.sha256 for entry in manifest.files() for c in entry.chunks}


def retained_releases(transport: Transport, topics: Topics,
                      trust: TrustRoot | None = None) -> tuple[dict[str, Manifest], dict[str, str]]:
    """(retained manifests by topic, ignored ones: topic → why).

    With ``trust`` a manifest counts only if its statement verifies against it (expired is fine:
    it was ours) and it sits at its own model/version topic; without, every readable one counts.
    """
    manifests: dict[str, Manifest] = {}
    ignored: dict[str, str] = {}
    for topic, payload in collect_retained(transport, topics, topics.all_manifests()).items():
        try:
            data, statement = open_envelope(payload)
            manifest = verify_manifest_bytes(data, statement, trust, allow_expired=True)
            if topic != topics.manifest(manifest.model, manifest.version):
                raise IntegrityError(f"holds the manifest of {manifest.model} v{manifest.version}")
        except IntegrityError as exc:
            ignored[topic] = str(exc)
            continue
        manifests[topic] = manifest
    return manifests, ignored


def published_chunks(transport: Transport, topics: Topics) -> tuple[set[str], dict[str, Manifest]]:
    """(chunks referenced by retained manifests, those manifests by topic); unreadable ones skipped."""
    manifests, ignored = retained_releases(transport, topics)
    for topic, why in ignored.items():
        log.warning("ignoring unreadable manifest at %s: %s", topic, why)
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


def _chunk_batches(release_dir: Path, files: list[FileEntry]) -> Iterator[dict[str, bytes]]:
    """Every distinct chunk of ``files`` once, in batches of about :data:`CHECK_BATCH_BYTES`."""
    seen: set[str] = set()
    batch: dict[str, bytes] = {}
    size = 0
    for entry in files:
        for sha, chunk in _iter_chunks(release_dir, entry):
            if sha in seen:
                continue
            seen.add(sha)
            batch[sha] = chunk
            size += len(chunk)
            if size >= CHECK_BATCH_BYTES:
                yield batch
                batch, size = {}, 0
    if batch:
        yield batch


def _fleet_trust(trust: TrustSource | None, private_key) -> TrustRoot | None:
    if trust is not None:
        return load_trust(trust)
    return TrustRoot.from_public_key(private_key.public_key(), "--sign-key") if private_key is not None else None


def publish_release(release_dir: Path | str, broker: str, fleet: str, *, prefix: str = "",
                    sign_key: Path | str | None = None, trust: TrustSource | None = None, force: bool = False,
                    tls: TlsConfig | None = None, progress: Progress | None = None, store: str = MQTT_STORE,
                    store_options: StoreOptions | None = None) -> PublishReport:
    """Publish ``release_dir`` to ``fleet`` on ``broker``, its chunks to ``store``; see the module docstring.

    ``trust``: the fleet's trust root (``root.json`` or PEM public key, as devices pin it); defaults
    to ``sign_key``'s public key. Without either, retained manifests cannot be verified (a warning).
    """
    release_dir = Path(release_dir)
    started = time.monotonic()
    store_scheme(store)  # an unknown store fails before anything is read or sent
    try:
        data = (release_dir / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{release_dir}: no {MANIFEST_NAME}; is this a release folder?") from None
    sig_path = release_dir / SIGNATURE_NAME
    private_key = load_private_key(sign_key) if sign_key is not None else None
    if private_key is not None:
        signature: bytes | None = sign_release(data, [private_key])
    else:
        signature = sig_path.read_bytes() if sig_path.exists() else None
        if signature is None:
            log.warning("publishing %s unsigned: devices with a public key will refuse it", release_dir)
    fleet_trust = _fleet_trust(trust, private_key)
    if fleet_trust is None:
        log.warning("no --trust or --sign-key: retained manifests are taken unverified (a forged one would count)")
    # Devices would refuse a release the fleet's root does not vouch for: fail before anything goes out.
    manifest = verify_manifest_bytes(data, signature, fleet_trust, allow_expired=False)
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
        retained, ignored = retained_releases(transport, topics, fleet_trust)
        for topic, why in ignored.items():
            log.warning("ignoring retained manifest at %s: %s", topic, why)
        refuse_replay(manifest, retained.values())
        referenced = set().union(*(chunk_refs_of(m) for m in retained.values())) if retained else set()
        # Stored before the blobs are listed, so a concurrent gc keeps what this publish relies on.
        if not transport.publish(pending_topic, pending_marker(set(needed)), qos=1, retain=True, wait=60.0):
            raise SyncError(f"broker did not acknowledge {pending_topic} within 60s")
        options = replace(store_options or StoreOptions(), transport=transport, topics=topics)
        chunk_store = open_store(store, options)
        report = PublishReport(manifest.model, manifest.version, manifest_topic, signature is not None,
                               chunks_total=len(needed), chunks_published=0, chunks_skipped=0,
                               bytes_total=sum(needed.values()), bytes_published=0, store=store,
                               ignored_manifests=ignored)
        try:
            done = 0
            if progress:
                progress(0, report.bytes_total)
            for batch in _chunk_batches(release_dir, files):
                held = {} if force else {sha: chunk for sha, chunk in batch.items() if sha in referenced}
                intact = chunk_store.intact(held) if held else set()
                for sha, chunk in batch.items():
                    if sha in intact:
                        report.chunks_skipped += 1
                    else:
                        chunk_store.put(sha, chunk)
                        report.chunks_published += 1
                        report.bytes_published += len(chunk)
                        report.chunks_repaired += sha in held
                done += sum(map(len, batch.values()))
                if progress:
                    progress(done, report.bytes_total)
            chunk_store.flush()  # every chunk durable on the store before the manifest names it
        finally:
            chunk_store.close()
        if not transport.publish(manifest_topic, seal(data, signature), qos=1, retain=True, wait=60.0):
            raise SyncError(f"broker did not acknowledge the manifest at {manifest_topic} within 60s")
        transport.publish(pending_topic, b"", qos=1, retain=True, wait=60.0)  # the manifest holds them now
    report.duration_s = round(time.monotonic() - started, 3)
    return report


def publish_root(root: bytes, broker: str, fleet: str, *, prefix: str = "", tls: TlsConfig | None = None) -> str:
    """Put trust root ``root`` retained at ``<prefix>/trust/root/<N>``; returns the topic.

    Refused before anything is sent if devices would refuse it: not signed by its own root keys,
    or not following the retained v N-1 (signed by a threshold of its root keys). Every version
    stays retained, so a device that missed some walks the chain from the root it has.
    """
    new = TrustRoot.from_bytes(root, "new root")
    topics = Topics(fleet, prefix)
    topic = topics.trust_root(new.version)
    with connect(broker, "publish-root", tls) as transport:
        retained = collect_retained(transport, topics, topics.all_trust_roots())
        previous = retained.get(topics.trust_root(new.version - 1)) if new.version > 1 else None
        if previous is not None:
            previous_root = TrustRoot.from_bytes(previous, topics.trust_root(new.version - 1))
            previous_root.rotate(root, "new root")
        elif new.version > 1:
            log.warning("no root v%d retained at %s: only devices that already trust v%d can take v%d",
                        new.version - 1, topics.trust_root(new.version - 1), new.version - 1, new.version)
        existing = retained.get(topic)
        if existing is not None and existing != root:
            forged = None
            if previous is not None:  # a retained root devices would refuse must not lock the publisher out
                try:
                    previous_root.rotate(existing, topic)
                except IntegrityError as exc:
                    forged = exc
            if forged is None:
                raise IntegrityError(f"a different root v{new.version} is already retained at {topic}; roots are "
                                     f"versioned: rotate to v{new.version + 1}")
            log.warning("replacing the root v%d retained at %s, which does not chain: %s", new.version, topic, forged)
        if not transport.publish(topic, root, qos=1, retain=True, wait=60.0):
            raise SyncError(f"broker did not acknowledge {topic} within 60s")
    return topic
