"""The export-target protocol: one module per target, registered by name.

The pipeline hands a target the checked (and pruned) FP32 ONNX model, a precision, a
:class:`Recipe` and the calibration feeds; the target writes its artifact files and says how the
runtime must feed them (renamed tensors, layout transposes). The pipeline then validates every
artifact by running it with its own runtime backend (``edge_sdk.runtime.backends``) against FP32 ONNX.

**Recipes.** One recipe is never enough for real models, so a target declares, per precision, an
ordered list of recipes (:meth:`ExportTarget.recipes`; see ``converters/search.py`` for how they
are tried). A recipe is data: a stable name (it appears in the report and the variant's
validation), a one-line summary, when it is tried (:class:`When`), whether it needs calibration
data, an optional ``applies(facts)`` that says why it does not fit this model, and ``options``,
the target's own typed object that its ``export`` reads from ``request.recipe``. A recipe whose
``keeps_sensitive_nodes`` is set is run by the pipeline as a search: it ranks the model's nodes
by the error they add at that precision and exports with the fewest top-ranked nodes kept in
FP32 (``request.nodes_to_exclude``, ONNX node names) that meet the accuracy budget.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from ...manifest import TensorSpec
from ...registry import Registry
from ...types import Precision, Target

Feeds = dict[str, np.ndarray]  # one calibration/validation sample: input name -> array (original layout)


class CalibrationMethod(str, Enum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


class When(str, Enum):
    """When a recipe of a target's list is tried."""

    ALWAYS = "always"  # whenever it applies: its candidate competes with the others on speed and size
    FALLBACK = "fallback"  # only while no earlier recipe of the list has given an accepted candidate


@dataclass(frozen=True)
class ModelFacts:
    """What recipes decide on: the main graph's op counts and weight parameters per op type."""

    op_counts: Mapping[str, int]
    weight_params: Mapping[str, int]  # op type -> parameters of the initializers it reads
    subgraph_nodes: int = 0  # nodes inside If/Loop/Scan bodies
    float_inputs: int = 1
    opset: int = 13

    @property
    def matmul_heavy(self) -> bool:
        """Most weights sit in MatMul/Gemm (transformers, RNN-like and MLP models), not in Conv."""
        matmul = self.weight_params.get("MatMul", 0) + self.weight_params.get("Gemm", 0)
        conv = self.weight_params.get("Conv", 0) + self.weight_params.get("ConvTranspose", 0)
        return matmul > 0 and matmul >= conv


@dataclass(frozen=True)
class Recipe:
    """One way to make a target's artifact at one precision (see the module docstring)."""

    name: str
    precision: Precision
    summary: str
    when: When = When.ALWAYS
    needs_calibration: bool = False
    only_after_failure_of: str | None = None  # tried only when that recipe produced no runnable artifact
    applies: Callable[[ModelFacts], str | None] | None = None  # None, or why it does not fit this model
    keeps_sensitive_nodes: bool = False
    # Trades speed or size for accuracy (FP32 islands): as a fallback, tried only after an earlier
    # candidate missed the accuracy budget, never because the others were slower.
    recovers_accuracy: bool = False
    options: Any = None  # the target's own typed options

    def says(self, reason: str) -> str:
        """``reason``, naming this recipe (a target's one plain recipe, named after its precision, goes unnamed)."""
        return reason if self.name == self.precision.value else f"{self.name}: {reason}"

    def skip_reason(self, facts: ModelFacts, has_calibration: bool) -> str | None:
        if self.needs_calibration and not has_calibration:
            return "needs calibration data"
        return self.applies(facts) if self.applies is not None else None


@dataclass(frozen=True)
class AccuracyCheck:
    """The gate's own accuracy measure, for a recipe that searches within the budget itself
    (NNCF's accuracy control): ``drop(outputs)`` is the drop in points the gate would judge when
    the validation ``samples`` at the given indices give these outputs (the rest FP32's, which
    ``reference`` holds, sample by sample)."""

    samples: Sequence[Feeds]
    drop: Callable[[Mapping[int, Mapping[str, np.ndarray]]], float]
    max_drop: float
    reference: Sequence[Mapping[str, np.ndarray]]


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
    nodes_to_exclude: Sequence[str] = ()  # ONNX node names kept in FP32 (sensitivity search)
    float_ops: Sequence[str] = ()  # TFLite op types kept float in full-integer INT8 (e.g. "SOFTMAX")
    recipe: Recipe | None = None  # None: the target's plain recipe for ``precision``
    accuracy: AccuracyCheck | None = None  # None: no validation samples a recipe can search on (streamed state)
    # Kept for the whole conversion: where a target keeps what its exports share (onnx2tf's output);
    # None: nothing is shared, each export works in its own temporary folder.
    scratch_dir: Path | None = None


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

    def recipes(self, precision: Precision) -> Sequence[Recipe]:
        """The recipes for ``precision``, in the order they are tried. Default: one plain recipe."""
        return (plain_recipe(self.target, precision),)

    @abstractmethod
    def export(self, request: ExportRequest) -> ExportResult:
        """Write the artifact for ``request.precision``; raise ConversionError naming what failed."""


def plain_recipe(target: Target, precision: Precision) -> Recipe:
    """The recipe a target without a list of its own uses: its export at ``precision``, as is."""
    return Recipe(name=precision.value, precision=precision, summary=f"{target.value} {precision.value} export",
                  needs_calibration=False)


TARGETS: Registry[type[ExportTarget]] = Registry("export target")
TARGETS.register_lazy("onnx", "edge_sdk.converters.targets.onnx:OnnxTarget")
TARGETS.register_lazy("tflite", "edge_sdk.converters.targets.tflite:TFLiteTarget")
TARGETS.register_lazy("ncnn", "edge_sdk.converters.targets.ncnn:NcnnTarget")
TARGETS.register_lazy("openvino", "edge_sdk.converters.targets.openvino:OpenVINOTarget")


def get_target(name: str | Target) -> ExportTarget:
    return TARGETS.get(Target(name).value if isinstance(name, Target) else name)()
