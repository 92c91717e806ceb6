"""Fleet figures at fleet size, measured in one run against real servers; prints JSON.

* ``delivery``: N simulated devices (real SyncClients, ``tests/support/simfleet.py``, spread over P
  processes) on one Mosquitto fetch a ~10 MB release, its chunks from the ``mqtt`` store (retained
  blobs) or with ``--store http`` from nginx (MQTT then carries only manifest, desired and
  reported state). Figures: time from writing the desired state until each device reports the
  release active (p50/p95/max), bytes through the broker (its ``$SYS`` counters) and through
  nginx (its access log), the broker's peak RSS.
* ``ingest``: end-to-end acked telemetry records/s into SQLite and into PostgreSQL with 1 and 2
  ``edge-sdk cloud ingest`` worker processes on one ``$share`` group. Loader processes publish
  pre-built 500-record batches for many devices, each keeping a window of unacked batches, and a
  run ends when every record is acked (so the rate is what ingest commits, not what it receives).

Run: ``python benchmarks/fleet.py [--sections delivery,ingest] [--devices 1000] [--processes 20]
[--fetch-window 8] [--store mqtt|http] [--width 188] [--records 200000]`` (needs mosquitto, nginx,
PostgreSQL's initdb, the dev extra). The figures carry the load average at start and end.
Figures on a shared machine are provisional: re-measure when it is quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
import servers  # noqa: E402
import simfleet  # noqa: E402

from edge_sdk.cloud.connection import connect  # noqa: E402
from edge_sdk.cloud.fleet import parse_reported  # noqa: E402
from edge_sdk.errors import SyncError  # noqa: E402
from edge_sdk.runtime.sync.topics import TopicKind, Topics  # noqa: E402
from edge_sdk.runtime.sync.transport import Transport, TransportConfig  # noqa: E402

FLEET = "bench"
RECORD = {"temp_c": 41.25, "cpu": 0.37, "ram_mb": 812, "precision": "int8", "latency_ms": [3.1, 3.3, 2.9]}


def _quantiles(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=20) if len(values) >= 2 else values * 19
    return {"p50": round(statistics.median(values), 2), "p95": round(q[18], 2), "max": round(max(values), 2)}


# -- delivery --------------------------------------------------------------------------------------------
def build_release(work: Path, width: int, key: Path) -> Path:
    from edge_sdk import samples
    from edge_sdk.converters.pipeline import convert

    model = samples.save(samples.make_cnn(width=width), work / "model.onnx")
    out = work / "release"
    convert(model, ["generic-x86_64"], out, targets=["onnx"], calibration="random", model_name="cnn", release_version=1,
            latency_runs=3, validation_limit=4, max_accuracy_drop=100.0, speed_gate=False, sign_key=key)
    return out


class BrokerBytes:
    """The broker's own byte counters (``$SYS``, published every second with ``sys_interval 1``)."""

    def __init__(self, url: str) -> None:
        self.values: dict[str, int] = {}
        self.transport = Transport(TransportConfig.from_url(url, client_id="bench-sys", session_expiry_s=0))
        self.transport.subscribe("$SYS/broker/bytes/+", self._on, qos=0)
        self.transport.start()
        self.transport.wait_connected(10)

    def _on(self, message) -> None:
        self.values[message.topic.rsplit("/", 1)[-1]] = int(message.payload)

    def read(self, wait_s: float = 2.5) -> dict[str, int]:
        time.sleep(wait_s)  # one more $SYS round, so the figures include what just happened
        return dict(self.values)


def delivery(work: Path, devices: int, processes: int, width: int, self_test: bool, store: str,
             fetch_window: int = 8) -> dict:
    import psutil

    from edge_sdk.cloud.publish import publish_release
    from edge_sdk.manifest import load_manifest
    from edge_sdk.runtime.sync.client import select_variants
    from edge_sdk.signing import generate_keypair

    work.mkdir(parents=True, exist_ok=True)
    key, pub = generate_keypair(work / "release.key", work / "release.pub")
    release = build_release(work, width, key)
    manifest = load_manifest(release)
    device_bytes = sum(e.size for e in manifest.files(select_variants(manifest, "generic-x86_64")))
    www = work / "www"
    (www / "chunks").mkdir(parents=True)
    broker = servers.MosquittoBroker(work / "mosquitto", extra_conf="sys_interval 1\nmax_inflight_messages 100\n").start()
    nginx = servers.NginxServer(work / "nginx", www).start()
    procs: list[subprocess.Popen] = []
    try:
        # http: chunks in a folder nginx serves, MQTT for control only; mqtt: retained blobs on the broker
        publish_release(release, broker.url, FLEET, store=f"file://{www / 'chunks'}" if store == "http" else "mqtt")
        names = [f"dev{i:04d}" for i in range(devices)]
        per = -(-devices // processes)
        started_at = time.monotonic()
        for k in range(processes):
            part = names[k * per:(k + 1) * per]
            if part:
                procs.append(simfleet.spawn({"broker": broker.url, "fleet": FLEET, "root": str(work / "devices"),
                                             "public_key": str(pub), "sync": {"self_test": self_test, "fetch_window": fetch_window},
                                             "devices": [{"device": d, "profile": "generic-x86_64"} for d in part]},
                                            work, f"fleet{k}"))
        spawn_s = time.monotonic() - started_at
        topics = Topics(FLEET)
        active: dict[str, float] = {}
        garbage = 0
        done = threading.Event()
        t0 = [0.0]

        def on_reported(message) -> None:
            nonlocal garbage
            device = topics.device_of(message.topic, TopicKind.REPORTED)
            if device is None or device in active or not t0[0]:
                return
            try:
                report = parse_reported(device, message.payload)
            except SyncError:
                garbage += 1
                return
            model = report.models.get("cnn")
            if model is not None and model.version == 1:
                active[device] = time.monotonic() - t0[0]
                if len(active) == devices:
                    done.set()

        watcher = Transport(TransportConfig.from_url(broker.url, client_id="bench-watch", session_expiry_s=0))
        watcher.subscribe(f"{topics.prefix}/+/reported", on_reported, qos=0)
        watcher.start()
        watcher.wait_connected(10)
        counters = BrokerBytes(broker.url)
        before = counters.read()
        rss = [broker.rss_bytes()]
        entry = {"version": 1, **({"store": f"{nginx.url}/chunks"} if store == "http" else {})}
        desired = json.dumps({"models": {"cnn": entry}}).encode()
        with connect(broker.url, "bench-desire") as t:
            t0[0] = time.monotonic()
            t.publish(topics.desired(None), desired, qos=1, retain=True, wait=30)
        while not done.wait(0.5):
            rss.append(broker.rss_bytes())
            if time.monotonic() - t0[0] > 3600:
                break
        total_s = time.monotonic() - t0[0]
        after = counters.read()
        watcher.stop()
        counters.transport.stop()
        nginx.stop()
        store_bytes = sum(r.bytes_sent for r in nginx.requests() if r.status in (200, 206))
        cpu = psutil.cpu_count()
        return {
            "devices": devices, "processes": processes, "devices_per_process": per, "self_test": self_test, "store": store,
            "fetch_window": fetch_window,
            "spawn_seconds": round(spawn_s, 1), "active": len(active), "garbage_reports": garbage,
            "release_bytes_per_device": device_bytes, "seconds_until_all_active": round(total_s, 1),
            "per_device_seconds_to_active": _quantiles(list(active.values())) if active else None,
            "bytes_through_http_store": store_bytes, "http_store_requests": len(nginx.requests()),
            "bytes_through_broker_sent": after.get("sent", 0) - before.get("sent", 0),
            "bytes_through_broker_received": after.get("received", 0) - before.get("received", 0),
            "broker_rss_mb_peak": round(max(rss) / 2**20, 1), "machine_cpus": cpu,
        }
    finally:
        simfleet.stop(procs, timeout=120)
        nginx.kill()
        broker.kill()


# -- ingest ------------------------------------------------------------------------------------------------
def load_child(url: str, prefix: str, devices: int, batches: int, per_batch: int, window: int) -> None:
    """Publish ``batches`` batches per device (window of unacked ones) and print the seconds until all acked."""
    from edge_sdk.runtime.sync.telemetry import decode_ack

    topics = Topics(FLEET)
    boot = "b" * 32
    names = [f"{prefix}{d:04d}" for d in range(devices)]
    payloads = {n: [json.dumps({"v": 1, "boot": boot, "floor": 1, "records": [
        [b * per_batch + i + 1, 1.0, 1, "m", RECORD] for i in range(per_batch)]}).encode() for b in range(batches)]
        for n in names}
    acked = dict.fromkeys(names, 0)
    sent = dict.fromkeys(names, 0)
    cond = threading.Condition()

    def on_ack(message) -> None:
        device = topics.device_of(message.topic, TopicKind.TELEMETRY_ACK)
        if device in acked:
            with cond:
                acked[device] = max(acked[device], decode_ack(message.payload)[1])
                cond.notify_all()

    transport = Transport(TransportConfig.from_url(url, client_id=f"load-{prefix}", max_inflight=1000, session_expiry_s=0))
    for n in names:
        transport.subscribe(topics.telemetry_ack(n), on_ack, qos=1)
    transport.start()
    transport.wait_connected(10)
    time.sleep(1.0)
    started = time.perf_counter()
    last = batches * per_batch
    while True:
        with cond:
            todo = []
            for n in names:
                while sent[n] < batches and (sent[n] * per_batch) - acked[n] < window * per_batch:
                    todo.append((n, payloads[n][sent[n]]))
                    sent[n] += 1
            if all(acked[n] >= last for n in names):
                break
            if not todo:
                cond.wait(0.05)
        for n, payload in todo:
            transport.publish(topics.telemetry(n), payload, qos=1)
    print(json.dumps({"records": devices * last, "seconds": time.perf_counter() - started}), flush=True)
    transport.stop()


def ingest_run(work: Path, sink: str, workers: int, records: int, loaders: int = 2, window: int = 4) -> dict:
    per_batch, devices_per_loader = 500, 10
    batches = max(1, records // (loaders * devices_per_loader * per_batch))
    work.mkdir(parents=True, exist_ok=True)
    broker = servers.MosquittoBroker(work / f"mq-{sink}-{workers}").start()
    pg = None
    try:
        if sink == "postgresql":
            pg = servers.PostgresServer(work / f"pg-{workers}").start()
            db = pg.create_database("telemetry")
        else:
            db = str(work / f"ingest-{workers}.db")
        procs = [subprocess.Popen([sys.executable, "-m", "edge_sdk", "cloud", "ingest", "--broker", broker.url,
                                   "--fleet", FLEET, "--db", db, "--group", "bench", "--client-id", f"w{i}",
                                   "--report-every", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for i in range(workers)]
        time.sleep(3.0)  # workers connect and subscribe
        loads = [subprocess.Popen([sys.executable, __file__, "--load-child", broker.url, f"l{i}-",
                                   str(devices_per_loader), str(batches), str(per_batch), str(window)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for i in range(loaders)]
        outs = [json.loads(p.communicate(timeout=3600)[0].strip().splitlines()[-1]) for p in loads]
        for p in procs:
            p.terminate()
            p.wait(60)
        total = sum(o["records"] for o in outs)
        seconds = max(o["seconds"] for o in outs)
        return {"sink": sink, "workers": workers, "records": total, "seconds": round(seconds, 2),
                "records_per_s": round(total / seconds)}
    finally:
        broker.kill()
        if pg is not None:
            pg.cleanup()


def decode_cost(per_batch: int = 500, repeats: int = 200) -> dict:
    """CPU per record of checking one loader batch: msgspec's path vs the stdlib reference path."""
    from edge_sdk.cloud import ingest as _ingest

    payload = json.dumps({"v": 1, "boot": "b" * 32, "floor": 1,
                          "records": [[i + 1, 1.0, 1, "m", RECORD] for i in range(per_batch)]}).encode()
    limits = _ingest.IngestLimits()
    out = {}
    for name, fn in (("fast", _ingest.prepare), ("stdlib", _ingest._prepare_stdlib)):
        t0 = time.process_time()
        for _ in range(repeats):
            fn("d", payload, limits)
        out[name] = round((time.process_time() - t0) / repeats / per_batch * 1e6, 2)
    return {"prepare_us_per_record": out, "stdlib_vs_fast": round(out["stdlib"] / out["fast"], 1)}


def ingest(work: Path, records: int) -> dict:
    runs = [ingest_run(work, sink, workers, records) for sink in ("sqlite", "postgresql") for workers in (1, 2)]
    rate = {(r["sink"], r["workers"]): r["records_per_s"] for r in runs}
    return {"runs": runs, "decoding": decode_cost(), "goal_postgresql_records_per_s": 50_000,
            "postgresql_vs_sqlite_1_worker": round(rate[("postgresql", 1)] / rate[("sqlite", 1)], 2),
            "postgresql_2_vs_1_workers": round(rate[("postgresql", 2)] / rate[("postgresql", 1)], 2),
            "sqlite_2_vs_1_workers": round(rate[("sqlite", 2)] / rate[("sqlite", 1)], 2)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--load-child":
        url, prefix, *numbers = sys.argv[2:]
        load_child(url, prefix, *map(int, numbers))
        return
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still stops servers and devices
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="delivery,ingest")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=20)
    parser.add_argument("--width", type=int, default=188, help="CNN width of the release (~10 MB of onnx variants)")
    parser.add_argument("--self-test", action="store_true", help="devices self-test the release through EdgeModel")
    parser.add_argument("--store", choices=["mqtt", "http"], default="mqtt",
                        help="where devices fetch chunks: retained blobs on the broker, or nginx (needs a SyncClient "
                             "that follows the store named in desired state)")
    parser.add_argument("--fetch-window", type=int, default=8,
                        help="chunk fetches in flight per device (each a thread; the simulated devices share a few cores)")
    parser.add_argument("--records", type=int, default=200_000, help="telemetry records per ingest run")
    args = parser.parse_args()
    sections = args.sections.split(",")
    from edge_sdk.cloud import ingest as _ingest

    # The machine is shared: the load average beside the figures says how much they can be trusted.
    figures: dict = {"benchmark": "fleet", "python": sys.version.split()[0], "cpus": os.cpu_count(),
                     "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
                     "ingest_fast_decoding": _ingest._FAST is not None}
    with tempfile.TemporaryDirectory(prefix="edge-fleet-") as tmp:
        work = Path(tmp)
        if "delivery" in sections:
            figures["delivery"] = delivery(work / "delivery", args.devices, args.processes, args.width, args.self_test,
                                           args.store, args.fetch_window)
        if "ingest" in sections:
            figures["ingest"] = ingest(work / "ingest", args.records)
        figures["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        # before the clean-up: deleting 1,000 devices' state takes minutes, and a timeout then loses nothing
        print(json.dumps(figures, indent=2), flush=True)


if __name__ == "__main__":
    main()
