"""The conversion report a release manifest carries (``manifest.report``): what the converter did and why.

Written by the converters, read by people and tools (``edge-sdk convert --json``, benchmarks);
devices ignore it. Like the manifest, unknown keys are ignored so older readers keep working.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .types import RecipeOutcome, SpeedVerdict


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SourceInfo(_Part):
    path: str
    opset: int
    opset_used: int


class SamplesInfo(_Part):
    """Where a set of samples came from and how many were used."""

    source: str | None = None
    samples: int = 0


class CalibrationInfo(SamplesInfo):
    method: str
    per_channel: bool


class ReferenceInfo(_Part):
    """The yardstick of every ratio in the report: the source model as FP32 ONNX in onnxruntime."""

    what: str = "source model, FP32 ONNX in onnxruntime"
    size_bytes: int
    latency_ms: float


class PruneReport(_Part):
    """What a pruning method removed (parameters, FLOPs, file size before and after)."""

    method: str
    amount: float
    params_before: int
    params_after: int
    nonzero_before: int
    nonzero_after: int
    flops_before: int
    flops_after: int
    size_before: int = 0
    size_after: int = 0
    pruned: dict[str, str] = Field(default_factory=dict, description="layer -> what was removed")
    skipped: dict[str, str] = Field(default_factory=dict, description="layer -> why it was left alone")


class MixedTrial(_Part):
    kept_fp32: int = Field(description="how many top-ranked nodes were kept in FP32")
    drop_points: float
    measure: str


class SensitivitySearch(_Part):
    """A keep-FP32 search: the nodes it kept in FP32, its trials, and the ranking it bisected (worst first)."""

    reached: bool
    kept_fp32: list[str] = Field(default_factory=list)
    trials: list[MixedTrial] = Field(default_factory=list)
    ranking: list[tuple[str, float]] = Field(default_factory=list, description="worst nodes first (at most 20)")


class RecipeAttempt(_Part):
    """What one recipe of a variant's search gave."""

    recipe: str
    outcome: RecipeOutcome
    reason: str | None = None
    size_bytes: int | None = None
    accuracy_drop: float | None = Field(default=None, description="points vs FP32")
    latency_ratio: float | None = None
    speed: SpeedVerdict | None = None


class ConversionReport(_Part):
    profiles: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    source: SourceInfo | None = None
    calibration: CalibrationInfo | None = None
    validation: SamplesInfo | None = None
    metric: str | None = Field(default=None, description="what the accuracy budget is measured on")
    reference: ReferenceInfo | None = None
    prune: PruneReport | None = None
    sensitivity: dict[str, SensitivitySearch] = Field(default_factory=dict, description="variant id -> keep-FP32 search")
    recipes: dict[str, list[RecipeAttempt]] = Field(default_factory=dict, description="variant id -> recipes tried")
    logs: dict[str, str] = Field(default_factory=dict, description="variant id -> its tool log, relative to the release")
    conversion_seconds: float | None = None
