"""Building one planned variant: run its target's recipes, validate each candidate, keep the best.

Each recipe's export writes into its own scratch folder (under the conversion's temporary
directory) with the tool's output captured (:func:`~edge_sdk.converters.toollog.quiet`); the
candidate is run with its own runtime backend on the validation samples and judged by the gate
(``validate.gate``). Only the chosen candidate's files move into the release; a variant with no
accepted candidate keeps its most accurate one as a ``rejected`` entry whose reason names what
every recipe gave, one clause each. Everything the tools said, and every failure's traceback,
goes to the release's ``report/<variant>.log``. Only a full or read-only disk aborts the release.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..errors import BackendError, EdgeSDKError, MissingDependencyError, ToolchainError
from ..manifest import FileEntry, TensorSpec, Validation, Variant
from ..report import ConversionReport, SensitivitySearch
from ..runtime.backends.base import BackendOptions, Session, get_backend
from ..types import TARGET_BACKEND, Precision, Target, VariantStatus
from ..runtime import footprint
from . import sensitivity, validate
from .calibration import SampleSet
from .config import ConvertConfig
from .loader import LoadedModel
from .metrics import Judged, OutputKind, TaskMetric, output_kind
from .release import fatal_write_error
from .search import Candidate, RecipeFailed, SearchResult, run_recipes
from .targets.base import AccuracyCheck, ExportRequest, ExportResult, ExportTarget, Feeds, ModelFacts, Recipe, get_target
from .toollog import quiet

LOG_FOLDER = "report"
_QUANTIZED = (Precision.INT8, Precision.MIXED)
NOT_SMALLER = 0.95  # a mixed or accuracy-recovering variant at or above this fraction of the FP32 size gains nothing


@dataclass
class Reference:
    """FP32 ONNX outputs on the validation samples, its session for paired latency runs, and the
    first output when it holds class scores (what top-1 agreement compares)."""

    outputs: list[dict]
    session: Session
    latency_ms: float
    classes: Judged | None = None

    @classmethod
    def build(cls, loaded: LoadedModel, model: onnx.ModelProto, samples: Sequence[Feeds], threads: int | None,
              runs: int, state: Mapping[str, str]) -> Reference:
        session = get_backend("onnxruntime").load([loaded.path], loaded.inputs, loaded.outputs, BackendOptions(threads=threads))
        outputs = validate.run_all(session, samples, state)
        first = next(iter(outputs[0]))
        numeric = np.asarray(outputs[0][first]).dtype.kind in "fiu"
        judged = output_kind(model, first, [o[first] for o in outputs]) if numeric else None
        return cls(outputs, session, validate.median_latency_ms(session, samples[0], runs=runs),
                   judged if judged is not None and judged.kind == OutputKind.CLASS_SCORES else None)


@dataclass
class PlannedBuild:
    """One (target, precision) to export, and the profiles that run it."""

    target: Target
    precision: Precision
    profiles: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.target.value}-{self.precision.value}"


@dataclass
class VariantBuilder:
    """What every variant of one conversion shares, and what earlier variants found out."""

    stage_dir: Path
    work_dir: Path
    loaded: LoadedModel
    facts: ModelFacts
    calib: SampleSet | None
    validation_set: SampleSet
    metric: TaskMetric
    reference: Reference
    config: ConvertConfig
    report: ConversionReport
    fp32_drop: dict[Target, float] = field(default_factory=dict)
    int8_searches: dict[Target, SearchResult] = field(default_factory=dict)  # the base of each target's MIXED search
    mixed_bases: dict[Target, Candidate] = field(default_factory=dict)
    reference_ms: list[float] = field(default_factory=list)  # the reference's paired latency per variant
    meter: footprint.FootprintMeter = field(default_factory=footprint.FootprintMeter)  # closed by the pipeline

    def build(self, planned: PlannedBuild) -> list[Variant]:
        """The variant for ``planned`` (none for a MIXED search with nothing to gain)."""
        log: list[str] = []
        try:
            return self._build(planned, log)
        except Exception as exc:  # noqa: BLE001 - one broken converter must not sink the other targets
            fatal = fatal_write_error(exc)
            if fatal is not None:
                raise fatal from None
            log.append(_traceback(exc))
            return [self._rejected(planned, TARGET_BACKEND[planned.target], f"build: {describe_failure(exc)}")]
        finally:
            self._write_log(planned.id, log)
            self._discard_candidates(planned)

    def _build(self, planned: PlannedBuild, log: list[str]) -> list[Variant]:
        try:
            target = get_target(planned.target)
            target.check_available()
        except (ToolchainError, MissingDependencyError, ImportError) as exc:
            # ImportError: the target's module (or a package it needs) is not installed.
            if planned.precision == Precision.MIXED:
                return []
            return [self._rejected(planned, TARGET_BACKEND[planned.target], f"target unavailable: {_first_line(exc)}")]
        unavailable = target.unavailable_reason(planned.precision)
        if unavailable:
            if planned.precision == Precision.MIXED:
                return []  # this target cannot keep islands in FP32; plain INT8 stands alone
            return [self._rejected(planned, target.backend, unavailable)]
        recipes = list(target.recipes(planned.precision))
        if planned.precision == Precision.MIXED:
            base = self._mixed_base(planned)
            if base is None:
                return []
            self.mixed_bases[planned.target] = base
            recipes = [dataclasses.replace(base.recipe, name=r.name, summary=r.summary, precision=Precision.MIXED,
                                           keeps_sensitive_nodes=True, when=r.when) for r in recipes]
        search = run_recipes(recipes, lambda recipe: self._attempt(planned, target, recipe, log), facts=self.facts,
                             has_calibration=self.calib is not None, refuse=lambda recipe: self._refuse(recipe, recipes),
                             max_drop=self.config.validation.max_accuracy_drop)
        self.report.recipes[planned.id] = search.attempts
        if planned.precision == Precision.INT8:
            self.int8_searches[planned.target] = search
        return self._variant(planned, target, search)

    def _refuse(self, recipe: Recipe, recipes: Sequence[Recipe]) -> str | None:
        if not self.config.quantization.per_channel and getattr(recipe.options, "per_channel", False):
            return "per-channel, and --per-tensor was given"
        # A recipe that differs from another of the list (whose method is left to the request) only
        # by naming the method the request already gives would repeat it.
        method = getattr(recipe.options, "calibration_method", None)
        if method is not None and method == self.config.quantization.method and dataclasses.is_dataclass(recipe.options):
            same = dataclasses.replace(recipe.options, calibration_method=None)
            twin = next((r for r in recipes if r.options == same), None)
            if twin is not None:
                return f"{twin.name} already calibrates with --calibration-method {method.value}"
        return None

    def _mixed_base(self, planned: PlannedBuild) -> Candidate | None:
        """The most accurate static INT8 candidate (else dynamic) that quantized something, when no
        INT8 recipe met the accuracy budget."""
        search = self.int8_searches.get(planned.target)
        budget = self.config.validation.max_accuracy_drop
        quantized = [] if search is None else [c for c in search.candidates if c.result.nodes_quantized != 0]
        if search is None or self.calib is None or any(c.drop <= budget for c in quantized):
            return None  # plain INT8 already meets the target (or could not be built at all)
        fp32_drop = self.fp32_drop.get(planned.target, 0.0)
        if fp32_drop > budget:
            self.report.notes.append(f"{planned.target.value}: no mixed-precision search: FP32 itself (after pruning) "
                                     f"misses max_accuracy_drop ({fp32_drop:.2f} points)")
            return None
        return min(quantized, key=lambda c: (not c.recipe.needs_calibration, c.drop), default=None)

    def _variant(self, planned: PlannedBuild, target: ExportTarget, search: SearchResult) -> list[Variant]:
        chosen = search.chosen or search.most_accurate()
        if chosen is None and planned.precision == Precision.MIXED:
            self.report.notes.append(f"{planned.target.value}: the mixed-precision search found no variant "
                                     f"({search.summary() or 'no recipe applies'})")
            return []
        if chosen is None:
            return [self._rejected(planned, target.backend, search.summary() or "no recipe applies")]
        if planned.precision == Precision.MIXED and not self._worth_keeping(planned, chosen):
            return []
        files = chosen.result.files = self._move_into_release(planned, chosen.result)
        variant = Variant(id=planned.id, profiles=list(planned.profiles), target=planned.target, precision=planned.precision,
                          backend=target.backend, files=[FileEntry.from_file(self.stage_dir, f) for f in files],
                          inputs=[*chosen.result.inputs, *self.loaded.constants], outputs=chosen.result.outputs,
                          validation=chosen.validation,
                          size_bytes=chosen.size_bytes)
        if chosen.speed is not None:
            variant.latency_ms = round(chosen.speed.candidate_ms, 4)
            self.reference_ms.append(chosen.speed.reference_ms)
        if planned.precision == Precision.FP32:
            self.fp32_drop[planned.target] = chosen.drop
        if search.chosen is None:
            variant.status, variant.reason = VariantStatus.REJECTED, search.summary()
        elif self.config.validation.footprint:
            self._measure_footprint(variant, files)
        return [variant]

    def _measure_footprint(self, variant: Variant, files: list[Path]) -> None:
        """Memory of the accepted ``variant`` on its backend, in fresh processes (a failure is a note)."""
        feeds = self.work_dir / "footprint-feeds.npz"
        if not feeds.exists():
            sample = self.validation_set.samples[0]
            np.savez(feeds, **{k: np.asarray(v) for k, v in sample.items()})
        try:
            variant.validation.footprint = self.meter.measure_files(
                files, variant, inputs_path=feeds, threads=self.config.validation.latency_threads)
        except EdgeSDKError as exc:
            variant.validation.notes.append(f"footprint not measured: {exc}")

    def _not_smaller(self, candidate: Candidate) -> float | None:
        """The candidate's size as a fraction of FP32's when that gains nothing (>= NOT_SMALLER), else None."""
        reference_size = self.report.reference.size_bytes if self.report.reference else 0
        ratio = candidate.size_bytes / reference_size if reference_size else 0.0
        return ratio if ratio >= NOT_SMALLER else None

    def _worth_keeping(self, planned: PlannedBuild, chosen: Candidate) -> bool:
        ratio = self._not_smaller(chosen)
        if not chosen.result.nodes_quantized:
            why = "would keep every node in FP32"
        elif ratio is not None:
            why = f"would be {ratio:.2f}x the FP32 size"
        else:
            return True
        self.report.notes.append(f"{planned.target.value}: mixed precision {why}; no mixed variant")
        return False

    # -- one recipe ------------------------------------------------------------------------------

    def _attempt(self, planned: PlannedBuild, target: ExportTarget, recipe: Recipe, log: list[str]) -> Candidate:
        log.append(f"== {planned.id}: recipe {recipe.name} ({recipe.summary})")
        if recipe.keeps_sensitive_nodes:
            return self._keep_sensitive(planned, target, recipe, log)
        result = self._export(planned, target, recipe, (), log, recipe.name)
        return self._judge(planned, recipe, result, self._validation(planned, target, recipe, result, log))

    def _export(self, planned: PlannedBuild, target: ExportTarget, recipe: Recipe, kept: Sequence[str], log: list[str],
                folder: str) -> ExportResult:
        out_dir = self.work_dir / "candidates" / planned.id / folder / planned.target.value
        request = ExportRequest(
            model_path=self.loaded.path, precision=planned.precision, out_dir=out_dir, variant_id=planned.id,
            inputs=self.loaded.inputs, outputs=self.loaded.outputs,
            calibration=self.calib.samples if self.calib is not None and planned.precision in _QUANTIZED else (),
            calibration_method=self.config.quantization.method, per_channel=self.config.quantization.per_channel,
            nodes_to_exclude=tuple(kept), recipe=recipe, scratch_dir=self.work_dir / "scratch" / planned.target.value,
            accuracy=self._accuracy_check() if recipe.recovers_accuracy else None)
        try:
            with quiet() as captured:
                result = target.export(request)
        except Exception as exc:  # noqa: BLE001 - every recipe failure is one line; the log keeps the rest
            self._reraise_fatal(exc)
            log.extend([captured.text, _traceback(exc)])
            raise RecipeFailed(recipe.says(f"export failed: {describe_failure(exc)}")) from None
        log.append(captured.text)
        if planned.precision in _QUANTIZED and result.nodes_quantized == 0:
            log.append("nothing was quantized")
        return result

    def _accuracy_check(self) -> AccuracyCheck | None:
        if self.config.validation.state:
            return None  # a streamed sample's outputs depend on the steps before it: no per-sample merge
        reference = self.reference.outputs

        def drop(outputs: Mapping[int, Mapping[str, np.ndarray]]) -> float:
            merged = [dict(outputs.get(i, ref)) for i, ref in enumerate(reference)]
            return validate.judged_drop(validate.compare(reference, merged, self.metric, self.reference.classes))

        return AccuracyCheck(self.validation_set.samples, drop, self.config.validation.max_accuracy_drop, reference)

    def _validation(self, planned: PlannedBuild, target: ExportTarget, recipe: Recipe, result: ExportResult,
                    log: list[str]) -> tuple[Session, Validation]:
        try:
            with quiet() as captured:
                session = self._load(target, result, planned.precision)
                outputs = validate.run_all(session, self.validation_set.samples, self.config.validation.state)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run it rejects this candidate only
            self._reraise_fatal(exc)
            log.extend([captured.text, _traceback(exc)])
            raise RecipeFailed(recipe.says(f"does not run in {target.backend}: {describe_failure(exc)}")) from None
        log.append(captured.text)
        try:
            validation = validate.compare(self.reference.outputs, outputs, self.metric, self.reference.classes)
        except Exception as exc:  # noqa: BLE001 - the user's metric raised on this candidate's outputs
            log.append(_traceback(exc))
            raise RecipeFailed(recipe.says(f"metric {self.metric.name} raised {type(exc).__name__} on its outputs")) from None
        validation.notes = list(result.notes)
        validation.nodes_quantized = result.nodes_quantized
        validation.nodes_kept_fp32 = list(result.nodes_kept_fp32)
        validation.recipe = recipe.name
        validation.self_test_tolerance = validate.self_test_tolerance(validation, self.reference.outputs)
        return session, validation

    def _judge(self, planned: PlannedBuild, recipe: Recipe, result: ExportResult,
               measured: tuple[Session, Validation]) -> Candidate:
        """Gate a validated candidate: accuracy first; only an accurate one is timed."""
        session, validation = measured
        candidate = Candidate(recipe, result, validation, size_bytes=sum(f.stat().st_size for f in result.files))
        checks = self.config.validation
        if planned.precision in _QUANTIZED and result.nodes_quantized == 0:
            candidate.reason = "nothing was quantized (the file is still FP32)"
            return candidate
        ratio = self._not_smaller(candidate) if recipe.recovers_accuracy else None
        if ratio is not None:
            candidate.reason = f"kept so much in FP32 that it is {ratio:.2f}x the FP32 size: nothing gained"
            return candidate
        verdict = validate.gate(validation, None, planned.precision, max_drop=checks.max_accuracy_drop)
        candidate.inaccurate = verdict.reason is not None
        if verdict.reason is None:
            limit = validate.MAX_LATENCY_RATIO.get(planned.precision, float("inf"))
            candidate.speed = validate.compare_speed(self.reference.session, session, self.validation_set.samples[0],
                                                     runs=checks.latency_runs, limit=limit)
            validation.latency_ratio = round(candidate.speed.ratio, 4)
            validation.latency_ratio_ci = (round(candidate.speed.low, 4), round(candidate.speed.high, 4))
            verdict = validate.gate(validation, candidate.speed if checks.speed_gate else None, planned.precision,
                                    max_drop=checks.max_accuracy_drop)
            candidate.verdict = validation.speed = verdict.speed
        candidate.reason = verdict.reason
        return candidate

    def _keep_sensitive(self, planned: PlannedBuild, target: ExportTarget, recipe: Recipe, log: list[str]) -> Candidate:
        """The fewest nodes kept in FP32 (ranked by the error this precision adds) that meet the budget."""
        exports = itertools.count()

        def export(kept: list[str], purpose: str = "keep") -> ExportResult:
            return self._export(planned, target, recipe, kept, log, f"{recipe.name}-{purpose}{len(kept)}-{next(exports)}")

        ranking_samples = (self.calib.samples if self.calib is not None else self.validation_set.samples)[:4]
        with quiet() as captured:
            if planned.precision == Precision.FP16:
                ranking = sensitivity.fp16_ranking(self.loaded.path, ranking_samples)
            else:
                base = self.mixed_bases[planned.target]
                ranking = sensitivity.int8_ranking(self.loaded.path, base.result.files[0], ranking_samples) or \
                    sensitivity.isolated_ranking(self.loaded.path, lambda kept: export(kept, "alone").files[0],
                                                 ranking_samples)
        log.append(captured.text)

        def evaluate(result: ExportResult) -> Validation:
            session, validation = self._validation(planned, target, recipe, result, log)
            session.close()  # only the winner is timed: it is loaded again below
            return validation

        found = sensitivity.keep_fp32_search(export, evaluate, ranking, self.config.validation.max_accuracy_drop)
        self.report.sensitivity[planned.id] = SensitivitySearch(
            reached=found.reached, kept_fp32=found.kept_fp32, trials=found.trials,
            ranking=[(name, round(err, 6)) for name, err in ranking[:20]])
        if found.result is None:
            raise RecipeFailed(recipe.says("no node could be ranked by sensitivity"))
        session = self._load(target, found.result, planned.precision)
        candidate = self._judge(planned, recipe, found.result, (session, found.validation))
        candidate.validation.nodes_kept_fp32 = list(found.kept_fp32)
        if not found.reached and candidate.accepted:
            candidate.reason = "even with every ranked node in FP32 the accuracy target is missed"
        return candidate

    # -- plumbing --------------------------------------------------------------------------------

    def _load(self, target: ExportTarget, result: ExportResult, precision: Precision) -> Session:
        """Load an artifact the way a device does: the precision sets OpenVINO's hint and ncnn's fp16/int8 flags."""
        try:
            backend = get_backend(target.backend)
        except ImportError as exc:  # the backend's module or native package is missing
            raise BackendError(f"runtime backend {target.backend!r} is not available: {_first_line(exc)}") from None
        return backend.load(result.files, result.inputs, result.outputs,
                            BackendOptions(threads=self.config.validation.latency_threads, precision=precision))

    def _move_into_release(self, planned: PlannedBuild, result: ExportResult) -> list[Path]:
        folder = self.stage_dir / planned.target.value
        folder.mkdir(parents=True, exist_ok=True)
        moved = []
        for path in result.files:
            destination = folder / path.name
            shutil.move(str(path), destination)
            moved.append(destination)
        return moved

    def _discard_candidates(self, planned: PlannedBuild) -> None:
        """Drop the candidates that were not chosen; INT8's wait for the MIXED search, which starts from one."""
        if planned.precision == Precision.INT8:
            return
        done = [planned.id] + ([f"{planned.target.value}-{Precision.INT8.value}"] if planned.precision == Precision.MIXED else [])
        for variant_id in done:
            shutil.rmtree(self.work_dir / "candidates" / variant_id, ignore_errors=True)

    def _rejected(self, planned: PlannedBuild, backend: str, reason: str) -> Variant:
        return Variant(id=planned.id, profiles=list(planned.profiles), target=planned.target, precision=planned.precision,
                       backend=backend, files=[], inputs=[*self.loaded.inputs, *self.loaded.constants],
                       outputs=self.loaded.outputs,
                       status=VariantStatus.REJECTED, reason=reason)

    def _write_log(self, variant_id: str, log: list[str]) -> None:
        text = "\n".join(part.rstrip() for part in log if part and part.strip())
        if not text:
            return
        path = self.stage_dir / LOG_FOLDER / f"{variant_id}.log"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
        self.report.logs[variant_id] = f"{LOG_FOLDER}/{path.name}"

    @staticmethod
    def _reraise_fatal(exc: BaseException) -> None:
        fatal = fatal_write_error(exc)
        if fatal is not None:
            raise fatal from None


def describe_failure(exc: BaseException) -> str:
    """One line in the SDK's words: our own message, or which tool raised what and where (no raw text).

    The rest of a multi-line message (a tool's output) and the traceback are in the variant's tool log.
    """
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    own = None
    if isinstance(exc, EdgeSDKError):
        text = str(exc).strip()
        own = _first_line(exc)
        if "\n" in text:
            own = own.rstrip(" :;").removesuffix("; last output").removesuffix(", last output") + " (tool output in the log)"
    if root is exc and own is not None:
        return own
    where = _where(root)
    return f"{own}: {type(root).__name__} in {where}" if own else f"{type(root).__name__} in {where}"


def _where(exc: BaseException) -> str:
    """``package (file.py, function)`` of the innermost frame that raised ``exc``."""
    tb = exc.__traceback__
    if tb is None:
        return "unknown code"
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", "?"))
    return f"{module.split('.')[0]} ({Path(tb.tb_frame.f_code.co_filename).name}, {tb.tb_frame.f_code.co_name})"


def _traceback(exc: BaseException) -> str:
    """What a failure leaves in the tool log: every tool output a ConversionError carries, then the traceback."""
    outputs, current = [], exc
    while current is not None:
        outputs.append(getattr(current, "log", "") or "")
        current = current.__cause__
    return "\n".join([*(o.rstrip() for o in outputs if o.strip()), "".join(traceback.format_exception(exc)).rstrip()])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
