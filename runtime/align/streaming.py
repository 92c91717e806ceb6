"""Online alignment for the daemon: push samples from any thread, get aligned tuples out.

How it decides (and why its output equals :func:`~.batch.align` on the same data):

* Each stream has a **reorder window** ``W``. Its **watermark** is ``max_seen − W``: every sample
  with a (corrected) timestamp below the watermark has arrived. A sample that arrives below the
  current watermark is **late**: counted, reported to ``on_late`` and not used.
* Samples below the watermark are *committed* in (timestamp, arrival) order — the order a stable
  sort of the arrival sequence gives, which is what batch alignment of that sequence sees.
* A committed reference sample ``t`` is emitted once every stream's match for ``t`` is final:
  the backward candidate is final when the stream's watermark is past ``t``; the forward candidate
  when a committed sample at/after ``t`` exists or the watermark is past ``t + tolerance``.
  So the tuple equals batch output whenever nothing arrived later than the window.
* **Bounded memory**: at most ``max_buffer`` samples per stream are held; beyond that the oldest
  is dropped, counted and reported to ``on_drop``. Samples no future reference can match are pruned.
* **Silent streams** do not block forever: with ``max_wait`` set, a reference sample older than
  the newest timestamp seen on any stream (or given to :meth:`StreamingAligner.tick`) by more than
  ``max_wait`` is emitted with the undecided streams marked *missing* (counted, ``on_missing``).
* A clock correction changed with :meth:`StreamingAligner.update_clock` applies to later pushes;
  a step back larger than the reorder window makes the next samples late (counted).
* :meth:`StreamingAligner.flush` ends the streams: everything pending is committed and emitted.
* ``StreamSpec(policy="previous", stack=N)`` matches the last N samples before each reference,
  stacked oldest first — the streaming twin of :class:`~.fusion.Window` (e.g. audio chunks per frame).

Timestamps are float seconds, or int nanoseconds with ``ns=True`` (window, tolerance, offset and
``max_wait`` are always given in seconds). Callbacks run on the pushing thread while the aligner's
lock is held, in emission order; keep them short (hand work to a queue).
"""

from __future__ import annotations

import heapq
import math
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import AlignError
from ...types import AlignPolicy
from .batch import correct_scalar, parse_policy, seconds_to_ns

_UNDECIDED = object()


@dataclass(frozen=True)
class StreamSpec:
    """How one non-reference stream is matched (same meaning as :class:`~.batch.Stream`)."""

    policy: AlignPolicy | str = AlignPolicy.NEAREST
    tolerance: float | None = None
    offset: float = 0.0
    drift_ppm: float = 0.0
    drift_origin: float = 0.0
    allow_exact_matches: bool = True
    reorder_window: float = 0.0  # seconds a sample may arrive behind the newest one of its stream
    max_buffer: int = 100_000  # samples held at most; the oldest beyond it are dropped and counted
    stack: int | None = None  # with policy 'previous': match the last N samples, stacked oldest first


@dataclass(frozen=True)
class Match:
    """The sample matched to a reference: its corrected timestamp, payload (interpolated value for
    ``interpolate``) and ``index``, its position in that stream's push order (lower bracket)."""

    ts: float | int
    value: Any
    index: int


@dataclass(frozen=True)
class AlignedTuple:
    """One reference sample with each stream's match (None = no match within tolerance)."""

    ts: float | int
    value: Any
    index: int
    matches: dict[str, Match | None]
    missing: frozenset[str] = frozenset()  # streams given up on after max_wait


@dataclass
class StreamCounters:
    accepted: int = 0
    late: int = 0
    dropped: int = 0
    matched: int = 0
    unmatched: int = 0
    missing: int = 0


class _Lane:
    """Per-stream state: reorder heap, committed samples, watermark."""

    def __init__(self, name: str, spec: StreamSpec, ns: bool, reference: bool) -> None:
        label = f"stream {name!r}"
        self.name, self.spec, self.ns, self.reference = name, spec, ns, reference
        self.policy = parse_policy(spec.policy, label)
        for what in ("offset", "drift_ppm", "drift_origin", "reorder_window"):
            value = getattr(spec, what)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AlignError(f"{label}: {what} must be a finite number, got {value!r}")
        if spec.reorder_window < 0:
            raise AlignError(f"{label}: reorder_window must be >= 0, got {spec.reorder_window}")
        if spec.tolerance is not None and (not isinstance(spec.tolerance, (int, float)) or not math.isfinite(spec.tolerance)
                                           or spec.tolerance < 0):
            raise AlignError(f"{label}: tolerance must be >= 0, got {spec.tolerance}")
        if not isinstance(spec.max_buffer, int) or spec.max_buffer < 2:
            raise AlignError(f"{label}: max_buffer must be an int >= 2, got {spec.max_buffer!r}")
        if spec.stack is not None:
            if not isinstance(spec.stack, int) or spec.stack < 1:
                raise AlignError(f"{label}: stack must be an int >= 1, got {spec.stack!r}")
            if self.policy is not AlignPolicy.PREVIOUS:
                raise AlignError(f"{label}: stack={spec.stack} needs policy 'previous' (the last N samples before each reference)")
        self.stack = spec.stack
        self.keep_before = spec.stack or 1
        conv = seconds_to_ns if ns else float
        self.window = conv(spec.reorder_window)
        self.tol = None if spec.tolerance is None else conv(spec.tolerance)
        self.exact = bool(spec.allow_exact_matches)
        self.offset, self.drift_ppm, self.drift_origin = spec.offset, spec.drift_ppm, spec.drift_origin
        self.heap: list[tuple[Any, int, Any]] = []  # (ts, index, payload), ts >= watermark
        self.ts: list[Any] = []  # committed, sorted by (ts, index)
        self.idx: list[int] = []
        self.payloads: list[Any] = []
        self.head = 0
        self.max_seen: Any = None
        self.closed = False
        self.pushed = 0
        self.counters = StreamCounters()

    @property
    def watermark(self) -> float:
        if self.closed:
            return math.inf
        if self.max_seen is None:
            return -math.inf
        return self.max_seen - self.window

    def held(self) -> int:
        return len(self.heap) + len(self.ts) - self.head

    def commit(self) -> None:
        wm = self.watermark
        heap = self.heap
        while heap and heap[0][0] < wm:
            ts, index, payload = heapq.heappop(heap)
            self.ts.append(ts)
            self.idx.append(index)
            self.payloads.append(payload)

    def drop_oldest(self) -> tuple[Any, Any]:
        if self.head < len(self.ts):
            item = (self.ts[self.head], self.payloads[self.head])
            self.payloads[self.head] = None
            self.head += 1
            return item
        ts, _, payload = heapq.heappop(self.heap)
        return ts, payload

    def prune(self, lower: Any) -> None:
        """Forget committed samples no reference at or after ``lower`` can match."""
        # the last sample before ``lower`` stays (and the stack-1 before it, for stacked windows)
        keep = bisect_left(self.ts, lower, self.head) - self.keep_before
        if keep > self.head:
            for i in range(self.head, keep):
                self.payloads[i] = None
            self.head = keep
        if self.head > 1024 and self.head * 2 > len(self.ts):
            del self.ts[: self.head], self.idx[: self.head], self.payloads[: self.head]
            self.head = 0

    # -- matching one reference time (None = no match, _UNDECIDED = not final yet) ------------
    def _backward(self, t: Any) -> int:
        pos = (bisect_right if self.exact else bisect_left)(self.ts, t, self.head) - 1
        if pos < self.head:
            return -1
        if self.tol is not None and t - self.ts[pos] > self.tol:
            return -1
        return pos

    def _forward(self, t: Any, wm: float) -> Any:
        pos = (bisect_left if self.exact else bisect_right)(self.ts, t, self.head)
        if pos < len(self.ts):
            if self.tol is not None and self.ts[pos] - t > self.tol:
                return -1
            return pos
        # No committed sample at/after t: final only if nothing within tolerance can still come.
        # (`wm - t > tol` rather than `wm > t + tol`: subtraction is monotone, so every future
        # sample s >= wm also has s - t > tol exactly as the batch kernel computes it.)
        if self.closed or (self.tol is not None and wm - t > self.tol):
            return -1
        return _UNDECIDED

    def decide(self, t: Any) -> Any:
        wm = self.watermark
        if not wm > t:
            return _UNDECIDED
        policy = self.policy
        if policy is AlignPolicy.PREVIOUS:
            b = self._backward(t)
            if self.stack is not None:
                first = b - self.stack + 1
                if b < 0 or first < self.head:  # fewer than `stack` samples (or the oldest were dropped)
                    return None
                stacked = np.stack([np.asarray(p) for p in self.payloads[first:b + 1]])
                return Match(self.ts[b], stacked, self.idx[b])
            return self._match(b)
        f = self._forward(t, wm)
        if f is _UNDECIDED:
            return _UNDECIDED
        if policy is AlignPolicy.NEXT:
            return self._match(f)
        b = self._backward(t)
        if policy is AlignPolicy.NEAREST:
            if b >= 0 and f >= 0:
                return self._match(b if (t - self.ts[b]) <= (self.ts[f] - t) else f)
            return self._match(b if b >= 0 else f)
        # interpolate: same arithmetic as the batch kernel (float64 values, float64 weight)
        if b >= 0 and self.exact and self.ts[b] == t:
            return Match(self.ts[b], np.asarray(self.payloads[b], dtype=np.float64), self.idx[b])
        if b < 0 or f < 0:
            return None
        t0, t1 = self.ts[b], self.ts[f]
        w = float(t - t0) / float(t1 - t0)
        v0 = np.asarray(self.payloads[b], dtype=np.float64)
        v1 = np.asarray(self.payloads[f], dtype=np.float64)
        return Match(t0, v0 + (v1 - v0) * w, self.idx[b])

    def _match(self, pos: int) -> Match | None:
        if pos < 0:
            return None
        return Match(self.ts[pos], self.payloads[pos], self.idx[pos])


Callback = Callable[..., None]


@dataclass
class _Callbacks:
    on_tuple: Callback | None = None
    on_late: Callback | None = None  # (stream, ts, payload)
    on_drop: Callback | None = None  # (stream, ts, payload)
    on_unmatched: Callback | None = None  # (stream, reference_ts)
    on_missing: Callback | None = None  # (stream, reference_ts)


class StreamingAligner:
    """Thread-safe online aligner: one reference stream drives the output (see module docstring).

    ``reference`` names the driving stream, ``streams`` maps the other names to :class:`StreamSpec`.
    """

    def __init__(
        self,
        reference: str,
        streams: Mapping[str, StreamSpec],
        *,
        reference_window: float = 0.0,
        reference_max_buffer: int = 100_000,
        max_wait: float | None = None,
        ns: bool = False,
        on_tuple: Callback | None = None,
        on_late: Callback | None = None,
        on_drop: Callback | None = None,
        on_unmatched: Callback | None = None,
        on_missing: Callback | None = None,
    ) -> None:
        if reference in streams:
            raise AlignError(f"stream {reference!r} is both the reference and a matched stream")
        if max_wait is not None and (not math.isfinite(max_wait) or max_wait < 0):
            raise AlignError(f"max_wait must be >= 0 seconds, got {max_wait}")
        self.ns = ns
        self._ref = _Lane(reference, StreamSpec(reorder_window=reference_window, max_buffer=reference_max_buffer), ns, True)
        self._lanes = {name: _Lane(name, spec, ns, False) for name, spec in streams.items()}
        self._all = {reference: self._ref, **self._lanes}
        self._max_wait = None if max_wait is None else (seconds_to_ns(max_wait) if ns else float(max_wait))
        self._newest: Any = None
        self._cb = _Callbacks(on_tuple, on_late, on_drop, on_unmatched, on_missing)
        self._lock = threading.Lock()
        self._flushed = False
        self.emitted = 0

    @property
    def reference(self) -> str:
        return self._ref.name

    def push(self, stream: str, ts: float | int, payload: Any = None) -> list[AlignedTuple]:
        """Add one sample; returns the tuples this push made final (also given to ``on_tuple``)."""
        lane = self._all.get(stream)
        if lane is None:
            raise AlignError(f"unknown stream {stream!r} (known: {', '.join(self._all)})")
        if self.ns:
            if not isinstance(ts, (int, np.integer)):
                raise AlignError(f"stream {stream!r}: timestamp {ts!r} must be an int (ns)")
        elif not isinstance(ts, (int, float, np.integer, np.floating)) or not math.isfinite(ts):
            raise AlignError(f"stream {stream!r}: timestamp {ts!r} must be a finite number of seconds")
        with self._lock:
            if self._flushed:
                raise AlignError("the aligner was flushed (end of stream); create a new one")
            t = correct_scalar(ts, lane.offset, lane.drift_ppm, lane.drift_origin, self.ns)
            index = lane.pushed
            lane.pushed += 1
            if t < lane.watermark:
                lane.counters.late += 1
                if self._cb.on_late:
                    self._cb.on_late(stream, t, payload)
                return []
            lane.counters.accepted += 1
            heapq.heappush(lane.heap, (t, index, payload))
            if lane.max_seen is None or t > lane.max_seen:
                lane.max_seen = t
            if self._newest is None or t > self._newest:
                self._newest = t
            lane.commit()
            while lane.held() > lane.spec.max_buffer:
                dts, dpayload = lane.drop_oldest()
                lane.counters.dropped += 1
                if self._cb.on_drop:
                    self._cb.on_drop(stream, dts, dpayload)
            return self._emit_ready()

    def tick(self, now: float | int) -> list[AlignedTuple]:
        """Tell the aligner the current reference-clock time without a sample.

        With ``max_wait`` set, this lets a daemon timer expire waits even when every stream is
        silent (otherwise time only advances with pushed timestamps).
        """
        if not isinstance(now, (int, float, np.integer, np.floating)) or not math.isfinite(now):
            raise AlignError(f"tick: time {now!r} must be a finite number")
        with self._lock:
            if self._flushed:
                return []
            if self._newest is None or now > self._newest:
                self._newest = now
            return self._emit_ready()

    def flush(self) -> list[AlignedTuple]:
        """End of all streams: commit everything pending and emit every remaining reference."""
        with self._lock:
            if self._flushed:
                return []
            for lane in self._all.values():
                lane.closed = True
                lane.commit()
            self._flushed = True
            out = self._emit_ready()
            for lane in self._all.values():  # nothing can be matched any more: release the buffers
                lane.heap.clear()
                lane.ts, lane.idx, lane.payloads, lane.head = [], [], [], 0
            return out

    def update_clock(self, stream: str, offset: float, drift_ppm: float = 0.0, drift_origin: float = 0.0) -> None:
        """Change a stream's clock correction for samples pushed from now on (e.g. a new estimate)."""
        lane = self._lanes.get(stream)
        if lane is None:
            raise AlignError(f"unknown stream {stream!r}")
        for what, value in (("offset", offset), ("drift_ppm", drift_ppm), ("drift_origin", drift_origin)):
            if not math.isfinite(value):
                raise AlignError(f"stream {stream!r}: {what} must be finite, got {value}")
        with self._lock:
            lane.offset, lane.drift_ppm, lane.drift_origin = offset, drift_ppm, drift_origin

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per stream (accepted, late, dropped, matched, unmatched, missing) + held samples."""
        with self._lock:
            out = {}
            for name, lane in self._all.items():
                out[name] = {**lane.counters.__dict__, "held": lane.held()}
            out[self._ref.name]["emitted"] = self.emitted
            return out

    # -- internals (lock held) -------------------------------------------------------------
    def _emit_ready(self) -> list[AlignedTuple]:
        ref = self._ref
        out: list[AlignedTuple] = []
        cb = self._cb
        while ref.head < len(ref.ts):
            t = ref.ts[ref.head]
            decisions = {name: lane.decide(t) for name, lane in self._lanes.items()}
            undecided = [name for name, d in decisions.items() if d is _UNDECIDED]
            if undecided:
                timed_out = self._max_wait is not None and self._newest is not None and self._newest - t > self._max_wait
                if not timed_out:
                    break
            missing = frozenset(undecided)
            matches: dict[str, Match | None] = {}
            for name, d in decisions.items():
                lane = self._lanes[name]
                if name in missing:
                    lane.counters.missing += 1
                    matches[name] = None
                    if cb.on_missing:
                        cb.on_missing(name, t)
                elif d is None:
                    lane.counters.unmatched += 1
                    matches[name] = None
                    if cb.on_unmatched:
                        cb.on_unmatched(name, t)
                else:
                    lane.counters.matched += 1
                    matches[name] = d
            item = AlignedTuple(t, ref.payloads[ref.head], ref.idx[ref.head], matches, missing)
            ref.payloads[ref.head] = None
            ref.head += 1
            self.emitted += 1
            out.append(item)
            if cb.on_tuple:
                cb.on_tuple(item)
        # Every future reference time is >= the next committed one, or >= the reference watermark.
        lower = ref.ts[ref.head] if ref.head < len(ref.ts) else ref.watermark
        if lower != -math.inf and lower != math.inf:
            for lane in self._lanes.values():
                lane.prune(lower)
            ref.prune(lower)
        return out


__all__ = ["AlignedTuple", "Match", "StreamCounters", "StreamSpec", "StreamingAligner"]
