"""Multimodal timestamp alignment.

* :func:`align` / :class:`Stream` — exact, vectorised batch alignment (equal to ``pandas.merge_asof``;
  semantics and the tie rule are documented in :mod:`.batch`);
* :class:`StreamingAligner` / :class:`StreamSpec` — the online version for the daemon (reorder window,
  watermarks, bounded buffers, counted late/dropped/unmatched/missing samples), equal to batch output
  once its watermarks have passed;
* :class:`ClockEstimator` — robust online clock offset + drift estimation;
* :func:`model_inputs` / :class:`Window` / :func:`tuple_inputs` — aligned rows → ``EdgeModel.run`` inputs.

None of this needs pandas; only NumPy.
"""

from __future__ import annotations

from ...types import AlignPolicy
from .batch import AlignResult, Stream, align
from .clock import ClockEstimate, ClockEstimator
from .fusion import FusedRow, Window, model_inputs, stack_windows, tuple_inputs
from .streaming import AlignedTuple, Match, StreamingAligner, StreamSpec

__all__ = [
    "AlignPolicy", "AlignResult", "AlignedTuple", "ClockEstimate", "ClockEstimator", "FusedRow", "Match",
    "Stream", "StreamSpec", "StreamingAligner", "Window", "align", "model_inputs", "stack_windows", "tuple_inputs",
]
