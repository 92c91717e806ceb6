"""Sessions and timing for comparing artifacts of the corpus: one thread, runs interleaved."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .cases import Feeds, Outputs, Run


def onnx_session(path: Path) -> Run:
    """A plain onnxruntime session on one thread (as the SDK's onnxruntime backend makes them)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(feeds: Feeds) -> Outputs:
        return dict(zip(names, session.run(None, feeds), strict=True))

    return run


def interleaved_medians(runs: Sequence[Callable[[], object]], repeats: int = 200, warmup: int = 10) -> list[float]:
    """Median wall time (ms) of each callable, measured in turn round after round so that a
    slower or busier moment of a shared machine weighs on all of them alike."""
    for _ in range(warmup):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, series in zip(runs, times):
            start = time.perf_counter()
            run()
            series.append(time.perf_counter() - start)
    return [statistics.median(series) * 1000.0 for series in times]
