"""``SyncClient``: keeps one device's model release in line with its desired state.

Flow for one release (``sync(model, version)``, also driven by desired-state messages)::

    manifest message ─ envelope + Ed25519 signature checked ─▶ parsed ─▶ rollback protection
      ─▶ variants for this device's profile ─▶ chunk diff against the local chunk store
      ─▶ fetch only missing chunks (retained ``…/blobs/<sha256>``; each verified, stored durably)
      ─▶ stage the release folder (every file re-assembled and sha256-checked, fsynced, renamed)
      ─▶ self-test (through ``EdgeModel``) ─▶ atomic switch of ``current`` ─▶ on_activate hook
      ─▶ keep the previous release, delete older ones and chunks nothing kept references.

Interrupted anywhere (broker gone, ``kill -9``), the next attempt starts over from the
manifest but finds the chunks already stored and fetches only the rest. Every rejection is
logged with its reason, counted in the twin, and leaves the active release untouched.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from edge_sdk.config import StrictModel
from edge_sdk.errors import ConfigError, EdgeSDKError, IntegrityError, SyncError
from edge_sdk.manifest import FileEntry, Manifest, Variant
from edge_sdk.profiles import AUTO
from edge_sdk.trust import TrustRoot, load_trust
from edge_sdk.types import ErrorKind, Precision, SyncState, SyncStatus

from ..monitor import ResourceSource
from ..policy import PolicyOverride
from .chunk_store import ChunkStore
from .envelope import verify_envelope
from .releases import ReleaseStore, release_name, write_atomic
from .topics import Topics, TopicKind
from .transport import Message, TlsConfig, Transport, TransportConfig
from .twin import DesiredState, Twin, merge_desired

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """The variant ``EdgeModel`` picked for this device's profile in the self-test: what serves."""

    backend: str
    precision: Precision


#: raises to refuse a staged release; may return the :class:`Selection` it loaded
SelfTest = Callable[[Path, "str | None"], "Selection | None"]


class SyncConfig(StrictModel):
    """Settings of one device's sync client."""

    broker: str = Field(description="mqtt://host:port (or mqtts:// with tls)")
    fleet: str
    device: str
    root: Path = Field(description="device state folder: chunks, releases, rollback-protection state")
    profile: str | None = Field(None, description="device profile id; None keeps every ok variant")
    public_key: Path | None = None
    allow_unsigned: bool = Field(False, description="accept unsigned releases (only without public_key)")
    prefix: str = ""
    tls: TlsConfig | None = None
    fetch_window: int = Field(32, ge=1, description="blob subscriptions in flight at once")
    stall_timeout_s: float = Field(5.0, gt=0, description="re-request a chunk not received after this")
    manifest_timeout_s: float = Field(30.0, gt=0)
    sync_timeout_s: float = Field(600.0, gt=0)
    retry_min_s: float = Field(2.0, gt=0)
    retry_max_s: float = Field(300.0, gt=0)
    self_test: bool = True


@dataclass
class SyncResult:
    """What one ``sync`` did; figures are what moved over the network in this attempt."""

    model: str
    version: int
    status: SyncStatus
    path: str | None = None
    chunks_total: int = 0  # distinct chunks the device's files need
    chunks_fetched: int = 0
    chunks_reused: int = 0  # found in the local store
    bytes_total: int = 0  # bytes of the device's files
    bytes_fetched: int = 0
    duration_s: float = 0.0
    reason: str | None = None
    variants: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_variants(manifest: Manifest, profile: str | None) -> list[Variant]:
    """The ok variants this device keeps: those built for ``profile`` (all ok ones if None)."""
    variants = manifest.variants_for(profile) if profile else [v for v in manifest.variants if v.ok]
    if not variants:
        raise IntegrityError(f"release {manifest.model} v{manifest.version} has no usable variant for profile {profile!r}")
    return variants


def default_self_test(release_dir: Path, profile: str | None, public_key: TrustRoot | None = None) -> Selection:
    """Load the staged release through ``EdgeModel``, which reproduces the manifest's self-test
    outputs (within each variant's tolerance) before it accepts a variant; raises if none does.
    Returns the variant it selected."""
    from edge_sdk import EdgeModel  # lazy: the runtime stack is heavy

    model = EdgeModel.load(release_dir, profile=profile or AUTO, monitor=False, public_key=public_key)
    try:
        info = model.info()
        return Selection(info.backend, info.precision)
    finally:
        model.close()


class SyncClient:
    """One device's release sync. ``sync()`` for a one-shot; ``start()`` to follow desired state.

    ``self_test(release_dir, profile)`` raises to refuse a staged release (default:
    :func:`default_self_test`); ``on_activate(release_dir)`` runs after the switch (e.g. the
    daemon's hot swap) and rolls the switch back if it raises; ``on_policy(policy)`` receives
    the merged desired runtime policy (a :class:`~edge_sdk.runtime.policy.PolicyOverride`) whenever
    it changes; raising reports the error in the twin (kind ``policy``) and the client keeps running.
    ``resources`` is the reader of the twin's resource figures (default: this machine, cgroup-aware).
    """

    def __init__(self, config: SyncConfig, *, transport: Transport | None = None,
                 self_test: SelfTest | None = None, on_activate: Callable[[Path], None] | None = None,
                 on_policy: Callable[[PolicyOverride], None] | None = None,
                 resources: ResourceSource | None = None) -> None:
        self.config = config
        self.topics = Topics(config.fleet, config.prefix)
        self.topics.status(config.device)  # validates the device id
        if config.public_key is not None:
            self.public_key = load_trust(config.public_key)
        elif config.allow_unsigned:
            self.public_key = None
        else:
            raise ConfigError("sync needs a public key to verify releases (or allow_unsigned for unsigned fleets)")
        root = Path(config.root)
        self.chunks = ChunkStore(root / "chunks")
        self.releases = ReleaseStore(root)
        self.transport = transport or Transport(TransportConfig.from_url(
            config.broker, client_id=config.device, status_topic=self.topics.status(config.device), tls=config.tls))
        self.twin = Twin(self.topics.reported(config.device),
                         lambda topic, payload: self.transport.publish(topic, payload, qos=1, retain=True),
                         resources=resources)
        if self_test is None and config.self_test:
            self_test = lambda folder, profile: default_self_test(folder, profile, self.public_key)  # noqa: E731
        self._self_test = self_test
        self._on_activate = on_activate
        self._on_policy = on_policy
        self._blobs: queue.Queue[Message] = queue.Queue()
        self._sync_lock = threading.Lock()
        self._desired: dict[str, DesiredState | None] = {"fleet": None, "device": None}
        self._policy: dict[str, Any] | None = None  # the last applied policy, as set (explicit nulls kept)
        self._failed: dict[tuple[str, int], str] = {}
        self._target: tuple[str, int] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.results: list[SyncResult] = []
        self._report_active()

    # -- lifecycle ---------------------------------------------------------------------------
    def subscribe_desired(self) -> None:
        """Receive the fleet and device desired state (see :meth:`desired`); no syncing by itself."""
        self.transport.subscribe(self.topics.desired(None), self._on_desired, qos=1)
        self.transport.subscribe(self.topics.desired(self.config.device), self._on_desired, qos=1)

    def start(self) -> None:
        """Connect in the background and follow desired state until :meth:`stop`."""
        self.subscribe_desired()
        self.transport.add_state_listener(lambda up: up and self.twin.publish())
        self.transport.start()
        self._worker = threading.Thread(target=self._run, name=f"sync-{self.config.device}", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
        self.transport.stop()

    def __enter__(self) -> SyncClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_active(self, model: str, version: int, timeout: float) -> bool:
        """Block until ``model`` ``version`` is the active release (for callers and tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.releases.active_ref() == (model, version):
                return True
            time.sleep(0.05)
        return False

    # -- desired state -----------------------------------------------------------------------
    def _on_desired(self, message: Message) -> None:
        match = self.topics.parse(message.topic)
        if match is None or match.kind not in (TopicKind.FLEET_DESIRED, TopicKind.DEVICE_DESIRED):
            return
        level = "fleet" if match.kind is TopicKind.FLEET_DESIRED else "device"
        if level == "device" and match.device != self.config.device:
            return
        try:
            self._desired[level] = DesiredState.from_payload(message.payload, message.topic)
        except ConfigError as exc:
            self.twin.error(ErrorKind.BAD_DESIRED, str(exc))
            return
        self._wake.set()

    def desired(self) -> DesiredState:
        return merge_desired(self._desired["fleet"], self._desired["device"])

    def _run(self) -> None:
        delay = self.config.retry_min_s
        timeout: float | None = None
        while not self._stop.is_set():
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                return
            desired = self.desired()
            self._apply_policy(desired.policy)
            timeout = None
            if len(desired.wanted) != 1:  # one model per device until the multi-model client (issue 13)
                continue
            (model, entry), = desired.wanted.items()
            target = (model, entry.version)
            if target != self._target:  # a new desired release: earlier refusals no longer apply
                self._failed.clear()
                self._target = target
            if self.releases.active_ref() == target or target in self._failed:
                continue
            try:
                result = self.sync(*target)
            except EdgeSDKError as exc:  # already reported in the twin; retry with backoff
                log.info("sync of %s v%s failed, retrying in %.1fs: %s", *target, delay, exc)
                timeout, delay = delay, min(delay * 2, self.config.retry_max_s)
                continue
            delay = self.config.retry_min_s
            if result.status in (SyncStatus.REJECTED, SyncStatus.ROLLED_BACK):
                self._failed[target] = result.reason or result.status

    def _apply_policy(self, policy: PolicyOverride) -> None:
        # Compared as set: model equality ignores whether pin_precision was null or absent.
        wanted = policy.as_dict()
        if wanted == self._policy:
            return
        self._policy = wanted
        if self._on_policy is not None:
            try:
                self._on_policy(policy)
            except Exception as exc:  # a policy the runtime cannot apply is reported, not fatal
                self.twin.error(ErrorKind.POLICY, f"could not apply desired policy {wanted}: {exc}")
                return
        self.twin.set(policy=wanted)

    # -- one release -------------------------------------------------------------------------
    def sync(self, model: str, version: int, timeout: float | None = None) -> SyncResult:
        """Fetch, verify, stage, self-test and activate ``model`` ``version``.

        Returns a :class:`SyncResult` (``rejected``/``rolled-back`` results carry the reason);
        raises :class:`SyncError` for transient failures (broker unreachable, timeouts, disk).
        Needs the transport started (``start()``, or ``transport.start()`` for a one-shot).
        """
        with self._sync_lock:
            started = time.monotonic()
            deadline = started + (timeout or self.config.sync_timeout_s)
            try:
                result = self._sync(model, version, deadline)
            except IntegrityError as exc:
                kind = getattr(exc, "kind", ErrorKind.INTEGRITY)
                self.twin.error(kind, str(exc))
                self.twin.progress(state=SyncState.FAILED, model=model, version=version, reason=str(exc))
                result = SyncResult(model, version, SyncStatus.REJECTED, reason=str(exc))
            except EdgeSDKError as exc:
                self.twin.error(getattr(exc, "kind", ErrorKind.SYNC), str(exc))
                self.twin.progress(state=SyncState.FAILED, model=model, version=version, reason=str(exc))
                raise
            result.duration_s = round(time.monotonic() - started, 3)
            self.results.append(result)
            return result

    def _sync(self, model: str, version: int, deadline: float) -> SyncResult:
        if self.releases.active_ref() == (model, version):
            return SyncResult(model, version, SyncStatus.ALREADY_ACTIVE, path=str(self.releases.active()))
        with _kind(ErrorKind.REPLAY):
            self.releases.check_version(model, version)  # before any download
        self.twin.progress(state=SyncState.MANIFEST, model=model, version=version)
        payload = self._fetch_manifest(model, version, deadline)
        with _kind(ErrorKind.BAD_SIGNATURE):
            manifest, data, signature = verify_envelope(payload, self.public_key)
        if (manifest.model, manifest.version) != (model, version):
            raise _tagged(IntegrityError(f"manifest at the {model} v{version} topic describes "
                                         f"{manifest.model} v{manifest.version}"), ErrorKind.WRONG_RELEASE)
        with _kind(ErrorKind.WRONG_PROFILE):
            variants = select_variants(manifest, self.config.profile)
        files = manifest.files(variants)
        with _kind(ErrorKind.BAD_CHUNK_LIST):
            for entry in files:
                entry.check_chunks()
        refs = [c for entry in files for c in entry.chunks]
        distinct = {c.sha256: c for c in refs}
        missing = self.chunks.missing(refs)
        result = SyncResult(model, version, SyncStatus.ACTIVATED, chunks_total=len(distinct),
                            chunks_reused=len(distinct) - len(missing),
                            bytes_total=sum(e.size for e in files), variants=[v.id for v in variants])
        self._fetch_chunks(missing, model, version, deadline, result)
        self.twin.progress(state=SyncState.STAGING, model=model, version=version)
        folder = self.releases.stage(manifest, data, signature, files, self.chunks)
        result.path = str(folder)
        selected: Selection | None = None
        if self._self_test is not None:
            self.twin.progress(state=SyncState.SELF_TEST, model=model, version=version)
            try:
                outcome = self._self_test(folder, self.config.profile)
                selected = outcome if isinstance(outcome, Selection) else None  # custom tests may return anything
            except Exception as exc:
                self.releases.discard(folder)
                reason = f"self-test of {model} v{version} failed: {exc}"
                self.twin.error(ErrorKind.SELF_TEST, reason)
                self.twin.progress(state=SyncState.FAILED, model=model, version=version, reason=reason)
                result.status, result.reason, result.path = SyncStatus.REJECTED, reason, None
                return result
        self.twin.progress(state=SyncState.ACTIVATING, model=model, version=version)
        self.releases.activate(folder)
        if self._on_activate is not None:
            try:
                self._on_activate(folder)
            except Exception as exc:
                back = self.releases.rollback()
                reason = f"activation of {model} v{version} failed, rolled back to {back.name if back else 'nothing'}: {exc}"
                self.twin.error(ErrorKind.ACTIVATION, reason)
                self._report_active()
                self.twin.progress(state=SyncState.FAILED, model=model, version=version, reason=reason)
                result.status, result.reason = SyncStatus.ROLLED_BACK, reason
                return result
        self.releases.cleanup()
        self.chunks.retain_only(self.releases.kept_chunks())
        # With an activation hook (the daemon) the hook reports what it actually serves.
        self._report_active(selected, backend=self._on_activate is None)
        self.twin.progress(state=SyncState.IDLE, model=model, version=version, chunks_fetched=result.chunks_fetched,
                           bytes_fetched=result.bytes_fetched)
        return result

    def _report_active(self, selected: Selection | None = None, backend: bool = True) -> None:
        """Report the active release and (``backend``) the backend/precision that serves it: the
        self-test's selection, remembered per release so a restarted client reports it too."""
        ref = self.releases.active_ref()
        if ref is None:
            return
        name = release_name(*ref)
        path = Path(self.config.root) / "served.json"
        try:
            served = json.loads(path.read_text())
        except (OSError, ValueError):
            served = {}
        if selected is not None:
            served = {name: asdict(selected)}  # older releases are cleaned up; only the active one matters
            try:
                write_atomic(path, json.dumps(served).encode())
            except OSError as exc:  # only the report after a restart suffers
                log.warning("could not remember the served variant in %s: %s", path, exc)
        fields: dict[str, Any] = {"release": {"model": ref[0], "version": ref[1]}}
        if backend:
            known = served.get(name) if isinstance(served, dict) else None
            fields["backend"] = known.get("backend") if isinstance(known, dict) else None
            fields["precision"] = known.get("precision") if isinstance(known, dict) else None
        self.twin.set(**fields)

    # -- network -----------------------------------------------------------------------------
    def _fetch_manifest(self, model: str, version: int, deadline: float) -> bytes:
        topic = self.topics.manifest(model, version)
        box: queue.Queue[bytes] = queue.Queue()
        self.transport.subscribe(topic, lambda m: box.put(m.payload), qos=1)
        try:
            limit = min(deadline, time.monotonic() + self.config.manifest_timeout_s)
            while True:
                remaining = limit - time.monotonic()
                if remaining <= 0:
                    raise SyncError(f"no manifest for {model} v{version} at {topic} (not published, or broker unreachable)")
                try:
                    payload = box.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    continue
                if payload:  # an empty retained message means "deleted"; keep waiting
                    return payload
        finally:
            self.transport.unsubscribe(topic)

    def _fetch_chunks(self, missing, model: str, version: int, deadline: float, result: SyncResult) -> None:
        pending = {ref.sha256: ref for ref in missing}
        waiting = list(pending)  # not yet requested
        inflight: dict[str, float] = {}  # sha -> when (re)requested
        while self._blobs.qsize():  # stale deliveries from an earlier attempt
            self._blobs.get_nowait()
        bytes_left = sum(r.size for r in missing)
        self.twin.progress(state=SyncState.FETCHING, model=model, version=version, chunks_total=result.chunks_total,
                           chunks_missing=len(pending), chunks_done=0, bytes_missing=bytes_left, bytes_done=0)
        try:
            while pending:
                now = time.monotonic()
                if now > deadline:
                    raise SyncError(f"sync of {model} v{version} timed out with {len(pending)} chunks still missing")
                while waiting and len(inflight) < self.config.fetch_window:
                    sha = waiting.pop(0)
                    inflight[sha] = now
                    self.transport.subscribe(self.topics.blob(sha), self._blobs.put, qos=1)
                for sha, since in list(inflight.items()):
                    if now - since > self.config.stall_timeout_s and self.transport.connected:
                        # Retained messages are sent on (re)subscribe: ask again for a stalled one.
                        self.transport.unsubscribe(self.topics.blob(sha))
                        self.transport.subscribe(self.topics.blob(sha), self._blobs.put, qos=1)
                        inflight[sha] = now
                try:
                    message = self._blobs.get(timeout=0.25)
                except queue.Empty:
                    continue
                match = self.topics.parse(message.topic)
                sha = match.sha256 if match is not None and match.kind is TopicKind.BLOB else None
                if sha not in inflight:
                    continue  # a duplicate, or a chunk already stored
                ref = pending[sha]
                if not message.payload:
                    continue  # cleared on the broker (gc); the stall timer asks again
                try:
                    self.chunks.put(sha, message.payload, ref.size)
                except IntegrityError as exc:
                    # Transient from our side: the broker may get the right bytes republished,
                    # so the caller retries later; nothing of it was stored.
                    raise _tagged(SyncError(f"corrupt chunk on the broker ({message.topic}): {exc}"), ErrorKind.CORRUPT_CHUNK) from None
                self.transport.unsubscribe(self.topics.blob(sha))
                del inflight[sha], pending[sha]
                result.chunks_fetched += 1
                result.bytes_fetched += ref.size
                self.twin.progress(state=SyncState.FETCHING, model=model, version=version, chunks_done=result.chunks_fetched,
                                   bytes_done=result.bytes_fetched)
        finally:
            for sha in inflight:
                self.transport.unsubscribe(self.topics.blob(sha))


class _kind:
    """Tag :class:`IntegrityError` raised in the block with a twin error kind."""

    def __init__(self, kind: ErrorKind) -> None:
        self.kind = kind

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if isinstance(exc, IntegrityError) and not hasattr(exc, "kind"):
            _tagged(exc, self.kind)
        return False


def _tagged(exc: EdgeSDKError, kind: ErrorKind) -> EdgeSDKError:
    exc.kind = kind  # type: ignore[attr-defined]
    return exc
