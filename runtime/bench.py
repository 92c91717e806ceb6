"""Latency measurement of a release's variants on this machine (``edge-sdk bench``, benchmarks).

Each variant is verified and loaded through its backend, warmed up, then timed call by call on
the release's self-test input (or zeros shaped like the signature); figures are percentiles of
the per-call wall time, throughput is calls per second of the timed loop, and memory is the
process RSS growth from loading the variant.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeSDKError, IntegrityError
from ..manifest import Manifest, Variant, verify_file
from .backends.base import BackendOptions, get_backend
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
    return {s.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in s.shape], np.dtype(s.dtype))
            for s in variant.inputs}


def bench_variant(release_dir: Path, manifest: Manifest, variant: Variant, *, runs: int = 100, warmup: int = 10,
                  threads: int | None = None) -> BenchResult:
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
                                                    BackendOptions(threads=threads, precision=variant.precision))
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
