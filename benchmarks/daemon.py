#!/usr/bin/env python3
"""Daemon overhead, measured side by side in one run; prints JSON.

* in-process ``EdgeModel.run`` vs the daemon's KServe v2 HTTP API (JSON tensors and the binary
  extension) on the same release and precision: p50/p99 latency, sequential and concurrent
  throughput, and the ratios HTTP / in-process;
* daemon start-up time to ``/v2/health/ready``; daemon RSS idle and peak under load.

Run: .venv/bin/python benchmarks/daemon.py [--calls 300] [--release DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def percentiles(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(arr, 50)), 4), "p99_ms": round(float(np.percentile(arr, 99)), 4),
            "mean_ms": round(float(arr.mean()), 4)}


def make_release(folder: Path) -> Path:
    import edge_sdk
    from edge_sdk import samples

    src = samples.save(samples.make_multimodal(), folder / "fusion.onnx")
    edge_sdk.convert(src, profiles=["generic-x86_64"], output=folder / "release", targets=["onnx"], calibration="random",
                     latency_runs=5, validation_limit=8, model_name="fusion")
    return folder / "release"


def inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.random((1, 3, 32, 32), dtype=np.float32), "audio": rng.standard_normal((1, 4, 40)).astype(np.float32),
            "imu": rng.standard_normal((1, 6)).astype(np.float32)}


def json_body(x: dict[str, np.ndarray]) -> bytes:
    return json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": "FP32", "data": v.ravel().tolist()}
                                  for k, v in x.items()]}).encode()


def binary_body(x: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": v.nbytes}} for k, v in x.items()],
                       "outputs": [{"name": "scores", "parameters": {"binary_data": True}}]}).encode()
    return head + b"".join(v.tobytes() for v in x.values()), {"Inference-Header-Content-Length": str(len(head)),
                                                               "Content-Type": "application/octet-stream"}


def timed(fn, calls: int) -> tuple[list[float], float]:
    lat = []
    started = time.perf_counter()
    for i in range(calls):
        t = time.perf_counter()
        fn(i)
        lat.append(time.perf_counter() - t)
    return lat, calls / (time.perf_counter() - started)


def concurrent(fn, calls: int, workers: int) -> float:
    """Calls per second with ``workers`` threads; any failed call fails the benchmark (a
    throughput of errors is not a throughput)."""
    per = calls // workers
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            for i in range(per):
                fn(w * per + i)
        except Exception as exc:  # re-raised below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} of {workers} worker threads failed; first: {errors[0]!r}") from errors[0]
    return per * workers / elapsed


# --- issue 15: time to serve again after side-state damage --------------------------------------
def side_state_recovery(release: Path, work: Path, timeout: float) -> dict[str, float | str]:
    """Seconds from daemon start to the first 200 infer, serving a *synced* release (no local
    one), with the outbox, state.json or both corrupt; ``clean`` is the baseline (the full-disk case is a
    test: tests/daemon/test_side_state.py, as it needs root for a tmpfs)."""
    import shutil

    import httpx

    def damage_outbox(state: Path) -> None:
        (state / "outbox.db").write_bytes(b"\x13not SQLite" * 512)

    def damage_state(state: Path) -> None:
        (state / "sync" / "state.json").write_text("{not json")

    cases = {"clean": [], "corrupt_outbox": [damage_outbox], "corrupt_state_json": [damage_state],
             "corrupt_both": [damage_outbox, damage_state]}
    body = json_body(inputs(0))
    out: dict[str, float | str] = {}
    for name, damages in cases.items():
        folder = work / f"side-{name}"
        state = folder / "state"
        shutil.copytree(release, state / "sync" / "releases" / "fusion@v1")
        os.symlink("releases/fusion@v1", state / "sync" / "current")
        for damage in damages:
            damage(state)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = {"device_id": "bench", "state_dir": str(state), "http": {"port": port},
                  "models": [{"name": "fusion", "profile": "generic-x86_64", "precision": "fp32"}],
                  "sync": {"broker": "mqtt://127.0.0.1:1", "allow_unsigned": True},
                  "policy": {"enabled": False}, "logging": {"level": "warning"}}
        (folder / "edge.yaml").write_text(json.dumps(config))
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "edge_sdk", "daemon", "--config", str(folder / "edge.yaml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while time.perf_counter() - started < timeout and proc.poll() is None:
                try:
                    if httpx.post(f"http://127.0.0.1:{port}/v2/models/fusion/infer", content=body, timeout=5,
                                  headers={"content-type": "application/json"}).status_code == 200:
                        out[name] = round(time.perf_counter() - started, 3)
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            else:
                out[name] = f"not serving (exit {proc.poll()})"
        finally:
            proc.terminate()
            proc.wait(30)
    if isinstance(out.get("clean"), float):
        out["worst_over_clean"] = round(max(v for v in out.values() if isinstance(v, float)) / out["clean"], 2)
    out["goal_s"] = 5.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--release", type=Path)
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds the daemon may take to be ready")
    args = parser.parse_args()

    import httpx
    import psutil

    import edge_sdk

    work = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    release = args.release or make_release(work)
    feeds = [inputs(i) for i in range(16)]

    # In-process, same release/precision/threads the daemon uses.
    model = edge_sdk.EdgeModel.load(release, profile="generic-x86_64", precision="fp32", monitor=False)
    for i in range(20):
        model.run(feeds[i % 16])
    lat_in, tput_in = timed(lambda i: model.run(feeds[i % 16]), args.calls)
    tput_in_conc = concurrent(lambda i: model.run(feeds[i % 16]), args.calls, args.workers)
    want = model.run(feeds[0])["scores"]
    model.close()

    # The daemon, as a real process.
    config = {"device_id": "bench", "state_dir": str(work / "state"), "http": {"port": 0, "max_concurrent_infer": 64},
              "models": [{"name": "fusion", "release": str(release), "profile": "generic-x86_64", "precision": "fp32"}],
              "policy": {"enabled": False}, "logging": {"level": "warning"}}
    (work / "edge.yaml").write_text(json.dumps(config))
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "edge_sdk", "daemon", "--config", str(work / "edge.yaml")],
                            stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "wb"))
    port_file = work / "state" / "http.port"
    url = None
    deadline = time.monotonic() + args.ready_timeout
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited: {(work / 'daemon.log').read_text()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"daemon not ready within {args.ready_timeout:g}s: {(work / 'daemon.log').read_text()}")
            if port_file.exists() and port_file.read_text().strip():
                url = f"http://127.0.0.1:{port_file.read_text().strip()}"
                try:
                    if httpx.get(url + "/v2/health/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.01)
        startup_s = time.perf_counter() - started
        ps = psutil.Process(proc.pid)
        time.sleep(1.0)
        rss_idle = ps.memory_info().rss
        client = httpx.Client(base_url=url)
        bodies = [json_body(x) for x in feeds]
        bins = [binary_body(x) for x in feeds]

        def call_json(i: int) -> None:
            r = client.post("/v2/models/fusion/infer", content=bodies[i % 16], headers={"Content-Type": "application/json"})
            if r.status_code != 200:
                raise RuntimeError(r.text)

        def call_bin(i: int) -> None:
            body, headers = bins[i % 16]
            r = client.post("/v2/models/fusion/infer", content=body, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(r.text)

        # Same numbers as in-process (a benchmark of wrong answers is worthless).
        r = client.post("/v2/models/fusion/infer", content=bodies[0], headers={"Content-Type": "application/json"})
        got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(want.shape)
        if not np.array_equal(got, want):
            raise SystemExit(f"the daemon's answer differs from in-process EdgeModel.run: {got} != {want}")
        for i in range(20):
            call_json(i)
            call_bin(i)
        lat_json, tput_json = timed(call_json, args.calls)
        lat_bin, tput_bin = timed(call_bin, args.calls)
        peak = [rss_idle]
        stop = threading.Event()

        def sample_rss() -> None:
            while not stop.is_set():
                peak.append(ps.memory_info().rss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample_rss)
        sampler.start()
        clients = [httpx.Client(base_url=url) for _ in range(args.workers)]

        def call_conc(i: int) -> None:
            body, headers = bins[i % 16]
            r = clients[i * args.workers // args.calls % args.workers].post("/v2/models/fusion/infer", content=body, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(r.text)

        try:
            tput_bin_conc = concurrent(call_conc, args.calls, args.workers)
        finally:  # a failed run must not leave the sampler thread keeping the process alive
            stop.set()
            sampler.join()
            for c in clients:
                c.close()
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    inproc = percentiles(lat_in)
    http_json = percentiles(lat_json)
    http_bin = percentiles(lat_bin)
    result = {
        "model": "multimodal fusion sample (image 1x3x32x32 + audio 1x4x40 + imu 1x6), onnxruntime fp32",
        "calls": args.calls, "workers": args.workers, "cpu_count": os.cpu_count(),
        "in_process": {**inproc, "throughput_per_s": round(tput_in, 1), "throughput_concurrent_per_s": round(tput_in_conc, 1)},
        "http_json": {**http_json, "throughput_per_s": round(tput_json, 1)},
        "http_binary": {**http_bin, "throughput_per_s": round(tput_bin, 1), "throughput_concurrent_per_s": round(tput_bin_conc, 1)},
        "ratios": {
            "http_json_p50_over_in_process": round(http_json["p50_ms"] / inproc["p50_ms"], 2),
            "http_binary_p50_over_in_process": round(http_bin["p50_ms"] / inproc["p50_ms"], 2),
            "http_binary_p99_over_in_process": round(http_bin["p99_ms"] / inproc["p99_ms"], 2),
            "http_json_overhead_ms_p50": round(http_json["p50_ms"] - inproc["p50_ms"], 3),
            "http_binary_overhead_ms_p50": round(http_bin["p50_ms"] - inproc["p50_ms"], 3),
            "throughput_http_binary_concurrent_over_in_process_concurrent": round(tput_bin_conc / tput_in_conc, 3),
        },
        "daemon": {"startup_to_ready_s": round(startup_s, 3), "rss_idle_mb": round(rss_idle / 2**20, 1),
                   "rss_peak_under_load_mb": round(max(peak) / 2**20, 1)},
    }
    result["side_state_recovery_s"] = side_state_recovery(release, work, args.ready_timeout)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
