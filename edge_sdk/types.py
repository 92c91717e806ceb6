"""Closed sets shared across the SDK."""

from __future__ import annotations

from enum import Enum


class Precision(str, Enum):
    """Numeric precision of a model variant, in the order the runtime steps down through."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    MIXED = "mixed"  # INT8 with the most sensitive nodes kept in FP32

    def __str__(self) -> str:
        return self.value


class Target(str, Enum):
    """An artifact format the converters can export to."""

    ONNX = "onnx"
    TFLITE = "tflite"
    NCNN = "ncnn"
    OPENVINO = "openvino"

    def __str__(self) -> str:
        return self.value


class Arch(str, Enum):
    AARCH64 = "aarch64"
    ARMV7L = "armv7l"
    X86_64 = "x86_64"

    def __str__(self) -> str:
        return self.value


# Cheapest-last ladder the precision policy walks; MIXED sits with INT8 (it is INT8 with some
# FP32 islands, so it costs a little more memory than pure INT8 but far less than FP16).
PRECISION_LADDER: tuple[Precision, ...] = (Precision.FP32, Precision.FP16, Precision.MIXED, Precision.INT8)

# The runtime backend that runs each target's artifacts.
TARGET_BACKEND: dict[Target, str] = {
    Target.ONNX: "onnxruntime",
    Target.TFLITE: "tflite",
    Target.NCNN: "ncnn",
    Target.OPENVINO: "openvino",
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


class AlignPolicy(str, Enum):
    """How a stream is matched to each reference timestamp (see ``edge_sdk.runtime.align``)."""

    NEAREST = "nearest"  # closest sample either side; ties go to the earlier one (as pandas)
    PREVIOUS = "previous"  # last sample at or before (as-of, pandas direction="backward")
    NEXT = "next"  # first sample at or after (pandas direction="forward")
    INTERPOLATE = "interpolate"  # linear between the two bracketing samples (numeric values)

    def __str__(self) -> str:
        return self.value


class OutboxPolicy(str, Enum):
    """What the telemetry outbox does when an append would exceed its row/byte quota."""

    REJECT = "reject"  # raise OutboxFullError; nothing already stored is touched
    DROP_OLDEST = "drop_oldest"  # delete the oldest records of equal or lower priority, counted

    def __str__(self) -> str:
        return self.value


class SpeedVerdict(str, Enum):
    """How a variant's paired latency compares with FP32's, against its precision's allowed ratio."""

    OK = "ok"  # the whole confidence interval of the ratio is within the limit
    SLOWER = "slower"  # the whole interval is above the limit: rejected
    INCONCLUSIVE = "inconclusive"  # the interval straddles the limit: kept, marked, never a default

    def __str__(self) -> str:
        return self.value
