"""The conversion API: one typed :class:`ConvertConfig`, built by ``edge_sdk.convert`` and ``edge-sdk convert``.

A config is the model, its device profiles (``auto`` resolved here, once), the export targets,
and four parts, each checked when it is built (a bad value is a :class:`ConfigError` naming it):

- :class:`IntakeConfig`: how the model and sample files are read (input shapes, pruning, images);
- :class:`QuantizationConfig`: the calibration data and how INT8 is calibrated;
- :class:`ValidationConfig`: the validation data, the task metric, the accuracy budget, latency runs;
- :class:`ReleaseConfig`: where the release goes, its version, name and signing key.

``ConvertConfig.from_options(model, profiles, output, **options)`` maps the flat keyword names of
``edge_sdk.convert`` (:data:`OPTIONS`) onto these parts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..config import named_values
from ..errors import ConfigError
from ..profiles import AUTO, DeviceProfile, resolve_profile
from ..types import Target
from .calibration import ImageOptions
from .loader import parse_input_shapes
from .specialize import parse_constant_inputs
from .prune import PruneConfig
from .targets.base import CalibrationMethod, Feeds
from .metrics import BUILTIN, TaskMetric

# A folder or file of .npy/.npz/images, "random" / "random:N", or samples given in code.
DataSource = Union[Path, str, Sequence[Feeds]]


@dataclass(frozen=True)
class PruneSpec:
    """A pruning method (``magnitude``, ``channel``) and its options."""

    method: str
    options: PruneConfig

    @classmethod
    def parse(cls, spec: str) -> PruneSpec:
        """``"METHOD:AMOUNT"`` (the CLI's ``--prune``), e.g. ``channel:0.3``."""
        method, sep, amount = spec.partition(":")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not method or not 0 < value < 1:
            raise ConfigError(f"--prune {spec!r}: expected METHOD:AMOUNT with 0 < AMOUNT < 1 (e.g. magnitude:0.5, channel:0.3)")
        return cls(method, PruneConfig(amount=value))

    def __str__(self) -> str:
        return f"{self.method}:{self.options.amount:g}"


@dataclass(frozen=True)
class IntakeConfig:
    """How the model and the sample files are read."""

    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # or the CLI's ["name=1,3,224,224"]
    # Inputs the device always feeds one value (or the CLI's ["sr=16000"]): folded into the model,
    # with the If nodes they decide inlined (converters/specialize.py).
    constant_inputs: Mapping[str, Any] = field(default_factory=dict)
    prune: PruneSpec | None = None  # or "METHOD:AMOUNT"
    image_options: ImageOptions = ImageOptions()  # how image folders become tensors

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shapes", parse_input_shapes(self.input_shapes))
        object.__setattr__(self, "constant_inputs", parse_constant_inputs(self.constant_inputs))
        both = sorted(set(self.input_shapes) & set(self.constant_inputs))
        if both:
            raise ConfigError(f"--input-shape and --constant-input both name {both}: a constant input is not fed")
        if isinstance(self.prune, str):
            object.__setattr__(self, "prune", PruneSpec.parse(self.prune))
        if self.image_options is None:
            object.__setattr__(self, "image_options", ImageOptions())


@dataclass(frozen=True)
class QuantizationConfig:
    """Calibration data (None: INT8 is dynamic) and how static INT8 is calibrated."""

    calibration: DataSource | None = None
    method: CalibrationMethod = CalibrationMethod.MINMAX
    per_channel: bool = True
    limit: int = 128  # at most this many calibration samples (a seeded subset, the same every run)
    # Accuracy-aware INT8 with the most sensitive nodes in FP32, when plain INT8 misses the budget.
    mixed_precision: bool = True

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "method", CalibrationMethod(self.method))
        except ValueError:
            known = ", ".join(m.value for m in CalibrationMethod)
            raise ConfigError(f"unknown calibration method {self.method!r} (known: {known})") from None


def _state_pairs(pairs: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    state = {}
    for name, output in named_values(pairs, "--state", "INPUT=OUTPUT, the output that feeds the input next step"):
        if not (isinstance(name, str) and isinstance(output, str) and name.strip() and output.strip()):
            raise ConfigError(f"--state {name}={output}: expected INPUT=OUTPUT, the output that feeds the input next step")
        state[name.strip()] = output.strip()
    return state


@dataclass(frozen=True)
class ValidationConfig:
    """What each variant is judged on against FP32, and how its latency is measured."""

    data: DataSource | None = None  # default: a held-out split of the calibration samples
    labels: Path | str | Sequence[int] | np.ndarray | None = None  # class labels -> top-1 accuracy as the task metric
    metric: TaskMetric | str | None = None  # or "top1", "cosine", "f1", "module:function"; None: by output kind
    max_accuracy_drop: float = 1.0  # points of the task metric (else top-1 agreement, else cosine x 100)
    latency_runs: int = 50
    latency_threads: int | None = 1  # one thread: ratios are stabler on a shared build machine
    limit: int = 64  # at most this many samples are used for validation
    random_samples: int = 16  # validation inputs when no data is given at all
    # Off when the build machine says nothing about the device's speed (cross-building, emulation):
    # latencies are still measured and reported, only not used to reject.
    speed_gate: bool = True
    # Measure each accepted variant's memory footprint on its backend (one fresh process per
    # backend memory mode, ~1 s each): the figures the device's memory ladder is ordered by.
    footprint: bool = True
    # Recurrent state, input name -> the output that feeds it at the next step (or the CLI's
    # ["state=stateN"]): the samples are then consecutive steps of streams and each variant is
    # validated carrying its own state, as a device runs it (see validate.run_all).
    state: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_accuracy_drop", float(self.max_accuracy_drop))
        if not 0 <= self.max_accuracy_drop <= 100:
            raise ConfigError(f"max_accuracy_drop {self.max_accuracy_drop}: expected points between 0 and 100")
        if self.latency_runs < 1:
            raise ConfigError(f"latency_runs {self.latency_runs}: must be >= 1")
        if self.limit < 1:
            raise ConfigError(f"validation_limit {self.limit}: must be >= 1")
        if self.labels is not None and self.metric is not None and self.metric != "top1":
            raise ConfigError("give labels or a task metric, not both")
        if isinstance(self.metric, str) and self.metric not in BUILTIN and ":" not in self.metric:
            raise ConfigError(f"--metric {self.metric!r}: expected one of {', '.join(BUILTIN)} or module:function")
        object.__setattr__(self, "state", _state_pairs(self.state))


@dataclass(frozen=True)
class ReleaseConfig:
    """Where the release folder is written and what its manifest says about it."""

    output: Path = Path("release")
    version: int = 1
    model_name: str | None = None  # default: the model file's stem
    sign_key: Path | None = None  # Ed25519 private key: writes manifest.sig

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", Path(self.output))
        if self.sign_key is not None:
            object.__setattr__(self, "sign_key", Path(self.sign_key))
        if not isinstance(self.version, int) or self.version < 1:
            raise ConfigError(f"release version {self.version}: must be an integer >= 1")


@dataclass(frozen=True)
class ConvertConfig:
    """Everything one conversion was asked to do, checked before any heavy work starts."""

    model: Path
    profiles: tuple[DeviceProfile, ...]
    targets: frozenset[Target] | None = None  # None: every target the profiles run
    intake: IntakeConfig = IntakeConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    validation: ValidationConfig = ValidationConfig()
    release: ReleaseConfig = ReleaseConfig()
    notes: tuple[str, ...] = ()  # what resolving the profiles decided (which profile ``auto`` picked and why)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Path(self.model))
        if not self.profiles:
            raise ConfigError("no device profile given")
        if (self.validation.labels is not None and self.quantization.calibration is None
                and self.validation.data is None):
            raise ConfigError("labels name the calibration (or validation) samples; pass those samples too")

    @classmethod
    def from_options(cls, model: Path | str, profiles: Sequence[str] | str = (AUTO,), output: Path | str = "release",
                     **options: Any) -> ConvertConfig:
        """Build a config from ``edge_sdk.convert``'s flat keywords (:data:`OPTIONS` lists them)."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"unknown convert option(s) {unknown} (known: {', '.join(sorted(OPTIONS))})")
        parts: dict[str, dict[str, Any]] = {"intake": {}, "quantization": {}, "validation": {}, "release": {"output": output}}
        top: dict[str, Any] = {}
        for name, value in options.items():
            part, key = OPTIONS[name]
            (top if part is None else parts[part])[key] = value
        resolved, notes = resolve_profiles(profiles)
        return cls(model=Path(model), profiles=resolved, targets=resolve_targets(top.get("targets")), notes=tuple(notes),
                   intake=IntakeConfig(**parts["intake"]), quantization=QuantizationConfig(**parts["quantization"]),
                   validation=ValidationConfig(**parts["validation"]), release=ReleaseConfig(**parts["release"]))


# edge_sdk.convert keyword -> (part of ConvertConfig, field); None: a field of ConvertConfig itself.
OPTIONS: dict[str, tuple[str | None, str]] = {
    "targets": (None, "targets"),
    "input_shapes": ("intake", "input_shapes"),
    "constant_inputs": ("intake", "constant_inputs"),
    "prune": ("intake", "prune"),
    "image_options": ("intake", "image_options"),
    "calibration": ("quantization", "calibration"),
    "calibration_method": ("quantization", "method"),
    "per_channel": ("quantization", "per_channel"),
    "mixed_precision": ("quantization", "mixed_precision"),
    "calibration_limit": ("quantization", "limit"),
    "validation": ("validation", "data"),
    "labels": ("validation", "labels"),
    "metric": ("validation", "metric"),
    "max_accuracy_drop": ("validation", "max_accuracy_drop"),
    "latency_runs": ("validation", "latency_runs"),
    "validation_limit": ("validation", "limit"),
    "speed_gate": ("validation", "speed_gate"),
    "footprint": ("validation", "footprint"),
    "state": ("validation", "state"),
    "release_version": ("release", "version"),
    "model_name": ("release", "model_name"),
    "sign_key": ("release", "sign_key"),
}


def resolve_profiles(profiles: Sequence[str] | str) -> tuple[tuple[DeviceProfile, ...], list[str]]:
    """(profiles, notes): ids (or YAML paths) to profiles, ``auto`` detected; the notes say what ``auto`` picked and why."""
    ids = [profiles] if isinstance(profiles, str) else list(profiles)
    if not ids:
        raise ConfigError("no device profile given (use 'auto' to detect this machine's)")
    resolved: dict[str, DeviceProfile] = {}
    notes = []
    for profile_id in ids:
        choice = resolve_profile(profile_id)
        if choice.detection is not None:
            notes.append(f"--profile auto: {choice.detection.explain()}")
        resolved.setdefault(choice.profile.id, choice.profile)
    return tuple(resolved.values()), notes


def resolve_targets(targets: Sequence[str | Target] | str | None) -> frozenset[Target] | None:
    """Target names (a list, or one comma-separated string) to :class:`Target` values; None: all."""
    if targets is None:
        return None
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    resolved = set()
    for name in names:
        try:
            resolved.add(Target(name.strip() if isinstance(name, str) else name))
        except ValueError:
            raise ConfigError(f"unknown target {name!r} (known: {', '.join(t.value for t in Target)})") from None
    if not resolved:
        raise ConfigError("targets: empty list")
    return frozenset(resolved)
