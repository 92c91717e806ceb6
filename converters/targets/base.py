"""The export-target protocol: one module per target, registered by name.

The pipeline hands a target the checked (and pruned) FP32 ONNX model, a precision and the
calibration feeds; the target writes its artifact files and says how the runtime must feed them
(renamed tensors, layout transposes). The pipeline then validates every artifact by running it
with its own runtime backend (``edge_sdk.runtime.backends``) against FP32 ONNX.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from ...manifest import TensorSpec
from ...registry import Registry
from ...types import Precision, Target

Feeds = dict[str, np.ndarray]  # one calibration/validation sample: input name -> array (original layout)


class CalibrationMethod(str, Enum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


@dataclass(frozen=True)
class ExportRequest:
    model_path: Path  # checked FP32 ONNX with static shapes
    precision: Precision
    out_dir: Path  # write artifact files here (inside the staging release folder)
    variant_id: str  # use as the file stem
    inputs: Sequence[TensorSpec]  # the original model's signature
    outputs: Sequence[TensorSpec]
    calibration: Sequence[Feeds] = ()
    calibration_method: CalibrationMethod = CalibrationMethod.MINMAX
    per_channel: bool = True
    nodes_to_exclude: Sequence[str] = ()  # kept in FP32 (accuracy-aware mixed precision)
    float_ops: Sequence[str] = ()  # TFLite op types kept float in full-integer INT8 (e.g. "SOFTMAX")


@dataclass
class ExportResult:
    files: list[Path]
    inputs: list[TensorSpec]  # caller names/layout + artifact_name/transpose for the runtime
    outputs: list[TensorSpec]
    notes: list[str] = field(default_factory=list)
    nodes_quantized: int | None = None
    nodes_kept_fp32: list[str] = field(default_factory=list)


class ExportTarget(ABC):
    target: Target
    backend: str  # runtime backend name that runs this target's artifacts

    @abstractmethod
    def precisions(self) -> frozenset[Precision]:
        """Precisions this target can export in this environment."""

    def unavailable_reason(self, precision: Precision) -> str | None:
        """Why ``precision`` cannot be exported here (None when it can): the report's rejected row."""
        if precision in self.precisions():
            return None
        return f"{self.target.value} cannot export {precision.value}"

    def check_available(self) -> None:
        """Raise ToolchainError/MissingDependencyError (naming the install command) if unusable."""

    @abstractmethod
    def export(self, request: ExportRequest) -> ExportResult:
        """Write the artifact for ``request.precision``; raise ConversionError naming what failed."""


TARGETS: Registry[type[ExportTarget]] = Registry("export target")
TARGETS.register_lazy("onnx", "edge_sdk.converters.targets.onnx:OnnxTarget")
TARGETS.register_lazy("tflite", "edge_sdk.converters.targets.tflite:TFLiteTarget")
TARGETS.register_lazy("ncnn", "edge_sdk.converters.targets.ncnn:NcnnTarget")
TARGETS.register_lazy("openvino", "edge_sdk.converters.targets.openvino:OpenVINOTarget")


def get_target(name: str | Target) -> ExportTarget:
    return TARGETS.get(Target(name).value if isinstance(name, Target) else name)()
