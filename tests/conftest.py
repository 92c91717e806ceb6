"""Shared fixtures: sample models generated in code, real releases, and real servers.

Servers (classes in ``tests/support/servers.py``), each on free loopback ports in a temp folder, stopped
after use: ``mosquitto``/``mosquitto_factory``; ``postgres`` (a fresh database URL on the session's
``postgres_server``) and ``postgres_factory`` (own clusters to stop or kill); ``nginx`` (serving
``nginx.root``) and ``nginx_factory``; ``seaweedfs`` (S3, session) with ``s3_bucket`` per test, and
``seaweedfs_factory``. A missing program or package goes through the CI guard (``tests/support/needs.py``):
skipped on a laptop, failed under ``CI=1``.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import servers
from edge_sdk import samples
from needs import missing, need_module, need_root
from servers import MosquittoBroker, NginxServer, PostgresServer, SeaweedS3Server

# Devices measure each release's footprint and benchmark its variants when they activate it
# (runtime/acceptance.py): ~1-10 s per activation. The suite activates releases hundreds of times
# for other reasons, so the checks are off by default here (also in the processes tests start);
# tests/runtime/test_footprint.py, test_ladder.py and test_acceptance.py turn them on explicitly.
os.environ.setdefault("EDGE_SDK_DEVICE_CHECKS", "off")


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


# --- real servers ---------------------------------------------------------------------------------
_fresh = itertools.count(1)  # names of per-test databases and buckets


def _made(make: Callable[[], servers.Server]):
    """Construct a server; a missing program goes through the CI guard."""
    try:
        return make()
    except servers.ServerUnavailable as exc:
        missing(str(exc))


def _factory(tmp_path_factory: pytest.TempPathFactory, cls: type[servers.Server],
             finish: Callable[[servers.Server], None] = lambda server: server.kill()) -> Iterator[Callable[..., servers.Server]]:
    """``make(*args, start=True, **options)`` builds ``cls`` in a fresh temp folder; every server made is finished after."""
    made: list[servers.Server] = []

    def make(*args, start: bool = True, **options):
        server = _made(lambda: cls(tmp_path_factory.mktemp(cls.name), *args, **options))
        made.append(server)
        return server.start() if start else server

    yield make
    for server in made:
        finish(server)


def _one(tmp_path_factory: pytest.TempPathFactory, cls: type[servers.Server], *finish) -> Iterator[servers.Server]:
    """One started server for a session fixture, finished when the session ends."""
    factory = _factory(tmp_path_factory, cls, *finish)
    yield next(factory)()
    next(factory, None)


@pytest.fixture
def mosquitto_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., MosquittoBroker]]:
    """Make (and finally kill) brokers: ``mosquitto_factory(extra_conf=..., autosave_interval=1, start=True)``."""
    yield from _factory(tmp_path_factory, MosquittoBroker)


@pytest.fixture
def mosquitto(mosquitto_factory) -> MosquittoBroker:
    """A fresh running broker for one test (``.url``, ``.host``, ``.port``, ``.kill()``, ``.start()``, ``.restart()``)."""
    return mosquitto_factory()


@pytest.fixture
def postgres_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., PostgresServer]]:
    """Own clusters for tests that stop, kill or restart PostgreSQL: ``postgres_factory(settings=None, start=True)``."""
    yield from _factory(tmp_path_factory, PostgresServer, PostgresServer.cleanup)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One PostgreSQL cluster shared by the session (do not stop it; use ``postgres_factory`` for that)."""
    yield from _one(tmp_path_factory, PostgresServer, PostgresServer.cleanup)


@pytest.fixture
def postgres(postgres_server: PostgresServer) -> str:
    """URL (``postgresql://edge@127.0.0.1:PORT/NAME``) of a fresh, empty database for one test."""
    need_module("psycopg", "the postgres extra")
    return postgres_server.create_database(f"test_{next(_fresh)}")


@pytest.fixture
def nginx_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., NginxServer]]:
    """``nginx_factory(root, limit_rate=None, tls=None, extra_server_conf="", start=True)``: nginx serving ``root``."""
    yield from _factory(tmp_path_factory, NginxServer)


@pytest.fixture
def nginx(nginx_factory, tmp_path: Path) -> NginxServer:
    """nginx serving the empty folder ``nginx.root`` (write files there); ``.url``, ``.requests()``."""
    root = tmp_path / "www"
    root.mkdir()
    return nginx_factory(root)


@pytest.fixture
def seaweedfs_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., SeaweedS3Server]]:
    """Own SeaweedFS servers for tests that kill or restart the store: ``seaweedfs_factory(start=True)``."""
    need_module("boto3", "the s3 extra")
    yield from _factory(tmp_path_factory, SeaweedS3Server)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3Server]:
    """One SeaweedFS S3 server shared by the session (~5 s to start); use ``s3_bucket`` per test."""
    need_module("boto3", "the s3 extra")
    yield from _one(tmp_path_factory, SeaweedS3Server)


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedS3Server) -> str:
    """Name of a fresh, empty bucket on the session's SeaweedFS (``seaweedfs.client()`` reaches it)."""
    name = f"test-{next(_fresh)}"
    seaweedfs.client().create_bucket(Bucket=name)
    return name


# --- TLS: a throw-away CA and certificates for brokers started by tests --------------------------
def make_test_certs(folder: Path, clients: tuple[str, ...] = ("d1",)) -> Path:
    """A throw-away CA, a server certificate for 127.0.0.1 and ``<cn>.crt``/``<cn>.key`` client
    certificates (cryptography is a core dependency); returns the CA file."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=2))

    def cert(subject, issuer, key, sign_key, ca: bool, san=None):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(valid[0]).not_valid_after(valid[1])
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(sign_key, hashes.SHA256())

    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-sdk test CA")])
    srv_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    ca_cert = cert(ca_name, ca_name, ca_key, ca_key, True)
    srv_cert = cert(srv_name, ca_name, srv_key, ca_key, False, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    pem = serialization.Encoding.PEM

    def write_key(path, key):
        path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))

    (folder / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    (folder / "server.crt").write_bytes(srv_cert.public_bytes(pem))
    write_key(folder / "server.key", srv_key)
    for cn in clients:  # the CN is the user name under use_identity_as_username
        key = ec.generate_private_key(ec.SECP256R1())
        (folder / f"{cn}.crt").write_bytes(cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]), ca_name,
                                                key, ca_key, False).public_bytes(pem))
        write_key(folder / f"{cn}.key", key)
    return folder / "ca.crt"


@pytest.fixture(scope="session")
def make_certs():
    """``make_certs(folder, clients=("d1",))`` writes ca.crt, server.crt/.key (127.0.0.1) and
    ``<cn>.crt``/``<cn>.key`` per client; returns the CA file."""
    return make_test_certs


# --- a tiny file system that fills up (disk-full tests) ----------------------------------------
@pytest.fixture
def tiny_disk(tmp_path: Path):
    """``tiny_disk(size="1m")`` mounts a tmpfs of that size and returns its folder (needs root, as CI
    runs); unmounted at teardown."""
    mounts: list[Path] = []

    def mount(size: str = "1m") -> Path:
        need_root("mounting a tmpfs for disk-full tests")
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)], check=True)
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)


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
                     speed_gate=False, footprint=False)
    return out


@pytest.fixture(scope="session")
def multimodal_release(tmp_path_factory: pytest.TempPathFactory, multimodal_path: Path) -> Path:
    """Unsigned release (v1, intel-nuc, onnx) of the fusion model: onnx-fp32/fp16/int8, random calibration.

    Runtime fixtures build with ``speed_gate=False``: which variant of a 0.1 ms model a shared (or
    emulated) build machine times as "slower than FP32" is noise; the gate has its own tests.
    Shared releases build with ``footprint=False``: memory figures are the footprint/ladder tests'
    subject (tests/runtime/test_footprint.py), and without them the runtime keeps the plain
    precision ladder these fixtures' tests were written for.
    """
    import edge_sdk

    out = tmp_path_factory.mktemp("releases") / "multimodal"
    edge_sdk.convert(multimodal_path, ["intel-nuc"], out, calibration="random", targets=["onnx"],
                     model_name="multimodal", latency_runs=20, speed_gate=False,
                     footprint=False)
    return out


# --- release sync (H6): a v1 → v2 update that changes only the last layer ----------------------


def build_cnn_release(out: Path, model, version: int, sign_key: Path | None) -> Path:
    """Convert a sample CNN into a release (intel-nuc, onnx fp32/fp16/int8) at ``out``."""
    import edge_sdk

    onnx_path = samples.save(model, out.parent / f"{out.name}.onnx")
    edge_sdk.convert(onnx_path, ["intel-nuc"], out, calibration="random", targets=["onnx"], model_name="cnn",
                     release_version=version, sign_key=sign_key, latency_runs=3, max_accuracy_drop=100.0,
                     speed_gate=False, footprint=False)
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


# --- optional packages: @pytest.mark.requires("openvino", …) ----------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(*modules): the test needs these importable packages "
                                       "(skipped without them, failed under CI)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        for module in mark.args:
            need_module(module)
