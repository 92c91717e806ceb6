"""Telemetry throughput, measured side by side in one run; prints JSON.

* outbox durable write rate: one fsync'd transaction per record vs ``append_many`` groups;
* end to end: records/s from ``Outbox.append`` until the ingest has committed *and acked* them
  (outbox → Mosquitto → ingest SQLite → ack → outbox delete), next to the raw QoS 1 publish rate
  of the same batches through the same broker (the transport ceiling).

Needs ``mosquitto`` (scripts/install-system-deps.sh); the broker is tests/support/servers.py's. Usage::

    python benchmarks/telemetry.py [--records 20000] [--single 500]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from servers import MosquittoBroker  # noqa: E402

from edge_sdk.cloud.ingest import IngestWorker, SqliteSink  # noqa: E402
from edge_sdk.runtime.sync.outbox import Outbox, OutboxConfig  # noqa: E402
from edge_sdk.runtime.sync.telemetry import TelemetryUploader, UploaderConfig, encode_batch  # noqa: E402
from edge_sdk.runtime.sync.topics import Topics  # noqa: E402
from edge_sdk.runtime.sync.transport import Transport, TransportConfig  # noqa: E402

RECORD = {"temp_c": 41.25, "cpu": 0.37, "ram_mb": 812, "precision": "int8", "latency_ms": [3.1, 3.3, 2.9]}


def transport(url: str, cid: str) -> Transport:
    t = Transport(TransportConfig.from_url(url, client_id=cid, max_inflight=1000))
    t.start()
    if not t.wait_connected(10):
        raise RuntimeError("no broker")
    return t


def outbox_rates(folder: Path, single: int, grouped: int) -> dict:
    box = Outbox(OutboxConfig(path=folder / "rate.db"))
    t0 = time.perf_counter()
    for _ in range(single):
        box.append(RECORD)
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(grouped // 100):
        box.append_many([RECORD] * 100)
    t_group = time.perf_counter() - t0
    box.close()
    single_rate, group_rate = single / t_single, grouped / t_group
    return {
        "durable_appends_per_s": round(single_rate, 1),
        "durable_records_per_s_append_many_100": round(group_rate, 1),
        "append_many_vs_single_ratio": round(group_rate / single_rate, 2),
    }


def end_to_end(folder: Path, url: str, records: int) -> dict:
    topics = Topics("bench")
    sink = SqliteSink(folder / "ingest.db")
    worker = IngestWorker(transport(url, "ingest"), topics, sink)
    worker.start()
    box = Outbox(OutboxConfig(path=folder / "device.db"))
    box.append_many([RECORD] * records)  # preloaded: measures the pipe, not the producer
    dev = transport(url, "dev")
    up = TelemetryUploader(box, dev, topics, "dev", UploaderConfig(batch_records=500, window=8))
    time.sleep(0.3)  # subscriptions settle
    t0 = time.perf_counter()
    up.start()
    up.notify()
    while box.stats().rows:
        time.sleep(0.01)
    t_e2e = time.perf_counter() - t0
    up.stop()
    committed = sink.counters()["records"]

    # The same batches, published raw at QoS 1 and waited for (PUBACK only, nothing stored).
    box2 = Outbox(OutboxConfig(path=folder / "raw.db"))
    box2.append_many([RECORD] * records)
    payloads, cursor = [], 0
    while (batch := box2.next_batch(cursor, 500)) is not None:
        payloads.append(encode_batch(batch))
        cursor = batch.last_id
    raw = transport(url, "raw")
    t0 = time.perf_counter()
    for p in payloads[:-1]:
        raw.publish("bench/raw", p, qos=1)
    raw.publish("bench/raw", payloads[-1], qos=1, wait=60)
    t_raw = time.perf_counter() - t0
    for t in (raw, dev, worker):
        t.stop()
    e2e, raw_rate = records / t_e2e, records / t_raw
    return {
        "records": records,
        "committed_by_ingest": committed,
        "end_to_end_acked_records_per_s": round(e2e, 1),
        "raw_qos1_publish_records_per_s": round(raw_rate, 1),
        "end_to_end_vs_raw_publish_ratio": round(e2e / raw_rate, 3),
        "batch_bytes_avg": round(sum(map(len, payloads)) / len(payloads)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--single", type=int, default=500, help="single-record durable appends to time")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        broker = MosquittoBroker(folder / "mosquitto").start()
        url = broker.url
        try:
            result = {
                "benchmark": "telemetry",
                "python": sys.version.split()[0],
                "outbox": outbox_rates(folder, args.single, args.records),
                "pipeline": end_to_end(folder, url, args.records),
            }
        finally:
            broker.kill()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
