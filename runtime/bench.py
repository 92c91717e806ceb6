"""Latency measurement of a release's variants on this machine (``edge-sdk bench``, benchmarks).

Each variant is verified and loaded through its backend, warmed up, then timed call by call on
the release's self-test input (or zeros shaped like the signature); figures are percentiles of
the per-call wall time, throughput is calls per second of the timed loop, and memory is the
process RSS growth from loading the variant.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeSDKError, IntegrityError
from ..manifest import Manifest, Variant, verify_file
from ..types import MemoryMode, Precision, SpeedVerdict
from .backends.base import BackendOptions, Session, get_backend, zero_feeds
from .monitor import MB


@dataclass(frozen=True)
class BenchResult:
    variant: str
    backend: str
    target: str
    precision: str
    status: str  # the manifest's status (ok/rejected)
    runs: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    throughput_per_s: float | None
    rss_mb: float | None
    load_ms: float | None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentiles(samples_ms: list[float] | np.ndarray) -> dict[str, float]:
    values = np.asarray(samples_ms, dtype=np.float64)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "mean_ms": float(values.mean())}


def bench_inputs(release_dir: Path, manifest: Manifest, variant: Variant) -> dict[str, np.ndarray]:
    """The self-test input when the release has one, else zeros matching the signature."""
    if manifest.self_test is not None:
        path = verify_file(release_dir, manifest.self_test.inputs)
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"self_test inputs {path}: {exc}") from None
    return zero_feeds(variant.inputs)


def bench_variant(release_dir: Path, manifest: Manifest, variant: Variant, *, runs: int = 100, warmup: int = 10,
                  threads: int | None = None, memory: MemoryMode = MemoryMode.DEFAULT) -> BenchResult:
    """Time ``variant``; a failure to load or run becomes ``error`` in the result, not an exception."""
    import psutil

    process = psutil.Process()
    base = dict(variant=variant.id, backend=variant.backend, target=variant.target.value,
                precision=variant.precision.value, status=variant.status)
    try:
        inputs = bench_inputs(release_dir, manifest, variant)
        files = [verify_file(release_dir, f) for f in variant.files]
        rss_before = process.memory_info().rss
        started = time.perf_counter()
        session = get_backend(variant.backend).load(files, variant.inputs, variant.outputs,
                                                    BackendOptions(threads=threads, precision=variant.precision,
                                                                   memory=memory))
        try:
            for _ in range(max(warmup, 1)):
                session.run(inputs)
            load_ms = (time.perf_counter() - started) * 1000
            # RSS growth reads 0 when the allocator reuses memory an earlier variant freed, but the
            # weights are resident either way: report at least their size.
            rss_mb = max((process.memory_info().rss - rss_before) / MB, sum(f.size for f in variant.files) / MB)
            times = []
            loop_start = time.perf_counter()
            for _ in range(runs):
                t0 = time.perf_counter()
                session.run(inputs)
                times.append((time.perf_counter() - t0) * 1000)
            loop_s = time.perf_counter() - loop_start
        finally:
            session.close()
    except EdgeSDKError as exc:
        return BenchResult(**base, runs=0, p50_ms=None, p95_ms=None, p99_ms=None, mean_ms=None,
                           throughput_per_s=None, rss_mb=None, load_ms=None, error=str(exc))
    return BenchResult(**base, runs=runs, **percentiles(times), throughput_per_s=runs / loop_s,
                       rss_mb=rss_mb, load_ms=load_ms)


# ---------------------------------------------------------------------------------------------
# Paired speed comparison: the converter's gate on the build machine and the device's acceptance

MIN_PAIRS = 6  # fewer pairs cannot give a 95% interval narrower than their own range

# The speed gate: the most a variant's latency may be, as a multiple of FP32's, measured paired on
# the build machine. INT8/mixed exist only to be faster, so they may not be slower at all. FP16
# also halves the weights (the runtime policy steps down to it under memory pressure), and a build
# CPU without FP16 arithmetic runs it at FP32 speed: it may take up to x1.25.
MAX_LATENCY_RATIO: dict[Precision, float] = {Precision.FP16: 1.25, Precision.INT8: 1.0, Precision.MIXED: 1.0}
# "Slower" needs the whole interval above the limit by more than this: a 1-2% difference is the
# size of a build machine's frequency drift between rounds, flips from run to run, and no user can act on it.
SPEED_EQUIVALENCE = 0.02


@dataclass(frozen=True)
class SpeedComparison:
    """Paired latency of a candidate against FP32: medians, and the median per-pair ratio with its 95% CI."""

    reference_ms: float
    candidate_ms: float
    ratio: float
    low: float
    high: float
    pairs: int
    reference_p99_ms: float | None = None
    candidate_p99_ms: float | None = None

    def verdict(self, limit: float) -> SpeedVerdict:
        """SLOWER when the whole interval is above ``limit`` (and ``SPEED_EQUIVALENCE`` more), OK
        when it is at or below it, else INCONCLUSIVE."""
        if self.low > limit * (1.0 + SPEED_EQUIVALENCE):
            return SpeedVerdict.SLOWER
        return SpeedVerdict.OK if self.high <= limit else SpeedVerdict.INCONCLUSIVE

    def clearly_faster_than(self, other: SpeedComparison, margin: float = 0.9) -> bool:
        """Intervals apart and at least ``1 - margin`` faster: a choice no rerun on a noisy machine flips."""
        return self.high < other.low and self.ratio < margin * other.ratio


def compare_speed(reference: Session, candidate: Session, sample: dict[str, np.ndarray], *, runs: int = 50,
                  limit: float = 1.0, max_rounds: int = 4, warmup: int = 5, deadline: float | None = None) -> SpeedComparison:
    """Paired, interleaved runs (``runs`` pairs a round) until the ratio's CI is clear of ``limit``.

    ``deadline`` (``time.monotonic()``) bounds the whole measurement: past it, the pairs measured
    so far decide (at least :data:`MIN_PAIRS`; few pairs give a wide, often inconclusive interval).
    """
    for _ in range(warmup):
        reference.run(sample)
        candidate.run(sample)
    ref_times: list[float] = []
    cand_times: list[float] = []
    for _ in range(max_rounds):
        for i in range(runs):
            if deadline is not None and len(ref_times) >= MIN_PAIRS and time.monotonic() > deadline:
                break
            first, second = (reference, candidate) if i % 2 == 0 else (candidate, reference)
            start = time.perf_counter()
            first.run(sample)
            middle = time.perf_counter()
            second.run(sample)
            end = time.perf_counter()
            ref, cand = (middle - start, end - middle) if i % 2 == 0 else (end - middle, middle - start)
            ref_times.append(ref)
            cand_times.append(cand)
        comparison = paired_ratio(ref_times, cand_times)
        if comparison.verdict(limit) != SpeedVerdict.INCONCLUSIVE:
            break
        if deadline is not None and time.monotonic() > deadline:
            break
    return comparison


def paired_ratio(reference_s: Sequence[float], candidate_s: Sequence[float]) -> SpeedComparison:
    """Medians and the median per-pair ratio with its distribution-free 95% confidence interval."""
    ratios = sorted(c / r for r, c in zip(reference_s, candidate_s) if r > 0)
    n = len(ratios)
    k = _sign_test_rank(n)
    return SpeedComparison(reference_ms=statistics.median(reference_s) * 1000.0,
                           candidate_ms=statistics.median(candidate_s) * 1000.0,
                           ratio=statistics.median(ratios), low=ratios[k], high=ratios[n - 1 - k], pairs=n,
                           reference_p99_ms=float(np.percentile(reference_s, 99)) * 1000.0,
                           candidate_p99_ms=float(np.percentile(candidate_s, 99)) * 1000.0)


def _sign_test_rank(n: int, alpha: float = 0.05) -> int:
    """0-based rank k such that [x_(k), x_(n-1-k)] covers the median with probability >= 1 - alpha."""
    cumulative, k = 0.0, 0
    while k < n // 2:
        cumulative += math.comb(n, k) / 2.0 ** n
        if cumulative > alpha / 2:
            break
        k += 1
    return k
