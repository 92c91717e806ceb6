"""Which releases a device trusts, on The Update Framework's metadata model (python-tuf).

What is adopted from TUF, and why (our feed is retained MQTT messages and a chunk store, not a
TUF repository fetched by URL, so TUF's ``ngclient`` and its snapshot/timestamp roles are not
used — each release is fetched alone, named by the desired state):

* **Root of trust** — a TUF ``root.json`` (:class:`TrustRoot`): keys named by TUF key ids, the
  ``root`` role (who may sign the next root) and the ``targets`` role (who may sign releases),
  each with a threshold, plus ``version`` and ``expires``. A lone PEM public key still works: it is
  a one-key root that cannot rotate.
* **Key compromise** — thresholds, release keys apart from root keys (keep those offline),
  **rotation and revocation** by a new root version signed by a threshold of the old root's root
  keys *and* its own (TUF's root update rule, checked by ``Root.verify_delegate``).
* **Mix-and-match** — a release statement (``manifest.sig``, TUF ``Targets`` metadata) binds one
  ``<model>/v<version>/manifest.json`` to the length and sha256 of the exact manifest bytes and to
  its own version; the manifest's chunk hashes then bind every file.
* **Freeze** — statements carry ``expires``: a device refuses to *activate* an expired one (a
  frozen or replayed feed is noticed) but keeps serving what it runs, and reports the expiry.
* **Rollback** — release versions only grow per model (``ReleaseStore.check_version``; the one
  exception is the release the device ran right before, still on disk, which a halted rollout
  sets it back to) and root versions only grow (:meth:`TrustRoot.rotate`).
* **Root delivery** — new roots travel as retained messages (``<prefix>/trust/root/<N>``); a
  device's :class:`TrustStore` takes them one version at a time by the rule above, in whatever
  order they arrive, keeps each accepted one on disk and re-walks the chain from its configured
  root at every start, so a file swapped on disk is never trusted.

Verification order: the statement (small, size-capped JSON) is parsed and its signatures checked
against the root; only then is the manifest hashed and parsed.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, Targets, TargetFile
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from .errors import ConfigError, IntegrityError

#: what ``verify_manifest_bytes`` and ``EdgeModel.load`` accept as trusted keys
TrustSource = "TrustRoot | Ed25519PublicKey | Path | str | bytes"
RELEASE_EXPIRY = timedelta(days=90)
ROOT_EXPIRY = timedelta(days=365)
MAX_STATEMENT_BYTES = 64 * 1024
_TARGET = re.compile(r"(?P<model>[^/]+)/v(?P<version>\d+)/manifest\.json")
_ROOT_FILE = re.compile(r"root\.(?P<version>\d+)\.json")
#: roots a :class:`TrustStore` holds while it waits for the versions in between
MAX_PENDING_ROOTS = 32
log = logging.getLogger(__name__)


def key_of(public: Ed25519PublicKey) -> SSlibKey:
    """The TUF key (its ``keyid`` is the sha256 of the key's canonical JSON)."""
    return SSlibKey.from_crypto(public)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    return key_of(key.public_key() if isinstance(key, Ed25519PrivateKey) else key).keyid


def _signer(private: Ed25519PrivateKey) -> CryptoSigner:
    return CryptoSigner(private, key_of(private.public_key()))


def _utc(when: datetime | timedelta) -> datetime:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    return now + when if isinstance(when, timedelta) else when


def _to_bytes(md: Metadata) -> bytes:
    return md.to_bytes(JSONSerializer(compact=False)) + b"\n"


def release_target(model: str, version: int) -> str:
    return f"{model}/v{version}/manifest.json"


def sign_release(manifest_bytes: bytes, keys: list[Ed25519PrivateKey], *,
                 expires: datetime | timedelta = RELEASE_EXPIRY) -> bytes:
    """The release statement (``manifest.sig``) for the exact ``manifest_bytes``, signed by ``keys``."""
    if not keys:
        raise ConfigError("signing a release needs at least one private key")
    head = json.loads(manifest_bytes)
    model, version = head["model"], int(head["version"])
    path = release_target(model, version)
    md = Metadata(Targets(version=version, expires=_utc(expires),
                          targets={path: TargetFile.from_data(path, manifest_bytes, ["sha256"])}))
    for key in keys:
        md.sign(_signer(key), append=True)
    return _to_bytes(md)


@dataclass(frozen=True)
class ReleaseTrust:
    """Why a release is trusted: by which keys, until when, under which root."""

    model: str
    version: int
    keyids: tuple[str, ...]
    expires: datetime
    root_version: int

    @property
    def expired(self) -> bool:
        return datetime.now(timezone.utc) >= self.expires

    def report(self) -> dict[str, object]:
        return {"keyids": list(self.keyids), "expires": self.expires.isoformat(), "expired": self.expired,
                "root_version": self.root_version}


class TrustRoot:
    """The keys a device trusts (TUF root metadata). See the module docstring."""

    def __init__(self, metadata: Metadata[Root], source: str) -> None:
        self.metadata = metadata
        self.source = source

    @property
    def root(self) -> Root:
        return self.metadata.signed

    @property
    def version(self) -> int:
        return self.root.version

    @classmethod
    def from_public_key(cls, public: Ed25519PublicKey, source: str = "public key") -> TrustRoot:
        """A one-key root (releases signed by ``public``), trusted by configuration; it cannot rotate."""
        root = Root(expires=datetime(9999, 1, 1, tzinfo=timezone.utc))
        for role in root.roles:
            root.add_key(key_of(public), role)
        return cls(Metadata(root), source)

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> TrustRoot:
        md = _parse(data, Root, source)
        try:  # a root must carry a threshold of its own root keys' signatures
            md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
        except tuf_errors.UnsignedMetadataError as exc:
            raise IntegrityError(f"{source}: root is not signed by its own root keys ({exc})") from None
        return cls(md, source)

    @classmethod
    def load(cls, path: Path | str) -> TrustRoot:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"trust root {path}: {exc.strerror or exc}") from None
        return cls.from_bytes(data, str(path))

    def to_bytes(self) -> bytes:
        return _to_bytes(self.metadata)

    @property
    def rotatable(self) -> bool:
        """False for a lone pinned public key: only a signed root.json names root keys apart."""
        return bool(self.metadata.signatures)

    def report(self) -> dict[str, object]:
        """For the reported state: which root is trusted now."""
        return {"root_version": self.version, "release_keys": self.keyids(),
                "expires": self.root.expires.isoformat(), "expired": self.root.is_expired()}

    def keyids(self, role: str = Targets.type) -> list[str]:
        return list(self.root.roles[role].keyids)

    def verify_release(self, statement: bytes, manifest_bytes: bytes, *, allow_expired: bool = False) -> ReleaseTrust:
        """Check ``statement`` against this root and ``manifest_bytes`` against the statement."""
        if len(statement) > MAX_STATEMENT_BYTES:
            raise IntegrityError(f"release statement of {len(statement)} bytes is oversized")
        md = _parse(statement, Targets, "release statement")
        result = self.root.get_verification_result(Targets.type, md.signed_bytes, md.signatures)
        if not result.verified:
            raise IntegrityError(
                f"signature does not verify: {len(result.signed)} valid signature(s) of trusted release keys, "
                f"{result.threshold} needed (signed by {sorted(md.signatures) or 'nobody'}; trusted: "
                f"{self.keyids()}; root v{self.version} from {self.source})")
        targets = md.signed.targets
        match = _TARGET.fullmatch(next(iter(targets))) if len(targets) == 1 else None
        if match is None or int(match["version"]) != md.signed.version:
            raise IntegrityError(f"release statement names {sorted(targets)} at v{md.signed.version}, "
                                 "not one <model>/v<version>/manifest.json of its own version")
        try:
            next(iter(targets.values())).verify_length_and_hashes(manifest_bytes)
        except tuf_errors.LengthOrHashMismatchError as exc:
            raise IntegrityError(f"signature does not verify: the manifest does not match its signed statement "
                                 f"({exc})") from None
        trust = ReleaseTrust(match["model"], md.signed.version, tuple(sorted(result.signed)), md.signed.expires,
                             self.version)
        if trust.expired and not allow_expired:
            raise IntegrityError(f"release statement of {trust.model} v{trust.version} expired on "
                                 f"{trust.expires.isoformat()} (a frozen or replayed feed?)")
        return trust

    def rotate(self, new_root: bytes, source: str = "new root") -> TrustRoot:
        """Accept root v(N+1) signed by a threshold of this root's root keys and of its own."""
        md = _parse(new_root, Root, source)
        if md.signed.version != self.version + 1:
            raise IntegrityError(f"{source}: root v{md.signed.version} does not follow v{self.version}")
        for who, root in (("current", self.root), ("new", md.signed)):
            result = root.get_verification_result(Root.type, md.signed_bytes, md.signatures)
            if not result.verified:
                raise IntegrityError(f"{source}: root v{md.signed.version} lacks a threshold of the {who} root "
                                     f"keys ({len(result.signed)} of {result.threshold})")
        return TrustRoot(md, source)


class TrustStore:
    """The root a device trusts now: its configured root, moved forward by later roots it accepted.

    :meth:`offer` takes a root from the network; v N+1 is accepted only if signed by a threshold
    of v N's root keys and of its own (:meth:`TrustRoot.rotate`), so roots that arrive early wait
    (at most :data:`MAX_PENDING_ROOTS`) for the ones in between. Each accepted root is written
    atomically to ``folder/root.<N>.json``; at start the chain is walked again from ``configured``
    through those files, so one that does not chain is ignored (and listed in :attr:`refused`).
    """

    def __init__(self, configured: TrustRoot, folder: Path | None = None) -> None:
        self.configured = configured
        self.folder = folder
        self.current = configured
        #: version -> why a root of that version was refused (the newest refusals)
        self.refused: dict[int, str] = {}
        self._pending: dict[int, tuple[bytes, str]] = {}
        if folder is not None and folder.is_dir():
            for path in folder.iterdir():
                match = _ROOT_FILE.fullmatch(path.name)
                if match is not None and int(match["version"]) > configured.version:
                    self._pending[int(match["version"])] = (path.read_bytes(), str(path))
        self._advance(persist=False)

    def offer(self, data: bytes, source: str = "network") -> bool:
        """Consider one root; True if the trusted root moved forward."""
        try:
            version = _parse(data, Root, source).signed.version
        except IntegrityError as exc:
            self._refuse(0, str(exc))
            return False
        if version <= self.current.version:
            return False  # already trusted, or a replayed old root
        if not self.current.rotatable:
            self._refuse(version, f"{source}: root v{version} ignored: this device pins a single public key "
                                  f"({self.current.source}); configure a root.json to rotate keys")
            return False
        self._pending[version] = (data, source)
        while len(self._pending) > MAX_PENDING_ROOTS:
            del self._pending[max(self._pending)]
        return self._advance(persist=True)

    def _advance(self, persist: bool) -> bool:
        moved = False
        while (entry := self._pending.pop(self.current.version + 1, None)) is not None:
            data, source = entry
            try:
                new = self.current.rotate(data, source)
            except IntegrityError as exc:
                self._refuse(self.current.version + 1, str(exc))
                break
            if persist and self.folder is not None:
                from .runtime.sync.releases import write_atomic  # device-side storage helper

                self.folder.mkdir(parents=True, exist_ok=True)
                write_atomic(self.folder / f"root.{new.version}.json", data)
            log.warning("trust root rotated: v%d -> v%d (release keys %s)", self.current.version, new.version,
                        new.keyids())
            self.current = new
            moved = True
        self._pending = {v: e for v, e in self._pending.items() if v > self.current.version}
        return moved

    def _refuse(self, version: int, why: str) -> None:
        log.error("trust root refused: %s", why)
        self.refused[version] = why
        while len(self.refused) > 8:
            del self.refused[min(self.refused)]


def _parse(data: bytes, kind: type, source: str) -> Metadata:
    try:
        md = Metadata.from_bytes(data)
    except (DeserializationError, ValueError, TypeError, KeyError) as exc:
        raise IntegrityError(f"{source}: not TUF metadata ({exc})") from None
    if not isinstance(md.signed, kind):
        raise IntegrityError(f"{source}: is {md.signed.type} metadata, expected {kind.type}")
    return md


def new_root(root_keys: list[Ed25519PrivateKey], release_keys: list[Ed25519PublicKey], *, root_threshold: int = 1,
             release_threshold: int = 1, expires: datetime | timedelta = ROOT_EXPIRY) -> bytes:
    """Root v1 (``root.json``): ``root_keys`` sign later roots, ``release_keys`` sign releases."""
    root = Root(expires=_utc(expires))
    for role in (Root.type, "snapshot", "timestamp"):  # TUF requires these roles; we use only root
        for key in root_keys:
            root.add_key(key_of(key.public_key()), role)
    for key in release_keys:
        root.add_key(key_of(key), Targets.type)
    _thresholds(root, root_threshold, release_threshold)
    md = Metadata(root)
    for key in root_keys:
        md.sign(_signer(key), append=True)
    return _to_bytes(md)


def rotate_root(current: bytes, signing_keys: list[Ed25519PrivateKey], *,
                add_release: list[Ed25519PublicKey] = (), add_root: list[Ed25519PublicKey] = (),
                revoke: list[str] = (), root_threshold: int | None = None, release_threshold: int | None = None,
                expires: datetime | timedelta = ROOT_EXPIRY) -> bytes:
    """Root v(N+1) from ``current``: keys added or revoked (by key id), signed by ``signing_keys``
    (a threshold of the current root keys and of the new ones)."""
    md = _parse(current, Root, "current root")
    root = md.signed
    root.version += 1
    root.expires = _utc(expires)
    for keyid in revoke:
        roles = [name for name, role in root.roles.items() if keyid in role.keyids]
        if not roles:
            raise ConfigError(f"key {keyid} is in no role of root v{root.version - 1}")
        for name in roles:
            root.revoke_key(keyid, name)
    for key in add_release:
        root.add_key(key_of(key), Targets.type)
    for key in add_root:
        for role in (Root.type, "snapshot", "timestamp"):
            root.add_key(key_of(key), role)
    _thresholds(root, root_threshold or root.roles[Root.type].threshold,
                release_threshold or root.roles[Targets.type].threshold)
    md.signatures.clear()
    for key in signing_keys:
        md.sign(_signer(key), append=True)
    return _to_bytes(md)


def _thresholds(root: Root, root_threshold: int, release_threshold: int) -> None:
    for name, threshold in ((Root.type, root_threshold), ("snapshot", root_threshold),
                            ("timestamp", root_threshold), (Targets.type, release_threshold)):
        role = root.roles[name]
        if not 1 <= threshold <= len(role.keyids):
            raise ConfigError(f"role {name}: threshold {threshold} needs 1…{len(role.keyids)} keys")
        role.threshold = threshold


def load_trust(source: Path | str | bytes | Ed25519PublicKey | TrustRoot) -> TrustRoot:
    """A :class:`TrustRoot` from a ``root.json`` or a PEM public key (path or bytes), or as given."""
    from .signing import load_public_key

    if isinstance(source, TrustRoot):
        return source
    if isinstance(source, Ed25519PublicKey):
        return TrustRoot.from_public_key(source)
    data = source if isinstance(source, bytes) else None
    name = "trust root" if data is not None else str(source)
    if data is None:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ConfigError(f"trust root {source}: {exc.strerror or exc}") from None
    if data.lstrip().startswith(b"{"):
        return TrustRoot.from_bytes(data, name)
    return TrustRoot.from_public_key(load_public_key(data), name)
