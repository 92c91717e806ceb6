"""The streaming aligner equals batch alignment, never drops silently, and is thread-safe."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sdk.errors import AlignError
from edge_sdk.runtime.align import Stream, align
from edge_sdk.runtime.align.streaming import StreamingAligner, StreamSpec

POLICIES = ["nearest", "previous", "next", "interpolate"]


def arrival_order(ts: list[float], delays: list[float]) -> list[int]:
    """Indices in arrival order when sample i arrives at ts[i] + delays[i] (stable on ties)."""
    return sorted(range(len(ts)), key=lambda i: (ts[i] + delays[i], i))


def batch_expectation(ref_ts, streams_in_arrival, specs):
    """Batch-align the data in each stream's arrival order; rows in (ts, arrival) order."""
    dtype = np.int64 if ref_ts and isinstance(ref_ts[0], int) else np.float64
    ref = np.asarray(ref_ts, dtype)
    batch = align(ref, {name: Stream(np.asarray(ts, dtype), np.asarray(vals, np.float64), spec.policy,
                                     spec.tolerance, spec.offset, spec.drift_ppm, spec.allow_exact_matches,
                                     drift_origin=spec.drift_origin)
                        for name, (ts, vals), spec in ((n, streams_in_arrival[n], specs[n]) for n in specs)})
    order = np.argsort(ref, kind="stable")
    return order, batch


def assert_equal_to_batch(out, ref_ts, streams_in_arrival, specs):
    order, batch = batch_expectation(ref_ts, streams_in_arrival, specs)
    assert [o.index for o in out] == order.tolist()
    assert [o.ts for o in out] == [ref_ts[i] for i in order]
    for row, item in zip(order, out):
        for name in specs:
            res, match = batch[name], item.matches[name]
            if not res.mask[row]:
                assert match is None, (name, row)
                continue
            assert match is not None, (name, row)
            assert match.index == res.indices[row]
            np.testing.assert_array_equal(np.asarray(match.value, np.float64), res.values[row])


stream_st = st.lists(st.integers(0, 40), max_size=30)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ref=stream_st, a=stream_st, b=stream_st, pa=st.sampled_from(POLICIES), pb=st.sampled_from(POLICIES),
       ta=st.one_of(st.none(), st.integers(0, 6)), tb=st.one_of(st.none(), st.integers(0, 6)),
       exa=st.booleans(), exb=st.booleans(), offset=st.integers(-8, 8), windows=st.tuples(*[st.integers(0, 6)] * 3),
       seed=st.integers(0, 2**32 - 1), ns=st.booleans(), drift=st.sampled_from([0.0, 0.0, 120.0, -250.0]))
def test_streaming_equals_batch(ref, a, b, pa, pb, ta, tb, exa, exb, offset, windows, seed, ns, drift):
    rng = random.Random(seed)
    scale = 0.5  # exact binary fractions: offsets and windows add without rounding
    specs = {
        "a": StreamSpec(pa, None if ta is None else ta * scale, offset * 0.25, drift, 3.0, allow_exact_matches=exa,
                        reorder_window=windows[1] * scale),
        "b": StreamSpec(pb, None if tb is None else tb * scale, allow_exact_matches=exb, reorder_window=windows[2] * scale),
    }
    raw = {"ref": [x * scale for x in ref], "a": [x * scale for x in a], "b": [x * scale for x in b]}
    win = {"ref": windows[0] * scale, "a": windows[1] * scale, "b": windows[2] * scale}
    events = []  # (arrival time, position in its stream, tie-break, stream, ts, value)
    in_arrival = {}
    for name, ts in raw.items():
        delays = [rng.random() * win[name] * 0.99 for _ in ts]  # < window even after a 250 ppm drift
        order = arrival_order(ts, delays)
        unit = (lambda x: int(round(x * 1e9))) if ns else float  # int64 ns or float seconds
        in_arrival[name] = ([unit(ts[i]) for i in order], [[float(i), ts[i] * 2.0] for i in order])
        for k, i in enumerate(order):
            events.append((ts[i] + delays[i], k, rng.random(), name, unit(ts[i]), in_arrival[name][1][k]))
    events.sort()
    aligner = StreamingAligner("ref", specs, reference_window=win["ref"], ns=ns)
    out = []
    for _, _, _, name, ts, value in events:
        out += aligner.push(name, ts, value)
    out += aligner.flush()
    stats = aligner.stats()
    assert all(stats[n]["late"] == 0 and stats[n]["dropped"] == 0 for n in stats)
    assert stats["ref"]["emitted"] == len(ref) == len(out)
    ref_arrival = in_arrival["ref"][0]
    assert_equal_to_batch(out, ref_arrival, {n: in_arrival[n] for n in ("a", "b")}, specs)
    for n in ("a", "b"):
        assert stats[n]["matched"] + stats[n]["unmatched"] == len(ref)
        assert stats[n]["matched"] == sum(o.matches[n] is not None for o in out)


def test_emits_as_soon_as_watermarks_pass_and_not_before():
    al = StreamingAligner("cam", {"imu": StreamSpec("nearest", tolerance=0.1)})
    assert al.push("cam", 1.0, "f0") == []  # reference itself not final (window 0: needs a later one)
    assert al.push("cam", 2.0, "f1") == []  # cam 1.0 final, but imu's watermark is not past it
    assert al.push("imu", 0.95, "i0") == []
    assert al.push("imu", 1.05, "i1") == []  # 1.05 is within tolerance but a closer one may come...
    out = al.push("imu", 1.2, "i2")  # ...now everything below 1.2 is in: nearest is final
    assert [(o.ts, o.matches["imu"].value) for o in out] == [(1.0, "i0")]  # tie → earlier sample
    out = al.flush()
    assert [(o.ts, o.matches["imu"]) for o in out] == [(2.0, None)]
    assert al.stats()["imu"]["unmatched"] == 1 and al.stats()["imu"]["matched"] == 1


def test_late_samples_are_counted_and_reported_not_used():
    late = []
    al = StreamingAligner("cam", {"imu": StreamSpec("previous", reorder_window=0.5)}, on_late=lambda *a: late.append(a))
    al.push("imu", 10.0, "new")
    al.push("imu", 9.6, "within window")
    al.push("imu", 9.4, "too late")
    assert late == [("imu", 9.4, "too late")]
    assert al.stats()["imu"]["late"] == 1 and al.stats()["imu"]["accepted"] == 2


def test_bounded_buffers_drop_oldest_and_count():
    drops = []
    al = StreamingAligner("cam", {"imu": StreamSpec("previous", max_buffer=5)}, on_drop=lambda *a: drops.append(a))
    for i in range(12):  # no reference arrives: the imu buffer must not grow past 5
        al.push("imu", float(i), i)
    assert al.stats()["imu"]["held"] == 5
    assert al.stats()["imu"]["dropped"] == 7
    assert [d[2] for d in drops] == list(range(7))


def test_silent_stream_does_not_block_forever():
    missing = []
    al = StreamingAligner("cam", {"imu": StreamSpec("nearest"), "mic": StreamSpec("previous")}, max_wait=1.0,
                          on_missing=lambda *a: missing.append(a))
    out = []
    for i in range(6):
        out += al.push("cam", i * 0.5, i)
        out += al.push("mic", i * 0.5 + 0.01, i)
    # imu never speaks: a frame is emitted once the newest data (mic 2.51) is more than 1 s later
    assert [o.ts for o in out] == [0.0, 0.5, 1.0, 1.5]
    assert all(o.missing == frozenset({"imu"}) and o.matches["imu"] is None for o in out)
    assert [o.matches["mic"] and o.matches["mic"].value for o in out] == [None, 0, 1, 2]
    assert al.stats()["imu"]["missing"] == 4 and [m[1] for m in missing] == [0.0, 0.5, 1.0, 1.5]
    assert al.stats()["mic"]["missing"] == 0 and al.stats()["mic"]["unmatched"] == 1


def test_tick_expires_waits_when_everything_is_silent():
    al = StreamingAligner("cam", {"imu": StreamSpec("nearest")}, max_wait=1.0)
    assert al.push("cam", 0.0, "a") + al.push("cam", 0.5, "b") + al.push("cam", 1.0, "c") == []
    assert al.tick(0.9) == []  # nothing older than 1 s yet
    out = al.tick(3.0)
    assert [(o.ts, o.missing) for o in out] == [(0.0, frozenset({"imu"})), (0.5, frozenset({"imu"}))]
    assert [o.ts for o in al.flush()] == [1.0]  # flush: imu is closed, so it is unmatched, not missing
    assert al.stats()["imu"] == {"accepted": 0, "late": 0, "dropped": 0, "matched": 0, "unmatched": 1,
                                 "missing": 2, "held": 0}


def test_memory_stays_bounded_in_a_long_run():
    al = StreamingAligner("cam", {"imu": StreamSpec("nearest", tolerance=0.01), "mic": StreamSpec("previous")})
    n = 0
    for k in range(20000):
        t = k * 0.005
        al.push("imu", t, k)
        if k % 4 == 0:
            al.push("mic", t + 0.001, k)
        if k % 7 == 0:
            n += len(al.push("cam", t, k))
    stats = al.stats()
    assert n > 2800 and stats["imu"]["held"] < 10 and stats["mic"]["held"] < 10


def test_int_nanoseconds():
    al = StreamingAligner("cam", {"imu": StreamSpec("nearest", tolerance=0.002, offset=0.001)}, ns=True)
    al.push("cam", 1_000_000_000, "f")
    al.push("imu", 998_000_000, "a")  # corrected 999 ms: 1 ms away
    out = al.push("imu", 2_000_000_000, "b") + al.flush()
    assert out[0].matches["imu"].value == "a" and out[0].matches["imu"].ts == 999_000_000


def test_bad_input_is_named():
    al = StreamingAligner("cam", {"imu": StreamSpec()})
    with pytest.raises(AlignError, match="unknown stream 'gps'"):
        al.push("gps", 1.0)
    with pytest.raises(AlignError, match="stream 'imu': timestamp nan"):
        al.push("imu", float("nan"))
    with pytest.raises(AlignError, match="stream 'imu': unknown policy 'closest'"):
        StreamingAligner("cam", {"imu": StreamSpec("closest")})
    with pytest.raises(AlignError, match="stream 'imu': tolerance must be >= 0"):
        StreamingAligner("cam", {"imu": StreamSpec(tolerance=-1.0)})
    al.flush()
    with pytest.raises(AlignError, match="flushed"):
        al.push("cam", 5.0)


def test_multithreaded_producers_equal_batch_with_exact_counters():
    rng = np.random.default_rng(7)
    dur = 20.0
    cam = np.arange(0, dur, 1 / 30) + rng.uniform(0, 0.002, int(np.ceil(dur * 30)))
    audio = np.arange(0, dur, 0.02) + 0.013
    imu = np.arange(0, dur, 1 / 200)
    data = {"cam": cam, "audio": audio, "imu": imu}
    windows = {"cam": 0.05, "audio": 0.1, "imu": 0.03}
    specs = {"audio": StreamSpec("previous", tolerance=0.05, reorder_window=windows["audio"]),
             "imu": StreamSpec("interpolate", tolerance=0.01, offset=-0.004, reorder_window=windows["imu"])}
    arrival = {}
    for name, ts in data.items():
        delays = rng.uniform(0, windows[name] * 0.99, ts.size)
        order = np.argsort(ts + delays, kind="stable")
        arrival[name] = (ts[order].tolist(), [[float(i), float(i) * 0.5] for i in order])
    got = []
    al = StreamingAligner("cam", specs, reference_window=windows["cam"], on_tuple=got.append)
    barrier = threading.Barrier(3)

    def produce(name):
        barrier.wait()
        for ts, value in zip(*arrival[name]):
            al.push(name, ts, value)

    threads = [threading.Thread(target=produce, args=(n,)) for n in data]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    al.flush()
    stats = al.stats()
    assert stats["cam"]["emitted"] == cam.size == len(got)
    for name in data:
        assert stats[name]["late"] == 0 and stats[name]["dropped"] == 0 and stats[name]["accepted"] == data[name].size
    for name in specs:
        assert stats[name]["matched"] == sum(o.matches[name] is not None for o in got)
        assert stats[name]["matched"] + stats[name]["unmatched"] == cam.size
    assert stats["imu"]["matched"] > 0.9 * cam.size and stats["audio"]["matched"] > 0.9 * cam.size
    assert_equal_to_batch(got, arrival["cam"][0], {n: arrival[n] for n in specs}, specs)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(st.tuples(st.sampled_from(["ref", "a", "b"]), st.integers(0, 60)), max_size=120),
       max_buffer=st.integers(2, 8), window=st.integers(0, 4), max_wait=st.one_of(st.none(), st.integers(0, 10)))
def test_nothing_is_lost_silently(events, max_buffer, window, max_wait):
    """Under late arrivals, overflow and timeouts every sample and every frame is accounted for."""
    calls = {"late": 0, "drop": 0, "unmatched": 0, "missing": 0}
    dropped_refs = []

    def count(kind):
        def cb(stream, *_):
            calls[kind] += 1
            if kind == "drop" and stream == "ref":
                dropped_refs.append(stream)
        return cb

    specs = {"a": StreamSpec("nearest", 2.0, reorder_window=window, max_buffer=max_buffer),
             "b": StreamSpec("previous", None, reorder_window=window, max_buffer=max_buffer)}
    al = StreamingAligner("ref", specs, reference_window=window, reference_max_buffer=max_buffer,
                          max_wait=max_wait, on_late=count("late"), on_drop=count("drop"),
                          on_unmatched=count("unmatched"), on_missing=count("missing"))
    out = []
    pushed = {"ref": 0, "a": 0, "b": 0}
    for name, ts in events:
        pushed[name] += 1
        out += al.push(name, float(ts), ts)
    out += al.flush()
    stats = al.stats()
    for name in pushed:
        assert stats[name]["accepted"] + stats[name]["late"] == pushed[name]
        assert stats[name]["held"] == 0
    assert calls["late"] == sum(s["late"] for s in stats.values())
    assert calls["drop"] == sum(s["dropped"] for s in stats.values())
    assert stats["ref"]["emitted"] == len(out) == stats["ref"]["accepted"] - stats["ref"]["dropped"]
    for name in specs:
        assert stats[name]["matched"] + stats[name]["unmatched"] + stats[name]["missing"] == len(out)
    assert calls["unmatched"] == sum(stats[n]["unmatched"] for n in specs)
    assert calls["missing"] == sum(stats[n]["missing"] for n in specs)
    assert [o.ts for o in out] == sorted(o.ts for o in out)


def test_clock_estimate_applied_online():
    from edge_sdk.runtime.align import ClockEstimator

    # The IMU clock is 40 ms behind and runs 50 ppm slow; sync pulses reveal it.
    def imu_clock(ref_t):
        return (ref_t - 0.040) / (1 + 50e-6)

    est = ClockEstimator(window=60.0)
    for k in range(200):
        ref_t = k * 0.25
        est.add(imu_clock(ref_t), ref_t)
    e = est.estimate()
    al = StreamingAligner("cam", {"imu": StreamSpec("nearest", tolerance=0.002)})
    al.update_clock("imu", **e.stream_kwargs())
    out = []
    for k in range(30):
        t = 60.0 + k / 30
        out += al.push("cam", t, k)
        out += al.push("imu", imu_clock(t + 0.0005), k)  # each frame has an IMU sample 0.5 ms later
    out += al.flush()
    assert [o.matches["imu"].value for o in out] == list(range(30))
    with pytest.raises(AlignError, match="unknown stream 'gps'"):
        al.update_clock("gps", 0.0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ref=stream_st, a=stream_st, size=st.integers(1, 4), window=st.integers(0, 4), exact=st.booleans(),
       tol=st.one_of(st.none(), st.integers(0, 6)), seed=st.integers(0, 2**32 - 1))
def test_streaming_windows_equal_batch_windows(ref, a, size, window, exact, tol, seed):
    from edge_sdk.runtime.align.fusion import Window, stack_windows

    rng = random.Random(seed)
    spec = StreamSpec("previous", tol, allow_exact_matches=exact, reorder_window=float(window), stack=size)
    arrival = {}
    events = []
    for name, ts in (("ref", ref), ("a", a)):
        delays = [rng.random() * window * 0.99 for _ in ts]
        order = arrival_order(ts, delays)
        arrival[name] = [float(ts[i]) for i in order]
        events += [(ts[i] + delays[i], k, name, float(ts[i])) for k, i in enumerate(order)]
    events.sort()
    al = StreamingAligner("ref", {"a": spec}, reference_window=float(window))
    out = []
    for _, k, name, ts in events:
        out += al.push(name, ts, [ts, float(k)])
    out += al.flush()
    ref_arr = np.asarray(arrival["ref"], np.float64)
    vals = np.array([[t, float(k)] for k, t in enumerate(arrival["a"])]).reshape(-1, 2)
    batch = stack_windows(ref_arr, Window(Stream(np.asarray(arrival["a"], np.float64), vals, tolerance=tol,
                                                 allow_exact_matches=exact), size))
    order = np.argsort(ref_arr, kind="stable")
    assert [o.index for o in out] == order.tolist()
    for row, item in zip(order, out):
        match = item.matches["a"]
        assert (match is not None) == bool(batch.mask[row])
        if match is not None:
            np.testing.assert_array_equal(match.value, batch.values[row])
            assert match.index == batch.indices[row, -1]
