"""Turn aligned rows into model input dicts for ``EdgeModel.run`` of a multimodal model.

A multimodal model takes, per camera frame, e.g. the frame itself, the last N audio feature
chunks before it and the IMU vector at its time. :func:`model_inputs` builds exactly those dicts
from the reference values plus :class:`~.batch.Stream` (one matched sample) and :class:`Window`
(the last N samples) inputs, vectorised over all reference rows, and yields one dict per complete
row; :func:`tuple_inputs` does the same for one :class:`~.streaming.AlignedTuple`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import AlignError
from .batch import AlignResult, Stream, _as_timestamps, _to_caller, align, backward


@dataclass(frozen=True)
class Window:
    """The last ``size`` samples of ``stream`` at or before each reference time, oldest first.

    The stream's offset/drift, ``allow_exact_matches`` and ordering rules apply as in :func:`align`;
    its ``tolerance`` bounds the age of the newest sample in the window; its policy is ignored.
    """

    stream: Stream
    size: int


@dataclass(frozen=True)
class WindowResult:
    indices: np.ndarray  # [rows, size] caller positions, −1 where the window is incomplete
    mask: np.ndarray  # [rows] all ``size`` samples present
    values: np.ndarray  # [rows, size, ...]; zeros where incomplete


def stack_windows(reference_ts: Any, window: Window, name: str = "stream") -> WindowResult:
    """Vectorised: for each reference time, the ``size`` newest samples at or before it."""
    if not isinstance(window.size, int) or window.size < 1:
        raise AlignError(f"stream {name!r}: window size must be an int >= 1, got {window.size!r}")
    t = _as_timestamps(reference_ts, "reference")
    stream = window.stream
    _, prep = stream.prepare(name)
    if stream.values is None:
        raise AlignError(f"stream {name!r}: a window needs values")
    newest = backward(prep.ts, t, prep.tolerance, bool(stream.allow_exact_matches))
    pos = newest[:, None] - np.arange(window.size - 1, -1, -1, dtype=np.int64)[None, :]
    mask = (newest >= 0) & (pos[:, 0] >= 0)
    pos[~mask] = -1
    idx = _to_caller(pos.reshape(-1), prep.order).reshape(pos.shape)
    values = np.asarray(stream.values)
    out = values[np.maximum(idx, 0)] if values.shape[0] else np.zeros(idx.shape + values.shape[1:], values.dtype)
    out[~mask] = 0
    return WindowResult(idx, mask, out)


@dataclass(frozen=True)
class FusedRow:
    """One reference row ready for ``EdgeModel.run``: ``inputs`` maps model input name → tensor."""

    row: int
    ts: float | int
    inputs: dict[str, np.ndarray]


def _tensor(value: Any, dtype: np.dtype | None, batch_axis: bool) -> np.ndarray:
    arr = np.asarray(value)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return np.ascontiguousarray(arr[None] if batch_axis else arr)


def model_inputs(
    reference_ts: Any,
    inputs: Mapping[str, np.ndarray | Stream | Window],
    *,
    dtype: Any = np.float32,
    batch_axis: bool = True,
    skip_incomplete: bool = True,
) -> Iterator[FusedRow]:
    """Yield a model input dict per reference row.

    ``inputs`` maps each model input name to: an array with one entry per reference row (e.g. the
    camera frames themselves), a :class:`Stream` (the matched sample) or a :class:`Window` (the
    last N samples, stacked). Tensors get ``dtype`` and a leading batch axis of 1. Rows where any
    input has no match are skipped (``skip_incomplete``) or raise :class:`AlignError`.
    """
    t = _as_timestamps(reference_ts, "reference")
    streams = {k: v for k, v in inputs.items() if isinstance(v, Stream)}
    matched: dict[str, AlignResult] = align(t, streams) if streams else {}
    columns: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    for name, spec in inputs.items():
        if isinstance(spec, Stream):
            res = matched[name]
            if res.values is None:
                raise AlignError(f"stream {name!r}: a model input needs values")
            columns[name], masks[name] = np.asarray(res.values), res.mask
        elif isinstance(spec, Window):
            res_w = stack_windows(t, spec, name)
            columns[name], masks[name] = res_w.values, res_w.mask
        else:
            arr = np.asarray(spec)
            if arr.ndim == 0 or arr.shape[0] != t.size:
                raise AlignError(f"input {name!r}: expected one entry per reference timestamp ({t.size}), "
                                 f"got shape {list(arr.shape)}")
            columns[name], masks[name] = arr, np.ones(t.size, bool)
    complete = np.logical_and.reduce(list(masks.values())) if masks else np.ones(t.size, bool)
    for row in range(t.size):
        if not complete[row]:
            if skip_incomplete:
                continue
            missing = [n for n, m in masks.items() if not m[row]]
            raise AlignError(f"reference row {row} (t={t[row]}): no match for {', '.join(missing)}")
        yield FusedRow(row, t[row].item(), {n: _tensor(col[row], dtype, batch_axis) for n, col in columns.items()})


def tuple_inputs(item: Any, reference_input: str, names: Mapping[str, str] | None = None, *,
                 dtype: Any = np.float32, batch_axis: bool = True) -> dict[str, np.ndarray] | None:
    """Model inputs from one streaming :class:`~.streaming.AlignedTuple` (None if a stream has no match).

    ``reference_input`` names the model input fed by the reference payload; ``names`` maps stream
    names to model input names (default: the same name).
    """
    out = {reference_input: _tensor(item.value, dtype, batch_axis)}
    for stream, match in item.matches.items():
        if match is None:
            return None
        out[(names or {}).get(stream, stream)] = _tensor(match.value, dtype, batch_axis)
    return out
