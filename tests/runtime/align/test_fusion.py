"""Aligned camera + audio window + IMU rows fed straight into a real multimodal ONNX model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edge_sdk.errors import AlignError
from edge_sdk.runtime.align import Stream
from edge_sdk.runtime.align.fusion import Window, model_inputs, stack_windows, tuple_inputs
from edge_sdk.runtime.align.streaming import StreamingAligner, StreamSpec


def sensors(seed: int = 0, duration: float = 2.0):
    rng = np.random.default_rng(seed)
    cam_ts = np.arange(0.1, duration, 1 / 30)
    frames = rng.random((cam_ts.size, 3, 32, 32), dtype=np.float32)
    audio_ts = np.arange(0.0, duration, 0.02)  # 20 ms feature chunks
    audio = rng.standard_normal((audio_ts.size, 40)).astype(np.float32)
    imu_ts = np.arange(0.0, duration, 1 / 200) + 0.0123  # IMU clock runs 12.3 ms ahead
    imu = rng.standard_normal((imu_ts.size, 6)).astype(np.float32)
    return cam_ts, frames, audio_ts, audio, imu_ts, imu


def naive_rows(cam_ts, frames, audio_ts, audio, imu_ts, imu, imu_offset, window):
    """Per-frame loop with argmin: the obviously-correct reference for the fused inputs."""
    rows = {}
    for i, t in enumerate(cam_ts):
        before = np.nonzero(audio_ts <= t)[0]
        if before.size < window:
            continue
        corrected = imu_ts + imu_offset
        j = int(np.argmin(np.abs(corrected - t)))
        if abs(corrected[j] - t) > 0.005:
            continue
        rows[i] = {"image": frames[i][None], "audio": audio[before[-window:]][None], "imu": imu[j][None]}
    return rows


def test_fused_rows_run_the_multimodal_model(multimodal_path):
    cam_ts, frames, audio_ts, audio, imu_ts, imu = sensors()
    fused = list(model_inputs(cam_ts, {
        "image": frames,
        "audio": Window(Stream(audio_ts, audio), size=4),
        "imu": Stream(imu_ts, imu, "nearest", tolerance=0.005, offset=-0.0123),
    }))
    expected = naive_rows(cam_ts, frames, audio_ts, audio, imu_ts, imu, -0.0123, 4)
    assert [r.row for r in fused] == sorted(expected) and len(fused) >= cam_ts.size - 2
    session = ort.InferenceSession(str(multimodal_path), providers=["CPUExecutionProvider"])
    for r in fused:
        assert {k: v.shape for k, v in r.inputs.items()} == {"image": (1, 3, 32, 32), "audio": (1, 4, 40), "imu": (1, 6)}
        for k, v in r.inputs.items():
            np.testing.assert_array_equal(v, expected[r.row][k])
        scores = session.run(None, r.inputs)[0]
        assert scores.shape == (1, 5) and np.isfinite(scores).all()
    # Different frames give different scores: the model really sees the aligned data.
    s0 = session.run(None, fused[0].inputs)[0]
    s1 = session.run(None, fused[1].inputs)[0]
    assert not np.allclose(s0, s1)


def test_streaming_tuples_feed_the_model(multimodal_path):
    cam_ts, frames, audio_ts, audio, imu_ts, imu = sensors(1, duration=1.0)
    # The audio stream is matched as a window of its last 4 chunks, stacked like the batch Window.
    al = StreamingAligner("image", {"audio": StreamSpec("previous", stack=4, reorder_window=0.03),
                                    "imu": StreamSpec("nearest", tolerance=0.005, offset=-0.0123)})
    events = [(t, "image", frames[i]) for i, t in enumerate(cam_ts)]
    events += [(t, "audio", audio[i]) for i, t in enumerate(audio_ts)]
    events += [(t, "imu", imu[i]) for i, t in enumerate(imu_ts)]
    out = []
    for t, name, value in sorted(events, key=lambda e: e[0]):
        out += al.push(name, float(t), value)
    out += al.flush()
    session = ort.InferenceSession(str(multimodal_path), providers=["CPUExecutionProvider"])
    batch = {r.row: r for r in model_inputs(cam_ts, {
        "image": frames, "audio": Window(Stream(audio_ts, audio), 4),
        "imu": Stream(imu_ts, imu, "nearest", tolerance=0.005, offset=-0.0123)})}
    ran = 0
    for item in out:
        feeds = tuple_inputs(item, "image")
        if feeds is None:
            assert item.index not in batch
            continue
        ran += 1
        for k in feeds:
            np.testing.assert_array_equal(feeds[k], batch[item.index].inputs[k])
        assert session.run(None, feeds)[0].shape == (1, 5)
    assert ran == len(batch) > 20


def test_windows_and_bad_inputs():
    ts = np.array([0.0, 1.0, 2.0, 3.0])
    w = stack_windows(np.array([0.5, 2.0, 9.0]), Window(Stream(ts, np.arange(4.0)), 2))
    assert w.mask.tolist() == [False, True, True]
    assert w.indices.tolist() == [[-1, -1], [1, 2], [2, 3]]
    np.testing.assert_array_equal(w.values[1], [1.0, 2.0])
    with pytest.raises(AlignError, match="window size"):
        stack_windows(ts, Window(Stream(ts, ts), 0), "mic")
    with pytest.raises(AlignError, match="input 'image': expected one entry per reference"):
        list(model_inputs(ts, {"image": np.zeros((3, 2))}))
    with pytest.raises(AlignError, match="stack=4 needs policy 'previous'"):
        StreamingAligner("cam", {"mic": StreamSpec("nearest", stack=4)})
    with pytest.raises(AlignError, match=r"reference row 0 \(t=0.0\): no match for imu"):
        list(model_inputs(ts, {"imu": Stream([5.0], [[1.0]], "next", tolerance=0.1)}, skip_incomplete=False))


def test_fused_rows_feed_edge_model_run(multimodal_release, multimodal_path):
    """The product path: a converted release loaded with EdgeModel, fed aligned rows."""
    from edge_sdk.runtime.model import EdgeModel

    cam_ts, frames, audio_ts, audio, imu_ts, imu = sensors(2, duration=0.5)
    rows = list(model_inputs(cam_ts, {
        "image": frames,
        "audio": Window(Stream(audio_ts, audio), size=4),
        "imu": Stream(imu_ts, imu, "nearest", tolerance=0.005, offset=-0.0123),
    }))
    assert len(rows) >= 10
    raw = ort.InferenceSession(str(multimodal_path), providers=["CPUExecutionProvider"])
    with EdgeModel.load(multimodal_release, profile="intel-nuc", precision="fp32", monitor=False) as model:
        for r in rows:
            got = model.run(r.inputs)["scores"]
            np.testing.assert_allclose(got, raw.run(None, r.inputs)[0], rtol=1e-5, atol=1e-6)
