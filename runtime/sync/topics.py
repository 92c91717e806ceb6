"""Every MQTT topic name of fleet sync, in one place.

Layout (prefix defaults to ``edge/<fleet>``, any other prefix may be given)::

    <prefix>/<device>/status                retained, Last Will {"online": false}
    <prefix>/<device>/desired               retained, per-device desired state
    <prefix>/desired                        retained, fleet-wide desired state
    <prefix>/<device>/reported              retained, what the device runs
    <prefix>/releases/<model>/<version>/manifest   retained (signed manifest)
    <prefix>/releases/<model>/<version>/pending    retained while `cloud publish` runs (its chunk list)
    <prefix>/blobs/<sha256>                 retained content-addressed chunk
    <prefix>/trust/root/<version>           retained trust root (TUF root.json), every version
    <prefix>/<device>/telemetry             QoS 1 record batches
    <prefix>/<device>/telemetry/ack         ingest → device: committed sequences
    $share/<group>/<prefix>/+/telemetry     what ingest workers subscribe to

Usage::

    t = Topics("plant1")                  # prefix "edge/plant1"
    t.telemetry("cam-7")                  # "edge/plant1/cam-7/telemetry"
    t.parse("edge/plant1/cam-7/telemetry")  # TopicMatch(kind=TopicKind.TELEMETRY, device="cam-7")

Names (fleet, device, model, group) are single topic levels: non-empty, no ``/``, ``+``, ``#``,
NUL, and not starting with ``$``; device ids may not be one of the reserved words used at the
same level (``desired``, ``releases``, ``blobs``, ``trust``). Violations raise :class:`ConfigError`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from edge_sdk.errors import ConfigError

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Words that sit at the device level of the tree and therefore cannot be device ids.
RESERVED_DEVICE_IDS = frozenset({"desired", "releases", "blobs", "trust"})


class TopicKind(enum.Enum):
    """What a topic under the fleet prefix is."""

    STATUS = "status"
    DEVICE_DESIRED = "device_desired"
    FLEET_DESIRED = "fleet_desired"
    REPORTED = "reported"
    MANIFEST = "manifest"
    PENDING = "pending"
    BLOB = "blob"
    TELEMETRY = "telemetry"
    TELEMETRY_ACK = "telemetry_ack"
    TRUST_ROOT = "trust_root"


@dataclass(frozen=True)
class TopicMatch:
    """A parsed topic: its kind plus whichever of device / model / version / sha256 it names."""

    kind: TopicKind
    device: str | None = None
    model: str | None = None
    version: int | None = None
    sha256: str | None = None


def check_level(value: str, what: str) -> str:
    """Return ``value`` if it is usable as one topic level, else raise :class:`ConfigError`."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a non-empty string, got {value!r}")
    bad = set(value) & {"/", "+", "#", "\0"}
    if bad or value.startswith("$"):
        raise ConfigError(f"{what} {value!r} cannot be an MQTT topic level (no '/', '+', '#', NUL or leading '$')")
    return value


def check_device(device: str) -> str:
    """Validate a device id (a topic level that is not a reserved word)."""
    check_level(device, "device id")
    if device in RESERVED_DEVICE_IDS:
        raise ConfigError(f"device id {device!r} is reserved (one of {sorted(RESERVED_DEVICE_IDS)})")
    return device


@dataclass(frozen=True)
class Topics:
    """Topic names of one fleet. ``prefix`` overrides the default ``edge/<fleet>``."""

    fleet: str
    prefix: str = ""

    def __post_init__(self) -> None:
        check_level(self.fleet, "fleet")
        prefix = self.prefix or f"edge/{self.fleet}"
        for level in prefix.split("/"):
            check_level(level, f"prefix {prefix!r} level")
        object.__setattr__(self, "prefix", prefix)

    # -- device topics -------------------------------------------------------------------------
    def status(self, device: str) -> str:
        return f"{self.prefix}/{check_device(device)}/status"

    def desired(self, device: str | None = None) -> str:
        """Per-device desired state, or the fleet-wide one when ``device`` is None."""
        if device is None:
            return f"{self.prefix}/desired"
        return f"{self.prefix}/{check_device(device)}/desired"

    def reported(self, device: str) -> str:
        return f"{self.prefix}/{check_device(device)}/reported"

    def telemetry(self, device: str) -> str:
        return f"{self.prefix}/{check_device(device)}/telemetry"

    def telemetry_ack(self, device: str) -> str:
        return f"{self.prefix}/{check_device(device)}/telemetry/ack"

    # -- release topics ------------------------------------------------------------------------
    def manifest(self, model: str, version: int) -> str:
        check_level(model, "model name")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ConfigError(f"release version must be a non-negative integer, got {version!r}")
        return f"{self.prefix}/releases/{model}/{version}/manifest"

    def pending(self, model: str, version: int) -> str:
        """Marker of a publish in progress: holds its chunks against ``cloud gc`` until the manifest is out."""
        return self.manifest(model, version)[: -len("manifest")] + "pending"

    def blob(self, sha256: str) -> str:
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ConfigError(f"blob id must be 64 lowercase hex digits (sha256), got {sha256!r}")
        return f"{self.prefix}/blobs/{sha256}"

    def trust_root(self, version: int) -> str:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(f"trust root version must be a positive integer, got {version!r}")
        return f"{self.prefix}/trust/root/{version}"

    # -- subscription filters ------------------------------------------------------------------
    def telemetry_shared(self, group: str = "ingest") -> str:
        """``$share/<group>/<prefix>/+/telemetry``: workers of one group split the messages."""
        return f"$share/{check_level(group, 'share group')}/{self.prefix}/+/telemetry"

    def all_blobs(self) -> str:
        return f"{self.prefix}/blobs/+"

    def all_manifests(self, model: str | None = None) -> str:
        return f"{self.prefix}/releases/{check_level(model, 'model name') if model else '+'}/+/manifest"

    def all_pending(self) -> str:
        return f"{self.prefix}/releases/+/+/pending"

    def all_trust_roots(self) -> str:
        return f"{self.prefix}/trust/root/+"

    # -- parsing -------------------------------------------------------------------------------
    def parse(self, topic: str) -> TopicMatch | None:
        """Classify a received topic; None if it is not one of this fleet's topics.

        Never raises: topics come from the network and may be anything.
        """
        if not isinstance(topic, str) or not topic.startswith(self.prefix + "/"):
            return None
        levels = topic[len(self.prefix) + 1 :].split("/")
        if any(not level for level in levels):
            return None
        n = len(levels)
        if n == 1 and levels[0] == "desired":
            return TopicMatch(TopicKind.FLEET_DESIRED)
        if n == 2 and levels[0] == "blobs":
            return TopicMatch(TopicKind.BLOB, sha256=levels[1]) if _SHA256.fullmatch(levels[1]) else None
        if n == 3 and levels[:2] == ["trust", "root"]:
            return TopicMatch(TopicKind.TRUST_ROOT, version=int(levels[2])) if levels[2].isdigit() else None
        if n == 4 and levels[0] == "releases" and levels[3] in ("manifest", "pending"):
            if not levels[2].isdigit():
                return None
            kind = TopicKind.MANIFEST if levels[3] == "manifest" else TopicKind.PENDING
            return TopicMatch(kind, model=levels[1], version=int(levels[2]))
        device = levels[0]
        if device in RESERVED_DEVICE_IDS or device.startswith("$") or "+" in device or "#" in device:
            return None
        kind = {
            ("status",): TopicKind.STATUS,
            ("desired",): TopicKind.DEVICE_DESIRED,
            ("reported",): TopicKind.REPORTED,
            ("telemetry",): TopicKind.TELEMETRY,
            ("telemetry", "ack"): TopicKind.TELEMETRY_ACK,
        }.get(tuple(levels[1:]))
        return TopicMatch(kind, device=device) if kind else None

    def device_of(self, topic: str, kind: TopicKind) -> str | None:
        """The device id in ``topic`` if it is a ``kind`` topic of this fleet, else None."""
        match = self.parse(topic)
        return match.device if match is not None and match.kind is kind else None
