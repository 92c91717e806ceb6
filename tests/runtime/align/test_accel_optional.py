"""numba is optional: without it alignment takes the NumPy path with the same results."""

from __future__ import annotations

import sys

import numpy as np

from edge_sdk.runtime.align import Stream, _accel, align, batch


def test_without_numba_the_numpy_path_is_used(monkeypatch):
    rng = np.random.default_rng(5)
    ref = np.sort(rng.uniform(0, 100, 10_000))
    ts = np.sort(np.round(rng.uniform(0, 100, 30_000), 3))
    with_kernel = align(ref, {"s": Stream(ts, None, "nearest", 0.01)})["s"].indices
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba → ImportError
    monkeypatch.setattr(_accel, "_tried", False)
    monkeypatch.setattr(_accel, "_kernels", None)
    monkeypatch.setattr(batch, "ACCEL_MIN", 0)
    assert _accel.kernel() is None and _accel.scanner() is None
    without = align(ref, {"s": Stream(ts, None, "nearest", 0.01)})["s"].indices
    np.testing.assert_array_equal(without, with_kernel)
    np.testing.assert_array_equal(without, batch.nearest(ts, ref, 0.01, True))
