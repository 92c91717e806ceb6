"""Vectorised batch alignment of timestamp streams onto a reference, exactly as ``pandas.merge_asof``.

Semantics (the contract other code relies on; ``tests/runtime/align`` checks it against pandas):

* Timestamps are float64 seconds or int64 nanoseconds. ``tolerance``, ``offset`` and
  ``drift_origin`` are always given in seconds; for int64 streams they are rounded to whole ns.
* Clock correction, applied to a stream before matching:
  ``corrected = ts + offset + drift_ppm·1e-6·(ts − drift_origin)`` (the drift term is rounded to
  whole ns for int64 streams). ``offset`` is what to add to the stream's clock to get reference time.
* ``previous`` = ``merge_asof(direction="backward")``: the last sample with ``ts <= t``
  (``ts < t`` when ``allow_exact_matches=False``); among equal timestamps the *last* one.
* ``next`` = ``direction="forward"``: the first sample with ``ts >= t`` (``>`` without exact
  matches); among equal timestamps the *first* one.
* ``nearest`` = ``direction="nearest"``: the closer of the two; **a tie goes to the earlier
  (backward) candidate**, which is pandas' rule (``bdiff <= fdiff`` chooses backward).
* ``tolerance`` (None = unbounded) is inclusive: a candidate matches when ``|t − ts| <= tolerance``,
  computed as pandas does (``t − ts`` backward, ``ts − t`` forward, in the timestamp dtype).
* ``interpolate`` brackets ``t`` with the ``previous`` and ``next`` candidates (each within the
  tolerance) and returns ``v0 + (v1 − v0)·w`` with ``w = (t − t0)/(t1 − t0)`` in float64; an
  exact hit returns that sample's value. ``indices`` holds the lower bracket, ``next_indices`` the
  upper one. There is no extrapolation: outside the stream's span the row is unmatched.
* Unsorted stream timestamps are stable-sorted (``unsorted="sort"``, indices still refer to the
  caller's positions) or rejected (``unsorted="raise"``). The reference may be in any order.

How: one ``searchsorted`` per stream, the second bracket derived from the first. With numba
installed (the ``align`` extra) and a sorted reference, a compiled linear merge (:mod:`._accel`)
replaces it and validation is a single fused pass; large inputs run one thread per stream. Every
path gives bit-identical results (the property tests run each against pandas).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np

from ...errors import AlignError
from ...types import AlignPolicy
from . import _accel

NS_PER_S = 1_000_000_000
_MAX_ABS_DRIFT_PPM = 100_000.0  # 10 %: beyond this it is not a clock drift but a wrong unit


def seconds_to_ns(value: float) -> int:
    """Seconds → whole nanoseconds (round half to even, as numpy does)."""
    return int(round(value * NS_PER_S))


def _scan(ts: np.ndarray) -> tuple[int, int]:
    """(first non-finite index, first index below its predecessor), −1 for none; one pass if compiled."""
    if ts.size == 0:
        return -1, -1
    scan = _accel.scanner() if ACCEL_MIN is not None and ts.size >= ACCEL_MIN else None
    if scan is not None:
        bad, unsorted = scan(ts)
        return int(bad), int(unsorted)
    bad = -1
    if ts.dtype.kind == "f":
        finite = np.isfinite(ts)
        if not finite.all():
            bad = int(np.argmin(finite))
    unsorted = -1
    if ts.size > 1:
        ok = ts[1:] >= ts[:-1]
        if not ok.all():
            # NaN compares false everywhere; report only real inversions
            inv = ts[1:] < ts[:-1]
            unsorted = int(np.argmax(inv)) + 1 if inv.any() else -1
    return bad, unsorted


def _as_timestamps(raw: Any, label: str, check_finite: bool = True) -> np.ndarray:
    """Validate one timestamp array: 1-D, float64 or int64 (ns), all finite (unless the caller
    checks finiteness itself, fused with its sortedness scan)."""
    try:
        ts = np.asarray(raw)
    except (TypeError, ValueError) as exc:
        raise AlignError(f"{label}: timestamps are not an array: {exc}") from None
    if ts.ndim != 1:
        raise AlignError(f"{label}: timestamps must be 1-D, got shape {list(ts.shape)}")
    if ts.dtype.kind == "M":
        ts = ts.astype("datetime64[ns]").view(np.int64)
    elif ts.dtype.kind == "f":
        ts = ts.astype(np.float64, copy=False)
        if check_finite:
            bad, _ = _scan(ts)
            if bad >= 0:
                _raise_not_finite(label, ts, bad)
    elif ts.dtype.kind in "iu":
        if ts.dtype.kind == "u" and ts.size and ts.max() > np.iinfo(np.int64).max:
            raise AlignError(f"{label}: timestamps overflow int64 nanoseconds")
        ts = ts.astype(np.int64, copy=False)
    elif ts.size == 0:
        ts = ts.astype(np.float64)
    else:
        raise AlignError(f"{label}: timestamps must be float seconds or int64 nanoseconds, got dtype {ts.dtype}")
    return ts


def _raise_not_finite(label: str, ts: np.ndarray, index: int) -> None:
    raise AlignError(f"{label}: timestamp {index} is {ts[index]} (timestamps must be finite)")


def _check_finite(value: float, what: str, label: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise AlignError(f"{label}: {what} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise AlignError(f"{label}: {what} must be finite, got {value}")
    return value


def parse_policy(policy: AlignPolicy | str, label: str) -> AlignPolicy:
    try:
        return AlignPolicy(policy)
    except ValueError:
        known = ", ".join(p.value for p in AlignPolicy)
        raise AlignError(f"{label}: unknown policy {policy!r} (known: {known})") from None


@dataclass(frozen=True)
class _Prepared:
    ts: np.ndarray  # corrected, sorted
    order: np.ndarray | None  # sorted position -> caller position (None: already sorted)
    tolerance: float | int | None  # in the timestamp unit


class Stream:
    """One input stream: timestamps, values and how to match it onto the reference.

    ``values`` is an array with a leading time axis, a list of payloads, or None (indices only).
    Validation happens in :func:`align`, where the stream's name is known for error messages.
    """

    def __init__(
        self,
        ts: Any,
        values: Any = None,
        policy: AlignPolicy | str = "nearest",
        tolerance: float | None = None,
        offset: float = 0.0,
        drift_ppm: float = 0.0,
        allow_exact_matches: bool = True,
        *,
        drift_origin: float = 0.0,
        unsorted: Literal["sort", "raise"] = "sort",
    ) -> None:
        self.ts = ts
        self.values = values
        self.policy = policy
        self.tolerance = tolerance
        self.offset = offset
        self.drift_ppm = drift_ppm
        self.allow_exact_matches = allow_exact_matches
        self.drift_origin = drift_origin
        self.unsorted = unsorted

    def __repr__(self) -> str:
        n = len(self.ts) if hasattr(self.ts, "__len__") else "?"
        return (f"Stream(n={n}, policy={str(self.policy)!r}, tolerance={self.tolerance}, offset={self.offset}, "
                f"drift_ppm={self.drift_ppm})")

    # -- validation -------------------------------------------------------------------------
    def validate(self, name: str, check_finite: bool = True) -> tuple[AlignPolicy, np.ndarray, Any]:
        """Check everything; return (policy, timestamps, values) or raise AlignError naming ``name``."""
        label = f"stream {name!r}"
        policy = parse_policy(self.policy, label)
        ts = _as_timestamps(self.ts, label, check_finite)
        values = self.values
        if values is not None:
            try:
                n_values = len(values)
            except TypeError:
                raise AlignError(f"{label}: values must have a leading time axis (array or list)") from None
            if n_values != len(ts):
                raise AlignError(f"{label}: {len(ts)} timestamps but {n_values} values")
            if policy is AlignPolicy.INTERPOLATE:
                arr = np.asarray(values)
                if arr.dtype.kind not in "fiub":
                    raise AlignError(f"{label}: policy 'interpolate' needs numeric values, got dtype {arr.dtype}")
        if self.tolerance is not None:
            tol = _check_finite(self.tolerance, "tolerance", label)
            if tol < 0:
                raise AlignError(f"{label}: tolerance must be >= 0, got {tol}")
        _check_finite(self.offset, "offset", label)
        drift = _check_finite(self.drift_ppm, "drift_ppm", label)
        if abs(drift) > _MAX_ABS_DRIFT_PPM:
            raise AlignError(f"{label}: drift_ppm {drift} is not a plausible clock drift (|drift| <= {_MAX_ABS_DRIFT_PPM:g})")
        _check_finite(self.drift_origin, "drift_origin", label)
        if self.unsorted not in ("sort", "raise"):
            raise AlignError(f"{label}: unsorted must be 'sort' or 'raise', got {self.unsorted!r}")
        if not isinstance(self.allow_exact_matches, (bool, np.bool_)):
            raise AlignError(f"{label}: allow_exact_matches must be a bool")
        return policy, ts, values

    def prepare(self, name: str) -> tuple[AlignPolicy, _Prepared]:
        policy, ts, _ = self.validate(name, check_finite=False)
        corrected = correct_timestamps(ts, self.offset, self.drift_ppm, self.drift_origin)
        bad, unsorted = _scan(corrected)  # finiteness and order in one pass
        if bad >= 0:
            _raise_not_finite(f"stream {name!r}", ts, bad)
        order = None
        if unsorted >= 0:
            if self.unsorted == "raise":
                pos = unsorted
                raise AlignError(f"stream {name!r}: timestamps are not monotonic at index {pos} "
                                 f"({corrected[pos - 1]} then {corrected[pos]}) and unsorted='raise'")
            order = np.argsort(corrected, kind="stable")
            corrected = corrected[order]
        tol = None
        if self.tolerance is not None:
            tol = seconds_to_ns(float(self.tolerance)) if ts.dtype == np.int64 else float(self.tolerance)
        return policy, _Prepared(corrected, order, tol)


def correct_timestamps(ts: np.ndarray, offset: float, drift_ppm: float, drift_origin: float) -> np.ndarray:
    """Apply a stream's clock model (see module docstring); exact integer arithmetic for int64 ns."""
    if ts.dtype == np.int64:
        out = ts + np.int64(seconds_to_ns(offset)) if offset else ts  # never mutated below
        if drift_ppm:
            rel = (ts - np.int64(seconds_to_ns(drift_origin))).astype(np.float64)
            out = out + np.rint((drift_ppm * 1e-6) * rel).astype(np.int64)
        return out
    out = ts + offset if offset else ts
    if drift_ppm:
        out = out + (drift_ppm * 1e-6) * (ts - drift_origin)
    return out


def correct_scalar(ts: float | int, offset: float, drift_ppm: float, drift_origin: float, ns: bool) -> float | int:
    """:func:`correct_timestamps` for one value, with bit-identical arithmetic (streaming uses it)."""
    if ns:
        out = int(ts) + (seconds_to_ns(offset) if offset else 0)
        if drift_ppm:
            out += int(np.rint((drift_ppm * 1e-6) * float(int(ts) - seconds_to_ns(drift_origin))))
        return out
    out = ts + offset if offset else float(ts)
    if drift_ppm:
        out = out + (drift_ppm * 1e-6) * (ts - drift_origin)
    return float(out)


# -- matching kernels (sorted stream timestamps ``s``, reference ``t`` in any order) ----------
# One binary search per stream and policy: the other bracket is derived from it (an equality test,
# plus run boundaries when the stream has duplicate timestamps), which halves the work of
# ``nearest``/``interpolate`` compared with two searches.
def _brackets(s: np.ndarray, t: np.ndarray, exact: bool, want_forward: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw sorted positions: b = last ``s <= t`` (``<`` if not exact), f = first ``s >= t`` (``>``); −1 = none."""
    m = s.size
    c = np.searchsorted(s, t, side="right" if exact else "left").astype(np.int64, copy=False)
    b = c - 1
    if not want_forward:
        return b, None
    if m == 0:
        return b, np.full(t.shape, -1, np.int64)
    dups = m > 1 and bool((s[1:] == s[:-1]).any())
    if exact:
        # first s >= t: c unless s[c-1] == t, then the start of that run of equal values
        eq = (b >= 0) & (s.take(b, mode="clip") == t)
        if dups:
            starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
            run_start = starts[np.searchsorted(starts, np.maximum(b, 0), side="right") - 1]
            f = np.where(eq, run_start, c)
        else:
            f = c - eq
    else:
        # first s > t: c unless s[c] == t, then one past the end of that run
        eq = (c < m) & (s.take(c, mode="clip") == t)
        if dups:
            ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
            run_end = ends[np.searchsorted(ends, np.minimum(c, m - 1), side="left")]
            f = np.where(eq, run_end + 1, c)
        else:
            f = c + eq
    f[f >= m] = -1
    return b, f


def _within(pos: np.ndarray, diff: np.ndarray, tol: float | int | None) -> np.ndarray:
    if tol is None:
        return pos
    return np.where((pos < 0) | (diff > tol), -1, pos)


def _bdiff(s: np.ndarray, t: np.ndarray, b: np.ndarray) -> np.ndarray:
    return t - s.take(b, mode="clip")  # garbage where b < 0; callers mask those rows


def _fdiff(s: np.ndarray, t: np.ndarray, f: np.ndarray) -> np.ndarray:
    return s.take(f, mode="clip") - t


def backward(s: np.ndarray, t: np.ndarray, tol: float | int | None, exact: bool) -> np.ndarray:
    """Sorted position of the last ``s <= t`` (``<`` if not exact) within tol, else −1."""
    b, _ = _brackets(s, t, exact, False)
    return _within(b, _bdiff(s, t, b), tol) if s.size else b


def forward(s: np.ndarray, t: np.ndarray, tol: float | int | None, exact: bool) -> np.ndarray:
    """Sorted position of the first ``s >= t`` (``>`` if not exact) within tol, else −1."""
    if not s.size:
        return np.full(t.shape, -1, np.int64)
    f = np.searchsorted(s, t, side="left" if exact else "right").astype(np.int64, copy=False)
    f[f >= s.size] = -1
    return _within(f, _fdiff(s, t, f), tol)


def both_sides(s: np.ndarray, t: np.ndarray, tol: float | int | None, exact: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Backward and forward positions (each within tol) and their distances, from one search."""
    b, f = _brackets(s, t, exact, True)
    if not s.size:
        z = np.zeros(t.shape, t.dtype)
        return b, f, z, z
    bd, fd = _bdiff(s, t, b), _fdiff(s, t, f)
    return _within(b, bd, tol), _within(f, fd, tol), bd, fd


def nearest(s: np.ndarray, t: np.ndarray, tol: float | int | None, exact: bool) -> np.ndarray:
    """The closer of backward/forward; ties go backward (pandas' rule: ``bdiff <= fdiff``)."""
    b, f, bd, fd = both_sides(s, t, tol, exact)
    return np.where(b >= 0, np.where((f >= 0) & (fd < bd), f, b), f)


@dataclass(frozen=True)
class AlignResult:
    """Per-reference-row match of one stream.

    ``indices``: int64 caller positions in the stream (−1 = unmatched; the lower bracket for
    ``interpolate``); ``mask``: matched rows; ``values``: matched (or interpolated) values — NaN rows
    for float arrays, zero rows for other arrays, None for payload lists where unmatched;
    ``matched_ts``: the matched sample's *corrected* timestamp (NaN / 0 where unmatched).
    """

    indices: np.ndarray
    mask: np.ndarray
    values: Any
    next_indices: np.ndarray | None = None
    weights: np.ndarray | None = None
    _sorted_ts: np.ndarray | None = field(default=None, repr=False, compare=False)
    _positions: np.ndarray | None = field(default=None, repr=False, compare=False)

    @cached_property
    def matched_ts(self) -> np.ndarray:
        # Computed on demand: most callers only need indices/values, and it is a full gather.
        dtype = self._sorted_ts.dtype if self._sorted_ts is not None else np.float64
        return _matched_ts(self._sorted_ts, self._positions, self.mask, dtype)


def _gather(values: Any, idx: np.ndarray, mask: np.ndarray) -> Any:
    if values is None:
        return None
    if isinstance(values, np.ndarray):
        fill = np.nan if values.dtype.kind in "fc" else 0
        if values.shape[0] == 0:
            return np.full((idx.size,) + values.shape[1:], fill, values.dtype)
        out = values.take(idx, axis=0, mode="clip")  # −1 clips to row 0; overwritten below
        if values.ndim == 1:
            return np.where(mask, out, fill).astype(values.dtype, copy=False)
        if not mask.all():
            out[~mask] = fill
        return out
    return [values[i] if ok else None for i, ok in zip(idx.tolist(), mask.tolist())]


def _interpolate(s: np.ndarray, t: np.ndarray, values: Any, b: np.ndarray, f: np.ndarray, exact: bool,
                 order: np.ndarray | None) -> tuple:
    """Rows where both brackets exist (or an exact hit): linear interpolation in float64.

    Returns sorted-position brackets, caller-position brackets, weights, mask and values."""
    if exact:
        hit = (b >= 0) & (s[np.maximum(b, 0)] == t) if s.size else np.zeros(t.shape, bool)
    else:
        hit = np.zeros(t.shape, bool)
    mask = hit | ((b >= 0) & (f >= 0))
    lower = np.where(mask, b, -1)
    upper = np.where(hit, b, np.where(mask, f, -1))
    w = np.zeros(t.shape, np.float64)
    inner = mask & ~hit
    if inner.any():
        t0, t1 = s[lower[inner]], s[upper[inner]]
        w[inner] = (t[inner] - t0).astype(np.float64) / (t1 - t0).astype(np.float64)
    lo_caller, up_caller = _to_caller(lower, order), _to_caller(upper, order)
    out = None
    if values is not None:
        v = np.asarray(values, dtype=np.float64)
        out = np.full((t.size,) + v.shape[1:], np.nan)
        if mask.any():
            v0 = v[lo_caller[mask]]
            v1 = v[up_caller[mask]]
            wm = w[mask].reshape((-1,) + (1,) * (v.ndim - 1))
            out[mask] = v0 + (v1 - v0) * wm
    return lower, lo_caller, up_caller, w, mask, out


# Below this many timestamps in total, thread start-up costs more than it saves.
PARALLEL_MIN = 1_000_000
# Sorted references at least this long use the compiled linear merge when numba is installed
# (None disables it; tests set 0 to run every case through both paths).
ACCEL_MIN: int | None = 4096


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def align(reference_ts: Any, streams: Mapping[str, Stream], *, check_reference_sorted: bool = False,
          workers: int | None = None) -> dict[str, AlignResult]:
    """Match every stream onto ``reference_ts``; returns ``{name: AlignResult}`` in input order.

    Vectorised (one ``searchsorted`` per stream); O(n log m) per stream. Streams are independent,
    so large inputs are aligned on up to ``workers`` threads (default: the usable CPU cores; NumPy
    releases the GIL in these kernels); the result does not depend on it. ``check_reference_sorted``
    turns an unsorted reference into an error (it is otherwise fine: each row is matched on its own).
    """
    t = _as_timestamps(reference_ts, "reference", check_finite=False)
    bad, unsorted = _scan(t)
    if bad >= 0:
        _raise_not_finite("reference", t, bad)
    if check_reference_sorted and unsorted >= 0:
        raise AlignError(f"reference: timestamps are not monotonic at index {unsorted}")
    if not isinstance(streams, Mapping):
        raise AlignError(f"streams must be a mapping of name -> Stream, got {type(streams).__name__}")
    for name, stream in streams.items():
        if not isinstance(stream, Stream):
            raise AlignError(f"stream {name!r}: expected a Stream, got {type(stream).__name__}")
    items = list(streams.items())
    merge = _accel.kernel() if ACCEL_MIN is not None and t.size >= ACCEL_MIN and unsorted < 0 else None
    total = t.size * len(items) + sum(len(st.ts) if hasattr(st.ts, "__len__") else 0 for _, st in items)
    n_workers = min(len(items), workers if workers is not None else _workers())
    if n_workers > 1 and total >= PARALLEL_MIN:
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="edge-sdk-align") as pool:
            futures = [pool.submit(_align_one, t, name, stream, merge) for name, stream in items]
            # .result() in input order: the first bad stream (in the caller's order) is the one reported
            return {name: fut.result() for (name, _), fut in zip(items, futures)}
    return {name: _align_one(t, name, stream, merge) for name, stream in items}


def _match(merge: Any, s: np.ndarray, t: np.ndarray, policy: AlignPolicy, tol: float | int | None,
           exact: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted positions for ``policy`` (and the forward bracket for ``interpolate``)."""
    if merge is not None and s.size and s.dtype == t.dtype:
        mode = {AlignPolicy.PREVIOUS: _accel.PREVIOUS, AlignPolicy.NEXT: _accel.NEXT,
                AlignPolicy.NEAREST: _accel.NEAREST, AlignPolicy.INTERPOLATE: _accel.BOTH}[policy]
        pos, other = merge(s, t, mode, exact, tol is not None, s.dtype.type(0 if tol is None else tol))
        return pos, (other if policy is AlignPolicy.INTERPOLATE else None)
    if policy is AlignPolicy.INTERPOLATE:
        b, f, _, _ = both_sides(s, t, tol, exact)
        return b, f
    if policy is AlignPolicy.PREVIOUS:
        return backward(s, t, tol, exact), None
    if policy is AlignPolicy.NEXT:
        return forward(s, t, tol, exact), None
    return nearest(s, t, tol, exact), None


def _align_one(t: np.ndarray, name: str, stream: Stream, merge: Any = None) -> AlignResult:
    policy, prep = stream.prepare(name)
    s = prep.ts
    if s.size and (s.dtype == np.int64) != (t.dtype == np.int64):
        raise AlignError(f"stream {name!r}: timestamps are {s.dtype} but the reference is {t.dtype} "
                         "(use float64 seconds or int64 ns for all)")
    exact = bool(stream.allow_exact_matches)
    tol = prep.tolerance
    values = stream.values
    if values is not None and not isinstance(values, (np.ndarray, list)):
        values = np.asarray(values) if hasattr(values, "__array__") else list(values)
    pos, f = _match(merge, s, t, policy, tol, exact)
    if policy is AlignPolicy.INTERPOLATE:
        lower, idx, nxt, w, mask, out = _interpolate(s, t, values, pos, f, exact, prep.order)
        return AlignResult(idx, mask, out, nxt, w, s, lower)
    mask = pos >= 0
    idx = _to_caller(pos, prep.order)
    return AlignResult(idx, mask, _gather(values, idx, mask), None, None, s, pos)


def _to_caller(pos: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    if order is None:
        return pos
    out = np.full(pos.shape, -1, np.int64)
    ok = pos >= 0
    out[ok] = order[pos[ok]]
    return out


def _matched_ts(s: np.ndarray, pos: np.ndarray, mask: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if s.size == 0:
        return np.full(pos.shape, np.nan) if dtype != np.int64 else np.zeros(pos.shape, np.int64)
    out = s[np.maximum(pos, 0)]
    if out.dtype.kind == "f":
        out[~mask] = np.nan
    else:
        out[~mask] = 0
    return out
