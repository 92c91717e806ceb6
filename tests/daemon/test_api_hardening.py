"""The local API under hostile or careless clients (issue 15: starvation, no authentication,
non-finite outputs): each test reproduces one failure measured on the old daemon.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from edge_sdk import samples

from .conftest import DaemonProcess, _convert, fusion_inputs, metric_value, v2_request, write_config

LIMITS = {"max_concurrent_infer": 4, "max_queue": 64, "header_timeout_s": 2, "body_timeout_s": 3}


def start(folder: Path, models: list[dict], **sections) -> DaemonProcess:
    proc = DaemonProcess(write_config(folder, models, **sections)).ready()
    proc.host, proc.port = "127.0.0.1", int(proc.url.rsplit(":", 1)[1])
    return proc


def stop(proc: DaemonProcess) -> None:
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    proc.kill()


@pytest.fixture(scope="module")
def daemon(fusion_release: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("hardening")
    proc = start(folder, [{"name": "fusion", "release": str(fusion_release), "precision": "fp32"}],
                 api=LIMITS, grpc={"unix_socket": str(folder / "grpc.sock")})
    proc.grpc_socket = folder / "grpc.sock"
    proc.tokens_file = folder / "state" / "api-tokens"
    yield proc
    stop(proc)


def headers(daemon, **extra) -> dict[str, str]:
    return {"Authorization": f"Bearer {daemon.token}", **extra}


def infer(daemon, client: httpx.Client | None = None, seed: int = 0, **kwargs) -> httpx.Response:
    post = (client or httpx).post
    return post(f"{daemon.url}/v2/models/fusion/infer", json=v2_request(fusion_inputs(seed)), headers=headers(daemon),
                timeout=30, **kwargs)


def test_slow_bodies_do_not_hold_the_inference_slots(daemon) -> None:
    # Old daemon: the slot was taken before the body was read; 4 such clients blocked every call.
    slow = []
    for _ in range(6):  # more than max_concurrent_infer
        s = socket.create_connection((daemon.host, daemon.port))
        s.sendall(f"POST /v2/models/fusion/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {daemon.token}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{".encode())
        slow.append(s)
    started = time.monotonic()
    r = infer(daemon)
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < LIMITS["body_timeout_s"]  # served while the slow bodies are still open
    for s in slow:  # ... and each slow body gets 408 once api.body_timeout_s has passed
        s.settimeout(15)
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
        s.close()
    text = httpx.get(daemon.url + "/metrics", headers=headers(daemon)).text
    assert metric_value(text, "edge_api_timeouts_total", phase="body") >= 6


def test_a_408_or_413_reaches_a_client_still_sending_its_body(daemon) -> None:
    # Old daemon: it closed the connection with the body unread, so the kernel answered the client's
    # next bytes with a reset (and, with unread bytes at close, dropped what was not yet sent): a
    # client still writing its body got a broken pipe, and on a real network often no 408/413 at all.
    # Now the connection half-closes after the answer and discards the rest of the body.
    def request(length: int, first: bytes) -> socket.socket:
        s = socket.create_connection((daemon.host, daemon.port), timeout=15)
        s.sendall(f"POST /v2/models/fusion/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {daemon.token}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode() + first)
        return s

    def keep_sending_then_read(s: socket.socket, pieces: int) -> bytes:
        for _ in range(pieces):  # old daemon: BrokenPipeError / ConnectionResetError here
            s.sendall(b" " * 4096)
            time.sleep(0.01)
        reply = b""
        while chunk := s.recv(65536):  # an orderly end (FIN), not a reset
            reply += chunk
        s.close()
        return reply

    s = request(1_000_000, b'{"inputs": [')
    time.sleep(LIMITS["body_timeout_s"] + 1)  # the 408 is sent meanwhile
    reply = keep_sending_then_read(s, 50)
    assert reply.startswith(b"HTTP/1.1 408") and b"api.body_timeout_s" in reply, reply[:200]
    s = request(20 * 1024 * 1024, b"")  # past api.max_body_bytes: refused on its Content-Length alone
    reply = keep_sending_then_read(s, 250)
    assert reply.startswith(b"HTTP/1.1 413") and b"exceeds the" in reply, reply[:200]
    assert infer(daemon).status_code == 200


def test_half_open_connections_do_not_take_the_api_down(daemon) -> None:
    # Old daemon: 300 idle connections passed uvicorn's limit_concurrency (256): 503 for everyone.
    idle = []
    for i in range(300):
        s = socket.create_connection((daemon.host, daemon.port))
        if i % 2:
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
        idle.append(s)
    try:
        r = httpx.get(daemon.url + "/v2/health/live", timeout=10)
        assert r.status_code == 200
        assert infer(daemon).status_code == 200
        # The server closes them once api.header_timeout_s has passed.
        for s in idle:
            s.settimeout(15)
            assert s.recv(1024) == b""
    finally:
        for s in idle:
            s.close()
    text = httpx.get(daemon.url + "/metrics", headers=headers(daemon)).text
    assert metric_value(text, "edge_api_timeouts_total", phase="header") >= 300


@pytest.mark.slow
def test_a_burst_from_50_threads_is_queued_not_refused(daemon) -> None:
    # Old daemon: 2,000 requests from 50 threads → 91 % 503, no queue, no Retry-After.
    statuses: list[int] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        with httpx.Client() as c:
            for i in range(40):
                r = infer(daemon, c, seed=worker)
                with lock:
                    statuses.append(r.status_code)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(statuses) == 2000 and statuses.count(200) == 2000  # 50 clients fit in the 64-deep queue


def test_beyond_the_queue_calls_get_503_with_retry_after(fusion_release: Path, tmp_path: Path) -> None:
    proc = start(tmp_path, [{"name": "fusion", "release": str(fusion_release), "precision": "fp32"}],
                 api={"max_concurrent_infer": 1, "max_queue": 2})
    try:
        results: list[httpx.Response] = []
        lock = threading.Lock()

        def client(worker: int) -> None:
            with httpx.Client() as c:
                for _ in range(10):
                    r = infer(proc, c, seed=worker)
                    with lock:
                        results.append(r)

        threads = [threading.Thread(target=client, args=(w,)) for w in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        refused = [r for r in results if r.status_code == 503]
        assert len(results) == 120 and {r.status_code for r in results} <= {200, 503}
        assert refused and all(int(r.headers["retry-after"]) >= 1 and "api.max_queue" in r.json()["error"]
                               for r in refused)
        # Refused only beyond the queue: each refusal saw the slot busy and both queue places taken.
        assert {r.json()["error"].split(" (")[0] for r in refused} == {"overloaded: 1 calls running and 2 waiting"}
        assert sum(r.status_code == 200 for r in results) > 3  # and queued calls were served
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def big_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("big-input")
    return _convert(samples.save(samples.make_cnn(width=4, size=512), root / "cnn512.onnx"), root / "release", 1, "cnn512")


def test_eight_concurrent_16mb_json_bodies_stay_within_twice_their_tensors(big_release: Path, tmp_path: Path) -> None:
    # Old daemon: RSS 120 → 466 MB (json.loads holds ~10x the tensor per body).
    proc = start(tmp_path, [{"name": "cnn512", "release": str(big_release), "precision": "fp32"}],
                 api={"max_body_bytes": 17_000_000, "max_concurrent_infer": 4})
    try:
        x = np.random.default_rng(0).random((1, 3, 512, 512), dtype=np.float32)
        body = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        assert 14_000_000 < len(body) < 17_000_000
        declared = 8 * x.nbytes
        statuses: list[int] = []

        def send() -> None:
            statuses.append(httpx.post(f"{proc.url}/v2/models/cnn512/infer", content=body, headers=headers(proc),
                                       timeout=120).status_code)

        def burst() -> None:
            senders = [threading.Thread(target=send) for _ in range(8)]
            for t in senders:
                t.start()
            for t in senders:
                t.join()

        burst()  # warm up: the model's buffers for 4 concurrent runs are part of the idle figure
        ps = psutil.Process(proc.proc.pid)
        time.sleep(0.5)
        idle = ps.memory_info().rss
        peak = [idle]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(ps.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        burst()
        done.set()
        sampler.join()
        assert statuses == [200] * 16
        grown = max(peak) - idle
        # The goal is < 2x (benchmarks/daemon.py measures it). Measured here: 1.0-1.4x; with the body
        # parsed whole by json.loads, as the old daemon did, 12.5x. 3x leaves room for a loaded machine.
        assert grown < 3 * declared, f"RSS grew {grown / 2**20:.1f} MiB for {declared / 2**20:.1f} MiB of tensors"
    finally:
        stop(proc)


def test_nan_and_inf_outputs_answer_valid_json_on_a_kept_alive_connection(daemon) -> None:
    # Old daemon: 500 "internal error: ValueError" and the keep-alive connection dropped.
    x = fusion_inputs(1)
    x["imu"][0, 0] = np.nan
    x["audio"][0, 0, 0] = np.inf
    body = json.dumps(v2_request(x)).encode()  # Python's json writes NaN/Infinity tokens
    request = (f"POST /v2/models/fusion/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {daemon.token}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection((daemon.host, daemon.port), timeout=30) as s:
        reader = s.makefile("rb")
        for _ in range(2):  # the same connection answers twice
            s.sendall(request)
            status = reader.readline()
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            payload = reader.read(length)
            assert status.startswith(b"HTTP/1.1 200"), (status, payload)

            def strict(token: str):
                raise AssertionError(f"not strict JSON: {token}")

            out = json.loads(payload, parse_constant=strict)["outputs"][0]
            values = np.asarray(out["data"], np.float32)  # "NaN" strings read back as NaN
            assert not np.isfinite(values).all()


def test_a_foreign_origin_or_host_is_refused_even_with_a_token(daemon) -> None:
    # Old daemon: a text/plain POST with a foreign Origin got 200 (CSRF / DNS rebinding from a browser).
    body = json.dumps(v2_request(fusion_inputs()))
    url = f"{daemon.url}/v2/models/fusion/infer"
    r = httpx.post(url, content=body, headers=headers(daemon, **{"Content-Type": "text/plain", "Origin": "http://evil.example"}))
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]
    r = httpx.post(url, content=body, headers=headers(daemon, **{"Content-Type": "text/plain"}), )
    assert r.status_code == 200
    r = httpx.get(f"{daemon.url}/v2/models/fusion", headers=headers(daemon, **{"Sec-Fetch-Site": "cross-site"}))
    assert r.status_code == 403
    r = httpx.get(f"{daemon.url}/v2/models/fusion", headers=headers(daemon, Host=f"evil.example:{daemon.port}"))
    assert r.status_code == 403 and "Host" in r.json()["error"]
    r = httpx.get(f"{daemon.url}/v2/models/fusion", headers=headers(daemon, Host=f"localhost:{daemon.port}"))
    assert r.status_code == 200


def test_no_token_no_service_and_the_tokens_file_is_private(daemon) -> None:
    assert httpx.get(f"{daemon.url}/v2/models/fusion").status_code == 401
    r = infer(daemon, headers={"Authorization": "Bearer wrong"}) if False else \
        httpx.post(f"{daemon.url}/v2/models/fusion/infer", json=v2_request(fusion_inputs()),
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(f"{daemon.url}/metrics").status_code == 401  # api.auth.metrics: token (default)
    assert httpx.get(f"{daemon.url}/v2/health/ready").json() == {"ready": True}  # probes need no token
    assert (daemon.tokens_file.stat().st_mode & 0o777) == 0o600
    # The gRPC Unix socket: its permissions are the authentication (no token needed).
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(f"unix:{daemon.grpc_socket}") as channel:
        assert service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelReady(
            service_pb2.ModelReadyRequest(name="fusion")).ready
    assert (daemon.grpc_socket.stat().st_mode & 0o777) == 0o660


NOBODY_SCRIPT = r"""
import http.client, json, socket, sys
port, tokens, sock = int(sys.argv[1]), sys.argv[2], sys.argv[3]
out = {}
c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
c.request("GET", "/v2/models/fusion"); out["metadata"] = c.getresponse().status
c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
c.request("POST", "/v2/models/fusion/infer", body="{}", headers={"Content-Type": "application/json"})
out["infer"] = c.getresponse().status
try:
    open(tokens).read(); out["tokens"] = "read"
except PermissionError:
    out["tokens"] = "denied"
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sock); out["socket"] = "connected"
except PermissionError:
    out["socket"] = "denied"
print(json.dumps(out))
"""


def test_uid_nobody_can_neither_call_nor_read_a_token(daemon) -> None:
    # Old daemon: uid nobody could infer and read metadata over loopback.
    from needs import need_binary, need_root

    need_root("switching to uid nobody")
    need_binary("python3", "/usr/bin/python3")  # the venv's interpreter may live where nobody cannot read
    run = subprocess.run(["/usr/bin/python3", "-c", NOBODY_SCRIPT, str(daemon.port), str(daemon.tokens_file),
                          str(daemon.grpc_socket)], user="nobody", group="nogroup", capture_output=True, text=True,
                         timeout=60, cwd="/")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"metadata": 401, "infer": 401, "tokens": "denied", "socket": "denied"}
