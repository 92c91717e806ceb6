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
import time
from pathlib import Path

import pytest

from edge_sdk.cloud.publish import publish_release
from edge_sdk.manifest import load_manifest
from edge_sdk.runtime.sync.client import SyncClient, SyncConfig, files_for, select_variants
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
    return len({c.sha256 for e in files_for(manifest, select_variants(manifest, PROFILE)) for c in e.chunks})


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


@pytest.mark.slow
def test_kill_at_random_points_never_leaves_a_broken_release(mosquitto, sync_releases, release_keypair, tmp_path):
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

    root = tmp_path / "dev"
    # Calibrate: when does the v1 → v2 run start touching the disk, and when is it done?
    shutil.copytree(snapshot, root, symlinks=True)
    started = time.monotonic()
    proc = subprocess.Popen(_cmd(mosquitto, root, release_keypair[1], 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    before = _stored(root)
    first_write = None
    while proc.poll() is None:
        if first_write is None and _stored(root) != before:
            first_write = time.monotonic() - started
        time.sleep(0.002)
    full = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr.read().decode()
    first_write = first_write or full * 0.5

    rng = random.Random(1234)
    outcomes = {"cnn@v1": 0, "cnn@v2": 0}
    for _ in range(KILL_POINTS):
        shutil.rmtree(root)
        shutil.copytree(snapshot, root, symlinks=True)
        proc = subprocess.Popen(_cmd(mosquitto, root, release_keypair[1], 2), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(first_write * 0.8, full * 1.05))
        _kill(proc)
        store = ReleaseStore(root)  # what a restarted device opens first
        active = store.active()
        assert active is not None and active.name in outcomes
        outcomes[active.name] += 1
        store.verify(active)  # every hash checks
        assert store.highest_accepted("cnn") == int(active.name[-1])
        EdgeModel.load(active, profile=PROFILE, monitor=False, public_key=release_keypair[1]).close()
    # The kill points covered both sides of the switch.
    assert outcomes["cnn@v1"] > 0 and outcomes["cnn@v2"] > 0, outcomes
    # And from whatever the last kill left, a restart completes the update.
    done = subprocess.run(_cmd(mosquitto, root, release_keypair[1], 2), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ReleaseStore(root).active().name == "cnn@v2"
