"""kill -9 of the device's sync process (``edge-sdk sync`` as a real subprocess) at random points.

After any kill the active release is the old or the new one, hash-valid and loadable; a restart
fetches only the chunks the killed run had not stored yet.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edge_sdk.cloud.publish import publish_release
from edge_sdk.manifest import load_manifest
from edge_sdk.runtime.sync.client import SyncClient, SyncConfig, select_variants
from edge_sdk.runtime.sync.releases import ReleaseStore

FLEET = "plant1"
PROFILE = "intel-nuc"
KILL_POINTS = int(os.environ.get("EDGE_SDK_SYNC_KILL_POINTS", "50"))


def _cmd(broker, root: Path, pub: Path, version: int, window: int = 32) -> list[str]:
    return [sys.executable, "-m", "edge_sdk", "sync", "--broker", broker.url, "--fleet", FLEET, "--device", "cam-1",
            "--root", str(root), "--public-key", str(pub), "--profile", PROFILE, "--model", "cnn",
            "--version", str(version), "--fetch-window", str(window), "--timeout", "60"]


def _stored(root: Path) -> int:
    return sum(1 for p in (root / "chunks").glob("*/*") if not p.name.endswith(".part"))


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def _device_chunks(release: Path) -> int:
    manifest = load_manifest(release)
    return len({c.sha256 for e in manifest.files(select_variants(manifest, PROFILE)) for c in e.chunks})


def test_kill_mid_fetch_then_resume_fetches_only_the_rest(mosquitto, sync_releases, release_keypair, tmp_path):
    publish_release(sync_releases["v1"], mosquitto.url, FLEET)
    root = tmp_path / "dev"
    total = _device_chunks(sync_releases["v1"])
    proc = subprocess.Popen(_cmd(mosquitto, root, release_keypair[1], 1, window=1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _stored(root) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    _kill(proc)
    had = _stored(root)
    assert 0 < had < total, (had, total, proc.stderr.read().decode()[-2000:])
    assert ReleaseStore(root).active() is None

    done = subprocess.run(_cmd(mosquitto, root, release_keypair[1], 1), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "activated"
    assert result["chunks_reused"] == had and result["chunks_fetched"] == total - had


# The device process, with a kill-at-named-step hook: it tracks the sync phase from the twin's
# progress states and SIGKILLs itself either right before the k-th file-system operation of the
# target phase (fetch, stage and activate are sequences of fsync/rename/replace/symlink/unlink,
# so every crash-relevant point is reachable) or after a delay into it (the self-test does
# little file-system work). A self-inflicted SIGKILL is the same crash as an external kill -9.
# Without a target it writes each phase's operation count and duration (calibration).
CRASHER = textwrap.dedent("""
    import json, os, signal, sys, threading, time
    from collections import Counter
    from edge_sdk.runtime.sync.twin import Twin

    log_path, target, nth, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    phase, ops, seconds, since = ["start"], Counter(), {}, [time.monotonic()]

    def crash():
        with open(log_path, "w") as f:
            json.dump({"killed_in": phase[0], "op": ops[phase[0]]}, f)
        os.kill(os.getpid(), signal.SIGKILL)

    real_progress = Twin.progress

    def progress(self, **fields):
        state = fields.get("state")
        if state is not None and state != phase[0]:
            seconds[phase[0]] = time.monotonic() - since[0]
            phase[0], since[0] = state, time.monotonic()
            if state == target and delay >= 0:
                threading.Timer(delay, lambda: phase[0] == target and crash()).start()
        return real_progress(self, **fields)

    Twin.progress = progress

    def counted(name):
        real = getattr(os, name)

        def op(*args, **kwargs):
            ops[phase[0]] += 1
            if phase[0] == target and ops[phase[0]] == nth:
                crash()
            return real(*args, **kwargs)

        setattr(os, name, op)

    for name in ("fsync", "replace", "rename", "symlink", "unlink", "mkdir"):
        counted(name)
    from edge_sdk.cli import main

    try:
        main(sys.argv[5:])
    finally:
        with open(log_path, "w") as f:
            json.dump({"ops": ops, "seconds": seconds}, f)
""")
#: phase (twin progress state) -> how the kill point in it is chosen
PHASES = {"fetching": "op", "staging": "op", "self-test": "time", "activating": "op"}


@pytest.mark.slow
def test_kill_in_every_phase_never_leaves_a_broken_release(mosquitto, sync_releases, release_keypair, tmp_path):
    """≥ KILL_POINTS kill -9s of a v1 → v2 update, spread over fetch, stage/verify, self-test and
    activate (the phase of each kill is recorded and counted): the active release is always
    v1 or v2, hash-valid and loadable, and a restart completes the update."""
    from edge_sdk import EdgeModel

    for name in ("v1", "v2"):
        publish_release(sync_releases[name], mosquitto.url, FLEET)
    snapshot = tmp_path / "snapshot"
    config = SyncConfig(broker=mosquitto.url, fleet=FLEET, device="cam-1", root=snapshot, profile=PROFILE,
                        public_key=release_keypair[1])
    client = SyncClient(config)
    client.transport.start()
    try:
        assert client.sync("cnn", 1, timeout=60).status == "activated"
    finally:
        client.transport.stop()

    root, log = tmp_path / "dev", tmp_path / "crash.json"

    def run(target: str, nth: int, delay: float) -> subprocess.CompletedProcess:
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(snapshot, root, symlinks=True)
        log.unlink(missing_ok=True)
        return subprocess.run([sys.executable, "-c", CRASHER, str(log), target, str(nth), str(delay),
                               *_cmd(mosquitto, root, release_keypair[1], 2)[3:]], capture_output=True, text=True,
                              timeout=120)

    calibration = run("", 0, -1.0)
    assert calibration.returncode == 0, calibration.stderr[-2000:]
    figures = json.loads(log.read_text())
    assert all(figures["ops"].get(p, 0) > 0 for p, how in PHASES.items() if how == "op"), figures

    rng = random.Random(1234)
    killed_in = {p: 0 for p in PHASES}
    outcomes = {"cnn@v1": 0, "cnn@v2": 0}
    per_phase = -(-KILL_POINTS // len(PHASES))
    attempts = 0
    for i in range(per_phase * len(PHASES)):
        phase = list(PHASES)[i % len(PHASES)]
        while True:
            attempts += 1
            if PHASES[phase] == "op":
                done = run(phase, rng.randint(1, figures["ops"][phase]), -1.0)
            else:  # a timed kill may come after a faster-than-calibrated phase ended: draw again
                done = run(phase, 0, rng.uniform(0.0, 0.8 * figures["seconds"][phase]))
            if done.returncode != 0 or attempts > 2 * per_phase * len(PHASES):
                break
        assert done.returncode == -signal.SIGKILL, (phase, done.returncode, done.stderr[-2000:])
        killed_in[json.loads(log.read_text())["killed_in"]] += 1
        store = ReleaseStore(root)  # what a restarted device opens first
        active = store.active("cnn")
        assert active is not None and active.name in outcomes
        if phase != "activating":
            assert active.name == "cnn@v1", phase  # nothing switches before the activation step
        outcomes[active.name] += 1
        store.verify(active)  # every hash checks
        assert store.highest_accepted("cnn") == int(active.name[-1])
        EdgeModel.load(active, profile=PROFILE, monitor=False, public_key=release_keypair[1]).close()
    print(f"\nkills per phase: {killed_in}; active after the kill: {outcomes}")
    assert sum(killed_in.values()) >= KILL_POINTS
    assert all(n >= per_phase for n in killed_in.values()), killed_in
    # The kills inside the activation step landed on both sides of the switch.
    assert outcomes["cnn@v1"] > 0 and outcomes["cnn@v2"] > 0, outcomes
    # And from whatever the last kill left, a restart completes the update.
    done = subprocess.run(_cmd(mosquitto, root, release_keypair[1], 2), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ReleaseStore(root).active().name == "cnn@v2"


@pytest.mark.slow
def test_kill_during_http_store_download_never_leaves_a_broken_release(mosquitto, nginx_factory, sync_releases,
                                                                      release_keypair, tmp_path):
    """20 kill -9s of a v1 → v2 update whose chunks come from nginx (slowed so the kills land in the
    download, as well as in staging, self-test and activation): the active release is always v1 or
    v2, hash-valid and loadable; a restart then completes the update, fetching only what is missing."""
    from edge_sdk import EdgeModel

    www = tmp_path / "www"
    server = nginx_factory(www, limit_rate="3k")  # v2's ~28 KB of new chunks take seconds, not milliseconds
    for name in ("v1", "v2"):
        publish_release(sync_releases[name], mosquitto.url, FLEET, store=f"file://{www}")
    snapshot = tmp_path / "snapshot"
    client = SyncClient(SyncConfig(broker=mosquitto.url, fleet=FLEET, device="cam-1", root=snapshot, profile=PROFILE,
                                   public_key=release_keypair[1], store=server.url))
    client.transport.start()
    try:
        assert client.sync("cnn", 1, timeout=300).status == "activated"
    finally:
        client.transport.stop()
    root = tmp_path / "dev"
    command = [*_cmd(mosquitto, root, release_keypair[1], 2, window=2), "--store", server.url]

    def fresh() -> None:
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(snapshot, root, symlinks=True)

    fresh()
    started = time.monotonic()
    calibration = subprocess.run(command, capture_output=True, text=True, timeout=300)
    duration = time.monotonic() - started
    assert calibration.returncode == 0, calibration.stderr[-2000:]
    new = json.loads(calibration.stdout.strip().splitlines()[-1])
    assert new["chunks_fetched"] > 0

    rng = random.Random(7)
    outcomes = {"cnn@v1": 0, "cnn@v2": 0}
    partial = 0  # kills that left some, not all, of v2's new chunks stored
    for _ in range(20):
        fresh()
        before = _stored(root)
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, duration))
        _kill(proc)
        store = ReleaseStore(root)
        active = store.active("cnn")
        assert active is not None and active.name in outcomes
        outcomes[active.name] += 1
        store.verify(active)
        EdgeModel.load(active, profile=PROFILE, monitor=False, public_key=release_keypair[1]).close()
        partial += before < _stored(root) < before + new["chunks_fetched"]
    print(f"\nhttp store kills: active after the kill {outcomes}, {partial} mid-download")
    assert sum(outcomes.values()) == 20 and partial > 0
    # From what the last kill left, a restart completes the update and fetches only what is missing.
    had = _stored(root)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ReleaseStore(root).active("cnn").name == "cnn@v2"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["status"] == "activated":
        assert result["chunks_fetched"] == new["chunks_fetched"] - (had - before)
