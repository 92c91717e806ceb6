"""Simulated devices for fleet tests and benchmarks: real SyncClients, many in one process.

Each device is a real :class:`~edge_sdk.runtime.sync.client.SyncClient` with its own state
folder, MQTT connection, chunk store and release store, following its desired state and
self-testing releases through ``EdgeModel``; it also reports a ``profile`` and ``labels`` as a
daemon does. Run as a process (``python tests/support/simfleet.py SPEC.json``) it starts every device in
the spec, prints ``ready``, and stops them cleanly on SIGTERM; :func:`spawn` does that from a test.

Spec (JSON): ``{"broker": url, "fleet": name, "root": folder, "public_key": path,
"devices": [{"device": id, "profile": id, "labels": {…}}, …], "sync": {SyncConfig overrides}}``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SYNC_DEFAULTS = {"stall_timeout_s": 3.0, "manifest_timeout_s": 15.0, "retry_min_s": 0.5, "retry_max_s": 3.0}


def spawn(spec: dict, folder: Path, name: str = "fleet") -> subprocess.Popen:
    """Start one process of simulated devices and wait for its ``ready`` line."""
    path = folder / f"{name}.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, __file__, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"simulated devices did not start: {line}{proc.stderr.read()[-3000:]}")
    return proc


def stop(procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class SharedReadings:
    """One machine's resource readings for every device of the process, read at most every
    ``max_age_s``: the devices share the machine, and each reading its own (a dozen ``/proc`` and
    ``/sys`` files, under a lock, at every reported-state publish) made hundreds of threads queue."""

    def __init__(self, max_age_s: float = 1.0) -> None:
        from edge_sdk.runtime.monitor import SystemSource

        self.source = SystemSource()
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._last = None
        self._at = 0.0

    def sample(self):
        with self._lock:
            if self._last is None or time.monotonic() - self._at > self.max_age_s:
                self._last, self._at = self.source.sample(), time.monotonic()
            return self._last


def main(spec_path: str) -> None:
    from edge_sdk.runtime.sync.client import SyncClient, SyncConfig

    spec = json.loads(Path(spec_path).read_text())
    root = Path(spec["root"])
    readings = SharedReadings()
    clients = []
    for device in spec["devices"]:
        config = SyncConfig(broker=spec["broker"], fleet=spec["fleet"], device=device["device"],
                            root=root / device["device"], profile=device.get("profile"), labels=device.get("labels", {}),
                            public_key=spec.get("public_key"), allow_unsigned=spec.get("public_key") is None,
                            **{**SYNC_DEFAULTS, **spec.get("sync", {})})
        clients.append(SyncClient(config, resources=readings))
    for client in clients:
        client.start()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    print("ready", flush=True)
    stopping.wait()
    stoppers = [threading.Thread(target=client.stop) for client in clients]  # each joins its own threads
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()


if __name__ == "__main__":
    main(sys.argv[1])
