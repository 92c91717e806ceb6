"""Online clock offset and drift estimation from paired observations.

Each observation pairs a stream-clock time with the reference-clock time of the same event
(a sync pulse, a shared flash/clap, or a ``(local_ts, remote_ts)`` pair from a sync protocol).
The model is the one :class:`~.batch.Stream` applies::

    reference = stream + offset + drift_ppm·1e-6·(stream − origin)

fitted over a sliding window (by time span and count) with a robust line fit: a pairwise median
slope as the starting point (immune to up to ~30 % outliers, e.g. one-sided network delays),
then Tukey-biweight iteratively reweighted least squares for efficiency on the inliers. The
origin is the newest observation, so ``offset`` is the *current* offset and extrapolation error
from the drift estimate stays small.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from ...errors import AlignError

_TUKEY_C = 4.685  # 95 % efficiency at the normal distribution
_MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class ClockEstimate:
    """Fitted clock model plus how well it fits."""

    offset: float  # seconds to add to the stream clock at ``origin``
    drift_ppm: float
    origin: float  # stream-clock time the offset refers to
    residual: float  # robust std of inlier residuals (seconds)
    n: int  # observations in the window
    outliers: int  # observations given zero weight

    def apply(self, stream_ts: float | np.ndarray) -> float | np.ndarray:
        """Map stream-clock time(s) to reference time."""
        return stream_ts + self.offset + self.drift_ppm * 1e-6 * (stream_ts - self.origin)

    def stream_kwargs(self) -> dict[str, float]:
        """Keyword arguments for :class:`~.batch.Stream` / :class:`~.streaming.StreamSpec`."""
        return {"offset": self.offset, "drift_ppm": self.drift_ppm, "drift_origin": self.origin}


def robust_line(x: np.ndarray, y: np.ndarray, iterations: int = 10) -> tuple[float, float, float, np.ndarray]:
    """Fit ``y ≈ a + b·x`` robustly; returns (a, b, residual sigma, inlier weights)."""
    n = x.size
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    half = n // 2
    dx = x[half:half * 2] - x[:half]
    ok = dx > 0
    if not ok.any():
        raise AlignError("clock fit: observations span no time (all stream timestamps equal)")
    b = float(np.median((y[half:half * 2][ok] - y[:half][ok]) / dx[ok]))
    a = float(np.median(y - b * x))
    w = np.ones(n)
    sigma = 0.0
    for _ in range(iterations):
        r = y - (a + b * x)
        sigma = _MAD_TO_SIGMA * float(np.median(np.abs(r - np.median(r))))
        # A floor keeps perfectly clean synthetic data from dividing by zero.
        scale = max(sigma, 1e-12) * _TUKEY_C
        u = r / scale
        w = np.where(np.abs(u) < 1, (1 - u * u) ** 2, 0.0)
        sw = w.sum()
        if sw <= 0:
            break
        xm, ym = float((w * x).sum() / sw), float((w * y).sum() / sw)
        sxx = float((w * (x - xm) ** 2).sum())
        if sxx <= 0:
            break
        b_new = float((w * (x - xm) * (y - ym)).sum() / sxx)
        a_new = ym - b_new * xm
        converged = abs(b_new - b) < 1e-12 and abs(a_new - a) < 1e-12
        a, b = a_new, b_new
        if converged:
            break
    r = y - (a + b * x)
    inl = w > 0
    resid = float(np.sqrt((w[inl] * r[inl] ** 2).sum() / w[inl].sum())) if inl.any() else float("nan")
    weights = np.empty(n)
    weights[order] = w
    return a, b, resid, weights


class ClockEstimator:
    """Sliding-window robust estimate of one stream's clock relative to the reference.

    Thread-safe: ``add`` from a sync thread, ``estimate`` from anywhere (refits lazily).
    """

    def __init__(self, window: float = 120.0, max_points: int = 4096, min_points: int = 8) -> None:
        if not (window > 0 and math.isfinite(window)):
            raise AlignError(f"clock window must be > 0 seconds, got {window}")
        if max_points < min_points or min_points < 3:
            raise AlignError(f"clock estimator needs 3 <= min_points <= max_points (got {min_points}, {max_points})")
        self.window, self.min_points = window, min_points
        self._obs: deque[tuple[float, float]] = deque(maxlen=max_points)
        self._lock = threading.Lock()
        self._cached: ClockEstimate | None = None
        self._newest = -math.inf

    def add(self, stream_ts: float, reference_ts: float) -> None:
        """One paired observation of the same event on both clocks (seconds)."""
        if not (math.isfinite(stream_ts) and math.isfinite(reference_ts)):
            raise AlignError(f"clock observation must be finite, got ({stream_ts}, {reference_ts})")
        with self._lock:
            obs = self._obs
            if stream_ts < self._newest - self.window:
                return  # older than the whole window: cannot matter
            obs.append((float(stream_ts), float(reference_ts)))
            self._newest = max(self._newest, float(stream_ts))
            while obs and obs[0][0] < self._newest - self.window:
                obs.popleft()
            self._cached = None

    def add_many(self, stream_ts: np.ndarray, reference_ts: np.ndarray) -> None:
        for s, r in zip(np.asarray(stream_ts, np.float64).tolist(), np.asarray(reference_ts, np.float64).tolist()):
            self.add(s, r)

    def __len__(self) -> int:
        return len(self._obs)

    def estimate(self) -> ClockEstimate:
        """The current fit; :class:`AlignError` until ``min_points`` observations are in."""
        with self._lock:
            if self._cached is not None:
                return self._cached
            if len(self._obs) < self.min_points:
                raise AlignError(f"clock estimate needs {self.min_points} observations, have {len(self._obs)}")
            arr = np.asarray(self._obs, np.float64)
        origin = float(arr[:, 0].max())
        x = arr[:, 0] - origin
        y = arr[:, 1] - arr[:, 0]
        a, b, resid, w = robust_line(x, y)
        est = ClockEstimate(offset=a, drift_ppm=b * 1e6, origin=origin, residual=resid, n=int(x.size),
                            outliers=int((w == 0).sum()))
        with self._lock:
            self._cached = est
        return est
