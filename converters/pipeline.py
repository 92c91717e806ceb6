"""The conversion pipeline: check → prune → quantize/export per target → validate → release.

``run`` plans one variant per (target, precision) that any requested profile can run (a variant
shared by several profiles is built once) and builds each with its target's recipes
(``converters/builder.py``, ``converters/search.py``): every candidate runs in its own runtime
backend on validation samples the calibration did not see, against the FP32 ONNX original, and
is gated on accuracy and speed (``validate.gate``). Everything is written into a staging folder
that is renamed into place at the end. A variant that fails in any way becomes a ``rejected``
row and the other variants still complete; only a full or read-only disk aborts the release.
"""

from __future__ import annotations

import tempfile
import time
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import ConfigError, InputError
from ..manifest import Manifest, TensorSpec, Variant
from ..profiles import AUTO, DeviceProfile
from ..report import CalibrationInfo, ConversionReport, ReferenceInfo, SamplesInfo, SourceInfo
from ..runtime.backends.base import check_inputs
from ..types import PRECISION_LADDER, Precision, SpeedVerdict, Target
from . import metrics
from .builder import PlannedBuild, Reference, VariantBuilder
from .calibration import SampleSet, is_random, load_labels, load_samples, random_samples, split_held_out, subset
from .config import ConvertConfig, DataSource
from .loader import LoadedModel, SourceModel, read_model
from .prune import prune_model
from .specialize import inputs_deciding_ifs
from .release import Staging
from .targets.base import Feeds

ProgressCallback = Callable[[str, int, int], None]
"""``progress(step, done, total)``: called as the pipeline advances (the CLI draws a bar)."""

MIN_VALIDATION_SAMPLES = 8  # fewer make every accuracy figure noisy: the report warns


def convert(model: Path | str, profiles: Sequence[str] | str = (AUTO,), output: Path | str = "release", *,
            progress: ProgressCallback | None = None, **options: Any) -> Manifest:
    """Convert ``model`` into a validated release folder at ``output`` and return its manifest.

    ``profiles``: device profile ids (or ``"auto"``). ``options`` are the keywords of
    :data:`~edge_sdk.converters.config.OPTIONS`, each a field of :class:`ConvertConfig`:
    ``calibration`` (a folder/file of ``.npy``/``.npz`` or images, a list of feeds dicts, or
    ``"random"``, an explicit opt-in warned about in the report; without it INT8 is dynamic);
    ``validation`` (samples to validate on; default: a seeded held-out part of the calibration
    samples, which then do not calibrate); ``labels`` (top-1 accuracy as the task metric) or
    ``metric`` (a :class:`~edge_sdk.converters.metrics.TaskMetric`, or ``"top1"``, ``"cosine"``,
    ``"f1"``, ``"module:function"``; default: by the output's kind, see ``converters/metrics.py``);
    ``max_accuracy_drop`` in points of that measure; ``prune`` (``"METHOD:AMOUNT"``, e.g.
    ``"channel:0.3"``); ``targets``; ``input_shapes`` (dims neither a dynamic batch, fixed to 1,
    nor the samples fix); ``constant_inputs`` (``{"sr": 16000}``: inputs the device always feeds
    that value, folded in; samples may still carry them, with that value); ``calibration_method``;
    ``per_channel``; ``calibration_limit``; ``mixed_precision``; ``latency_runs``; ``validation_limit``; ``speed_gate``
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
        source = read_model(config.model, config.intake.input_shapes, config.intake.constant_inputs)
        notify("loading calibration data", 1, total)
        data = _Data.read(config, source, work)
        loaded = data.loaded
        report.notes.extend(loaded.notes)
        report.warnings.extend(data.warnings)
        report.source = SourceInfo(path=str(config.model), opset=loaded.source_opset, opset_used=loaded.opset)
        calib, validation_set = data.calib, data.validation
        report.calibration = CalibrationInfo(source=calib.source if calib else None, samples=len(calib.samples) if calib else 0,
                                             method=quantization.method.value, per_channel=quantization.per_channel)
        report.validation = SamplesInfo(source=validation_set.source, samples=len(validation_set.samples))
        if checks.state:
            pairs = ", ".join(f"{name} <- {output}" for name, output in checks.state.items())
            report.notes.append(f"validation streams its {len(validation_set.samples)} samples as consecutive steps, "
                                f"each variant carrying its own state ({pairs})")
        if calib is None:
            report.notes.append("no calibration data: INT8 is dynamic (weights only, often slower than FP32 on "
                                "conv nets); pass calibration for static INT8")

        # The reference is the user's model as given: a pruned FP32 variant shows what pruning cost.
        notify("running FP32 reference", 2, total)
        model = loaded.load()
        reference = Reference.build(loaded, model, validation_set.samples, checks.latency_threads, checks.latency_runs,
                                    checks.state)
        metric = _metric(config, model, reference.outputs, data.labels)
        report.metric = metric.name
        # Ratios in the report table are against this, whether or not an onnx-fp32 variant is built.
        report.reference = ReferenceInfo(size_bytes=loaded.path.stat().st_size, latency_ms=round(reference.latency_ms, 4))
        prune = config.intake.prune
        if prune is not None:
            notify(f"pruning ({prune})", 2, total)
            loaded, report.prune = prune_model(loaded, prune.method, prune.options, work)

        builder = VariantBuilder(stage.dir, work, loaded, loaded.facts, calib, validation_set, metric, reference,
                                 config, report)
        variants: list[Variant] = []
        try:
            for index, planned in enumerate(plan):
                notify(f"{planned.id}: export + validate", 3 + index, total)
                variants.extend(builder.build(planned))
        finally:
            builder.meter.close()
        if builder.reference_ms:
            # The reference timed alongside each variant (warm, under the same load) is the fairer yardstick.
            report.reference.latency_ms = round(statistics.median(builder.reference_ms), 4)
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
    Rejected variants, and variants whose speed verdict is inconclusive, never become a default.
    """
    ladder = {p: i for i, p in enumerate(PRECISION_LADDER)}
    defaults = {}
    for profile in profiles:
        for target in profile.targets:
            candidates = sorted((v for v in variants if v.ok and v.target == target and profile.id in v.profiles
                                 and v.validation.speed != SpeedVerdict.INCONCLUSIVE),
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


class _Data:
    """The model with every shape fixed, and the samples: calibration, validation, their labels."""

    def __init__(self, loaded, calib: SampleSet | None, validation: SampleSet, labels: np.ndarray | None,
                 warnings: list[str]) -> None:
        self.loaded, self.calib, self.validation, self.labels, self.warnings = loaded, calib, validation, labels, warnings

    @classmethod
    def read(cls, config: ConvertConfig, source: SourceModel, work: Path) -> _Data:
        """Read the samples against the model's inputs (symbolic dims fit any size), fix those dims from
        the samples, then split a held-out validation set off the calibration data unless one is given."""
        quantization, checks = config.quantization, config.validation
        given = [spec for spec in (quantization.calibration, checks.data) if spec is not None and not is_random(spec)]
        inputs = source.inputs
        read = {id(spec): _sample_set(spec, inputs, "calibration" if spec is quantization.calibration else "validation",
                                      config, source.constants) for spec in given}
        observed: dict[str, list[tuple[int, ...]]] = {}
        for samples in read.values():
            for sample in samples.samples:
                for name, array in sample.items():
                    observed.setdefault(name, []).append(array.shape)
        first = next(iter(read.values())).samples[:2] if read else ()
        source.notes.extend(_constant_input_hints(source, list(read.values())))
        loaded = source.finish(work, observed, first)
        inputs = loaded.inputs
        _check_state(checks.state, loaded)
        streams = bool(checks.state)

        def sample_set(spec: DataSource | None, what: str) -> SampleSet | None:
            if spec is None:
                return None
            found = read.get(id(spec)) or _sample_set(spec, inputs, what, config, loaded.constants)
            _check_feeds(found.samples, inputs, what)
            return found

        calib = sample_set(quantization.calibration, "calibration")
        held_out = sample_set(checks.data, "validation")
        warnings = list(calib.warnings) if calib else []
        labels_for = held_out if held_out is not None else calib
        labels = load_labels(checks.labels, labels_for.names) if checks.labels is not None and labels_for else None
        if held_out is not None:
            validation = held_out
        elif calib is None or is_random(quantization.calibration):
            # Random validation inputs only compare variants with FP32 (no range fitting): a note, not a warning.
            validation = random_samples(inputs, checks.random_samples, seed=1)
            validation.source = "random (no calibration data given)" if calib is None else "random (calibration is random)"
        else:
            calib, validation = split_held_out(calib, checks.limit, consecutive=streams)
            if validation is calib:
                warnings.append(f"validation uses the calibration samples themselves (only {len(calib.samples)} given): "
                                "pass more samples or --validation")
        validation.warnings = []
        validation = subset(validation, checks.limit, consecutive=streams)
        if labels is not None:
            by_name = dict(zip(labels_for.names, labels))
            labels = np.asarray([by_name[name] for name in validation.names], np.int64)
        if calib is not None:
            calib = subset(calib, quantization.limit)
        real = held_out is not None or (calib is not None and not is_random(quantization.calibration))
        if real and len(validation.samples) < MIN_VALIDATION_SAMPLES:
            warnings.append(f"validation has only {len(validation.samples)} samples (fewer than {MIN_VALIDATION_SAMPLES}): "
                            "accuracy figures are noisy; pass more samples or --validation")
        return cls(loaded, calib, validation, labels, warnings)


def _metric(config: ConvertConfig, model, reference: Sequence[dict], labels: np.ndarray | None) -> metrics.TaskMetric:
    """The accuracy measure: ``--metric``, top-1 accuracy from labels, else the output kind's default."""
    chosen = config.validation.metric
    if isinstance(chosen, metrics.TaskMetric):
        metrics.check(chosen, reference)
        return chosen
    if isinstance(chosen, str):
        return metrics.from_spec(chosen, model, reference, labels)
    if labels is not None:
        return metrics.top1_accuracy(labels)
    return metrics.default_metric(model, reference)


def _constant_input_hints(source: SourceModel, sets: Sequence[SampleSet]) -> list[str]:
    """A note for each integer input that holds one value in every sample and decides an If."""
    hints = []
    for name, ifs in inputs_deciding_ifs(source.model).items():
        values = {np.asarray(s[name]).tobytes(): np.asarray(s[name]) for found in sets for s in found.samples if name in s}
        value = next(iter(values.values())) if len(values) == 1 else None
        if value is not None and value.size == 1:
            shown = value.reshape(-1)[0].item()
            hints.append(f"input {name} is {shown} in every sample and decides {len(ifs)} If node(s): if the device "
                         f"never feeds another value, --constant-input {name}={int(shown)} inlines the branch taken")
    return hints


def _check_state(state: Mapping[str, str], loaded: LoadedModel) -> None:
    inputs = {s.name: s for s in loaded.inputs}
    outputs = {s.name: s for s in loaded.outputs}
    for name, output in state.items():
        if name not in inputs or output not in outputs:
            raise ConfigError(f"--state {name}={output}: expected an input=output pair of the model "
                              f"(inputs {sorted(inputs)}, outputs {sorted(outputs)})")
        if inputs[name].dtype != outputs[output].dtype:
            raise ConfigError(f"--state {name}={output}: the input is {inputs[name].dtype}, the output "
                              f"{outputs[output].dtype}; a state output must feed its input unchanged")


def _sample_set(spec: DataSource, inputs: Sequence[TensorSpec], what: str, config: ConvertConfig,
                constants: Sequence[TensorSpec] = ()) -> SampleSet:
    if isinstance(spec, (str, Path)):
        return load_samples(spec, inputs, image_options=config.intake.image_options)
    samples = [dict(s) for s in spec]
    if not samples:
        raise ConfigError(f"{what}: the list of samples is empty")
    _check_feeds(samples, [*inputs, *constants], what)  # a constant input, if given, holds its value
    for sample in samples:
        for constant in constants:
            sample.pop(constant.name, None)
    return SampleSet(samples, source=f"{len(samples)} samples given in code", names=[str(i) for i in range(len(samples))])


def _check_feeds(samples: list[Feeds], inputs: Sequence[TensorSpec], what: str) -> None:
    for index, sample in enumerate(samples):
        try:
            check_inputs(inputs, sample)
        except InputError as exc:
            raise ConfigError(f"{what} sample {index}: {exc}") from None
