"""The release manifest: the contract between converters, the cloud side and devices.

Its JSON key names are read by tools outside the SDK (see DESIGN.md); change them never, add to
them carefully. A signed release has ``manifest.sig`` beside ``manifest.json``: a release
statement (TUF targets metadata, see :mod:`edge_sdk.trust`) with Ed25519 signatures by key id and an
expiry, binding the sha256 of the exact bytes of ``manifest.json``; it is verified *before* those
bytes are parsed.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import trust
from .chunking import chunk_file, sha256_file
from .config import describe_validation_error
from .errors import IntegrityError
from .report import ConversionReport
from .types import Precision, SpeedVerdict, Target, VariantStatus

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
SCHEMA_VERSION = 1


class _Model(BaseModel):
    # Devices must keep reading manifests written by newer SDKs: unknown keys are ignored.
    model_config = ConfigDict(extra="ignore")


class ChunkRef(_Model):
    sha256: str
    size: int = Field(ge=0)


class FileEntry(_Model):
    path: str = Field(description="relative to the release folder")
    size: int = Field(ge=0)
    sha256: str
    chunks: list[ChunkRef] = Field(default_factory=list)

    @classmethod
    def from_file(cls, release_dir: Path, path: Path) -> FileEntry:
        """Describe ``path`` (inside ``release_dir``) with its hash and chunks (one streamed read)."""
        rel = path.resolve().relative_to(release_dir.resolve()).as_posix()
        chunked = chunk_file(path)
        return cls(path=rel, size=chunked.size, sha256=chunked.sha256,
                   chunks=[ChunkRef(sha256=c.sha256, size=c.size) for c in chunked.chunks])

    def check_chunks(self) -> None:
        """Refuse a chunk list that does not cover exactly the file's declared size."""
        declared = sum(c.size for c in self.chunks)
        if declared != self.size or (self.size and not self.chunks):
            raise IntegrityError(f"{self.path}: chunk list covers {declared} bytes, declared size is {self.size}")


class TensorSpec(_Model):
    """One input or output as the *caller* sees it (the original ONNX model's name and layout).

    ``artifact_name`` is the tensor's name inside the artifact when a converter renamed it
    (pnnx: ``in0``/``out0``); ``transpose`` is the permutation that turns the caller's array into
    the artifact's layout for inputs, and the artifact's array into the caller's for outputs
    (e.g. ``[0, 2, 3, 1]`` for NCHW → NHWC). ``constant`` is set on an input fixed at conversion
    (``--constant-input``): the artifact does not take it, and a caller may still pass it, with
    this value only.
    """

    name: str
    dtype: str
    shape: list[int | str | None]
    artifact_name: str | None = None
    transpose: list[int] | None = None
    layout: str | None = None
    constant: int | float | bool | list | None = None


class FootprintFigures(_Model):
    """RSS of one variant in one backend memory mode, measured in a fresh process (MB)."""

    load_rss_mb: float = Field(ge=0, description="RSS added by loading the session (before the first run)")
    peak_rss_mb: float = Field(ge=0, description="peak RSS above the pre-load baseline while loading and running")


class Footprint(_Model):
    """Memory a variant takes on its backend: what the runtime's memory ladder is ordered by.

    ``default`` is the backend's defaults; ``lean`` its memory-saving options (see
    :class:`~edge_sdk.types.MemoryMode`), measured where the backend has them.
    """

    backend: str
    weights_bytes: int = Field(ge=0, description="bytes of the artifact files (weights and graph)")
    default: FootprintFigures
    lean: FootprintFigures | None = None
    machine: str = Field(default="", description="where it was measured: arch, backend package version")
    runs: int = 0

    def figures(self, mode: str = "default") -> FootprintFigures | None:
        """The figures of a memory mode (``"default"`` or ``"lean"``), if measured."""
        return self.lean if mode == "lean" else self.default


class Validation(_Model):
    """How a variant compares with the FP32 ONNX original on the validation inputs."""

    samples: int = 0
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    cosine_similarity: float | None = None
    top1_agreement: float | None = None
    metric_name: str | None = None
    metric: float | None = None
    metric_fp32: float | None = None
    metric_margin: float | None = Field(default=None, description="one standard error (points) of the metric's drop "
                                        "from outputs that changed both ways (new errors against fixed ones); the gate adds it")
    self_test_tolerance: float | None = None
    nodes_quantized: int | None = None
    nodes_kept_fp32: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    recipe: str | None = Field(default=None, description="the converter recipe that made this artifact")
    latency_ratio: float | None = Field(default=None, description="median of paired latency ratios to FP32")
    latency_ratio_ci: tuple[float, float] | None = Field(default=None, description="95% confidence interval of that median")
    speed: SpeedVerdict | None = None
    footprint: Footprint | None = Field(default=None, description="memory measured on the build machine")


class Variant(_Model):
    """One artifact of the release. ``backend`` names a registered runtime backend: one of
    :class:`~edge_sdk.types.BackendName` for the built-in ones, or a plugin's name."""

    id: str
    profiles: list[str]
    target: Target
    precision: Precision
    backend: str
    files: list[FileEntry]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    validation: Validation = Validation()
    latency_ms: float | None = None
    size_bytes: int = 0
    status: VariantStatus = VariantStatus.OK
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == VariantStatus.OK


class SelfTest(_Model):
    """A fixed input and the FP32 outputs every variant must reproduce within its tolerance."""

    inputs: FileEntry
    expected: FileEntry
    digest: str = Field(description="sha256 of the expected outputs file")


class Manifest(_Model):
    schema_version: int = SCHEMA_VERSION
    model: str
    version: int = Field(ge=1)
    source_sha256: str
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    sdk_version: str = ""
    self_test: SelfTest | None = None
    variants: list[Variant]
    defaults: dict[str, str] = Field(default_factory=dict, description="profile id -> default variant id")
    report: ConversionReport = Field(default_factory=ConversionReport, description="what the converter did and why")
    labels: dict[str, list[str]] = Field(
        default_factory=dict, description="output name -> class names by index (the API's classification extension)")

    def variant(self, variant_id: str) -> Variant:
        for variant in self.variants:
            if variant.id == variant_id:
                return variant
        raise IntegrityError(f"manifest of {self.model} v{self.version} has no variant {variant_id!r}")

    def variants_for(self, profile_id: str, *, ok_only: bool = True) -> list[Variant]:
        return [v for v in self.variants if profile_id in v.profiles and (v.ok or not ok_only)]

    def files(self, variants: Iterable[Variant] | None = None) -> list[FileEntry]:
        """The files of ``variants`` (default: every ok variant) and the self-test files, each path once."""
        entries: dict[str, FileEntry] = {}
        for variant in (v for v in self.variants if v.ok) if variants is None else variants:
            for entry in variant.files:
                entries.setdefault(entry.path, entry)
        if self.self_test is not None:
            for entry in (self.self_test.inputs, self.self_test.expected):
                entries.setdefault(entry.path, entry)
        return list(entries.values())

    def to_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = MANIFEST_NAME) -> Manifest:
        try:
            return cls.model_validate(json.loads(data))
        except ValidationError as exc:
            raise IntegrityError(describe_validation_error(source, exc)) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"{source}: not valid JSON ({exc})") from None


def write_manifest(release_dir: Path, manifest: Manifest,
                   private_key: Ed25519PrivateKey | list[Ed25519PrivateKey] | None = None) -> None:
    """Write ``manifest.json`` (and ``manifest.sig`` when keys are given), fsynced."""
    data = manifest.to_bytes()
    _write_synced(release_dir / MANIFEST_NAME, data)
    if private_key is not None:
        keys = private_key if isinstance(private_key, list) else [private_key]
        _write_synced(release_dir / SIGNATURE_NAME, trust.sign_release(data, keys))


def verify_manifest_bytes(data: bytes, signature: bytes | None, public_key: trust.TrustSource | None,
                          *, allow_expired: bool = True) -> Manifest:
    """Check the release statement against the trusted keys first, and only then parse ``data``.

    ``public_key``: a :class:`~edge_sdk.trust.TrustRoot`, an Ed25519 public key, or None (no check).
    An expired statement is refused only with ``allow_expired=False`` (activating a new release);
    a release already installed keeps serving.
    """
    if public_key is not None:
        if signature is None:
            raise IntegrityError("release is not signed, but trusted keys are configured")
        checked = trust.load_trust(public_key).verify_release(signature, data, allow_expired=allow_expired)
        manifest = Manifest.from_bytes(data)
        if (manifest.model, manifest.version) != (checked.model, checked.version):
            raise IntegrityError(f"manifest of {manifest.model} v{manifest.version} came with the statement "
                                 f"of {checked.model} v{checked.version}")
        return manifest
    return Manifest.from_bytes(data)


def load_manifest(release_dir: Path | str, public_key: trust.TrustSource | None = None) -> Manifest:
    """Read a release folder's manifest, verifying its statement when ``public_key`` is given."""
    release_dir = Path(release_dir)
    try:
        data = (release_dir / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{release_dir}: no {MANIFEST_NAME}; is this a release folder?") from None
    sig_path = release_dir / SIGNATURE_NAME
    signature = sig_path.read_bytes() if sig_path.exists() else None
    return verify_manifest_bytes(data, signature, public_key)


def verify_file(release_dir: Path, entry: FileEntry) -> Path:
    """Check one listed file's size and sha256; return its absolute path."""
    path = resolve_inside(release_dir, entry.path)
    if not path.is_file():
        raise IntegrityError(f"{entry.path}: listed in the manifest but missing from {release_dir}")
    if path.stat().st_size != entry.size:
        raise IntegrityError(f"{entry.path}: size {path.stat().st_size} != manifest {entry.size}")
    if sha256_file(path) != entry.sha256:
        raise IntegrityError(f"{entry.path}: sha256 does not match the manifest (tampered or corrupt)")
    return path


def resolve_inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing paths that escape ``root`` (absolute, ``..``, symlinks)."""
    root = root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise IntegrityError(f"{relative!r} points outside the release folder")
    return path


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
