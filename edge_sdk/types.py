"""Closed sets shared across the SDK."""

from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    """A closed set of strings: members compare equal to their values and ``str()`` gives the
    value (``enum.StrEnum`` from Python 3.11 on)."""

    def __str__(self) -> str:
        return self.value


class Precision(StrEnum):
    """Numeric precision of a model variant, in the order the runtime steps down through."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    MIXED = "mixed"  # INT8 with the most sensitive nodes kept in FP32


class Target(StrEnum):
    """An artifact format the converters can export to."""

    ONNX = "onnx"
    TFLITE = "tflite"
    NCNN = "ncnn"
    OPENVINO = "openvino"


class Arch(StrEnum):
    AARCH64 = "aarch64"
    ARMV7L = "armv7l"
    X86_64 = "x86_64"


# Cheapest-last ladder the precision policy walks; MIXED sits with INT8 (it is INT8 with some
# FP32 islands, so it costs a little more memory than pure INT8 but far less than FP16).
PRECISION_LADDER: tuple[Precision, ...] = (Precision.FP32, Precision.FP16, Precision.MIXED, Precision.INT8)

class BackendName(StrEnum):
    """A runtime backend of ``edge_sdk.runtime.backends`` (the registry's built-in names)."""

    ONNXRUNTIME = "onnxruntime"
    TFLITE = "tflite"
    NCNN = "ncnn"
    OPENVINO = "openvino"


# The runtime backend that runs each target's artifacts.
TARGET_BACKEND: dict[Target, BackendName] = {
    Target.ONNX: BackendName.ONNXRUNTIME,
    Target.TFLITE: BackendName.TFLITE,
    Target.NCNN: BackendName.NCNN,
    Target.OPENVINO: BackendName.OPENVINO,
}

# What each target can run, and on which CPU architectures its runtime ships wheels.
# (PyPI has no armv7 wheels for onnxruntime or openvino; ncnn and LiteRT build for armv7.)
TARGET_PRECISIONS: dict[Target, frozenset[Precision]] = {
    Target.ONNX: frozenset({Precision.FP32, Precision.FP16, Precision.INT8, Precision.MIXED}),
    Target.TFLITE: frozenset({Precision.FP32, Precision.FP16, Precision.INT8}),
    Target.NCNN: frozenset({Precision.FP32, Precision.FP16, Precision.INT8}),
    Target.OPENVINO: frozenset({Precision.FP32, Precision.FP16, Precision.INT8}),
}
TARGET_ARCHES: dict[Target, frozenset[Arch]] = {
    Target.ONNX: frozenset({Arch.X86_64, Arch.AARCH64}),
    Target.TFLITE: frozenset({Arch.X86_64, Arch.AARCH64, Arch.ARMV7L}),
    Target.NCNN: frozenset({Arch.X86_64, Arch.AARCH64, Arch.ARMV7L}),
    Target.OPENVINO: frozenset({Arch.X86_64, Arch.AARCH64}),
}


class AlignPolicy(StrEnum):
    """How a stream is matched to each reference timestamp (see ``edge_sdk.runtime.align``)."""

    NEAREST = "nearest"  # closest sample either side; ties go to the earlier one (as pandas)
    PREVIOUS = "previous"  # last sample at or before (as-of, pandas direction="backward")
    NEXT = "next"  # first sample at or after (pandas direction="forward")
    INTERPOLATE = "interpolate"  # linear between the two bracketing samples (numeric values)


class OutboxPolicy(StrEnum):
    """What the telemetry outbox does when an append would exceed its row/byte quota."""

    REJECT = "reject"  # raise OutboxFullError; nothing already stored is touched
    DROP_OLDEST = "drop_oldest"  # delete the oldest records of equal or lower priority, counted


class VariantStatus(StrEnum):
    """A manifest variant's ``status``: whether validation accepted it."""

    OK = "ok"
    REJECTED = "rejected"


class SyncStatus(StrEnum):
    """How one release sync ended (``SyncResult.status``)."""

    ACTIVATED = "activated"
    ALREADY_ACTIVE = "already-active"
    REJECTED = "rejected"  # refused before activation (integrity, profile, self-test); not retried
    ROLLED_BACK = "rolled-back"  # activated, then the activation hook failed: the previous one serves


class SyncState(StrEnum):
    """The ``sync.state`` a device reports while it brings a release in."""

    IDLE = "idle"
    MANIFEST = "manifest"
    FETCHING = "fetching"
    STAGING = "staging"
    SELF_TEST = "self-test"
    ACTIVATING = "activating"
    FAILED = "failed"


class ErrorKind(StrEnum):
    """What a reported ``last_error`` (and the per-kind error counters) is about."""

    REPLAY = "replay"  # a release older than the highest accepted
    BAD_SIGNATURE = "bad_signature"
    WRONG_RELEASE = "wrong_release"  # the manifest describes another release than its topic
    WRONG_PROFILE = "wrong_profile"  # no variant for this device's profile
    BAD_CHUNK_LIST = "bad_chunk_list"
    CORRUPT_CHUNK = "corrupt_chunk"
    INTEGRITY = "integrity"  # any other integrity failure of a release
    STORAGE = "storage"  # the disk refused (full, read-only)
    SYNC = "sync"  # a transient failure (broker unreachable, timeout)
    SELF_TEST = "self_test"
    ACTIVATION = "activation"
    POLICY = "policy"  # a desired runtime policy the device cannot apply
    BAD_DESIRED = "bad_desired"  # a malformed desired-state message
    TRUST_ROOT = "trust_root"  # a fleet trust root that does not chain to the trusted one
    # Chunk stores (edge_sdk.runtime.sync.stores): how fetching a release's chunks failed.
    STORE_UNREACHABLE = "store_unreachable"  # no answer after retries with backoff (or TLS failed)
    CHUNK_MISSING = "chunk_missing"  # the store answered that it has no such chunk (HTTP 404, NoSuchKey)
    STORE_DENIED = "store_denied"  # credentials refused (HTTP 401/403, S3 AccessDenied)
    OVERSIZED_MESSAGE = "oversized_message"  # an MQTT payload over the configured cap, refused unstored
    STORE_ERROR = "store_error"  # any other answer of the store


class RecordKind(StrEnum):
    """The kinds of telemetry record the daemon writes to its outbox."""

    STATS = "stats"  # per-interval call counts, latencies and resource figures
    RESULT = "result"  # a pipeline result
    PRECISION_SWITCH = "precision_switch"
    RELEASE_ACTIVATED = "release_activated"


class MemoryMode(StrEnum):
    """How a backend trades speed for memory (``BackendOptions.memory``; a ladder step of its own
    where it saves measured memory, see ``runtime/ladder.py``)."""

    DEFAULT = "default"  # the backend's defaults: fastest
    LEAN = "lean"  # the backend's memory-saving options (onnxruntime: no pre-packing, no arena)


class SpeedVerdict(StrEnum):
    """How a variant's paired latency compares with FP32's, against its precision's allowed ratio."""

    OK = "ok"  # the whole confidence interval of the ratio is within the limit
    SLOWER = "slower"  # the whole interval is above the limit: rejected
    INCONCLUSIVE = "inconclusive"  # the interval straddles the limit: kept, marked, never a default


class RecipeOutcome(StrEnum):
    """What one recipe of a variant's search gave (``manifest.report.recipes``)."""

    CHOSEN = "chosen"  # the variant's artifact
    ACCEPTED = "accepted"  # passed the gate, another candidate was better
    REJECTED = "rejected"  # ran, failed the gate
    FAILED = "failed"  # gave no runnable artifact
    SKIPPED = "skipped"  # not tried (the reason says why)
