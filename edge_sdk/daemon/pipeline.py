"""Local sensor pipelines: samples pushed over HTTP → streaming aligner → model → telemetry.

Apps push batches of timestamped samples per stream (``POST /v2/pipelines/{model}/streams/{stream}``).
The :class:`~edge_sdk.runtime.align.streaming.StreamingAligner` matches every reference sample
(e.g. a camera frame) with the other streams (audio window, IMU vector) after clock correction;
each complete tuple is queued to one worker thread that runs the model and records the result.
Pushing never waits for inference: a full queue drops tuples, counted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import AlignError, EdgeSDKError
from .config import PipelineConfig
from .metrics import Snapshot
from .models import ModelTable

log = logging.getLogger(__name__)

ResultHook = Callable[[str, float, dict[str, np.ndarray], float], None]  # model, ts, outputs, seconds


class Pipeline:
    """One configured pipeline: an aligner and the worker that runs its tuples."""

    def __init__(self, config: PipelineConfig, models: ModelTable, on_result: ResultHook | None = None) -> None:
        from ..runtime.align.streaming import StreamingAligner, StreamSpec

        self.config = config
        self.models = models
        self.on_result = on_result
        specs = {name: StreamSpec(policy=s.policy, tolerance=s.tolerance_s, offset=s.offset_s, drift_ppm=s.drift_ppm,
                                  reorder_window=s.reorder_window_s, max_buffer=s.max_buffer)
                 for name, s in config.streams.items()}
        self.names = {name: s.input or name for name, s in config.streams.items()}
        self.reference_input = config.reference_input or config.reference
        self.aligner = StreamingAligner(config.reference, specs, reference_window=config.reorder_window_s,
                                        max_wait=config.max_wait_s, on_tuple=self._on_tuple)
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._stop = threading.Event()
        self.tuples = 0
        self.incomplete = 0
        self.overflow = 0
        self.runs = 0
        self.failures = 0
        self.last_result: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._work, name=f"pipeline-{config.model}", daemon=True)
        self._thread.start()

    @property
    def streams(self) -> list[str]:
        return [self.config.reference, *self.config.streams]

    def push(self, stream: str, timestamps: np.ndarray, samples: np.ndarray) -> dict[str, int]:
        """Push ``len(timestamps)`` samples of ``stream`` (``samples[i]`` taken at ``timestamps[i]``)."""
        before = self.aligner.stats()[stream] if stream in self.streams else None
        if before is None:
            raise AlignError(f"unknown stream {stream!r} for pipeline {self.config.model!r} (streams: {self.streams})")
        emitted = 0
        for ts, sample in zip(timestamps.tolist(), samples):
            emitted += len(self.aligner.push(stream, ts, sample))
        after = self.aligner.stats()[stream]
        return {"accepted": after["accepted"] - before["accepted"], "late": after["late"] - before["late"],
                "dropped": after["dropped"] - before["dropped"], "tuples": emitted}

    def _on_tuple(self, item: Any) -> None:
        # Runs on the pushing thread with the aligner's lock held: only hand over.
        self.tuples += 1
        from ..runtime.align.fusion import tuple_inputs

        inputs = tuple_inputs(item, self.reference_input, self.names) if not item.missing else None
        if inputs is None:
            self.incomplete += 1
            return
        try:
            self._queue.put_nowait((item.ts, inputs))
        except queue.Full:
            self.overflow += 1

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                ts, inputs = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._run_one(ts, inputs)

    def _run_one(self, ts: float, inputs: dict[str, np.ndarray]) -> None:
        served = self.models.checkout(self.config.model)
        if served is None:
            self.failures += 1
            return
        try:
            started = time.perf_counter()
            outputs = served.run(inputs)
            elapsed = time.perf_counter() - started
        except EdgeSDKError as exc:
            self.failures += 1
            log.warning("pipeline %s: inference failed at t=%s: %s", self.config.model, ts, exc)
            return
        except Exception:  # a bad tuple must not end the worker
            self.failures += 1
            log.exception("pipeline %s: unexpected inference error", self.config.model)
            return
        finally:
            served.release()
        self.runs += 1
        self.last_result = {"ts": ts, "outputs": {k: np.asarray(v).ravel()[:16].tolist() for k, v in outputs.items()}}
        if self.on_result is not None:
            try:
                self.on_result(self.config.model, ts, outputs, elapsed)
            except Exception:
                log.exception("pipeline result hook failed")

    def drain(self, timeout: float) -> None:
        """Flush the aligner (end of streams) and let queued tuples run, up to ``timeout``."""
        try:
            self.aligner.flush()
        except AlignError:
            pass
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(max(0.1, deadline - time.monotonic()))

    def status(self) -> dict[str, Any]:
        return {"model": self.config.model, "reference": self.config.reference, "streams": self.aligner.stats(),
                "tuples": self.tuples, "incomplete": self.incomplete, "overflow": self.overflow,
                "runs": self.runs, "failures": self.failures, "queued": self._queue.qsize(), "last_result": self.last_result}


class Pipelines:
    """All pipelines of a daemon, by model name; also their metrics source."""

    def __init__(self, configs: list[PipelineConfig], models: ModelTable, on_result: ResultHook | None = None) -> None:
        self.by_model = {c.model: Pipeline(c, models, on_result) for c in configs}

    def get(self, model: str) -> Pipeline | None:
        return self.by_model.get(model)

    def drain(self, timeout: float) -> None:
        for pipeline in self.by_model.values():
            pipeline.drain(timeout)

    def snapshot(self) -> Snapshot:
        counters: dict[str, dict[str, float]] = {k: {} for k in
                                                 ("samples_accepted", "samples_late", "samples_dropped", "unmatched", "missing")}
        gauges: dict[str, dict[str, float]] = {"samples_held": {}, "queue_depth": {}}
        per_model: dict[str, dict[str, float]] = {k: {} for k in ("tuples", "tuples_incomplete", "tuples_overflow", "runs", "failures")}
        for model, p in self.by_model.items():
            for stream, c in p.aligner.stats().items():
                key = f"{model}/{stream}"
                counters["samples_accepted"][key] = c["accepted"]
                counters["samples_late"][key] = c["late"]
                counters["samples_dropped"][key] = c["dropped"]
                counters["unmatched"][key] = c["unmatched"]
                counters["missing"][key] = c["missing"]
                gauges["samples_held"][key] = c["held"]
            gauges["queue_depth"][model] = p._queue.qsize()
            per_model["tuples"][model] = p.tuples
            per_model["tuples_incomplete"][model] = p.incomplete
            per_model["tuples_overflow"][model] = p.overflow
            per_model["runs"][model] = p.runs
            per_model["failures"][model] = p.failures
        labels = {**{k: "stream" for k in counters}, "samples_held": "stream", "queue_depth": "model",
                  **{k: "model" for k in per_model}}
        return Snapshot(gauges=gauges, counters={**counters, **per_model}, labels=labels,
                        help={"samples_late": "Samples that arrived behind the reorder window (not used)",
                              "samples_dropped": "Samples dropped because a stream's buffer was full",
                              "tuples_overflow": "Aligned tuples dropped because the model queue was full"})
