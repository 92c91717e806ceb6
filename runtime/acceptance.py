"""What a device checks for itself when it activates a release (``EdgeModel.load``, sync).

1. **Footprint**: each candidate variant's memory on this device's backend, measured in fresh
   processes (:mod:`~edge_sdk.runtime.footprint`) unless ``device-figures.json`` beside the release
   already holds figures measured here; an unreadable side file is reported and measured again.
2. **Acceptance**: within a bounded total budget (:attr:`DeviceChecks.acceptance_budget_s`, 0 skips
   it, which is reported), each non-FP32 candidate is timed *paired* against the device's FP32
   variant (the converter's statistics, :func:`~edge_sdk.runtime.bench.compare_speed`) and judged by
   the same limits (:data:`~edge_sdk.runtime.bench.MAX_LATENCY_RATIO`): a variant whose whole 95%
   interval is above its limit is not used here; so is a variant whose measured footprint exceeds
   the memory budget (the cgroup limit, else host memory). Verdicts are kept in the side file, so a
   restart does not benchmark again.

Every finding is a line for the model's events; the figures (p50/p99, footprint, verdict per
variant) go into ``info()``, the twin's reported state and telemetry.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from ..config import StrictModel
from ..errors import EdgeSDKError
from ..manifest import Footprint, Manifest, Variant, verify_file
from ..types import MemoryMode, Precision, SpeedVerdict
from .backends.base import BackendOptions, Session, get_backend
from .bench import MAX_LATENCY_RATIO, bench_inputs, compare_speed
from .footprint import DeviceFigures, FootprintMeter, VariantFigures, machine_id
from .monitor import ResourceSample
from .selection import Plan

ENV = "EDGE_SDK_DEVICE_CHECKS"  # "off": no measuring, no acceptance (test suites; images shipped with figures)


class DeviceChecks(StrictModel):
    """What the device measures itself at activation, and how the memory ladder uses it."""

    enabled: bool = Field(True, description="off: no measuring, no acceptance, no events about them")
    measure_footprint: bool = Field(True, description="measure each candidate's footprint here (once per release)")
    acceptance_budget_s: float = Field(10.0, ge=0, le=600, description="total time for the on-device benchmark; 0 skips it")
    min_memory_saving: float = Field(0.10, ge=0, lt=1, description="share of memory a step must save to be a memory step")
    memory_modes: bool = Field(True, description="backend memory-saving modes are ladder steps where they save memory")

    @classmethod
    def from_env(cls) -> DeviceChecks:
        """The defaults, or everything off when ``$EDGE_SDK_DEVICE_CHECKS`` is ``off``/``0``."""
        if os.environ.get(ENV, "").strip().lower() in ("0", "off", "false", "no"):
            return cls(enabled=False, measure_footprint=False, acceptance_budget_s=0)
        return cls()


@dataclass
class DeviceReport:
    """What the checks found: the figures, events to publish, variants not to use here."""

    figures: DeviceFigures
    notes: list[tuple[str, str]] = field(default_factory=list)  # (event kind, text)
    rejected: dict[str, str] = field(default_factory=dict)  # variant id -> why it is not used here
    acceptance: dict[str, Any] = field(default_factory=dict)  # budget, spent, skipped
    build: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant id -> the build machine's figures

    def footprint(self, variant: Variant) -> tuple[Footprint, str] | None:
        """The variant's footprint and where it was measured: this device's, else the build machine's."""
        mine = self.figures.variants.get(variant.id)
        if mine is not None and mine.footprint is not None:
            return mine.footprint, "device"
        if variant.validation.footprint is not None:
            return variant.validation.footprint, "build"
        return None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready per-variant figures (for the twin and telemetry)."""
        variants = {}
        for variant_id, figures in self.figures.variants.items():
            fp = figures.footprint
            variants[variant_id] = {
                "p50_ms": figures.p50_ms, "p99_ms": figures.p99_ms, "latency_ratio": figures.latency_ratio,
                "latency_ratio_ci": list(figures.latency_ratio_ci) if figures.latency_ratio_ci else None,
                "verdict": figures.verdict, "reason": figures.reason,
                "footprint_mb": None if fp is None else fp.default.peak_rss_mb,
                "footprint_lean_mb": None if fp is None or fp.lean is None else fp.lean.peak_rss_mb,
                "load_rss_mb": None if fp is None else fp.default.load_rss_mb,
                "used": variant_id not in self.rejected,
                "build": self.build.get(variant_id),
            }
        return {"machine": self.figures.machine, "variants": variants, "acceptance": dict(self.acceptance)}


def memory_budget_mb(sample: ResourceSample | None) -> float | None:
    """The most memory this process may take: its cgroup limit, else what the host could give it."""
    if sample is None:
        return None
    if sample.cgroup_limit_mb is not None:
        return sample.cgroup_limit_mb
    return sample.host_available_memory_mb + sample.process_rss_mb


def check_release(release_dir: Path, manifest: Manifest, plan: Plan, checks: DeviceChecks, options: BackendOptions,
                  sample: ResourceSample | None) -> tuple[Plan, DeviceReport]:
    """Measure and judge ``plan``'s candidates here; the plan without the variants not to use."""
    if not checks.enabled:
        # Figures measured earlier (or shipped) still order the ladder; nothing new is measured.
        figures, _ = DeviceFigures.read(release_dir)
        report = DeviceReport(figures or DeviceFigures(), acceptance={"skipped": "device checks are off"})
        return plan, report
    figures, problem = DeviceFigures.read(release_dir)
    report = DeviceReport(figures or DeviceFigures(machine=platform.machine()))
    if problem:
        report.notes.append(("measured", problem))
    variants = [v for candidates in plan.candidates.values() for v in candidates]
    report.build = {v.id: _build_figures(v) for v in variants}
    changed = _measure_footprints(release_dir, manifest, variants, checks, options, report)
    changed |= _accept(release_dir, manifest, plan, variants, checks, options, sample, report)
    if changed:
        report.figures.measured = time.time()
        failed = report.figures.write(release_dir)
        if failed:
            report.notes.append(("measured", failed + "; the figures are used for this run only"))
    candidates = {p: [v for v in vs if v.id not in report.rejected] for p, vs in plan.candidates.items()}
    candidates = {p: vs for p, vs in candidates.items() if vs}
    if not candidates:  # never refuse to serve over figures: keep the plan, say so
        report.notes.append(("acceptance", "every variant failed the device's checks; serving them anyway: "
                             + "; ".join(f"{k}: {v}" for k, v in report.rejected.items())))
        report.rejected.clear()
        return plan, report
    return dataclasses.replace(plan, candidates=candidates), report


def _build_figures(variant: Variant) -> dict[str, Any]:
    """What the converter measured for ``variant`` on the build machine (shown beside the device's)."""
    fp = variant.validation.footprint
    return {"latency_ms": variant.latency_ms, "latency_ratio": variant.validation.latency_ratio,
            "speed": variant.validation.speed.value if variant.validation.speed else None,
            "footprint_mb": fp.default.peak_rss_mb if fp else None, "machine": fp.machine if fp else None}


def _feeds_path(release_dir: Path, manifest: Manifest) -> Path | None:
    return verify_file(release_dir, manifest.self_test.inputs) if manifest.self_test is not None else None


def _measure_footprints(release_dir: Path, manifest: Manifest, variants: list[Variant], checks: DeviceChecks,
                        options: BackendOptions, report: DeviceReport) -> bool:
    todo = []
    for variant in variants:
        mine = report.figures.variants.get(variant.id)
        if mine is not None and mine.footprint is not None and mine.footprint.machine == machine_id(variant.backend):
            continue
        todo.append(variant)
    if not todo:
        return False
    if not checks.measure_footprint:
        missing = [v.id for v in todo if v.validation.footprint is None]
        if missing:
            report.notes.append(("measured", f"no footprint figures for {', '.join(missing)} and measuring is off: "
                                 "their memory steps are assumed, not measured"))
        return False
    measured, started = [], time.monotonic()
    feeds = _feeds_path(release_dir, manifest)
    with FootprintMeter() as meter:
        for variant in todo:
            try:
                files = [verify_file(release_dir, entry) for entry in variant.files]
                footprint = meter.measure_files(files, variant, inputs_path=feeds, threads=options.threads)
            except EdgeSDKError as exc:
                report.notes.append(("measured", f"{exc}; the build machine's figures are used" if
                                     variant.validation.footprint else str(exc)))
                continue
            report.figures.variants.setdefault(variant.id, VariantFigures()).footprint = footprint
            lean = f", lean {footprint.lean.peak_rss_mb:.0f} MB" if footprint.lean else ""
            measured.append(f"{variant.id} {footprint.default.peak_rss_mb:.0f} MB{lean}")
    if measured:
        report.notes.append(("measured", f"footprint measured on this device in {time.monotonic() - started:.1f} s "
                             f"(peak RSS): {'; '.join(measured)}"))
    return bool(measured)


def _accept(release_dir: Path, manifest: Manifest, plan: Plan, variants: list[Variant], checks: DeviceChecks,
            options: BackendOptions, sample: ResourceSample | None, report: DeviceReport) -> bool:
    budget = checks.acceptance_budget_s
    report.acceptance = {"budget_s": budget, "spent_s": 0.0, "skipped": None}
    # Memory first: it needs no benchmark, and a variant over budget is not timed either.
    limit_mb = memory_budget_mb(sample)
    for variant in variants:
        found = report.footprint(variant)
        if limit_mb is None or found is None:
            continue
        fp, source = found
        smallest = min(fp.default.peak_rss_mb, fp.lean.peak_rss_mb if fp.lean else fp.default.peak_rss_mb)
        if smallest > limit_mb:
            why = (f"over the memory budget: needs {smallest:.0f} MB (measured on the {source} machine), "
                   f"{limit_mb:.0f} MB {'cgroup limit' if sample and sample.cgroup_limit_mb else 'available'}")
            report.rejected[variant.id] = why
            entry = report.figures.variants.setdefault(variant.id, VariantFigures())
            entry.verdict, entry.reason = "over_memory", why
            report.notes.append(("acceptance", f"{variant.id} not used: {why}"))
    if budget <= 0:
        report.acceptance["skipped"] = "acceptance budget is 0"
        report.notes.append(("acceptance", "on-device acceptance skipped (budget 0 s): the build machine's speed verdicts stand"))
        return False
    machine = platform.machine()
    judged = {v.id for v in variants if (f := report.figures.variants.get(v.id)) is not None and f.verdict is not None}
    todo = [v for v in variants if v.precision is not Precision.FP32 and v.id not in judged and v.id not in report.rejected]
    references = {v.backend: v for v in plan.candidates.get(Precision.FP32, []) if v.id not in report.rejected}
    if report.figures.machine == machine and not todo and all(v.id in judged for v in references.values()):
        for variant in variants:  # judged before on this device: reuse the verdicts
            entry = report.figures.variants.get(variant.id)
            if entry is not None and entry.verdict == SpeedVerdict.SLOWER.value:
                report.rejected[variant.id] = entry.reason or "slower than FP32 on this device"
        report.acceptance["skipped"] = "judged earlier on this device"
        return False
    report.figures.machine = machine
    if not references:
        report.acceptance["skipped"] = "no FP32 variant to compare with"
        report.notes.append(("acceptance", "on-device acceptance skipped: the release has no usable FP32 variant here"))
        return False
    started = time.monotonic()
    deadline = started + budget
    verdicts = []
    todo = [v for v in variants if v.precision is not Precision.FP32 and v.id not in report.rejected]
    for index, variant in enumerate(todo):
        reference = references.get(variant.backend) or next(iter(references.values()))
        share = (deadline - time.monotonic()) / (len(todo) - index)
        if share <= 0.05:
            entry = report.figures.variants.setdefault(variant.id, VariantFigures())
            entry.verdict, entry.reason = "not_measured", f"the acceptance budget of {budget:g} s ran out"
            verdicts.append(f"{variant.id}: not measured (budget ran out)")
            continue
        try:
            comparison = _paired(release_dir, manifest, reference, variant, options, time.monotonic() + share)
        except EdgeSDKError as exc:
            report.rejected[variant.id] = f"failed on this device: {exc}"
            entry = report.figures.variants.setdefault(variant.id, VariantFigures())
            entry.verdict, entry.reason = "failed", str(exc)
            verdicts.append(f"{variant.id}: failed ({exc})")
            continue
        limit = MAX_LATENCY_RATIO.get(variant.precision, float("inf"))
        verdict = comparison.verdict(limit)
        entry = report.figures.variants.setdefault(variant.id, VariantFigures())
        entry.p50_ms, entry.p99_ms = round(comparison.candidate_ms, 4), round(comparison.candidate_p99_ms, 4)
        entry.latency_ratio = round(comparison.ratio, 4)
        entry.latency_ratio_ci = (round(comparison.low, 4), round(comparison.high, 4))
        entry.verdict = verdict.value
        ref_entry = report.figures.variants.setdefault(reference.id, VariantFigures())
        ref_entry.p50_ms, ref_entry.p99_ms = round(comparison.reference_ms, 4), round(comparison.reference_p99_ms, 4)
        ref_entry.verdict = ref_entry.verdict or SpeedVerdict.OK.value
        ratio = f"x{comparison.ratio:.2f} (95% CI x{comparison.low:.2f}-x{comparison.high:.2f}, {comparison.pairs} pairs)"
        if verdict is SpeedVerdict.SLOWER:
            allowed = "" if limit == 1.0 else f", {variant.precision.value} may take up to x{limit:g}"
            entry.reason = (f"slower than {reference.id} on this device: {ratio}; "
                            f"{comparison.candidate_ms:.3f} ms vs {comparison.reference_ms:.3f} ms{allowed}")
            report.rejected[variant.id] = entry.reason
            verdicts.append(f"{variant.id} not used: {entry.reason}")
        else:
            entry.reason = None
            verdicts.append(f"{variant.id} {verdict.value}: {ratio}")
    spent = time.monotonic() - started
    report.acceptance["spent_s"] = round(spent, 3)
    report.notes.append(("acceptance", f"on-device acceptance in {spent:.1f} s of {budget:g} s: " + "; ".join(verdicts)))
    return True


def _paired(release_dir: Path, manifest: Manifest, reference: Variant, candidate: Variant, options: BackendOptions,
            deadline: float):
    sessions: list[Session] = []
    try:
        for variant in (reference, candidate):
            files = [verify_file(release_dir, entry) for entry in variant.files]
            opts = dataclasses.replace(options, precision=variant.precision, memory=MemoryMode.DEFAULT)
            try:
                sessions.append(get_backend(variant.backend).load(files, variant.inputs, variant.outputs, opts))
            except EdgeSDKError:
                raise
            except Exception as exc:  # a native runtime's own error type: one tree for callers
                raise EdgeSDKError(f"loading {variant.id}: {type(exc).__name__}: {exc}") from exc
        sample = bench_inputs(release_dir, manifest, candidate)
        limit = MAX_LATENCY_RATIO.get(candidate.precision, float("inf"))
        return compare_speed(sessions[0], sessions[1], sample, runs=50, limit=limit, max_rounds=8, warmup=10,
                             deadline=deadline)
    finally:
        for session in sessions:
            session.close()
