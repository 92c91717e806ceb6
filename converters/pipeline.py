"""The conversion pipeline: check → prune → quantize/export per target → validate → release.

``convert`` plans one variant per (target, precision) that any requested profile can run (a
variant shared by several profiles is built once), exports each with its target module, runs
it with its own runtime backend against the FP32 ONNX original, gates it (accuracy and speed,
see :func:`~edge_sdk.converters.validate.gate`) and writes everything into a staging folder that
is renamed into place at the end. A variant that fails in any way becomes a ``rejected`` row and
the other variants still complete; only a full or read-only disk aborts the whole release.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import BackendError, ConfigError, EdgeSDKError, InputError, MissingDependencyError, ToolchainError
from ..manifest import FileEntry, Manifest, TensorSpec, Validation, Variant
from ..profiles import AUTO, DeviceProfile, resolve_profile
from ..runtime.backends.base import BackendOptions, Session, check_inputs, get_backend
from ..types import PRECISION_LADDER, TARGET_BACKEND, Precision, Target, VariantStatus
from . import mixed_precision, validate
from .calibration import ImageOptions, SampleSet, load_labels, load_samples, random_samples
from .loader import LoadedModel, load_model, parse_input_shapes
from .release import Staging, fatal_write_error
from .targets.base import CalibrationMethod, ExportRequest, ExportResult, ExportTarget, Feeds, get_target

ProgressCallback = Callable[[str, int, int], None]
"""``progress(step, done, total)``: called as the pipeline advances (the CLI draws a bar)."""

_QUANTIZED = (Precision.INT8, Precision.MIXED)


@dataclass(frozen=True)
class ConvertConfig:
    """Everything ``convert`` was asked to do, checked before any heavy work starts."""

    profiles: tuple[DeviceProfile, ...]
    targets: frozenset[Target] | None
    max_accuracy_drop: float = 1.0
    calibration_method: CalibrationMethod = CalibrationMethod.MINMAX
    per_channel: bool = True
    latency_runs: int = 50
    latency_threads: int | None = 1  # one thread: ratios are stabler on a shared build machine
    validation_limit: int = 64  # at most this many samples are used for validation
    random_samples: int = 16
    mixed_precision: bool = True
    # Off when the build machine says nothing about the device's speed (cross-building, emulation):
    # latencies are still measured and reported, only not used to reject.
    speed_gate: bool = True
    image_options: ImageOptions = ImageOptions()  # for calibration/validation folders of images

    def __post_init__(self) -> None:
        if not self.profiles:
            raise ConfigError("no device profile given")
        if not 0 <= self.max_accuracy_drop <= 100:
            raise ConfigError(f"max_accuracy_drop {self.max_accuracy_drop}: expected points between 0 and 100")
        if self.latency_runs < 1:
            raise ConfigError(f"latency_runs {self.latency_runs}: must be >= 1")
        if self.validation_limit < 1:
            raise ConfigError(f"validation_limit {self.validation_limit}: must be >= 1")


@dataclass
class _Planned:
    target: Target
    precision: Precision
    profiles: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.target.value}-{self.precision.value}"


def convert(
    model: Path | str,
    profiles: Sequence[str] | str = (AUTO,),
    output: Path | str = "release",
    *,
    calibration: Path | str | Sequence[Feeds] | None = None,
    labels: Path | str | Sequence[int] | np.ndarray | None = None,
    metric: validate.TaskMetric | None = None,
    validation: Path | str | Sequence[Feeds] | None = None,
    input_shapes: Sequence[str] | Mapping[str, Sequence[int]] | None = None,
    prune: str | None = None,
    max_accuracy_drop: float = 1.0,
    targets: Sequence[str | Target] | None = None,
    sign_key: Path | str | None = None,
    release_version: int = 1,
    model_name: str | None = None,
    progress: ProgressCallback | None = None,
    calibration_method: CalibrationMethod | str = CalibrationMethod.MINMAX,
    per_channel: bool = True,
    latency_runs: int = 50,
    validation_limit: int = 64,
    speed_gate: bool = True,
    image_options: ImageOptions | None = None,
) -> Manifest:
    """Convert ``model`` into a validated release folder at ``output`` and return its manifest.

    ``profiles``: device profile ids (or ``"auto"``); ``calibration``: a folder/file of
    ``.npy``/``.npz`` (or images), a list of feeds dicts, or ``"random"`` (explicit opt-in, warned
    about in the report); without it INT8 falls back to dynamic quantization. ``labels`` give
    a task metric (top-1 accuracy) on the validation samples (``validation``, by default the
    calibration samples); ``metric`` is any other
    :class:`~edge_sdk.converters.validate.TaskMetric` over the validation outputs. ``prune`` is ``"METHOD:AMOUNT"``
    (e.g. ``"channel:0.3"``). ``max_accuracy_drop`` is in points (task metric when labels are
    given, else top-1 agreement with FP32, else cosine similarity × 100). Nothing is written at
    ``output`` unless the whole conversion succeeds. ``speed_gate=False`` keeps variants slower than
    FP32 on this machine (measured and reported all the same) for builds whose machine is not
    representative of the device. ``image_options`` say how image folders become tensors (mean,
    std, layout, BGR).
    """
    started = time.perf_counter()
    resolved, profile_notes = _resolve_profiles(profiles)
    config = ConvertConfig(
        profiles=resolved,
        targets=_resolve_targets(targets),
        max_accuracy_drop=float(max_accuracy_drop),
        calibration_method=_method(calibration_method),
        per_channel=per_channel,
        latency_runs=latency_runs,
        validation_limit=validation_limit,
        speed_gate=speed_gate,
        image_options=image_options or ImageOptions(),
    )
    if release_version < 1:
        raise ConfigError(f"release version {release_version}: must be an integer >= 1")
    shapes = parse_input_shapes(input_shapes)
    prune_spec = _parse_prune(prune) if prune else None
    plan = plan_variants(config)
    model_path = Path(model)
    notify = progress or (lambda step, done, total: None)
    total = 3 + len(plan)
    report: dict = {"profiles": [p.id for p in config.profiles], "warnings": [], "notes": list(profile_notes)}

    with Staging(Path(output), sign_key) as stage, tempfile.TemporaryDirectory(prefix="edge-sdk-convert-") as tmp:
        work = Path(tmp)
        notify("checking model", 0, total)
        loaded = load_model(model_path, work, shapes)
        report["notes"].extend(loaded.notes)
        report["source"] = {"path": str(model_path), "opset": loaded.source_opset, "opset_used": loaded.opset}
        notify("loading calibration data", 1, total)
        calib, validation_set = _samples(calibration, validation, loaded.inputs, config)
        report["warnings"].extend(calib.warnings if calib else [])
        report["calibration"] = {"source": calib.source if calib else None, "samples": len(calib.samples) if calib else 0,
                                 "method": config.calibration_method.value, "per_channel": config.per_channel}
        report["validation"] = {"source": validation_set.source, "samples": len(validation_set.samples)}
        if calib is None:
            report["notes"].append("no calibration data: INT8 is dynamic (weights only, often slower than FP32 on "
                                   "conv nets); pass calibration for static INT8")
        if labels is not None:
            if calib is None and validation is None:
                raise ConfigError("labels name the calibration (or validation) samples; pass those samples too")
            if metric is not None:
                raise ConfigError("give labels or a task metric, not both")
            named = validation_set if validation is not None else calib
            metric = validate.top1_metric(load_labels(labels, named.names)[: len(validation_set.samples)])

        # The reference is the user's model as given: a pruned FP32 variant shows what pruning cost.
        notify("running FP32 reference", 2, total)
        reference = _Reference.build(loaded, validation_set.samples, config)
        # Ratios in the report table are against this, whether or not an onnx-fp32 variant is built.
        report["reference"] = {"what": "source model, FP32 ONNX in onnxruntime",
                               "size_bytes": loaded.path.stat().st_size, "latency_ms": round(reference.latency_ms, 4)}
        if prune_spec is not None:
            notify(f"pruning ({prune_spec[0]}:{prune_spec[1]:g})", 2, total)
            loaded, report["prune"] = _prune(loaded, prune_spec, work)

        run = _Run(stage.dir, loaded, calib, validation_set, metric, reference, config, report)
        variants: list[Variant] = []
        for index, planned in enumerate(plan):
            notify(f"{planned.id}: export + validate", 3 + index, total)
            variants.extend(run.build(planned))
        if run.reference_ms:
            # The reference timed alongside each variant (warm, under the same load) is the fairer yardstick.
            report["reference"]["latency_ms"] = round(statistics.median(run.reference_ms), 4)
        notify("writing release", total, total)

        self_test = stage.write_self_test(validation_set.samples[0], reference.outputs[0])
        manifest = Manifest(
            model=model_name or model_path.stem,
            version=release_version,
            source_sha256=loaded.source_sha256,
            sdk_version=__version__,
            self_test=self_test,
            variants=variants,
            defaults=choose_defaults(config.profiles, variants),
            report=report,
        )
        for profile in config.profiles:
            if profile.id not in manifest.defaults:
                report["warnings"].append(f"profile {profile.id}: no variant passed validation; it has no default")
        report["conversion_seconds"] = round(time.perf_counter() - started, 3)
        stage.commit(manifest)
    return manifest


def plan_variants(config: ConvertConfig) -> list[_Planned]:
    """One entry per (target, precision) some profile runs; profiles sharing it are listed on it."""
    planned: dict[tuple[Target, Precision], _Planned] = {}
    for profile in config.profiles:
        targets = [t for t in profile.targets if config.targets is None or t in config.targets]
        if not targets:
            raise ConfigError(f"profile {profile.id} runs {[t.value for t in profile.targets]}, none of the requested "
                              f"targets {sorted(t.value for t in config.targets or [])}")
        precisions = list(profile.precisions)
        if Precision.INT8 in precisions and Precision.MIXED not in precisions and config.mixed_precision:
            precisions.append(Precision.MIXED)  # only materialises when plain INT8 misses the accuracy target
        for target in targets:
            for precision in precisions:
                entry = planned.setdefault((target, precision), _Planned(target, precision))
                entry.profiles.append(profile.id)
    order = {p: i for i, p in enumerate((Precision.FP32, Precision.FP16, Precision.INT8, Precision.MIXED))}
    return sorted(planned.values(), key=lambda e: (e.target.value, order[e.precision]))


def choose_defaults(profiles: Sequence[DeviceProfile], variants: Sequence[Variant],
                    min_speedup: float = 0.05) -> dict[str, str]:
    """Per profile: in its most preferred target that has passing variants, the fastest one.

    A lower precision wins only when it is at least ``min_speedup`` faster than the best higher
    precision (FP16 on a CPU is rarely faster, and accuracy is worth a few percent of noise).
    Rejected variants never become a default.
    """
    ladder = {p: i for i, p in enumerate(PRECISION_LADDER)}
    defaults = {}
    for profile in profiles:
        for target in profile.targets:
            candidates = sorted((v for v in variants if v.ok and v.target == target and profile.id in v.profiles),
                                key=lambda v: ladder[v.precision])
            if not candidates:
                continue
            best = candidates[0]
            for variant in candidates[1:]:
                if variant.latency_ms is not None and (best.latency_ms is None
                                                       or variant.latency_ms < best.latency_ms * (1 - min_speedup)):
                    best = variant
            defaults[profile.id] = best.id
            break
    return defaults


# ---------------------------------------------------------------------------------------------


@dataclass
class _Reference:
    """FP32 ONNX outputs on the validation samples, and its session for paired latency runs."""

    outputs: list[dict[str, np.ndarray]]
    session: Session
    latency_ms: float

    @classmethod
    def build(cls, loaded: LoadedModel, samples: Sequence[Feeds], config: ConvertConfig) -> _Reference:
        session = get_backend("onnxruntime").load([loaded.path], loaded.inputs, loaded.outputs,
                                                  BackendOptions(threads=config.latency_threads))
        outputs = validate.run_all(session, samples)
        latency = validate.median_latency_ms(session, samples[0], runs=config.latency_runs)
        return cls(outputs, session, latency)


@dataclass
class _Run:
    """What every variant of one conversion shares."""

    stage_dir: Path
    loaded: LoadedModel
    calib: SampleSet | None
    validation_set: SampleSet
    metric: validate.TaskMetric | None
    reference: _Reference
    config: ConvertConfig
    report: dict
    # Accuracy drop (points) of plain FP32 and INT8 per target: decides whether MIXED is searched.
    fp32_drop: dict[Target, float] = field(default_factory=dict)
    int8_drop: dict[Target, float] = field(default_factory=dict)
    reference_ms: list[float] = field(default_factory=list)  # the reference's paired latency per variant

    def build(self, planned: _Planned) -> list[Variant]:
        """Export and validate one planned variant; whatever fails becomes its rejected entry.

        Only a full or read-only disk aborts (the whole release is then removed). Files the
        variant wrote but the manifest will not list (failed exports, a mixed-precision search
        that kept nothing) are deleted, so the release folder holds exactly what it lists.
        """
        before = _files(self.stage_dir)
        try:
            variants = self._build(planned)
        except Exception as exc:  # noqa: BLE001 - one broken converter must not sink the other targets
            fatal = fatal_write_error(exc)
            if fatal is not None:
                raise fatal from None
            what = "mixed precision search" if planned.precision == Precision.MIXED else "export"
            variants = [self._rejected(planned, TARGET_BACKEND[planned.target], f"{what} failed: {_describe(exc)}")]
        listed = {(self.stage_dir / f.path).resolve() for v in variants for f in v.files}
        for path in sorted(_files(self.stage_dir) - before - listed, reverse=True):
            path.unlink()
        _remove_empty_dirs(self.stage_dir)
        return variants

    def _build(self, planned: _Planned) -> list[Variant]:
        try:
            target = get_target(planned.target)
            target.check_available()
        except (ToolchainError, MissingDependencyError, ImportError) as exc:
            # ImportError: the target's module (or a package it needs) is not installed.
            if planned.precision == Precision.MIXED:
                return []
            return [self._rejected(planned, TARGET_BACKEND[planned.target], f"target unavailable: {exc}")]
        unavailable = target.unavailable_reason(planned.precision)
        if unavailable:
            if planned.precision == Precision.MIXED:
                return []  # this target cannot keep islands in FP32; plain INT8 stands alone
            return [self._rejected(planned, target.backend, unavailable)]
        if planned.precision == Precision.MIXED:
            return self._build_mixed(planned, target)
        return [self._validated(planned, target, target.export(self._request(planned)))]

    def _build_mixed(self, planned: _Planned, target: ExportTarget) -> list[Variant]:
        """Accuracy-aware INT8: only when plain INT8 misses ``max_accuracy_drop`` and calibration exists."""
        drop = self.int8_drop.get(planned.target)
        if self.calib is None or drop is None or drop <= self.config.max_accuracy_drop:
            return []  # plain INT8 already meets the target (or could not be built at all)
        fp32_drop = self.fp32_drop.get(planned.target, 0.0)
        if fp32_drop > self.config.max_accuracy_drop:
            self.report["notes"].append(f"{planned.target.value}: no mixed-precision search: FP32 itself (after pruning) "
                                        f"misses max_accuracy_drop ({fp32_drop:.2f} points)")
            return []

        def export(kept: list[str]) -> ExportResult:
            return target.export(self._request(planned, nodes_to_exclude=kept))

        def evaluate(result: ExportResult) -> Validation:
            session = self._load(target, result, planned.precision)
            return validate.compare(self.reference.outputs, validate.run_all(session, self.validation_set.samples), self.metric)

        found = mixed_precision.search(export, evaluate, self.loaded.path, self.validation_set.samples,
                                       self.config.max_accuracy_drop)
        self.report.setdefault("mixed_precision", {})[planned.target.value] = {
            "reached": found.reached, "kept_fp32": found.kept_fp32, "trials": found.trials,
            "ranking": [[name, round(err, 6)] for name, err in found.ranking[:20]],
        }
        if found.result is None or found.result.nodes_quantized == 0:
            self.report["notes"].append(f"{planned.target.value}: mixed precision would keep every node in FP32; no mixed variant")
            return []
        variant = self._validated(planned, target, found.result)
        variant.validation.nodes_kept_fp32 = list(found.kept_fp32)
        if not found.reached and variant.ok:
            variant.status, variant.reason = VariantStatus.REJECTED, "even with every ranked node in FP32 the accuracy target is missed"
        return [variant]

    def _validated(self, planned: _Planned, target: ExportTarget, result: ExportResult) -> Variant:
        files = [FileEntry.from_file(self.stage_dir, f) for f in result.files]
        variant = Variant(id=planned.id, profiles=list(planned.profiles), target=planned.target, precision=planned.precision,
                          backend=target.backend, files=files, inputs=result.inputs, outputs=result.outputs,
                          size_bytes=sum(f.size for f in files))
        try:
            session = self._load(target, result, planned.precision)
            outputs = validate.run_all(session, self.validation_set.samples)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run it rejects this variant only
            variant.status, variant.reason = VariantStatus.REJECTED, f"does not run in {target.backend}: {_describe(exc)}"
            return variant
        validation = validate.compare(self.reference.outputs, outputs, self.metric)
        validation.notes = list(result.notes)
        validation.nodes_quantized = result.nodes_quantized
        validation.nodes_kept_fp32 = list(result.nodes_kept_fp32)
        validation.self_test_tolerance = validate.self_test_tolerance(validation, self.reference.outputs)
        variant.validation = validation
        ref_ms, latency = validate.paired_latency_ms(self.reference.session, session, self.validation_set.samples[0],
                                                     runs=self.config.latency_runs)
        variant.latency_ms = round(latency, 4)
        self.reference_ms.append(ref_ms)
        reasons = []
        if planned.precision in _QUANTIZED and result.nodes_quantized == 0:
            reasons.append("nothing was quantized (the file is still FP32)")
        reason = validate.gate(validation, latency if self.config.speed_gate else None, ref_ms, planned.precision,
                               max_drop=self.config.max_accuracy_drop)
        if reason:
            reasons.append(reason)
        if planned.precision in (Precision.FP32, Precision.INT8):
            drops = self.fp32_drop if planned.precision == Precision.FP32 else self.int8_drop
            drops[planned.target] = validate.accuracy_drop(validation)[1]
        if reasons:
            variant.status, variant.reason = VariantStatus.REJECTED, "; ".join(reasons)
        return variant

    def _load(self, target: ExportTarget, result: ExportResult, precision: Precision) -> Session:
        """Load an artifact the way a device does: the precision sets OpenVINO's hint and ncnn's fp16/int8 flags."""
        try:
            backend = get_backend(target.backend)
        except ImportError as exc:  # the backend's module or native package is missing
            raise BackendError(f"runtime backend {target.backend!r} is not available: {exc}") from None
        return backend.load(result.files, result.inputs, result.outputs,
                            BackendOptions(threads=self.config.latency_threads, precision=precision))

    def _request(self, planned: _Planned, nodes_to_exclude: Sequence[str] = ()) -> ExportRequest:
        quantized = planned.precision in _QUANTIZED
        return ExportRequest(
            model_path=self.loaded.path, precision=planned.precision, out_dir=self.stage_dir / planned.target.value,
            variant_id=planned.id, inputs=self.loaded.inputs, outputs=self.loaded.outputs,
            calibration=self.calib.samples if self.calib is not None and quantized else (),
            calibration_method=self.config.calibration_method, per_channel=self.config.per_channel,
            nodes_to_exclude=tuple(nodes_to_exclude),
        )

    def _rejected(self, planned: _Planned, backend: str, reason: str) -> Variant:
        return Variant(id=planned.id, profiles=list(planned.profiles), target=planned.target, precision=planned.precision,
                       backend=backend, files=[], inputs=self.loaded.inputs, outputs=self.loaded.outputs,
                       status=VariantStatus.REJECTED, reason=reason)


def _describe(exc: Exception) -> str:
    """Our own errors already name what failed; anything else is named by its type too."""
    if isinstance(exc, EdgeSDKError):
        return str(exc)
    return f"{type(exc).__name__}: {str(exc).strip() or '(no message)'}"


def _files(folder: Path) -> set[Path]:
    return {p.resolve() for p in folder.rglob("*") if p.is_file()}


def _remove_empty_dirs(folder: Path) -> None:
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        if not any(path.iterdir()):
            path.rmdir()


def _samples(calibration, validation, inputs: Sequence[TensorSpec], config: ConvertConfig) -> tuple[SampleSet | None, SampleSet]:
    """(calibration set or None, validation set). Validation defaults to the calibration samples."""
    calib = _sample_set(calibration, inputs, "calibration", config) if calibration is not None else None
    if validation is not None:
        held_out = _sample_set(validation, inputs, "validation", config)
        held_out.warnings = []  # random validation inputs only compare variants with FP32: no range fitting
        return calib, _limit(held_out, config.validation_limit)
    if calib is None:
        # No calibration: INT8 is dynamic. Validation still needs inputs; random ones only compare
        # variants with FP32 (no range fitting), so they are a note, not a warning.
        validation_set = random_samples(inputs, config.random_samples, seed=1)
        validation_set.warnings = []
        validation_set.source = "random (no calibration data given)"
        return None, validation_set
    return calib, _limit(calib, config.validation_limit)


def _sample_set(spec, inputs: Sequence[TensorSpec], what: str, config: ConvertConfig) -> SampleSet:
    if isinstance(spec, (str, Path)):
        return load_samples(spec, inputs, image_options=config.image_options)
    samples = [dict(s) for s in spec]
    if not samples:
        raise ConfigError(f"{what}: the list of samples is empty")
    _check_feeds(samples, inputs, what)
    return SampleSet(samples, source=f"{len(samples)} samples given in code", names=[str(i) for i in range(len(samples))])


def _limit(samples: SampleSet, limit: int) -> SampleSet:
    if len(samples.samples) <= limit:
        return samples
    return SampleSet(samples.samples[:limit], samples.source, samples.names[:limit], list(samples.warnings))


def _check_feeds(samples: list[Feeds], inputs: Sequence[TensorSpec], what: str) -> None:
    for index, sample in enumerate(samples):
        try:
            check_inputs(inputs, sample)
        except InputError as exc:
            raise ConfigError(f"{what} sample {index}: {exc}") from None


def _resolve_profiles(profiles: Sequence[str] | str) -> tuple[tuple[DeviceProfile, ...], list[str]]:
    """(profiles, notes): the notes say which profile ``auto`` picked and why."""
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


def _resolve_targets(targets: Sequence[str | Target] | None) -> frozenset[Target] | None:
    if targets is None:
        return None
    resolved = set()
    for name in [targets] if isinstance(targets, str) else targets:
        try:
            resolved.add(Target(name))
        except ValueError:
            raise ConfigError(f"unknown target {name!r} (known: {', '.join(t.value for t in Target)})") from None
    if not resolved:
        raise ConfigError("targets: empty list")
    return frozenset(resolved)


def _method(method: CalibrationMethod | str) -> CalibrationMethod:
    try:
        return CalibrationMethod(method)
    except ValueError:
        raise ConfigError(f"unknown calibration method {method!r} (known: {', '.join(m.value for m in CalibrationMethod)})") from None


def _parse_prune(spec: str) -> tuple[str, float]:
    method, sep, amount = spec.partition(":")
    try:
        value = float(amount)
    except ValueError:
        value = -1.0
    if not sep or not method or not 0 < value < 1:
        raise ConfigError(f"--prune {spec!r}: expected METHOD:AMOUNT with 0 < AMOUNT < 1 (e.g. magnitude:0.5, channel:0.3)")
    return method, value


def _prune(loaded: LoadedModel, spec: tuple[str, float], work: Path) -> tuple[LoadedModel, dict]:
    from .prune import prune_model

    return prune_model(loaded, spec[0], spec[1], work)
