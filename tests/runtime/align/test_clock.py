"""Clock offset + drift recovered from synthetic clocks with known truth, jitter and outliers."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.errors import AlignError
from edge_sdk.runtime.align import Stream, align
from edge_sdk.runtime.align.clock import ClockEstimator, robust_line


def synthetic_pairs(seed: int, offset: float, drift_ppm: float, jitter: float, outlier_rate: float,
                    duration: float = 300.0, rate: float = 10.0, start: float = 5_000.0):
    """Stream-clock event times and the reference-clock times of the same events.

    Truth: reference = stream + offset + drift·(stream − start). Jitter is Gaussian on both clocks'
    timestamping; outliers are one-sided delays of 5–80 ms (a late network packet or a missed
    interrupt), as real sync channels show.
    """
    rng = np.random.default_rng(seed)
    n = int(duration * rate)
    stream = start + np.arange(n) / rate + rng.uniform(0, 0.5 / rate, n)
    truth = stream + offset + drift_ppm * 1e-6 * (stream - start)
    observed = truth + rng.normal(0, jitter, n)
    bad = rng.random(n) < outlier_rate
    observed[bad] += rng.uniform(0.005, 0.080, bad.sum())
    return stream, observed, (lambda s: s + offset + drift_ppm * 1e-6 * (s - start))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("offset, drift_ppm, jitter, outliers", [
    (0.0372, 40.0, 0.0005, 0.0),
    (-0.0815, -25.0, 0.001, 0.05),
    (12.5, 100.0, 0.001, 0.15),
])
def test_offset_within_1ms_and_drift_within_5ppm(seed, offset, drift_ppm, jitter, outliers):
    stream, observed, truth = synthetic_pairs(seed, offset, drift_ppm, jitter, outliers)
    est = ClockEstimator(window=120.0)
    est.add_many(stream, observed)
    e = est.estimate()
    # Offset is judged where it is used: the current correction at the newest observation.
    assert abs(e.apply(e.origin) - truth(e.origin)) < 1e-3
    assert abs(e.drift_ppm - drift_ppm) < 5.0
    # The whole window is corrected to well within 1 ms as well.
    s = stream[stream >= stream[-1] - 120.0]
    assert np.max(np.abs(e.apply(s) - truth(s))) < 1e-3
    assert jitter * 0.8 < e.residual < jitter * 1.3  # residual reports the jitter, not the outliers
    assert e.outliers >= 0.7 * outliers * e.n
    assert e.n == s.size


def test_measured_errors_are_far_inside_the_bounds():
    errs_off, errs_drift = [], []
    for seed in range(20):
        stream, observed, truth = synthetic_pairs(100 + seed, 0.05, 30.0, 0.001, 0.05)
        est = ClockEstimator(window=120.0)
        est.add_many(stream, observed)
        e = est.estimate()
        errs_off.append(abs(e.apply(e.origin) - truth(e.origin)))
        errs_drift.append(abs(e.drift_ppm - 30.0))
    assert max(errs_off) < 0.5e-3 and max(errs_drift) < 3.0


def test_tracks_a_clock_that_changes_online():
    # The window forgets: after a step in drift, the estimate follows the new clock.
    est = ClockEstimator(window=60.0)
    s1, o1, _ = synthetic_pairs(1, 0.02, 10.0, 0.0005, 0.02, duration=120.0, start=0.0)
    est.add_many(s1, o1)
    assert abs(est.estimate().drift_ppm - 10.0) < 5.0
    end_offset = 0.02 + 10e-6 * s1[-1]
    s2, o2, truth2 = synthetic_pairs(2, end_offset, 60.0, 0.0005, 0.02, duration=120.0, start=s1[-1] + 0.1)
    est.add_many(s2, o2)
    e = est.estimate()
    assert abs(e.drift_ppm - 60.0) < 5.0 and abs(e.apply(e.origin) - truth2(e.origin)) < 1e-3


def test_estimate_feeds_alignment():
    stream, observed, truth = synthetic_pairs(3, 0.045, 50.0, 0.0005, 0.05)
    est = ClockEstimator(window=300.0)
    est.add_many(stream, observed)
    kwargs = est.estimate().stream_kwargs()
    # Events seen on the stream clock land on their reference-clock twins once corrected.
    events = stream[::37]
    ref = truth(events)
    r = align(ref, {"s": Stream(events, None, "nearest", tolerance=1e-3, **kwargs)})["s"]
    assert r.indices.tolist() == list(range(events.size))
    uncorrected = align(ref, {"s": Stream(events, None, "nearest", tolerance=1e-3)})["s"]
    assert not uncorrected.mask.any()


def test_robust_line_and_errors():
    x = np.linspace(0, 10, 50)
    a, b, resid, w = robust_line(x, 2 + 0.5 * x)
    assert a == pytest.approx(2) and b == pytest.approx(0.5) and resid < 1e-9
    with pytest.raises(AlignError, match="needs 8 observations"):
        ClockEstimator().estimate()
    with pytest.raises(AlignError, match="finite"):
        ClockEstimator().add(float("nan"), 0.0)
    est = ClockEstimator()
    for _ in range(10):
        est.add(1.0, 2.0)
    with pytest.raises(AlignError, match="span no time"):
        est.estimate()
