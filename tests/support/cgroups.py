"""Real cgroups for tests: a child memory or CPU cgroup of this process's own (v2 or v1).

Each maker returns ``(folder, version)`` or ``None`` where cgroups cannot be created here (the
caller skips through ``needs.missing``); :func:`remove` takes a folder away once its processes
have exited.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

V2 = Path("/sys/fs/cgroup")
MB = 2**20
PRESSURE = Path(__file__).with_name("pressure.py")  # the serving-under-pressure script run inside a cgroup


def own_cgroup(controller_line) -> str:
    """This process's cgroup path for the controller line ``controller_line(controllers)`` accepts."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller_line(controllers):
            return path.lstrip("/")
    return ""


def _v2_child(controller: str, name: str) -> Path | None:
    if not (V2 / "cgroup.controllers").exists() or controller not in (V2 / "cgroup.controllers").read_text().split():
        return None
    folder = V2 / own_cgroup(lambda c: c == "") / name
    folder.mkdir()
    return folder


def make_memory_cgroup(limit_mb: int) -> tuple[Path, str] | None:
    """Create a child memory cgroup limited to ``limit_mb``; (folder, "v1"/"v2") or None."""
    v1 = V2 / "memory"
    name = f"edge-sdk-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        if (v1 / "memory.limit_in_bytes").exists():
            folder = v1 / own_cgroup(lambda c: "memory" in c.split(",")) / name
            folder.mkdir()
            (folder / "memory.limit_in_bytes").write_text(str(limit_mb * MB))
            return folder, "v1"
        folder = _v2_child("memory", name)
        if folder is None:
            return None
        if not (folder / "memory.max").exists():
            folder.rmdir()
            return None
        (folder / "memory.max").write_text(str(limit_mb * MB))
        return folder, "v2"
    except OSError:
        return None


def set_memory_limit(folder: Path, version: str, limit_mb: float) -> None:
    (folder / ("memory.limit_in_bytes" if version == "v1" else "memory.max")).write_text(str(int(limit_mb * MB)))


def oom_kills(folder: Path, version: str) -> int:
    """How many processes the kernel's OOM killer killed in this cgroup."""
    name = "memory.oom_control" if version == "v1" else "memory.events"
    for line in (folder / name).read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def make_cpu_cgroup(cpus: float) -> tuple[Path, str] | None:
    """Create a child CPU cgroup with a quota of ``cpus`` CPUs (0.2: a fifth of one core)."""
    period = 100_000
    quota = int(cpus * period)
    name = f"edge-sdk-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        v1 = V2 / "cpu"
        if (v1 / "cpu.cfs_quota_us").exists():
            folder = v1 / own_cgroup(lambda c: "cpu" in c.split(",")) / name
            folder.mkdir()
            (folder / "cpu.cfs_period_us").write_text(str(period))
            (folder / "cpu.cfs_quota_us").write_text(str(quota))
            return folder, "v1"
        folder = _v2_child("cpu", name)
        if folder is None:
            return None
        (folder / "cpu.max").write_text(f"{quota} {period}")
        return folder, "v2"
    except OSError:
        return None


def remove(folder: Path) -> None:
    """Remove a cgroup folder once its processes are gone (retries for a few seconds)."""
    for _ in range(50):
        try:
            folder.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
