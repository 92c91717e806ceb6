"""Release sync figures, measured side by side in one run against real servers; prints JSON.

* ``release_delta``: new bytes / release bytes after a last-layer change, on a ~2.5 MB release
  (small CNN, every target) and a ~10 MB one (goals ≤ 0.15× and ≤ 0.03×), with tensor-following
  chunks and, for reference, plain content-defined chunks (16/64/256 KiB, what shipped before);
  a rebuild of the unchanged model (every chunk reused); adding one variant (only its own new
  chunks: bytes of the variant vs bytes it adds to the store).
* ``broker_rss``: Mosquitto's RSS after publishing a ~50 MB release and one device fetching it,
  with the ``mqtt`` store vs the ``http`` (nginx) and ``s3`` (SeaweedFS) stores, where MQTT carries
  only the manifest (goal: broker RSS independent of release size).
* ``update``: one device syncing v1 then the last-layer v2 over MQTT: bytes moved vs its files.
* ``fleet``: N device clients in one process fetching one release from one broker.

Run: ``python benchmarks/sync.py [--sections release_delta,broker_rss,update,fleet] [--devices 100]``
(needs ``mosquitto``, ``nginx`` and the dev extra's ``weed``; converter toolchains for every target).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def _load_servers():
    """tests/support/servers.py (real servers); tests/support has no package folder to shadow edge_sdk."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
    import servers

    return servers


servers = _load_servers()

import edge_sdk  # noqa: E402
from edge_sdk import samples  # noqa: E402
from edge_sdk.chunking import ChunkSizes, chunk_bytes  # noqa: E402
from edge_sdk.cloud.publish import publish_release  # noqa: E402
from edge_sdk.manifest import Manifest, load_manifest  # noqa: E402
from edge_sdk.runtime.sync.client import SyncClient, SyncConfig  # noqa: E402
from edge_sdk.signing import generate_keypair  # noqa: E402

PROFILES = ["intel-nuc", "raspberry-pi-4"]  # together they take every target
DEVICE_PROFILE = "intel-nuc"
FLEET = "bench"
ALL_TARGETS = ["onnx", "tflite", "ncnn", "openvino"]
BEFORE = ChunkSizes(16 * 1024, 64 * 1024, 256 * 1024)  # the chunker before tensor-following cuts


def build(work: Path, name: str, model, version: int, targets: list[str], key: Path | None = None) -> Path:
    path = samples.save(model, work / f"{name}.onnx")
    edge_sdk.convert(path, PROFILES, work / name, calibration="random", targets=targets, model_name="cnn",
                     release_version=version, sign_key=key, latency_runs=3, max_accuracy_drop=100.0, speed_gate=False)
    return work / name


def chunk_map(release: Path, manifest: Manifest | None = None) -> dict[str, int]:
    manifest = manifest or load_manifest(release)
    return {c.sha256: c.size for e in manifest.files() for c in e.chunks}


def plain_chunk_map(release: Path) -> dict[str, int]:
    """The release's files cut as before: content-defined only, one size for every file."""
    out = {}
    for entry in load_manifest(release).files():
        data = (release / entry.path).read_bytes()
        out.update({c.sha256: c.size for c in chunk_bytes(data, sizes=BEFORE)})
    return out


def delta(old: dict[str, int], new: dict[str, int], file_bytes: int) -> dict:
    moved = sum(size for sha, size in new.items() if sha not in old)
    return {"new_bytes": moved, "ratio": round(moved / file_bytes, 4)}


def release_delta(work: Path, width: int, goal: float) -> dict:
    base = samples.make_cnn(width=width)
    v1 = build(work, f"w{width}-v1", base, 1, ALL_TARGETS)
    v2 = build(work, f"w{width}-v2", samples.with_new_last_layer(base, 7), 2, ALL_TARGETS)
    again = build(work, f"w{width}-v1-again", base, 1, ALL_TARGETS)
    manifest = load_manifest(v1)
    files = manifest.files()
    file_bytes = sum(e.size for e in files)
    now = {name: chunk_map(path) for name, path in (("v1", v1), ("v2", v2), ("again", again))}
    before = {name: plain_chunk_map(path) for name, path in (("v1", v1), ("v2", v2))}
    variants = {}
    for variant in (v for v in manifest.variants if v.ok):
        own = {c.sha256: c.size for e in variant.files for c in e.chunks}
        others = {c.sha256 for v in manifest.variants if v.ok and v.id != variant.id for e in v.files for c in e.chunks}
        variants[variant.id] = {"variant_bytes": sum(e.size for e in variant.files),
                                "new_bytes_when_added": sum(n for sha, n in own.items() if sha not in others)}
    return {
        "width": width, "release_file_bytes": file_bytes, "files": len(files),
        "release_chunk_bytes": sum(now["v1"].values()), "chunks": len(now["v1"]),
        "last_layer": {**delta(now["v1"], now["v2"], file_bytes), "goal_ratio": goal},
        "last_layer_plain_cdc_before": delta(before["v1"], before["v2"], file_bytes),
        "rebuild_of_unchanged_model": delta(now["v1"], now["again"], file_bytes),
        "add_one_variant": variants,
    }


# --- broker RSS: mqtt store vs http / s3 --------------------------------------------------------------
def broker_rss(work: Path, width: int) -> dict:
    MosquittoBroker, NginxServer, SeaweedS3Server = servers.MosquittoBroker, servers.NginxServer, servers.SeaweedS3Server
    release = build(work, f"rss-w{width}", samples.make_cnn(width=width), 1, ["onnx"])
    manifest = load_manifest(release)
    out: dict = {"release_bytes": sum(e.size for e in manifest.files())}
    seaweed = SeaweedS3Server(work / "seaweedfs").start()
    nginx = NginxServer(work / "nginx", work / "www").start()
    try:
        stores = {"mqtt": ("mqtt", "mqtt"), "http": (f"file://{work / 'www'}", nginx.url),
                  "s3": (f"s3://{_bucket(seaweed)}/chunks", None)}
        for name, (publish_to, fetch_from) in stores.items():
            broker = MosquittoBroker(work / f"mosquitto-{name}").start()
            try:
                idle = broker.rss_bytes()
                with _aws_env(seaweed if name == "s3" else None):
                    report = publish_release(release, broker.url, FLEET, store=publish_to)
                    published = broker.rss_bytes()
                    fetched = _device_fetch(broker, fetch_from or publish_to, work / f"device-{name}")
                out[name] = {"broker_rss_idle_mb": _mb(idle), "after_publish_mb": _mb(published),
                             "after_device_fetch_mb": _mb(broker.rss_bytes()),
                             "growth_mb": _mb(max(published, broker.rss_bytes()) - idle),
                             "bytes_published": report.bytes_published, "device_bytes_fetched": fetched}
            finally:
                broker.kill()
    finally:
        nginx.kill()
        seaweed.kill()
    return out


def _bucket(seaweed) -> str:
    seaweed.client().create_bucket(Bucket="bench")
    return "bench"


class _aws_env:
    """The S3 server's AWS_* variables for the duration of the block (boto3 reads them)."""

    def __init__(self, server) -> None:
        self.values = server.environ() if server is not None else {}
        self.saved: dict = {}

    def __enter__(self) -> None:
        import os

        for key, value in self.values.items():
            self.saved[key] = os.environ.get(key)
            os.environ[key] = value

    def __exit__(self, *exc) -> None:
        import os

        for key, value in self.saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _device_fetch(broker, store_url: str, root: Path) -> int:
    """One device syncing the release with its chunks from ``store_url`` (self-test off: RSS only)."""
    client = SyncClient(SyncConfig(broker=broker.url, fleet=FLEET, device="bench-device", root=root,
                                   profile=DEVICE_PROFILE, allow_unsigned=True, self_test=False, store=store_url))
    client.transport.start()
    try:
        client.transport.wait_connected(10)
        result = client.sync("cnn", 1, timeout=600)
        if result.status != "activated":
            raise RuntimeError(f"sync from {store_url} failed: {result.reason}")
        return result.bytes_fetched
    finally:
        client.transport.stop()


def _mb(n: int) -> float:
    return round(n / 2**20, 1)


# --- one device over MQTT, and a fleet ------------------------------------------------------------------
def device_config(broker_url: str, root: Path, pub: Path, device: str, self_test: bool = True) -> SyncConfig:
    return SyncConfig(broker=broker_url, fleet=FLEET, device=device, root=root, profile=DEVICE_PROFILE, public_key=pub,
                      self_test=self_test, stall_timeout_s=10.0, sync_timeout_s=600.0)


def update_figures(broker_url: str, work: Path, pub: Path) -> dict:
    client = SyncClient(device_config(broker_url, work / "device", pub, "bench-dev"))
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


def fleet_figures(broker_url: str, work: Path, pub: Path, devices: int, fleet_version: int) -> dict:
    clients = [SyncClient(device_config(broker_url, work / f"fleet-{i}", pub, f"dev-{i:04d}", self_test=False))
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


def mqtt_figures(work: Path, devices: int, width: int) -> dict:
    MosquittoBroker = servers.MosquittoBroker
    key, pub = generate_keypair(work / "k.key")
    base = samples.make_cnn(width=width)
    for version, model in ((1, base), (2, samples.with_new_last_layer(base, 7))):
        build(work, f"mqtt-v{version}", model, version, ["onnx"], key)
    broker = MosquittoBroker(work / "mosquitto-update").start()
    try:
        publish = [publish_release(work / f"mqtt-v{v}", broker.url, FLEET).to_dict() for v in (1, 2)]
        figures = {"publish": [{k: p[k] for k in ("version", "chunks_published", "chunks_skipped", "bytes_published",
                                                  "duration_s")} for p in publish],
                   "update": update_figures(broker.url, work, pub)}
        if devices:
            figures["fleet"] = fleet_figures(broker.url, work, pub, devices, 1)
        return figures
    finally:
        broker.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="release_delta,broker_rss,update",
                        help="comma-separated: release_delta, broker_rss, update (with --devices: fleet)")
    parser.add_argument("--devices", type=int, default=0, help="fleet clients for the fleet figures (0: none)")
    parser.add_argument("--small-width", type=int, default=44, help="CNN width of the ~2.5 MB every-target release")
    parser.add_argument("--large-width", type=int, default=92, help="CNN width of the ~10 MB every-target release")
    parser.add_argument("--rss-width", type=int, default=420, help="CNN width of the ~50 MB release (onnx)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    work = Path(tempfile.mkdtemp(prefix="edge-sdk-sync-bench-"))
    figures: dict = {}
    try:
        if "release_delta" in sections:
            figures["release_delta"] = {"small": release_delta(work, args.small_width, 0.15),
                                        "large": release_delta(work, args.large_width, 0.03)}
        if "broker_rss" in sections:
            figures["broker_rss"] = broker_rss(work, args.rss_width)
        if "update" in sections:
            figures["mqtt"] = mqtt_figures(work, args.devices, 96)
        print(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
