"""Batch alignment equals pandas.merge_asof on every generated case (hypothesis)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from needs import need_module

from edge_sdk.errors import AlignError
from edge_sdk.runtime.align import Stream, _accel, align, batch

DIRECTION = {"nearest": "nearest", "previous": "backward", "next": "forward"}
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True, params=["numpy", "compiled"])
def kernel_path(request, monkeypatch):
    """Every test runs on the NumPy searchsorted path and on the compiled linear merge."""
    if request.param == "compiled":
        need_module("numba")
        monkeypatch.setattr(batch, "ACCEL_MIN", 0)
        assert _accel.kernel() is not None
    else:
        monkeypatch.setattr(batch, "ACCEL_MIN", None)
    return request.param

# Small integer grids make duplicates and exact ties (equal distance both sides) common.
_grid = st.lists(st.integers(-20, 20), max_size=25)
_floats = st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False), max_size=25)


def _pandas_indices(ref: np.ndarray, ts: np.ndarray, direction: str, tol, exact: bool) -> np.ndarray:
    left = pd.DataFrame({"t": ref})
    right = pd.DataFrame({"t": ts, "i": np.arange(len(ts), dtype=np.int64)})
    merged = pd.merge_asof(left, right, on="t", direction=direction, tolerance=tol, allow_exact_matches=exact)
    return merged["i"].fillna(-1).astype(np.int64).to_numpy()


@SETTINGS
@given(ref=_grid, ts=_grid, policy=st.sampled_from(sorted(DIRECTION)), exact=st.booleans(),
       tol=st.one_of(st.none(), st.integers(0, 8)), scale=st.sampled_from([1.0, 0.1, 1e-3]))
def test_float_seconds_equal_merge_asof(ref, ts, policy, exact, tol, scale):
    ref_a = np.sort(np.array(ref, np.float64) * scale)
    ts_a = np.sort(np.array(ts, np.float64) * scale)
    tol_s = None if tol is None else tol * scale
    got = align(ref_a, {"s": Stream(ts_a, np.arange(len(ts_a)), policy, tol_s, allow_exact_matches=exact)})["s"]
    want = _pandas_indices(ref_a, ts_a, DIRECTION[policy], tol_s, exact)
    np.testing.assert_array_equal(got.indices, want)
    np.testing.assert_array_equal(got.mask, want >= 0)
    assert got.indices.dtype == np.int64
    np.testing.assert_array_equal(got.values[got.mask], want[want >= 0])


@SETTINGS
@given(ref=_floats, ts=_floats, policy=st.sampled_from(sorted(DIRECTION)), exact=st.booleans(),
       tol=st.one_of(st.none(), st.floats(0, 50)), offset=st.one_of(st.just(0.0), st.floats(-1e9, 1e9), st.floats(-5, 5)))
def test_random_floats_with_offsets_equal_merge_asof(ref, ts, policy, exact, tol, offset):
    ref_a = np.sort(np.array(ref, np.float64))
    ts_a = np.sort(np.array(ts, np.float64))
    got = align(ref_a, {"s": Stream(ts_a, None, policy, tol, offset=offset, allow_exact_matches=exact)})["s"]
    # The offset is applied to the stream before matching: pandas sees the corrected keys.
    want = _pandas_indices(ref_a, ts_a + offset if offset else ts_a, DIRECTION[policy], tol, exact)
    np.testing.assert_array_equal(got.indices, want)


@SETTINGS
@given(ref=_grid, ts=_grid, policy=st.sampled_from(sorted(DIRECTION)), exact=st.booleans(),
       tol=st.one_of(st.none(), st.integers(0, 8)), offset_ns=st.integers(-5, 5),
       base=st.sampled_from([0, 1_700_000_000 * 10**9]))
def test_int64_nanoseconds_equal_merge_asof(ref, ts, policy, exact, tol, offset_ns, base):
    unit = 1_000_000  # 1 ms grid in ns
    ref_a = np.sort(np.array(ref, np.int64) * unit + base)
    ts_a = np.sort(np.array(ts, np.int64) * unit + base)
    tol_s = None if tol is None else tol * 1e-3
    got = align(ref_a, {"s": Stream(ts_a, None, policy, tol_s, offset=offset_ns * 1e-3, allow_exact_matches=exact)})["s"]
    tol_ns = None if tol is None else tol * unit
    want = _pandas_indices(ref_a, ts_a + offset_ns * unit, DIRECTION[policy], tol_ns, exact)
    np.testing.assert_array_equal(got.indices, want)


@SETTINGS
@given(ref=_grid, ts=_grid, policy=st.sampled_from(sorted(DIRECTION)), exact=st.booleans(),
       tol=st.one_of(st.none(), st.integers(0, 8)), data=st.data())
def test_unsorted_stream_is_stable_sorted_and_indices_stay_caller_positions(ref, ts, policy, exact, tol, data):
    perm = data.draw(st.permutations(range(len(ts))))
    ts_u = np.array(ts, np.float64)[list(perm)] if ts else np.array([], np.float64)
    payload = [f"p{i}" for i in range(len(ts_u))]
    ref_a = np.sort(np.array(ref, np.float64))
    got = align(ref_a, {"s": Stream(ts_u, payload, policy, tol, allow_exact_matches=exact)})["s"]
    order = np.argsort(ts_u, kind="stable")
    want_sorted = _pandas_indices(ref_a, ts_u[order], DIRECTION[policy], tol, exact)
    want = np.where(want_sorted >= 0, order[np.maximum(want_sorted, 0)] if len(order) else -1, -1)
    np.testing.assert_array_equal(got.indices, want)
    assert got.values == [payload[i] if i >= 0 else None for i in want]


def test_tie_goes_to_the_earlier_sample_like_pandas():
    # 5 is exactly 1 from 4 and from 6: pandas (and we) choose backward (4).
    got = align(np.array([5.0]), {"s": Stream(np.array([4.0, 6.0]), ["a", "b"])})["s"]
    assert got.indices.tolist() == [0] and got.values == ["a"]
    # Duplicates: backward takes the last of equal timestamps, forward the first.
    ts = np.array([1.0, 2.0, 2.0, 2.0, 3.0])
    assert align(np.array([2.0]), {"s": Stream(ts, None, "previous")})["s"].indices.tolist() == [3]
    assert align(np.array([2.0]), {"s": Stream(ts, None, "next")})["s"].indices.tolist() == [1]
    assert align(np.array([2.0]), {"s": Stream(ts, None, "nearest")})["s"].indices.tolist() == [3]
    assert align(np.array([2.0]), {"s": Stream(ts, None, "nearest", allow_exact_matches=False)})["s"].indices.tolist() == [0]


def test_values_arrays_fill_unmatched_rows():
    ts = np.array([0.0, 1.0, 2.0])
    vals = np.arange(6, dtype=np.float32).reshape(3, 2)
    r = align(np.array([-5.0, 1.1, 9.0]), {"s": Stream(ts, vals, "nearest", tolerance=0.5)})["s"]
    assert r.indices.tolist() == [-1, 1, -1]
    assert r.mask.tolist() == [False, True, False]
    np.testing.assert_array_equal(r.values[1], [2.0, 3.0])
    assert np.isnan(r.values[0]).all() and np.isnan(r.values[2]).all()
    assert r.matched_ts[1] == 1.0 and np.isnan(r.matched_ts[0])
    ints = align(np.array([-5.0, 1.0]), {"s": Stream(ts, np.array([7, 8, 9]), "previous")})["s"]
    assert ints.values.tolist() == [0, 8] and ints.mask.tolist() == [False, True]


def test_interpolate_linear_between_brackets_within_tolerance():
    ts = np.array([0.0, 1.0, 2.0, 10.0])
    vals = np.array([[0.0, 10.0], [1.0, 20.0], [3.0, 40.0], [100.0, 0.0]])
    ref = np.array([-0.5, 0.25, 1.0, 1.5, 5.0, 10.0, 11.0])
    r = align(ref, {"imu": Stream(ts, vals, "interpolate", tolerance=2.0)})["imu"]
    assert r.mask.tolist() == [False, True, True, True, False, True, False]
    np.testing.assert_allclose(r.values[1], [0.25, 12.5])
    np.testing.assert_allclose(r.values[2], [1.0, 20.0])  # exact hit returns the sample
    np.testing.assert_allclose(r.values[3], [2.0, 30.0])
    assert r.indices.tolist() == [-1, 0, 1, 1, -1, 3, -1]
    assert r.next_indices.tolist() == [-1, 1, 1, 2, -1, 3, -1]
    np.testing.assert_allclose(r.weights[[1, 3]], [0.25, 0.5])
    # Ints and int64 ns timestamps interpolate in float64 too.
    ns = align(np.array([500_000_000], np.int64), {"x": Stream(np.array([0, 10**9], np.int64), np.array([0, 10]), "interpolate")})["x"]
    assert ns.values.tolist() == [5.0]


def test_drift_is_applied_relative_to_origin():
    # A stream clock running 100 ppm fast... corrected = ts + offset + 1e-4 * (ts - origin).
    ts = np.array([1000.0, 1010.0])
    r = align(np.array([1010.001 + 0.5]), {"s": Stream(ts, None, "nearest", tolerance=1e-6, offset=0.5,
                                                       drift_ppm=100.0, drift_origin=1000.0)})["s"]
    assert r.indices.tolist() == [1]
    assert r.matched_ts[0] == pytest.approx(1010.5 + 0.001)


@pytest.mark.parametrize(
    "stream, match",
    [
        (Stream([0.0, float("nan")], None), "timestamp 1 is nan"),
        (Stream([0.0, float("inf")], None), "timestamp 1 is inf"),
        (Stream([0.0, 1.0], [1, 2, 3]), "2 timestamps but 3 values"),
        (Stream([0.0], None, policy="closest"), "unknown policy 'closest'"),
        (Stream([0.0], None, tolerance=-1.0), "tolerance must be >= 0"),
        (Stream([1.0, 0.0], None, unsorted="raise"), "not monotonic at index 1"),
        (Stream([0.0], ["x"], policy="interpolate"), "needs numeric values"),
        (Stream([[0.0]], None), "must be 1-D"),
        (Stream(["a"], None), "float seconds or int64 nanoseconds"),
        (Stream([0.0], None, drift_ppm=float("nan")), "drift_ppm must be finite"),
    ],
)
def test_bad_input_names_the_stream(stream, match):
    with pytest.raises(AlignError, match=match) as info:
        align(np.array([0.0]), {"microphone": stream})
    assert "stream 'microphone'" in str(info.value)


def test_mixed_units_and_bad_reference_are_errors():
    with pytest.raises(AlignError, match="int64 but the reference is float64"):
        align(np.array([0.0]), {"s": Stream(np.array([1], np.int64), None)})
    with pytest.raises(AlignError, match="reference: timestamp 0 is nan"):
        align(np.array([np.nan]), {})
    with pytest.raises(AlignError, match="reference: timestamps are not monotonic"):
        align(np.array([1.0, 0.0]), {}, check_reference_sorted=True)


def test_empty_and_single_streams():
    r = align(np.array([1.0, 2.0]), {"e": Stream(np.array([]), np.zeros((0, 3))), "one": Stream([1.5], ["x"], "next")})
    assert r["e"].indices.tolist() == [-1, -1] and r["e"].values.shape == (2, 3)
    assert r["one"].indices.tolist() == [0, -1] and r["one"].values == ["x", None]
    assert align(np.array([]), {"s": Stream([1.0], None)})["s"].indices.shape == (0,)


@pytest.mark.parametrize("workers", [1, 3])
def test_large_streams_with_duplicates_equal_merge_asof(workers, monkeypatch):
    # Quantised timestamps give many duplicates and ties; workers=3 takes the threaded path.
    monkeypatch.setattr(batch, "PARALLEL_MIN", 0)
    rng = np.random.default_rng(11)
    ref = np.sort(np.round(rng.uniform(0, 1000, 150_000), 2))
    streams = {f"s{k}": np.sort(np.round(rng.uniform(0, 1000, size), 2))
               for k, size in enumerate((50_000, 120_000, 200_000))}
    for policy in DIRECTION:
        for exact in (True, False):
            spec = {k: Stream(v, None, policy, 0.02, allow_exact_matches=exact) for k, v in streams.items()}
            got = align(ref, spec, workers=workers)
            for k, v in streams.items():
                np.testing.assert_array_equal(got[k].indices, _pandas_indices(ref, v, DIRECTION[policy], 0.02, exact))


def test_first_bad_stream_in_caller_order_is_reported_from_threads(monkeypatch):
    monkeypatch.setattr(batch, "PARALLEL_MIN", 0)
    good = Stream(np.arange(300_000, dtype=np.float64), None)
    with pytest.raises(AlignError, match="stream 'b'"):
        align(np.arange(10.0), {"a": good, "b": Stream([np.nan], None), "c": Stream([1.0], None, "bogus")}, workers=3)
