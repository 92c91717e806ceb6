#!/usr/bin/env python3
"""Daemon overhead, measured side by side in one run; prints JSON.

* in-process ``EdgeModel.run`` vs the daemon's KServe v2 API over HTTP (JSON tensors and the
  binary extension) and gRPC (``tritonclient.grpc``, raw contents) on the same release and
  precision, a 1x3x224x224 FP32 input. Paired: each round calls in-process and every transport
  once (rotating order), so all share the machine's load of that moment; the overhead is the
  median over rounds of (transport - in-process), repeated ``--repeats`` times. Also p50/p99,
  calls/s sequential and with ``--workers`` client threads, and CPU time per call of the daemon
  process and of the client (load-independent where wall time is not: on a shared machine a
  call waits for a core as long as it computes);
* the transport floor: a bare grpcio server in another process answering the same 602 KB request
  bytes with an empty reply (no parsing, no model) — what any Python gRPC service pays before
  doing anything, so the gRPC overhead can be read as floor + ours;
* a 50-thread burst against the admission queue: calls/s, p99, share of 503s;
* RSS peak above idle while 8 clients send 16 MB JSON bodies at once, against the tensor bytes
  those bodies declare;
* daemon start-up time to ``/v2/health/ready``; daemon RSS idle and peak under load;
* time to serve again after side-state damage (``--side-state-only`` runs just this part).

Run: .venv/bin/python benchmarks/daemon.py [--calls 300] [--release DIR]
(``PYTHONPATH=<another checkout>`` benchmarks that checkout's daemon and runtime the same way.)
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
from collections.abc import Callable
from pathlib import Path

import numpy as np


def percentiles(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(arr, 50)), 4), "p99_ms": round(float(np.percentile(arr, 99)), 4),
            "mean_ms": round(float(arr.mean()), 4)}


def make_release(folder: Path, size: int = 224, name: str = "cnn") -> Path:
    import edge_sdk
    from edge_sdk import samples

    src = samples.save(samples.make_cnn(width=8, size=size), folder / f"{name}.onnx")
    edge_sdk.convert(src, profiles=["generic-x86_64"], output=folder / name, targets=["onnx"], calibration="random",
                     latency_runs=5, validation_limit=8, model_name=name, speed_gate=False)
    return folder / name


def inputs(seed: int, size: int = 224) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(seed).random((1, 3, size, size), dtype=np.float32)}


def json_body(x: dict[str, np.ndarray]) -> bytes:
    return json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": "FP32", "data": v.ravel().tolist()}
                                  for k, v in x.items()]}).encode()


def binary_body(x: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": v.nbytes}} for k, v in x.items()],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return head + b"".join(v.tobytes() for v in x.values()), {"Inference-Header-Content-Length": str(len(head)),
                                                               "Content-Type": "application/octet-stream"}


def side_by_side(calls: dict[str, Callable[[int], object]], rounds: int, repeats: int) -> tuple[dict, dict]:
    """Each round calls every entry once, in an order rotated per round; returns per entry
    p50/p99/mean (all repeats) and, per entry but the first (the reference), the median of its
    paired difference to the reference in each repeat."""
    names = list(calls)
    latency = {name: [] for name in names}
    paired: dict[str, list[float]] = {name: [] for name in names[1:]}
    for _ in range(repeats):
        this = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                started = time.perf_counter()
                calls[name](r)
                this[name].append(time.perf_counter() - started)
        reference = np.asarray(this[names[0]])
        for name in names[1:]:
            paired[name].append(round(float(np.median(np.asarray(this[name]) - reference)) * 1000, 3))
        for name in names:
            latency[name] += this[name]
    stats = {name: {**percentiles(lat), "throughput_per_s": round(len(lat) / sum(lat), 1)} for name, lat in latency.items()}
    return stats, {name: {"median_ms": round(float(np.median(d)), 3), "per_repeat_ms": d} for name, d in paired.items()}


def _grpc_echo_server(ports) -> None:
    """A bare grpcio server (generic handler, bytes in, empty bytes out) for the transport floor."""
    from concurrent import futures

    import grpc

    def raw(data: bytes) -> bytes:
        return data

    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 64 << 20)])
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"", request_deserializer=raw,
                                                  response_serializer=raw)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("floor.Echo", {"Echo": handler})])
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def grpc_floor(payload: bytes):
    """(call, stop): a unary call of ``payload`` to a bare grpcio server in its own process."""
    import multiprocessing

    import grpc

    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    proc = context.Process(target=_grpc_echo_server, args=(ports,), daemon=True)
    proc.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{ports.get(timeout=60)}",
                                    options=[("grpc.max_send_message_length", 64 << 20)])
    echo = channel.unary_unary("/floor.Echo/Echo", request_serializer=lambda b: b, response_deserializer=lambda b: b)

    def stop() -> None:
        channel.close()
        proc.kill()
        proc.join()

    return (lambda i: echo(payload)), stop


def cpu_per_call(call: Callable[[int], object], calls: int, daemon) -> dict[str, float]:
    """CPU milliseconds per call of the daemon process (psutil) and of this, the client, process."""
    daemon_before, client_before = sum(daemon.cpu_times()[:4]), time.process_time()
    for i in range(calls):
        call(i)
    return {"daemon": round((sum(daemon.cpu_times()[:4]) - daemon_before) * 1000 / calls, 3),
            "client": round((time.process_time() - client_before) * 1000 / calls, 3)}


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
def synced_state(release: Path, state: Path) -> str:
    """``state`` as a device leaves it after syncing ``release``: chunk store, release folder,
    active pointer (the real ReleaseStore/ChunkStore code). Returns the model name."""
    from edge_sdk.manifest import MANIFEST_NAME, SIGNATURE_NAME, load_manifest
    from edge_sdk.runtime.sync.chunk_store import ChunkStore
    from edge_sdk.runtime.sync.releases import ReleaseStore

    manifest = load_manifest(release)
    files = manifest.files()
    chunks = ChunkStore(state / "sync" / "chunks")
    for entry in files:
        data = (release / entry.path).read_bytes()
        offset = 0
        for ref in entry.chunks:
            chunks.put(ref.sha256, data[offset:offset + ref.size], ref.size)
            offset += ref.size
    store = ReleaseStore(state / "sync")
    sig = release / SIGNATURE_NAME
    store.activate(store.stage(manifest, (release / MANIFEST_NAME).read_bytes(), sig.read_bytes() if sig.exists() else None,
                               files, chunks))
    return manifest.model


def side_state_recovery(release: Path, work: Path, timeout: float, rounds: int = 3) -> dict[str, object]:
    """Seconds from a daemon restart to its first 200 infer, serving a *synced* release, after
    each kind of side-state damage done while it was stopped: a garbage outbox.db, state.json or
    both, and a flipped byte in the active release's largest file (rebuilt from the local chunk
    store). Paired: every round restarts each case once (rotating order); ``over_clean_s`` is the
    median over rounds of (case - clean), what the damage adds to a clean restart — the time from
    the damage being found to serving again, start-up itself excluded. (The full-disk cases are
    tests, tests/daemon/test_side_state.py: they need root for a tmpfs.)"""
    import shutil
    import statistics

    import httpx

    from edge_sdk.manifest import load_manifest

    def damage_outbox(state: Path) -> None:
        (state / "outbox.db").write_bytes(b"\x13not SQLite" * 512)

    def damage_state(state: Path) -> None:
        (state / "sync" / "state.json").write_text("{not json")

    def damage_active_file(state: Path) -> None:
        (active,) = (state / "sync" / "releases").iterdir()
        entry = max(load_manifest(active).files(), key=lambda e: e.size)
        data = bytearray((active / entry.path).read_bytes())
        data[len(data) // 2] ^= 0x20
        (active / entry.path).write_bytes(bytes(data))

    cases = {"clean": [], "corrupt_outbox": [damage_outbox], "corrupt_state_json": [damage_state],
             "corrupt_both": [damage_outbox, damage_state], "corrupt_active_file": [damage_active_file]}
    template = work / "side-template"
    model = synced_state(release, template)
    body = json_body(inputs(0))

    def restart_to_serving(name: str, damages, round_: int) -> float | None:
        folder = work / f"side-{name}-{round_}"
        state = folder / "state"
        shutil.copytree(template, state, symlinks=True)
        for damage in damages:
            damage(state)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = {"device_id": "bench", "state_dir": str(state), "http": {"port": port}, "grpc": {"port": 0},
                  "api": {"auth": {"anonymous_loopback": True}},
                  "models": [{"name": model, "profile": "generic-x86_64", "precision": "fp32"}],
                  "sync": {"broker": "mqtt://127.0.0.1:1", "allow_unsigned": True},
                  "policy": {"enabled": False}, "logging": {"level": "warning"}}
        (folder / "edge.yaml").write_text(json.dumps(config))
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "edge_sdk", "daemon", "--config", str(folder / "edge.yaml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while time.perf_counter() - started < timeout and proc.poll() is None:
                try:
                    if httpx.post(f"http://127.0.0.1:{port}/v2/models/{model}/infer", content=body, timeout=5,
                                  headers={"content-type": "application/json"}).status_code == 200:
                        return time.perf_counter() - started
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
            return None
        finally:
            proc.terminate()
            proc.wait(30)

    names = list(cases)
    seconds: dict[str, list[float | None]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            seconds[name].append(restart_to_serving(name, cases[name], round_))
    out: dict[str, object] = {"rounds": rounds, "goal_s": 5.0}
    for name in names:
        ok = [s for s in seconds[name] if s is not None]
        if len(ok) < rounds:
            out[name] = f"not serving within {timeout:g}s in {rounds - len(ok)} of {rounds} restarts"
            continue
        entry = {"restart_to_serving_s": round(statistics.median(ok), 3)}
        if name != "clean" and all(s is not None for s in seconds["clean"]):
            entry["over_clean_s"] = round(statistics.median(s - c for s, c in zip(ok, seconds["clean"])), 3)
        out[name] = entry
    return out


def start_daemon(work: Path, models: list[dict], api: dict, ready_timeout: float) -> tuple[subprocess.Popen, dict]:
    """The daemon as a real process; returns it and {url, grpc, token}."""
    import httpx

    state = work / "state"
    config = {"device_id": "bench", "state_dir": str(state), "http": {"port": 0}, "grpc": {"port": 0},
              "api": api, "models": models, "sync": {"allow_unsigned": True},  # (the generated releases are unsigned)
              "policy": {"enabled": False}, "logging": {"level": "warning"}}
    (work / "edge.yaml").write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "edge_sdk", "daemon", "--config", str(work / "edge.yaml")],
                            stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "wb"))
    deadline = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited: {(work / 'daemon.log').read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"daemon not ready within {ready_timeout:g}s: {(work / 'daemon.log').read_text()}")
        port = state / "http.port"
        if port.exists() and port.read_text().strip():
            url = f"http://127.0.0.1:{port.read_text().strip()}"
            try:
                if httpx.get(url + "/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        time.sleep(0.01)
    token = (state / "api-tokens").read_text().split()[-1]
    return proc, {"url": url, "grpc": f"127.0.0.1:{(state / 'grpc.port').read_text().strip()}", "token": token}


def stop_daemon(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def rss_peak_during(pid: int, work) -> tuple[float, float]:
    """(idle RSS, peak RSS while ``work()`` runs), in bytes."""
    import psutil

    ps = psutil.Process(pid)
    idle = ps.memory_info().rss
    peak = [idle]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(ps.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:  # a failed run must not leave the sampler thread keeping the process alive
        stop.set()
        sampler.join()
    return idle, max(peak)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the paired rounds")
    parser.add_argument("--release", type=Path, help="a release taking image [1, 3, 224, 224] -> logits")
    parser.add_argument("--burst", type=int, default=2000, help="calls of the 50-thread burst")
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds the daemon may take to be ready")
    parser.add_argument("--side-state-only", action="store_true", help="only the side-state recovery section")
    args = parser.parse_args()
    if args.side_state_only:
        work = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
        release = args.release or make_release(work)
        print(json.dumps({"side_state_recovery_s": side_state_recovery(release, work, args.ready_timeout)}, indent=2))
        return

    import httpx
    import psutil
    import tritonclient.grpc as tg

    import edge_sdk

    work = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    release = args.release or make_release(work)
    feeds = [inputs(i) for i in range(16)]

    # In-process, same release/precision/threads the daemon uses; kept loaded for the paired rounds.
    model = edge_sdk.EdgeModel.load(release, profile="generic-x86_64", precision="fp32", monitor=False)

    def run_in_process(i: int) -> None:
        model.run(feeds[i % 16])

    for i in range(20):
        run_in_process(i)
    tput_in_conc = concurrent(run_in_process, args.calls, args.workers)
    want = model.run(feeds[0])["logits"]

    started = time.perf_counter()
    proc, daemon = start_daemon(work, [{"name": "cnn", "release": str(release), "profile": "generic-x86_64",
                                        "precision": "fp32"}], {"max_concurrent_infer": 4, "max_queue": 64}, args.ready_timeout)
    startup_s = time.perf_counter() - started
    auth = {"Authorization": f"Bearer {daemon['token']}"}
    grpc_auth = {"authorization": auth["Authorization"]}
    try:
        time.sleep(1.0)
        bodies = [json_body(x) for x in feeds]
        bins = [binary_body(x) for x in feeds]
        grpc_feeds = []
        for x in feeds:
            item = tg.InferInput("image", list(x["image"].shape), "FP32")
            item.set_data_from_numpy(x["image"])
            grpc_feeds.append([item])
        local = threading.local()

        def http_client() -> httpx.Client:
            if getattr(local, "http", None) is None:
                local.http = httpx.Client(base_url=daemon["url"], headers=auth, timeout=120)  # (a loaded machine is slow)
            return local.http

        def grpc_client():
            if getattr(local, "grpc", None) is None:
                local.grpc = tg.InferenceServerClient(daemon["grpc"])
            return local.grpc

        def call_json(i: int) -> None:
            r = http_client().post("/v2/models/cnn/infer", content=bodies[i % 16], headers={"Content-Type": "application/json"})
            if r.status_code != 200:
                raise RuntimeError(r.text)

        def call_bin(i: int) -> None:
            body, headers = bins[i % 16]
            r = http_client().post("/v2/models/cnn/infer", content=body, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(r.text)

        def call_grpc(i: int):
            return grpc_client().infer("cnn", grpc_feeds[i % 16], headers=grpc_auth)

        # Same numbers as in-process (a benchmark of wrong answers is worthless).
        r = http_client().post("/v2/models/cnn/infer", content=bodies[0], headers={"Content-Type": "application/json"})
        got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(want.shape)
        if not np.array_equal(got, want) or not np.array_equal(call_grpc(0).as_numpy("logits"), want):
            raise SystemExit("the daemon's answer differs from in-process EdgeModel.run")
        transports = {"http_json": call_json, "http_binary": call_bin, "grpc": call_grpc}
        floor_call, stop_floor = grpc_floor(feeds[0]["image"].tobytes())  # the request's tensor bytes
        for call in [*transports.values(), floor_call]:
            for i in range(20):
                call(i)
        try:
            results, paired = side_by_side({"in_process": run_in_process, **transports, "grpc_floor": floor_call},
                                           args.calls, args.repeats)
        finally:
            stop_floor()
        floor = results.pop("grpc_floor")
        del paired["grpc_floor"]
        daemon_ps = psutil.Process(proc.pid)
        cpu = {name: cpu_per_call(call, args.calls // 3, daemon_ps)
               for name, call in {"in_process": run_in_process, **transports}.items()}
        idle_rss = peak_rss = 0
        for name, call in transports.items():
            idle_rss, peak = rss_peak_during(proc.pid, lambda: results[name].__setitem__(
                "throughput_concurrent_per_s", round(concurrent(call, args.calls, args.workers), 1)))
            peak_rss = max(peak_rss, peak)

        # A burst of 50 threads against the queue (64 deep): nothing refused up to its bound.
        codes: list[int] = []
        burst_lat: list[float] = []
        lock = threading.Lock()

        def burst_call(i: int) -> None:
            body, headers = bins[i % 16]
            t = time.perf_counter()
            status = http_client().post("/v2/models/cnn/infer", content=body, headers=headers, timeout=120).status_code
            with lock:
                codes.append(status)
                burst_lat.append(time.perf_counter() - t)

        burst_tput = concurrent(burst_call, args.burst, 50)
    finally:
        stop_daemon(proc)
        model.close()

    # Memory: 8 clients at once, each a 16 MB JSON body (a 1x3x512x512 FP32 tensor).
    big = make_release(work, 512, "cnn512")
    x = inputs(0, 512)["image"]
    big_body = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
    (work / "state" / "http.port").unlink(missing_ok=True)
    proc, daemon = start_daemon(work, [{"name": "cnn512", "release": str(big), "profile": "generic-x86_64",
                                        "precision": "fp32"}], {"max_body_bytes": 17_000_000}, args.ready_timeout)
    try:
        def eight() -> None:
            def send(_: int) -> None:
                r = httpx.post(daemon["url"] + "/v2/models/cnn512/infer", content=big_body, timeout=300,
                               headers={"Authorization": f"Bearer {daemon['token']}"})
                if r.status_code != 200:
                    raise RuntimeError(r.text)
            concurrent(send, 8, 8)

        eight()  # warm up: the model's buffers for concurrent runs belong to the idle figure
        time.sleep(0.5)
        mem_idle, mem_peak = rss_peak_during(proc.pid, eight)
    finally:
        stop_daemon(proc)

    inproc = results.pop("in_process")
    result = {
        "model": "generated CNN (width 8), image 1x3x224x224 FP32 -> logits 1x10, onnxruntime fp32",
        "calls": args.calls, "repeats": args.repeats, "workers": args.workers, "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "in_process": {**inproc, "throughput_concurrent_per_s": round(tput_in_conc, 1)},
        **results,
        "overhead_ms_p50_paired": paired,
        "grpc_transport_floor": {**floor, "grpc_overhead_beyond_floor_ms": round(paired["grpc"]["median_ms"] - floor["p50_ms"], 3)},
        "ratios_p50_over_in_process": {k: round(v["p50_ms"] / inproc["p50_ms"], 2) for k, v in results.items()},
        "cpu_ms_per_call": cpu,
        "server_cpu_overhead_ms_per_call": {k: round(cpu[k]["daemon"] - cpu["in_process"]["client"], 3) for k in results},
        "burst_50_threads": {"calls": len(codes), "throughput_per_s": round(burst_tput, 1),
                             **percentiles(burst_lat), "share_503": round(codes.count(503) / len(codes), 4),
                             "other_errors": len([c for c in codes if c not in (200, 503)])},
        "memory_8x16MB_json": {"body_mb": round(len(big_body) / 1e6, 1), "declared_tensor_mb": round(8 * x.nbytes / 2**20, 1),
                               "rss_growth_mb": round((mem_peak - mem_idle) / 2**20, 1),
                               "growth_over_declared": round((mem_peak - mem_idle) / (8 * x.nbytes), 2)},
        "daemon": {"startup_to_ready_s": round(startup_s, 3), "rss_idle_mb": round(idle_rss / 2**20, 1),
                   "rss_peak_under_load_mb": round(peak_rss / 2**20, 1)},
    }
    result["side_state_recovery_s"] = side_state_recovery(release, work, args.ready_timeout)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
