"""Release sync figures, measured side by side in one run against a real Mosquitto; prints JSON.

* ``update``: bytes a device moves for an update that re-trains only the last layer, vs the full
  size of its files (goal ≤ 0.15×), and the time of the first full sync and of the update.
* ``chunking``: FastCDC vs fixed-size chunks: bytes an update must move under each, for the same
  last-layer change with and without a small insertion near the start of the file (metadata
  growing by a few bytes shifts every offset after it, which defeats fixed-size chunks).
* ``fleet``: N device clients in one process fetching one ~10 MB release from one broker: total
  time, bytes through the broker, per-device p50/p95.

Run: ``python benchmarks/sync.py [--devices 100] [--width 192]`` (needs ``mosquitto`` on PATH).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import onnx

import edge_sdk
from edge_sdk import samples
from edge_sdk.chunking import chunk_bytes, sha256_bytes
from edge_sdk.cloud.publish import publish_release
from edge_sdk.manifest import load_manifest
from edge_sdk.runtime.sync.client import SyncClient, SyncConfig, select_variants
from edge_sdk.signing import generate_keypair

PROFILE = "intel-nuc"
FLEET = "bench"


class Broker:
    def __init__(self, folder: Path) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        conf = folder / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence false\n"
                        f"max_queued_messages 100000\nmax_inflight_messages 100\n")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


def fixed_chunks(data: bytes, size: int = 64 * 1024) -> list[tuple[str, int]]:
    return [(sha256_bytes(data[i:i + size]), len(data[i:i + size])) for i in range(0, len(data), size)]


def cdc_chunks(data: bytes) -> list[tuple[str, int]]:
    return [(c.sha256, c.size) for c in chunk_bytes(data)]


def moved(old: bytes, new: bytes, chunker) -> int:
    have = {sha for sha, _ in chunker(old)}
    return sum(size for sha, size in dict(chunker(new)).items() if sha not in have)


def chunking_comparison(base: onnx.ModelProto, updated: onnx.ModelProto) -> dict:
    old = base.SerializeToString()
    new = updated.SerializeToString()
    shifted_model = onnx.ModelProto.FromString(new)
    shifted_model.doc_string = "retrained on site 7, 2026-11-23 (build 4711)"  # serialized before the graph
    shifted = shifted_model.SerializeToString()
    out = {"file_bytes": len(new)}
    for name, data in (("last_layer", new), ("last_layer_plus_metadata_shift", shifted)):
        cdc, fixed = moved(old, data, cdc_chunks), moved(old, data, fixed_chunks)
        out[name] = {"fastcdc_bytes": cdc, "fixed_64k_bytes": fixed,
                     "fastcdc_ratio": round(cdc / len(data), 4), "fixed_ratio": round(fixed / len(data), 4),
                     "fixed_over_fastcdc": round(fixed / max(cdc, 1), 2)}
    return out


def device_config(broker: Broker, root: Path, pub: Path, device: str, self_test: bool = True) -> SyncConfig:
    return SyncConfig(broker=broker.url, fleet=FLEET, device=device, root=root, profile=PROFILE, public_key=pub,
                      self_test=self_test, stall_timeout_s=10.0, sync_timeout_s=600.0)


def update_figures(broker: Broker, work: Path, pub: Path) -> dict:
    client = SyncClient(device_config(broker, work / "device", pub, "bench-dev"))
    client.transport.start()
    try:
        client.transport.wait_connected(10)
        full = client.sync("cnn", 1)
        update = client.sync("cnn", 2)
    finally:
        client.transport.stop()
    for r in (full, update):
        if r.status != "activated":
            raise RuntimeError(f"sync failed: {r.reason}")
    return {
        "device_files_bytes": update.bytes_total,
        "full_sync": {"bytes_moved": full.bytes_fetched, "chunks": full.chunks_fetched, "seconds": full.duration_s},
        "last_layer_update": {"bytes_moved": update.bytes_fetched, "chunks_moved": update.chunks_fetched,
                              "chunks_reused": update.chunks_reused, "seconds": update.duration_s,
                              "ratio_vs_full": round(update.bytes_fetched / update.bytes_total, 4)},
        "goal_ratio": 0.15,
    }


def fleet_figures(broker: Broker, work: Path, pub: Path, devices: int, fleet_version: int) -> dict:
    clients = [SyncClient(device_config(broker, work / f"fleet-{i}", pub, f"dev-{i:04d}", self_test=False))
               for i in range(devices)]
    for c in clients:
        c.transport.start()
    for c in clients:
        if not c.transport.wait_connected(30):
            raise RuntimeError("a fleet client could not connect")
    durations: list[float] = []
    results = []
    lock = threading.Lock()

    def run(c: SyncClient) -> None:
        r = c.sync("cnn", fleet_version, timeout=900)
        with lock:
            results.append(r)
            durations.append(r.duration_s)

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = time.monotonic() - started
    for c in clients:
        c.transport.stop()
    ok = [r for r in results if r.status == "activated"]
    q = statistics.quantiles(durations, n=20) if len(durations) >= 2 else durations * 19
    return {
        "devices": devices, "activated": len(ok), "release_bytes_per_device": ok[0].bytes_total if ok else None,
        "total_seconds": round(total, 2), "bytes_through_broker": sum(r.bytes_fetched for r in results),
        "per_device_seconds_p50": round(statistics.median(durations), 2), "per_device_seconds_p95": round(q[18], 2),
        "aggregate_mb_per_s": round(sum(r.bytes_fetched for r in results) / total / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--width", type=int, default=192, help="CNN width (192 ≈ 10 MB of artifacts)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-sdk-sync-bench-"))
    broker = Broker(work)
    try:
        key, pub = generate_keypair(work / "k.key")
        base = samples.make_cnn(width=args.width)
        updated = samples.with_new_last_layer(base, 7)
        for version, model in ((1, base), (2, updated)):
            path = samples.save(model, work / f"cnn-v{version}.onnx")
            edge_sdk.convert(path, [PROFILE], work / f"v{version}", calibration="random", targets=["onnx"],
                             model_name="cnn", release_version=version, sign_key=key, latency_runs=3,
                             max_accuracy_drop=100.0)
        publish = [publish_release(work / f"v{v}", broker.url, FLEET).to_dict() for v in (1, 2)]
        manifest = load_manifest(work / "v1")
        device_bytes = sum(e.size for e in manifest.files(select_variants(manifest, PROFILE)))
        figures = {
            "release_bytes_v1": device_bytes,
            "publish": [{k: p[k] for k in ("version", "chunks_published", "chunks_skipped", "bytes_published", "duration_s")}
                        for p in publish],
            "update": update_figures(broker, work, pub),
            "chunking": chunking_comparison(base, updated),
            "fleet": fleet_figures(broker, work, pub, args.devices, 1),
        }
        print(json.dumps(figures, indent=2))
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
