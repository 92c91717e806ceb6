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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import BackendError, ConfigError, EdgeSDKError, InputError, MissingDependencyError, ToolchainError
from ..manifest import FileEntry, Manifest, TensorSpec, Validation, Variant
from ..profiles import AUTO, DeviceProfile
from ..report import CalibrationInfo, ConversionReport, MixedSearch, ReferenceInfo, SamplesInfo, SourceInfo
from ..runtime.backends.base import BackendOptions, Session, check_inputs, get_backend
from ..types import PRECISION_LADDER, TARGET_BACKEND, Precision, Target, VariantStatus
from . import mixed_precision, validate
from .calibration import SampleSet, load_labels, load_samples, random_samples
from .config import ConvertConfig, DataSource, ValidationConfig
from .loader import LoadedModel, load_model
from .prune import prune_model
from .release import Staging, fatal_write_error
from .targets.base import ExportRequest, ExportResult, ExportTarget, Feeds, get_target

ProgressCallback = Callable[[str, int, int], None]
"""``progress(step, done, total)``: called as the pipeline advances (the CLI draws a bar)."""

_QUANTIZED = (Precision.INT8, Precision.MIXED)


@dataclass
class PlannedBuild:
    """One (target, precision) to export, and the profiles that run it."""

    target: Target
    precision: Precision
    profiles: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.target.value}-{self.precision.value}"


def convert(model: Path | str, profiles: Sequence[str] | str = (AUTO,), output: Path | str = "release", *,
            progress: ProgressCallback | None = None, **options: Any) -> Manifest:
    """Convert ``model`` into a validated release folder at ``output`` and return its manifest.

    ``profiles``: device profile ids (or ``"auto"``). ``options`` are the keywords of
    :data:`~edge_sdk.converters.config.OPTIONS`, each a field of :class:`ConvertConfig`:
    ``calibration`` (a folder/file of ``.npy``/``.npz`` or images, a list of feeds dicts, or
    ``"random"``, an explicit opt-in warned about in the report; without it INT8 is dynamic);
    ``validation`` (held-out samples; default: the calibration samples); ``labels`` (top-1
    accuracy as the task metric) or ``metric`` (any :class:`~edge_sdk.converters.validate.TaskMetric`);
    ``max_accuracy_drop`` in points (task metric, else top-1 agreement with FP32, else cosine x 100);
    ``prune`` (``"METHOD:AMOUNT"``, e.g. ``"channel:0.3"``); ``targets``; ``input_shapes``;
    ``calibration_method``; ``per_channel``; ``latency_runs``; ``validation_limit``; ``speed_gate``
    (False keeps variants slower than FP32 here, for builds whose machine is unlike the device);
    ``image_options``; ``sign_key``; ``release_version``; ``model_name``. Nothing is written at
    ``output`` unless the whole conversion succeeds.
    """
    return run(ConvertConfig.from_options(model, profiles, output, **options), progress)


def run(config: ConvertConfig, progress: ProgressCallback | None = None) -> Manifest:
    """Carry out ``config``: check, prune, export and validate every planned variant, write the release."""
    started = time.perf_counter()
    plan = plan_builds(config.profiles, config.targets, mixed_precision=config.quantization.mixed_precision)
    notify = progress or (lambda step, done, total: None)
    total = 3 + len(plan)
    quantization, checks = config.quantization, config.validation
    report = ConversionReport(profiles=[p.id for p in config.profiles], notes=list(config.notes))

    with Staging(config.release.output, config.release.sign_key) as stage, \
            tempfile.TemporaryDirectory(prefix="edge-sdk-convert-") as tmp:
        work = Path(tmp)
        notify("checking model", 0, total)
        loaded = load_model(config.model, work, config.intake.input_shapes)
        report.notes.extend(loaded.notes)
        report.source = SourceInfo(path=str(config.model), opset=loaded.source_opset, opset_used=loaded.opset)
        notify("loading calibration data", 1, total)
        calib, validation_set = _samples(config, loaded.inputs)
        report.warnings.extend(calib.warnings if calib else [])
        report.calibration = CalibrationInfo(source=calib.source if calib else None, samples=len(calib.samples) if calib else 0,
                                             method=quantization.method.value, per_channel=quantization.per_channel)
        report.validation = SamplesInfo(source=validation_set.source, samples=len(validation_set.samples))
        if calib is None:
            report.notes.append("no calibration data: INT8 is dynamic (weights only, often slower than FP32 on "
                                "conv nets); pass calibration for static INT8")
        metric = checks.metric
        if checks.labels is not None:
            named = validation_set if checks.data is not None else calib
            metric = validate.top1_metric(load_labels(checks.labels, named.names)[: len(validation_set.samples)])

        # The reference is the user's model as given: a pruned FP32 variant shows what pruning cost.
        notify("running FP32 reference", 2, total)
        reference = _Reference.build(loaded, validation_set.samples, checks)
        # Ratios in the report table are against this, whether or not an onnx-fp32 variant is built.
        report.reference = ReferenceInfo(size_bytes=loaded.path.stat().st_size, latency_ms=round(reference.latency_ms, 4))
        prune = config.intake.prune
        if prune is not None:
            notify(f"pruning ({prune})", 2, total)
            loaded, report.prune = prune_model(loaded, prune.method, prune.options, work)

        build = _Run(stage.dir, loaded, calib, validation_set, metric, reference, config, report)
        variants: list[Variant] = []
        for index, planned in enumerate(plan):
            notify(f"{planned.id}: export + validate", 3 + index, total)
            variants.extend(build.build(planned))
        if build.reference_ms:
            # The reference timed alongside each variant (warm, under the same load) is the fairer yardstick.
            report.reference.latency_ms = round(statistics.median(build.reference_ms), 4)
        notify("writing release", total, total)

        self_test = stage.write_self_test(validation_set.samples[0], reference.outputs[0])
        manifest = Manifest(
            model=config.release.model_name or config.model.stem,
            version=config.release.version,
            source_sha256=loaded.source_sha256,
            sdk_version=__version__,
            self_test=self_test,
            variants=variants,
            defaults=choose_defaults(config.profiles, variants),
            report=report,
        )
        for profile in config.profiles:
            if profile.id not in manifest.defaults:
                report.warnings.append(f"profile {profile.id}: no variant passed validation; it has no default")
        report.conversion_seconds = round(time.perf_counter() - started, 3)
        stage.commit(manifest)
    return manifest


def plan_builds(profiles: Sequence[DeviceProfile], targets: frozenset[Target] | None, *,
                mixed_precision: bool = True) -> list[PlannedBuild]:
    """One build per (target, precision) some profile runs; profiles sharing it are listed on it."""
    planned: dict[tuple[Target, Precision], PlannedBuild] = {}
    for profile in profiles:
        runnable = [t for t in profile.targets if targets is None or t in targets]
        if not runnable:
            raise ConfigError(f"profile {profile.id} runs {[t.value for t in profile.targets]}, none of the requested "
                              f"targets {sorted(t.value for t in targets or [])}")
        precisions = list(profile.precisions)
        if Precision.INT8 in precisions and Precision.MIXED not in precisions and mixed_precision:
            precisions.append(Precision.MIXED)  # only materialises when plain INT8 misses the accuracy target
        for target in runnable:
            for precision in precisions:
                entry = planned.setdefault((target, precision), PlannedBuild(target, precision))
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
    def build(cls, loaded: LoadedModel, samples: Sequence[Feeds], config: ValidationConfig) -> _Reference:
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
    report: ConversionReport
    # Accuracy drop (points) of plain FP32 and INT8 per target: decides whether MIXED is searched.
    fp32_drop: dict[Target, float] = field(default_factory=dict)
    int8_drop: dict[Target, float] = field(default_factory=dict)
    reference_ms: list[float] = field(default_factory=list)  # the reference's paired latency per variant

    def build(self, planned: PlannedBuild) -> list[Variant]:
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

    def _build(self, planned: PlannedBuild) -> list[Variant]:
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

    def _build_mixed(self, planned: PlannedBuild, target: ExportTarget) -> list[Variant]:
        """Accuracy-aware INT8: only when plain INT8 misses ``max_accuracy_drop`` and calibration exists."""
        drop = self.int8_drop.get(planned.target)
        if self.calib is None or drop is None or drop <= self.config.validation.max_accuracy_drop:
            return []  # plain INT8 already meets the target (or could not be built at all)
        fp32_drop = self.fp32_drop.get(planned.target, 0.0)
        if fp32_drop > self.config.validation.max_accuracy_drop:
            self.report.notes.append(f"{planned.target.value}: no mixed-precision search: FP32 itself (after pruning) "
                                        f"misses max_accuracy_drop ({fp32_drop:.2f} points)")
            return []

        def export(kept: list[str]) -> ExportResult:
            return target.export(self._request(planned, nodes_to_exclude=kept))

        def evaluate(result: ExportResult) -> Validation:
            session = self._load(target, result, planned.precision)
            return validate.compare(self.reference.outputs, validate.run_all(session, self.validation_set.samples), self.metric)

        found = mixed_precision.search(export, evaluate, self.loaded.path, self.validation_set.samples,
                                       self.config.validation.max_accuracy_drop)
        self.report.mixed_precision[planned.target.value] = MixedSearch(
            reached=found.reached, kept_fp32=found.kept_fp32, trials=found.trials,
            ranking=[(name, round(err, 6)) for name, err in found.ranking[:20]])
        if found.result is None or found.result.nodes_quantized == 0:
            self.report.notes.append(f"{planned.target.value}: mixed precision would keep every node in FP32; no mixed variant")
            return []
        variant = self._validated(planned, target, found.result)
        variant.validation.nodes_kept_fp32 = list(found.kept_fp32)
        if not found.reached and variant.ok:
            variant.status, variant.reason = VariantStatus.REJECTED, "even with every ranked node in FP32 the accuracy target is missed"
        return [variant]

    def _validated(self, planned: PlannedBuild, target: ExportTarget, result: ExportResult) -> Variant:
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
                                                     runs=self.config.validation.latency_runs)
        variant.latency_ms = round(latency, 4)
        self.reference_ms.append(ref_ms)
        reasons = []
        if planned.precision in _QUANTIZED and result.nodes_quantized == 0:
            reasons.append("nothing was quantized (the file is still FP32)")
        reason = validate.gate(validation, latency if self.config.validation.speed_gate else None, ref_ms, planned.precision,
                               max_drop=self.config.validation.max_accuracy_drop)
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
                            BackendOptions(threads=self.config.validation.latency_threads, precision=precision))

    def _request(self, planned: PlannedBuild, nodes_to_exclude: Sequence[str] = ()) -> ExportRequest:
        quantized = planned.precision in _QUANTIZED
        return ExportRequest(
            model_path=self.loaded.path, precision=planned.precision, out_dir=self.stage_dir / planned.target.value,
            variant_id=planned.id, inputs=self.loaded.inputs, outputs=self.loaded.outputs,
            calibration=self.calib.samples if self.calib is not None and quantized else (),
            calibration_method=self.config.quantization.method, per_channel=self.config.quantization.per_channel,
            nodes_to_exclude=tuple(nodes_to_exclude),
        )

    def _rejected(self, planned: PlannedBuild, backend: str, reason: str) -> Variant:
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


def _samples(config: ConvertConfig, inputs: Sequence[TensorSpec]) -> tuple[SampleSet | None, SampleSet]:
    """(calibration set or None, validation set). Validation defaults to the calibration samples."""
    checks = config.validation
    calibration = config.quantization.calibration
    calib = _sample_set(calibration, inputs, "calibration", config) if calibration is not None else None
    if checks.data is not None:
        held_out = _sample_set(checks.data, inputs, "validation", config)
        held_out.warnings = []  # random validation inputs only compare variants with FP32: no range fitting
        return calib, _limit(held_out, checks.limit)
    if calib is None:
        # No calibration: INT8 is dynamic. Validation still needs inputs; random ones only compare
        # variants with FP32 (no range fitting), so they are a note, not a warning.
        validation_set = random_samples(inputs, checks.random_samples, seed=1)
        validation_set.warnings = []
        validation_set.source = "random (no calibration data given)"
        return None, validation_set
    return calib, _limit(calib, checks.limit)


def _sample_set(spec: DataSource, inputs: Sequence[TensorSpec], what: str, config: ConvertConfig) -> SampleSet:
    if isinstance(spec, (str, Path)):
        return load_samples(spec, inputs, image_options=config.intake.image_options)
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
