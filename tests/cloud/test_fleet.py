"""The fleet view (`edge-sdk cloud status`) from retained state on a real broker: garbage reports
are left out and counted, stale and offline devices flagged, filters by model and group."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from edge_sdk.cloud.connection import connect
from edge_sdk.runtime.sync.topics import Topics

FLEET = "fv"


def _retain(broker, items: dict[str, bytes]) -> None:
    with connect(broker.url, "seed") as t:
        for topic, payload in items.items():
            t.publish(topic, payload, qos=1, retain=True, wait=5)


def _status(broker, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_sdk", "cloud", "status", "--broker", broker.url, "--fleet", FLEET,
                           *args], capture_output=True, text=True, timeout=60)


def test_cloud_status_leaves_garbage_out_counts_it_and_flags_stale_devices(mosquitto):
    topics = Topics(FLEET)
    now = time.time()

    def report(version: int, updated: float, **extra) -> bytes:
        return json.dumps({"models": {"cnn": {"release": {"model": "cnn", "version": version}, "backend": "onnxruntime",
                                              "precision": "int8", "stats": {"calls": 10, "errors": 0, "p50_ms": 2.5}}},
                           "profile": "intel-nuc", "labels": {"site": "p1"}, "telemetry": {"queued_rows": 3},
                           "updated": updated, **extra}).encode()

    _retain(mosquitto, {
        topics.reported("ok1"): report(2, now),
        topics.reported("old"): report(1, now - 3600),
        topics.reported("off"): report(2, now),
        topics.status("off"): b'{"online": false}',
        topics.reported("junk"): b"\xff\xfe not json",
        topics.reported("liar"): json.dumps({"models": {"cnn": {"release": {"version": "two"}}}}).encode(),
        topics.reported("other"): report(2, now, labels={"site": "p2"}),
    })
    proc = _status(mosquitto, "--json", "--stale-after", "60")
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    rows = {r["device"]: r for r in view["devices"]}
    assert set(rows) == {"ok1", "old", "off", "other"}  # garbage is not in the view …
    assert set(view["garbage"]) == {"junk", "liar"}  # … but counted, with what is wrong
    assert "not JSON" in view["garbage"]["junk"] and "models.cnn.release.version" in view["garbage"]["liar"]
    assert (rows["ok1"]["health"], rows["old"]["health"], rows["off"]["health"]) == ("ok", "stale", "offline")
    assert rows["old"]["stale"] and not rows["ok1"]["stale"]
    assert (rows["ok1"]["version"], rows["ok1"]["precision"], rows["ok1"]["p50_ms"], rows["ok1"]["outbox_depth"]) == (
        2, "int8", 2.5, 3)
    by_release = {(s["version"], s["profile"]): s for s in view["summary"]}
    assert by_release[(2, "intel-nuc")]["devices"] == 3 and by_release[(1, "intel-nuc")]["health"] == {"stale": 1}

    grouped = json.loads(_status(mosquitto, "--json", "--group", "site=p2", "--model", "cnn").stdout)
    assert [r["device"] for r in grouped["devices"]] == ["other"]

    table = _status(mosquitto)
    assert table.returncode == 0 and "2 devices reported unreadable state (left out)" in table.stdout, table.stdout
    bad = _status(mosquitto, "--group", "site")
    assert bad.returncode == 1 and "group 'site': expected label=value" in bad.stderr and "Traceback" not in bad.stderr
