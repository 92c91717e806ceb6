"""Sensor streams pushed to the daemon are aligned exactly like batch ``align`` and run through the model."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import httpx
import numpy as np

import edge_sdk
from edge_sdk.runtime.align import Stream, align

from .conftest import metric_value, write_config

IMU_OFFSET = -0.013  # the IMU clock runs 13 ms ahead of the camera's


def synthetic_streams(seconds: float = 2.0, seed: int = 0):
    """Camera 10 fps, audio chunks 25 Hz, IMU 100 Hz with clock offset and jitter (own clocks)."""
    rng = np.random.default_rng(seed)
    cam_ts = np.arange(0.05, seconds, 0.1) + rng.uniform(-0.002, 0.002, int(np.ceil((seconds - 0.05) / 0.1)))
    audio_ts = np.arange(0.0, seconds, 0.04) + rng.uniform(-0.001, 0.001, int(np.ceil(seconds / 0.04)))
    imu_ts = np.arange(0.0, seconds, 0.01) - IMU_OFFSET + rng.uniform(-0.0015, 0.0015, int(np.ceil(seconds / 0.01)))
    return {
        "camera": (cam_ts, rng.random((cam_ts.size, 3, 32, 32), dtype=np.float32)),
        "audio": (audio_ts, rng.standard_normal((audio_ts.size, 4, 40)).astype(np.float32)),
        "imu": (np.sort(imu_ts), rng.standard_normal((imu_ts.size, 6)).astype(np.float32)),
    }


PIPELINE = {"model": "fusion", "reference": "camera", "reference_input": "image", "reorder_window_s": 0.0,
            "max_wait_s": 5.0,
            "streams": {"audio": {"input": "audio", "policy": "previous", "tolerance_s": 0.2},
                        "imu": {"input": "imu", "policy": "nearest", "tolerance_s": 0.02, "offset_s": IMU_OFFSET}}}


def push(url: str, stream: str, ts: np.ndarray, values: np.ndarray, binary: bool = False) -> dict:
    if binary:
        head = json.dumps({"ts": ts.tolist(), "shape": list(values.shape), "datatype": "FP32",
                           "parameters": {"binary_data_size": values.nbytes}}).encode()
        r = httpx.post(f"{url}/v2/pipelines/fusion/streams/{stream}", content=head + values.tobytes(),
                       headers={"Inference-Header-Content-Length": str(len(head))})
    else:
        r = httpx.post(f"{url}/v2/pipelines/fusion/streams/{stream}",
                       json={"ts": ts.tolist(), "shape": list(values.shape), "datatype": "FP32", "data": values.ravel().tolist()})
    assert r.status_code == 200, r.text
    return r.json()


def test_pipeline_matches_batch_alignment_and_model(fusion_release: Path, tmp_path: Path, start_daemon) -> None:
    config = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release), "precision": "fp32"}],
                          pipelines=[PIPELINE],
                          sync={"broker": "mqtt://127.0.0.1:1", "fleet": "lab", "allow_unsigned": True,
                                "telemetry_interval_s": 60})
    daemon = start_daemon(config).wait_ready()
    data = synthetic_streams()
    # Interleave in 0.2 s slices, the way a capture loop would send them (binary for the camera).
    for start in np.arange(0.0, 2.0, 0.2):
        for name in ("imu", "audio", "camera"):
            ts, values = data[name]
            sel = (ts >= start) & (ts < start + 0.2)
            if sel.any():
                counts = push(daemon.url, name, ts[sel], values[sel], binary=name == "camera")
                assert counts["accepted"] == int(sel.sum()) and counts["late"] == 0
    # A sample far behind the IMU watermark is late: counted, not used.
    late = push(daemon.url, "imu", np.array([0.5]), np.zeros((1, 6), np.float32))
    assert late == {"accepted": 0, "late": 1, "dropped": 0, "tuples": 0}
    bad = httpx.post(daemon.url + "/v2/pipelines/fusion/streams/lidar", json={"ts": [1.0], "shape": [1, 6], "datatype": "FP32", "data": [0] * 6})
    assert bad.status_code == 400 and "unknown stream 'lidar'" in bad.json()["error"]
    bad = httpx.post(daemon.url + "/v2/pipelines/fusion/streams/imu", json={"ts": [1.0, 2.0], "shape": [1, 6], "datatype": "FP32", "data": [0] * 6})
    assert bad.status_code == 400 and "number of samples (2)" in bad.json()["error"]
    text = httpx.get(daemon.url + "/metrics").text
    assert metric_value(text, "edge_aligner_samples_late_total", stream="fusion/imu") == 1.0
    assert metric_value(text, "edge_aligner_samples_accepted_total", stream="fusion/camera") == data["camera"][0].size
    assert metric_value(text, "edge_aligner_samples_dropped_total", stream="fusion/imu") == 0.0
    daemon.signal(signal.SIGTERM)  # flushes the aligner: every remaining frame is emitted and run
    assert daemon.wait(30) == 0

    # What batch alignment says, frame by frame.
    cam_ts, frames = data["camera"]
    matched = align(cam_ts, {"audio": Stream(data["audio"][0], policy="previous", tolerance=0.2),
                             "imu": Stream(data["imu"][0], policy="nearest", tolerance=0.02, offset=IMU_OFFSET)})
    complete = matched["audio"].mask & matched["imu"].mask
    assert 0 < complete.sum() < cam_ts.size or complete.all()
    model = edge_sdk.EdgeModel.load(fusion_release, profile="generic-x86_64", precision="fp32", monitor=False)
    try:
        expected = {}
        for i in np.flatnonzero(complete):
            inputs = {"image": frames[i][None], "audio": data["audio"][1][matched["audio"].indices[i]][None],
                      "imu": data["imu"][1][matched["imu"].indices[i]][None]}
            expected[round(float(cam_ts[i]), 9)] = model.run(inputs)["scores"].ravel()
    finally:
        model.close()
    with sqlite3.connect(tmp_path / "state" / "outbox.db") as db:
        rows = [json.loads(d) for (d,) in db.execute("SELECT data FROM records WHERE kind = 'result' ORDER BY seq")]
    got = {round(r["ts"], 9): np.asarray(r["outputs"]["scores"], np.float32) for r in rows}
    assert sorted(got) == sorted(expected)
    for t, want in expected.items():
        np.testing.assert_allclose(got[t], want, atol=2e-6)


def test_full_stream_buffer_drops_are_counted(fusion_release: Path, tmp_path: Path, start_daemon) -> None:
    pipeline = {**PIPELINE, "streams": {**PIPELINE["streams"], "imu": {**PIPELINE["streams"]["imu"], "max_buffer": 2}}}
    config = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release), "precision": "fp32"}],
                          pipelines=[pipeline])
    daemon = start_daemon(config).wait_ready()
    # No camera frame consumes them: an IMU buffer of 2 cannot hold 10 samples.
    counts = push(daemon.url, "imu", np.arange(10) * 0.01, np.zeros((10, 6), np.float32))
    text = httpx.get(daemon.url + "/metrics").text
    assert counts["dropped"] > 0
    assert metric_value(text, "edge_aligner_samples_dropped_total", stream="fusion/imu") == counts["dropped"]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
