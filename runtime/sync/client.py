"""``SyncClient``: keeps one device's models in line with their desired state.

A device serves several models. Each desired model has its own release version and chunk store
(see :mod:`~edge_sdk.runtime.sync.desired`), its own worker thread and its own ``current``
pointer: models sync, activate, roll back and report independently, and one model's bad
release never touches another. Chunks are shared: a chunk two models (or versions, or
variants) use is stored once.

Flow for one release (``sync(model, version)``, also driven by desired-state messages)::

    manifest message ─ envelope + Ed25519 signature checked ─▶ parsed ─▶ rollback protection
      ─▶ variants for this device's profile ─▶ chunk diff against the local chunk store
      ─▶ fetch only missing chunks from the model's chunk store (MQTT retained blobs, S3, or a
         web server/CDN; see :mod:`~edge_sdk.runtime.sync.stores`), each verified, stored durably
      ─▶ stage the release folder (every file re-assembled and sha256-checked, fsynced, renamed)
      ─▶ self-test (through ``EdgeModel``) ─▶ atomic switch of ``current/<model>`` ─▶ on_activate hook
      ─▶ keep the previous release, delete older ones and chunks nothing kept references.

Interrupted anywhere (broker or store gone, ``kill -9``), the next attempt starts over from the
manifest but finds the chunks already stored and fetches only the rest. Every rejection is
logged with its reason, counted in the twin, and leaves the active release untouched.

A refusal is remembered by *content*, the sha256 of the manifest message (manifest + release
statement), not by version: a forged or broken manifest is not tried again, but the genuine one
published at the same version later is taken as soon as it is retained (each follower watches its
model's manifest topics). A bad chunk is not a refusal of the release: it is fetched again.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from edge_sdk.chunking import sha256_bytes
from edge_sdk.config import StrictModel
from edge_sdk.errors import ConfigError, EdgeSDKError, IntegrityError, SyncError
from edge_sdk.manifest import Manifest, Variant
from edge_sdk.profiles import AUTO
from edge_sdk.trust import TrustRoot, TrustStore, load_trust
from edge_sdk.types import ErrorKind, Precision, SyncState, SyncStatus

from ..monitor import ResourceSource
from ..policy import PolicyOverride
from .chunk_store import ChunkStore
from .envelope import verify_envelope
from .fetch import fetch_missing
from .releases import ReleaseStore, parse_name, release_name, write_atomic
from .stores import DEFAULT_MAX_MESSAGE_BYTES, MQTT_STORE, Store, StoreError, StoreOptions, open_store, store_scheme
from .topics import Topics, TopicKind
from .transport import Message, TlsConfig, Transport, TransportConfig
from .twin import DesiredState, Twin, merge_desired

log = logging.getLogger(__name__)
#: refused manifest messages remembered (by sha256), oldest forgotten first
MAX_REFUSED = 256


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
    labels: dict[str, str] = Field(default_factory=dict, description="reported with the profile: what rollout "
                                                                     "groups and the fleet view match (site=plant1)")
    public_key: Path | None = None
    allow_unsigned: bool = Field(False, description="accept unsigned releases (only without public_key)")
    prefix: str = ""
    tls: TlsConfig | None = None
    store: str = Field(MQTT_STORE, description="chunk store of models whose desired state names none")
    store_ca: Path | None = Field(None, description="CA of https stores and S3 endpoints (default: tls.ca)")
    store_timeout_s: float = Field(30.0, gt=0, description="per store request")
    store_retries: int = Field(5, ge=0, description="per chunk, with exponential backoff")
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=1024, description="largest MQTT chunk accepted")
    fetch_window: int = Field(32, ge=1, description="chunks in flight at once")
    stall_timeout_s: float = Field(5.0, gt=0, description="re-request an MQTT chunk not received after this")
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
    ``trust`` is the device's :class:`~edge_sdk.trust.TrustStore` (default: one built from
    ``config.public_key``, keeping accepted roots under ``<root>/trust``); the client follows the
    fleet's retained roots (``<prefix>/trust/root/<N>``) and verifies releases with the newest it accepted.
    """

    def __init__(self, config: SyncConfig, *, transport: Transport | None = None,
                 self_test: SelfTest | None = None, on_activate: Callable[[Path], None] | None = None,
                 on_policy: Callable[[PolicyOverride], None] | None = None,
                 resources: ResourceSource | None = None, trust: TrustStore | None = None) -> None:
        self.config = config
        store_scheme(config.store)  # an unknown default store is a config error now, not at the first sync
        self.topics = Topics(config.fleet, config.prefix)
        self.topics.status(config.device)  # validates the device id
        root = Path(config.root)
        if trust is None and config.public_key is not None:
            trust = TrustStore(load_trust(config.public_key), root / "trust")
        elif trust is None and not config.allow_unsigned:
            raise ConfigError("sync needs a public key to verify releases (or allow_unsigned for unsigned fleets)")
        self.trust = trust
        self.chunks = ChunkStore(root / "chunks")
        self.releases = ReleaseStore(root)
        self.transport = transport or Transport(TransportConfig.from_url(
            config.broker, client_id=config.device, status_topic=self.topics.status(config.device), tls=config.tls))
        self.twin = Twin(self.topics.reported(config.device),
                         lambda topic, payload: self.transport.publish(topic, payload, qos=1, retain=True),
                         resources=resources, identity={"profile": config.profile, "labels": dict(config.labels)})
        if self_test is None and config.self_test:
            self_test = lambda folder, profile: default_self_test(folder, profile, self.public_key)  # noqa: E731
        self._self_test = self_test
        self._on_activate = on_activate
        self._on_policy = on_policy
        self._lock = threading.Lock()  # guards the dicts below
        self._stores: dict[str, Store] = {}
        self._model_locks: dict[str, threading.Lock] = {}
        self._needed: dict[str, set[str]] = {}  # chunks of syncs in progress, kept by chunk cleanup
        self._followers: dict[str, _Follower] = {}
        self._desired: dict[str, DesiredState | None] = {"fleet": None, "device": None}
        self._policy: dict[str, Any] | None = None  # the last applied policy, as set (explicit nulls kept)
        self._refused: OrderedDict[str, str] = OrderedDict()  # sha256 of a refused manifest message -> why
        self._unverified: set[str] = set()  # refused for their signature: judged again when the root rotates
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.results: list[SyncResult] = []
        for model in self.releases.models():
            self._report_active(model)

    @property
    def public_key(self) -> TrustRoot | None:
        """The root releases are verified with now (None for an unsigned fleet)."""
        return self.trust.current if self.trust is not None else None

    # -- lifecycle ---------------------------------------------------------------------------
    def subscribe_desired(self) -> None:
        """Receive the fleet and device desired state (see :meth:`desired`) and the fleet's trust
        roots; no syncing by itself."""
        self.transport.subscribe(self.topics.desired(None), self._on_desired, qos=1)
        self.transport.subscribe(self.topics.desired(self.config.device), self._on_desired, qos=1)
        if self.trust is not None:
            self.transport.subscribe(self.topics.all_trust_roots(), self._on_trust_root, qos=1)

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
        with self._lock:
            followers = list(self._followers.values())
        for follower in followers:
            follower.wake.set()
        for thread in [self._worker, *(f.thread for f in followers)]:
            if thread is not None:
                thread.join(timeout=30)
        self.transport.stop()
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            store.close()

    def __enter__(self) -> SyncClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_active(self, model: str, version: int, timeout: float) -> bool:
        """Block until ``model`` ``version`` is the model's active release (for callers and tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.releases.active_ref(model) == (model, version):
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
        """Apply the desired policy; give each desired model a follower and wake it on changes."""
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            desired = self.desired()
            self._apply_policy(desired.policy)
            with self._lock:
                for name in desired.wanted:
                    if name not in self._followers:
                        self._followers[name] = _Follower(self, name)
                followers = list(self._followers.values())
            for follower in followers:  # models no longer desired keep serving what they have
                follower.wake.set()

    def _follow(self, follower: _Follower) -> None:
        """One model's loop: sync it to its desired version, retrying transient failures with backoff."""
        model = follower.model
        delay = self.config.retry_min_s
        timeout: float | None = None
        while not self._stop.is_set():
            follower.wake.wait(timeout)
            follower.wake.clear()
            if self._stop.is_set():
                return
            entry = self.desired().wanted.get(model)
            timeout = None
            if entry is None or self.releases.active_ref(model) == (model, entry.version):
                continue
            if follower.manifests.get(entry.version) in self._refused:
                continue  # the retained manifest is one refused before; the watcher wakes us for another
            try:
                self.sync(model, entry.version, store=entry.store)
            except EdgeSDKError as exc:  # already reported in the twin; retry with backoff
                log.info("sync of %s v%s failed, retrying in %.1fs: %s", model, entry.version, delay, exc)
                timeout, delay = delay, min(delay * 2, self.config.retry_max_s)
                continue
            delay = self.config.retry_min_s

    def _on_manifest(self, follower: _Follower, message: Message) -> None:
        """A retained manifest of the follower's model: remember its digest; wake the follower
        if it is for the wanted version and is not one refused before."""
        match = self.topics.parse(message.topic)
        if match is None or match.kind is not TopicKind.MANIFEST or match.model != follower.model:
            return
        if not message.payload:
            follower.manifests.pop(match.version, None)
            return
        digest = follower.manifests[match.version] = sha256_bytes(message.payload)
        entry = self.desired().wanted.get(follower.model)
        if entry is not None and entry.version == match.version and digest not in self._refused:
            follower.wake.set()

    def _refuse(self, digest: str, reason: str, kind: ErrorKind | None = None) -> None:
        with self._lock:
            self._refused[digest] = reason
            if kind is ErrorKind.BAD_SIGNATURE:
                self._unverified.add(digest)
            while len(self._refused) > MAX_REFUSED:
                self._unverified.discard(self._refused.popitem(last=False)[0])

    def _on_trust_root(self, message: Message) -> None:
        """A retained root: the trust store takes it if it chains (TUF's root update rule). Once the
        root moves, releases refused for their signature are judged again under the new keys."""
        match = self.topics.parse(message.topic)
        if match is None or match.kind is not TopicKind.TRUST_ROOT or not message.payload or self.trust is None:
            return
        refused_before = dict(self.trust.refused)
        try:
            moved = self.trust.offer(message.payload, source=message.topic)
        except OSError as exc:  # the accepted root could not be kept on disk: not trusted until it can be
            self.twin.error(ErrorKind.STORAGE, f"trust root from {message.topic}: {exc.strerror or exc}")
            return
        for version, why in self.trust.refused.items():
            if refused_before.get(version) != why:
                self.twin.error(ErrorKind.TRUST_ROOT, why)
        if not moved:
            return
        self.twin.set(trust_root=self.trust.current.version)
        with self._lock:
            for digest in self._unverified:
                self._refused.pop(digest, None)
            self._unverified.clear()
            followers = list(self._followers.values())
        for follower in followers:
            follower.wake.set()

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
    def sync(self, model: str, version: int, timeout: float | None = None, store: str | None = None) -> SyncResult:
        """Fetch, verify, stage, self-test and activate ``model`` ``version``, its chunks from
        ``store`` (default: the configured store).

        Returns a :class:`SyncResult` (``rejected``/``rolled-back`` results carry the reason);
        raises :class:`SyncError` for transient failures (broker or store unreachable, timeouts,
        disk). Needs the transport started (``start()``, or ``transport.start()`` for a one-shot).
        Syncs of different models run at the same time; one model's are serialized.
        """
        with self._lock:
            model_lock = self._model_locks.setdefault(model, threading.Lock())
        with model_lock:
            started = time.monotonic()
            deadline = started + (timeout or self.config.sync_timeout_s)
            try:
                result = self._sync(model, version, deadline, store or self.config.store)
            except IntegrityError as exc:
                kind = getattr(exc, "kind", ErrorKind.INTEGRITY)
                self.twin.error(kind, str(exc))
                self.twin.progress(state=SyncState.FAILED, model=model, version=version, reason=str(exc))
                result = SyncResult(model, version, SyncStatus.REJECTED, reason=str(exc))
            except EdgeSDKError as exc:
                if not getattr(exc, "counted", False):
                    self.twin.error(getattr(exc, "kind", ErrorKind.SYNC), str(exc))
                self.twin.progress(state=SyncState.FAILED, model=model, version=version, reason=str(exc))
                raise
            finally:
                with self._lock:
                    self._needed.pop(model, None)
            result.duration_s = round(time.monotonic() - started, 3)
            self.results.append(result)
            return result

    def _sync(self, model: str, version: int, deadline: float, store_url: str) -> SyncResult:
        if self.releases.active_ref(model) == (model, version):
            return SyncResult(model, version, SyncStatus.ALREADY_ACTIVE, path=str(self.releases.active(model)))
        with _kind(ErrorKind.REPLAY):
            self.releases.check_version(model, version)  # before any download
        self.twin.progress(state=SyncState.MANIFEST, model=model, version=version)
        payload = self._fetch_manifest(model, version, deadline)
        digest = sha256_bytes(payload)
        if digest in self._refused:  # this exact message was refused: not again, and not counted again
            return SyncResult(model, version, SyncStatus.REJECTED, reason=f"refused before: {self._refused[digest]}")
        try:
            result = self._apply(model, version, payload, deadline, store_url)
        except IntegrityError as exc:
            self._refuse(digest, str(exc), getattr(exc, "kind", None))
            raise
        if result.status in (SyncStatus.REJECTED, SyncStatus.ROLLED_BACK):
            self._refuse(digest, result.reason or result.status.value)
        return result

    def _apply(self, model: str, version: int, payload: bytes, deadline: float, store_url: str) -> SyncResult:
        """Everything after the manifest message arrived: verify, fetch, stage, self-test, activate."""
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
        with self._lock:  # before the diff: another model's cleanup must not delete them meanwhile
            self._needed[model] = set(distinct)
        missing = self.chunks.missing(refs)
        result = SyncResult(model, version, SyncStatus.ACTIVATED, chunks_total=len(distinct),
                            chunks_reused=len(distinct) - len(missing),
                            bytes_total=sum(e.size for e in files), variants=[v.id for v in variants])
        self._fetch_chunks(missing, model, version, deadline, result, store_url)
        self.twin.progress(state=SyncState.STAGING, model=model, version=version)
        try:
            folder = self.releases.stage(manifest, data, signature, files, self.chunks)
        except IntegrityError as exc:
            if getattr(exc, "kind", None) != ErrorKind.CORRUPT_CHUNK:
                raise
            # A stored chunk went bad on this device (now removed): not the release's fault.
            raise _tagged(SyncError(f"staging {model} v{version}: {exc}; fetching it again"),
                          ErrorKind.CORRUPT_CHUNK) from None
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
                back = self.releases.rollback(model)
                reason = f"activation of {model} v{version} failed, rolled back to {back.name if back else 'nothing'}: {exc}"
                self.twin.error(ErrorKind.ACTIVATION, reason)
                self._report_active(model)
                self.twin.progress(state=SyncState.FAILED, model=model, version=version, reason=reason)
                result.status, result.reason = SyncStatus.ROLLED_BACK, reason
                return result
        self.releases.cleanup(model)
        with self._lock:  # every model's kept releases, and the chunks of syncs still running
            keep = self.releases.kept_chunks().union(*(s for m, s in self._needed.items() if m != model))
            self.chunks.retain_only(keep)
        # With an activation hook (the daemon) the hook reports what it actually serves.
        self._report_active(model, selected, backend=self._on_activate is None)
        self.twin.progress(state=SyncState.IDLE, model=model, version=version, chunks_fetched=result.chunks_fetched,
                           bytes_fetched=result.bytes_fetched)
        return result

    def _report_active(self, model: str, selected: Selection | None = None, backend: bool = True) -> None:
        """Report ``model``'s active release and (``backend``) the backend/precision that serves it:
        the self-test's selection, remembered per release so a restarted client reports it too."""
        ref = self.releases.active_ref(model)
        if ref is None:
            return
        name = release_name(*ref)
        path = Path(self.config.root) / "served.json"
        with self._lock:
            try:
                served = json.loads(path.read_text())
            except (OSError, ValueError):
                served = {}
            served = served if isinstance(served, dict) else {}
            if selected is not None:
                # One entry per model: its older releases are cleaned up, only the active one matters.
                served = {k: v for k, v in served.items() if (parse_name(k) or ("",))[0] != model}
                served[name] = asdict(selected)
                try:
                    write_atomic(path, json.dumps(served).encode())
                except OSError as exc:  # only the report after a restart suffers
                    log.warning("could not remember the served variant in %s: %s", path, exc)
        fields: dict[str, Any] = {"release": {"model": ref[0], "version": ref[1]}}
        if backend:
            known = served.get(name)
            fields["backend"] = known.get("backend") if isinstance(known, dict) else None
            fields["precision"] = known.get("precision") if isinstance(known, dict) else None
        self.twin.set_model(model, **fields)

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

    def store(self, url: str) -> Store:
        """The chunk store at ``url``, opened once and shared by every model that uses it."""
        with self._lock:
            store = self._stores.get(url)
            if store is None:
                tls = self.config.tls
                # The fleet's TLS identity serves https stores too (the fleet CA, the device certificate).
                options = StoreOptions(ca_certs=self.config.store_ca or (tls.ca if tls else None),
                                       certfile=tls.cert if tls else None, keyfile=tls.key if tls else None,
                                       timeout_s=self.config.store_timeout_s, retries=self.config.store_retries,
                                       max_message_bytes=self.config.max_message_bytes,
                                       stall_s=self.config.stall_timeout_s, transport=self.transport, topics=self.topics)
                store = self._stores[url] = open_store(url, options)
            return store

    def _fetch_chunks(self, missing, model: str, version: int, deadline: float, result: SyncResult,
                      store_url: str) -> None:
        store = self.store(store_url)
        self.twin.progress(state=SyncState.FETCHING, model=model, version=version, store=store_url,
                           chunks_total=result.chunks_total, chunks_missing=len(missing), chunks_done=0,
                           bytes_missing=sum(r.size for r in missing), bytes_done=0)
        lock = threading.Lock()

        def fetched(ref) -> None:
            with lock:
                result.chunks_fetched += 1
                result.bytes_fetched += ref.size
                done, size = result.chunks_fetched, result.bytes_fetched
            self.twin.progress(state=SyncState.FETCHING, model=model, version=version, chunks_done=done, bytes_done=size)

        def refused(ref, why: str) -> None:  # counted each time; fetch_missing asks again, then gives up
            self.twin.error(ErrorKind.CORRUPT_CHUNK, f"{store_url} served wrong bytes for chunk {ref.sha256[:12]}… of "
                                             f"{model} v{version}: {why}")

        try:
            fetch_missing(store, self.chunks, missing, deadline, workers=self.config.fetch_window, on_chunk=fetched,
                          on_corrupt=refused, cancel=self._stop)
        except StoreError as exc:
            exc.counted = exc.kind == ErrorKind.CORRUPT_CHUNK  # type: ignore[attr-defined]  # each refusal was, in refused()
            raise


class _Follower:
    """The worker thread that keeps one model at its desired release."""

    def __init__(self, client: SyncClient, model: str) -> None:
        self.model = model
        self.wake = threading.Event()
        self.manifests: dict[int, str] = {}  # version -> sha256 of the manifest message retained for it
        # Its own filter (not the exact topic _fetch_manifest subscribes to), so both get the messages.
        client.transport.subscribe(client.topics.all_manifests(model), lambda m: client._on_manifest(self, m), qos=1)
        self.thread = threading.Thread(target=client._follow, args=(self,), name=f"sync-{model}", daemon=True)
        self.thread.start()


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
