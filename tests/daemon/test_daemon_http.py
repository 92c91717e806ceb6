"""The daemon's KServe v2 API, as a real subprocess over real HTTP, against in-process EdgeModel."""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

import edge_sdk

from .conftest import fusion_inputs, metric_value, v2_request, write_config


@pytest.fixture(scope="module")
def daemon(fusion_release: Path, tmp_path_factory: pytest.TempPathFactory):
    from .conftest import DaemonProcess

    folder = tmp_path_factory.mktemp("daemon-http")
    config = write_config(folder, [{"name": "fusion", "release": str(fusion_release), "precision": "fp32"}],
                          api={"auth": {"anonymous_loopback": True}, "max_body_bytes": 200_000,
                                                "max_concurrent_infer": 2, "max_queue": 0})
    proc = DaemonProcess(config)
    try:
        proc.wait_ready()
    except BaseException:
        proc.kill()  # no teardown runs when the fixture fails: never leave the daemon behind
        raise
    yield proc
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    proc.kill()


@pytest.fixture(scope="module")
def reference(fusion_release: Path):
    model = edge_sdk.EdgeModel.load(fusion_release, profile="generic-x86_64", precision="fp32", monitor=False)
    yield model
    model.close()


def test_health_and_metadata(daemon) -> None:
    assert httpx.get(daemon.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(daemon.url + "/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(daemon.url + "/v2/models/fusion").json()
    assert meta["name"] == "fusion" and meta["versions"] == ["1"]
    assert {i["name"]: i["shape"] for i in meta["inputs"]} == {"image": [1, 3, 32, 32], "audio": [1, 4, 40], "imu": [1, 6]}
    assert all(i["datatype"] == "FP32" for i in meta["inputs"])
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [1, 5]}]
    assert meta["parameters"]["backend"] == "onnxruntime" and meta["parameters"]["precision"] == "fp32"
    assert httpx.get(daemon.url + "/v2/models/fusion/ready").json() == {"name": "fusion", "ready": True}
    assert httpx.get(daemon.url + "/v2").json()["extensions"] == ["binary_tensor_data", "classification",
                                                                  "model_repository", "model_configuration"]


def test_json_infer_matches_in_process_run(daemon, reference) -> None:
    for seed in range(3):
        inputs = fusion_inputs(seed)
        r = httpx.post(daemon.url + "/v2/models/fusion/infer", json=v2_request(inputs, id=f"req-{seed}"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == f"req-{seed}" and body["model_name"] == "fusion" and body["model_version"] == "1"
        (out,) = body["outputs"]
        assert out["name"] == "scores" and out["datatype"] == "FP32" and out["shape"] == [1, 5]
        want = reference.run(inputs)["scores"]
        # JSON carries float32 values as decimal text: round-trips exactly through float64.
        np.testing.assert_array_equal(np.asarray(out["data"], np.float32).reshape(1, 5), want)


def test_binary_infer_matches_in_process_run(daemon, reference) -> None:
    inputs = fusion_inputs(7)
    head = json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": v.nbytes}} for k, v in inputs.items()],
                       "outputs": [{"name": "scores", "parameters": {"binary_data": True}}]}).encode()
    payload = head + b"".join(v.tobytes() for v in inputs.values())
    r = httpx.post(daemon.url + "/v2/models/fusion/infer", content=payload,
                   headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 20
    got = np.frombuffer(r.content[n:], np.float32).reshape(1, 5)
    np.testing.assert_array_equal(got, reference.run(inputs)["scores"])


BAD = [
    ("wrong JSON", b"{oops", {}, 400, "not valid JSON"),
    ("deep nesting", b'{"a":' + b"[" * 150_000, {}, 400, "nested too deeply"),
    ("missing input", json.dumps(v2_request({"image": fusion_inputs()["image"]})).encode(), {}, 400, "missing ['audio', 'imu']"),
    ("wrong shape", json.dumps(v2_request({**fusion_inputs(), "imu": np.zeros((1, 7), np.float32)})).encode(), {}, 400, "'imu': shape [1, 7]"),
    ("wrong dtype", json.dumps({"inputs": [*v2_request(fusion_inputs())["inputs"][:2],
                                           {"name": "imu", "shape": [1, 6], "datatype": "INT64", "data": [1] * 6}]}).encode(),
     {}, 400, "dtype int64 != expected float32"),
    ("unknown output", json.dumps(v2_request(fusion_inputs(), outputs=[{"name": "nope"}])).encode(), {}, 400, "unknown outputs ['nope']"),
    ("huge body", b"x" * 300_000, {}, 413, "exceeds the 200000-byte limit"),
    ("bad binary header", b"{}", {"Inference-Header-Content-Length": "abc"}, 400, "Inference-Header-Content-Length"),
]


@pytest.mark.parametrize("case, payload, headers, status, needle", BAD, ids=[b[0] for b in BAD])
def test_malformed_requests_get_4xx_with_a_message(daemon, case, payload, headers, status, needle) -> None:
    r = httpx.post(daemon.url + "/v2/models/fusion/infer", content=payload, headers=headers)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_huge_chunked_body_is_cut_off(daemon) -> None:
    def chunks():
        yield b'{"parameters": {"k": ['
        for _ in range(100):
            yield b"1," * 5_000  # 1 MB of valid JSON so far, no Content-Length

    r = httpx.post(daemon.url + "/v2/models/fusion/infer", content=chunks())
    assert r.status_code == 413 and "exceeds" in r.json()["error"]


def test_unknown_routes_and_models(daemon) -> None:
    r = httpx.get(daemon.url + "/v2/models/nope")
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    r = httpx.post(daemon.url + "/v2/models/nope/infer", json=v2_request(fusion_inputs()))
    assert r.status_code == 404
    # Random names from clients do not become metric labels (bounded registry).
    text = httpx.get(daemon.url + "/metrics").text
    assert 'model="nope"' not in text
    assert metric_value(text, "edge_inference_errors_total", model="_unknown", reason="unknown_model") >= 1
    assert httpx.get(daemon.url + "/v3/whatever").status_code == 404
    assert httpx.get(daemon.url + "/v2/models/fusion/infer").status_code == 405


def test_garbage_on_the_socket_does_not_hurt(daemon) -> None:
    host, port = daemon.url.removeprefix("http://").split(":")
    for junk in (b"\x00\xff" * 500 + b"\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"POST /v2/models/fusion/infer HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(junk)
            s.settimeout(5)
            try:
                s.recv(4096)
            except (TimeoutError, ConnectionResetError):
                pass
    assert httpx.get(daemon.url + "/v2/health/live").status_code == 200
    r = httpx.post(daemon.url + "/v2/models/fusion/infer", json=v2_request(fusion_inputs()))
    assert r.status_code == 200


def test_concurrent_calls_all_answered_and_counted(daemon, reference) -> None:
    before = httpx.get(daemon.url + "/metrics").text
    ok_before = metric_value(before, "edge_http_requests_total", route="infer", code="200") or 0
    statuses: list[int] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        with httpx.Client() as c:
            for i in range(5):
                r = c.post(daemon.url + "/v2/models/fusion/infer", json=v2_request(fusion_inputs(seed * 10 + i)))
                if r.status_code == 200:
                    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(1, 5)
                    np.testing.assert_array_equal(got, reference.run(fusion_inputs(seed * 10 + i))["scores"])
                with lock:
                    statuses.append(r.status_code)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Over the concurrency limit calls get 503 (retryable), never anything else.
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and len(statuses) == 30
    after = httpx.get(daemon.url + "/metrics").text
    assert metric_value(after, "edge_http_requests_total", route="infer", code="200") == ok_before + statuses.count(200)
    count = metric_value(after, "edge_inference_latency_seconds_count", model="fusion", backend="onnxruntime", precision="fp32")
    assert count is not None and count >= statuses.count(200)
    assert metric_value(after, "edge_model_active", model="fusion", version="1", backend="onnxruntime", precision="fp32") == 1.0
    assert metric_value(after, "edge_resource_available_memory_bytes") > 0
    assert metric_value(after, "edge_resource_process_rss_bytes") > 50 * 2**20  # Python + onnxruntime at least
    # prometheus_client's own process collector is there too (it reads 0 under qemu-user, hence only "is there").
    assert metric_value(after, "process_resident_memory_bytes") is not None
    assert metric_value(after, "edge_inference_errors_total", model="fusion", reason="bad_request") is not None
