"""Resource monitor: the figures the precision policy decides on, sampled in the background.

Free memory is the *container's* budget, not just the host's: ``min(host MemAvailable, cgroup
limit - cgroup working set)`` with cgroup v2 (``memory.max``/``memory.current``) or v1
(``memory.limit_in_bytes``/``memory.usage_in_bytes``), walking up the hierarchy because a limit
may be set on a parent. psutil alone reports the host's memory, so a process in a 512 MB
container on a 8 GB board would think it had gigabytes to spare.

Every file is read below a ``root`` folder (``/`` on a device), so tests point a
:class:`SystemSource` at a temporary tree of real files; :class:`FakeSource` replaces the whole
source for policy tests.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from ..errors import ConfigError

MB = 2**20
# cgroup v1 reports "no limit" as a huge page-rounded number (2**63 - 4096 and friends).
_V1_UNLIMITED = 2**60
# CPU utilisation is a ratio of counter deltas; readings closer than this reuse the last figure.
MIN_CPU_WINDOW_S = 0.1


@dataclass(frozen=True)
class ResourceSample:
    """One reading. ``None`` means the platform does not expose that figure."""

    time: float  # time.monotonic() of the reading
    available_memory_mb: float  # min(host available, cgroup headroom): what the policy uses
    host_available_memory_mb: float
    cgroup_headroom_mb: float | None  # limit - working set of the tightest limited cgroup
    cgroup_limit_mb: float | None
    process_rss_mb: float
    cpu_percent: float  # 0..100 of the CPUs this process may use (cgroup CPU quota respected)
    temperature_c: float | None
    throttled: bool | None  # the SoC is capping the CPU clock now (thermal / undervoltage)
    cgroup_error: str | None = None  # a cgroup file that exists but cannot be read: host figures were used

    def as_dict(self) -> dict[str, float | bool | None]:
        return asdict(self)

    def report(self) -> dict[str, float | bool | None]:
        """The figures a device reports (twin ``resources``, telemetry ``stats``), rounded."""
        def mb(value: float | None) -> float | None:
            return None if value is None else round(value, 1)

        return {"cpu_percent": round(self.cpu_percent, 1), "memory_available_mb": mb(self.available_memory_mb),
                "memory_limit_mb": mb(self.cgroup_limit_mb), "process_rss_mb": mb(self.process_rss_mb),
                "temperature_c": self.temperature_c, "throttled": self.throttled}


class ResourceSource(Protocol):
    """Anything that can take a :class:`ResourceSample` now."""

    def sample(self) -> ResourceSample: ...


# ---------------------------------------------------------------------------------------------
# The real source


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _read_checked(path: Path, problems: list[str]) -> str | None:
    """Like :func:`_read`, but a file that exists and cannot be read is noted in ``problems``."""
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        problems.append(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})")
        return None


def _int_checked(path: Path, problems: list[str]) -> int | None:
    text = _read_checked(path, problems)
    if text is None:
        return None
    try:
        return int(text.split()[0], 0)
    except (ValueError, IndexError):
        problems.append(f"{path}: not a number ({text[:40]!r})")
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.split()[0], 0)
    except (ValueError, IndexError):
        return None


def _stat_value(path: Path, key: str) -> int:
    """A ``key value`` line of a cgroup ``memory.stat``/``cpu.stat`` file (0 when absent)."""
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


@dataclass(frozen=True)
class _CgroupMemory:
    limit_mb: float
    headroom_mb: float


class SystemSource:
    """Reads ``/proc``, ``/sys/fs/cgroup``, ``/sys/class/thermal`` and cpufreq below ``root``.

    ``pid`` is the process whose RSS is reported (this one by default). CPU utilisation is the
    host's (``/proc/stat``), or the cgroup's share of its CPU quota when that is higher, measured
    between consecutive samples.
    """

    def __init__(self, root: Path | str = "/", pid: int | None = None) -> None:
        self.root = Path(root)
        self.pid = pid or os.getpid()
        self._last_cpu: tuple[float, int, int] | None = None  # (time, busy, total) jiffies
        self._last_cgroup_cpu: tuple[float, int] | None = None  # (time, usage usec)
        self._cpu_percent = (0.0, 0.0)  # last (host, cgroup) figures, reused for too-close readings
        self._last_throttle_count: int | None = None
        self._lock = threading.Lock()  # the sampler thread and on-demand readings share the deltas

    # -- memory --------------------------------------------------------------------------------
    def _host_available_mb(self) -> float:
        meminfo = _read(self.root / "proc/meminfo") or ""
        fields = {}
        for line in meminfo.splitlines():
            name, _, value = line.partition(":")
            parts = value.split()
            if parts:
                fields[name] = int(parts[0]) * 1024  # kB
        if "MemAvailable" in fields:
            return fields["MemAvailable"] / MB
        if "MemFree" in fields:  # kernels before 3.14
            return (fields["MemFree"] + fields.get("Cached", 0)) / MB
        import psutil

        return psutil.virtual_memory().available / MB

    def _cgroup_dirs(self, controller: str = "memory") -> Iterator[tuple[int, Path]]:
        """(cgroup version, folder) for this process's ``controller`` cgroup and each ancestor."""
        text = _read(self.root / f"proc/{self.pid}/cgroup") or _read(self.root / "proc/self/cgroup") or ""
        base = self.root / "sys/fs/cgroup"
        for line in text.splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            _, controllers, rel = parts
            rel = rel.lstrip("/")
            if controllers == "" and (base / "cgroup.controllers").exists():
                mount, version = base, 2
            elif controller in controllers.split(","):
                # v1 mounts a hierarchy under its controller's name, or under the co-mounted list.
                mount, version = (base / controller if (base / controller).is_dir() else base / controllers), 1
            else:
                continue
            folder = mount / rel
            # Inside a container the cgroup namespace may show a path that the mount does not
            # have (the mount *is* the container's cgroup): fall back to the mount root.
            if not folder.is_dir():
                folder = mount
            while True:
                yield version, folder
                if folder == mount:
                    break
                folder = folder.parent

    def _cgroup_memory(self, problems: list[str]) -> _CgroupMemory | None:
        """The tightest limited cgroup up the chain; files that exist but cannot be read or
        parsed are noted in ``problems`` (that level then counts as unlimited)."""
        tightest: _CgroupMemory | None = None
        for version, folder in self._cgroup_dirs():
            if version == 2:
                limit_text = _read_checked(folder / "memory.max", problems)
                if limit_text is None or limit_text == "max":
                    continue
                try:
                    limit = int(limit_text)
                except ValueError:
                    problems.append(f"{folder / 'memory.max'}: not a number ({limit_text[:40]!r})")
                    continue
                usage = _int_checked(folder / "memory.current", problems)
                inactive = _stat_value(folder / "memory.stat", "inactive_file")
            else:
                limit = _int_checked(folder / "memory.limit_in_bytes", problems)
                if limit is None or limit >= _V1_UNLIMITED:
                    continue
                usage = _int_checked(folder / "memory.usage_in_bytes", problems)
                inactive = _stat_value(folder / "memory.stat", "total_inactive_file") or _stat_value(
                    folder / "memory.stat", "inactive_file")
            if usage is None:
                continue
            # The working set, as the OOM killer and kubelet see it: inactive page cache is
            # reclaimable and does not count against the budget.
            working_set = max(usage - inactive, 0)
            entry = _CgroupMemory(limit_mb=limit / MB, headroom_mb=max(limit - working_set, 0) / MB)
            if tightest is None or entry.headroom_mb < tightest.headroom_mb:
                tightest = entry
        return tightest

    def _rss_mb(self) -> float:
        statm = _read(self.root / f"proc/{self.pid}/statm")
        if statm:
            try:
                return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
            except (ValueError, IndexError):
                pass
        import psutil

        return psutil.Process(self.pid).memory_info().rss / MB

    # -- CPU -----------------------------------------------------------------------------------
    def _host_cpu_percent(self, now: float) -> float:
        first = (_read(self.root / "proc/stat") or "").splitlines()[:1]
        if not first or not first[0].startswith("cpu "):
            return 0.0
        values = [int(v) for v in first[0].split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        total = sum(values[:8])  # guest time is already counted in user
        if self._last_cpu is not None and now - self._last_cpu[0] < MIN_CPU_WINDOW_S:
            return self._cpu_percent[0]  # a few jiffies apart: the ratio would be noise
        previous, self._last_cpu = self._last_cpu, (now, total - idle, total)
        if previous is None or total <= previous[2]:
            return 0.0
        value = 100.0 * (total - idle - previous[1]) / (total - previous[2])
        self._cpu_percent = (value, self._cpu_percent[1])
        return value

    def cpu_quota(self) -> tuple[float, int, Path] | None:
        """The tightest CPU quota up this process's cgroup chain, as systemd's ``CPUQuota=`` sets
        it: (CPUs, version, folder), from v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``/``cfs_period_us``."""
        tightest: tuple[float, int, Path] | None = None
        for version, folder in self._cgroup_dirs("cpu"):
            if version == 2:
                text = _read(folder / "cpu.max")
                if not text or text.startswith("max"):
                    continue
                try:
                    quota, period = (int(v) for v in text.split()[:2])
                except ValueError:
                    continue
            else:
                quota, period = _read_int(folder / "cpu.cfs_quota_us"), _read_int(folder / "cpu.cfs_period_us")
                if quota is None or period is None or quota <= 0:
                    continue  # -1: no quota at this level
            if quota > 0 and period > 0 and (tightest is None or quota / period < tightest[0]):
                tightest = (quota / period, version, folder)
        return tightest

    def _cgroup_usage_usec(self, version: int, folder: Path) -> int:
        if version == 2:
            return _stat_value(folder / "cpu.stat", "usage_usec")
        # v1 counts CPU time in the cpuacct hierarchy, at the same path as the cpu one (or in the
        # same folder when cpu and cpuacct are mounted together).
        parts = folder.relative_to(self.root / "sys/fs/cgroup").parts
        for acct in (self.root / "sys/fs/cgroup" / "cpuacct" / Path(*parts[1:]) if len(parts) > 1
                     else self.root / "sys/fs/cgroup" / "cpuacct", folder):
            ns = _read_int(acct / "cpuacct.usage")
            if ns is not None:
                return ns // 1000
        return 0

    def _cgroup_cpu_percent(self, now: float) -> float:
        """Usage as a share of the tightest CPU quota up the cgroup chain (0 when there is none)."""
        found = self.cpu_quota()
        if found is None:
            return 0.0
        cores, version, folder = found
        usage = self._cgroup_usage_usec(version, folder)
        if self._last_cgroup_cpu is not None and now - self._last_cgroup_cpu[0] < MIN_CPU_WINDOW_S:
            return self._cpu_percent[1]
        previous, self._last_cgroup_cpu = self._last_cgroup_cpu, (now, usage)
        if previous is None or now <= previous[0] or cores <= 0:
            return 0.0
        value = min(100.0, 100.0 * (usage - previous[1]) / 1e6 / ((now - previous[0]) * cores))
        self._cpu_percent = (self._cpu_percent[0], value)
        return value

    # -- thermal -------------------------------------------------------------------------------
    def _temperature_c(self) -> float | None:
        zones = sorted((self.root / "sys/class/thermal").glob("thermal_zone*"))
        cpu_like, other = [], []
        for zone in zones:
            millideg = _read_int(zone / "temp")
            if millideg is None or millideg <= -273000:
                continue
            kind = (_read(zone / "type") or "").lower()
            (cpu_like if any(k in kind for k in ("cpu", "soc", "pkg", "x86", "core", "bigcore")) else other).append(millideg / 1000)
        readings = cpu_like or other
        if readings:
            return max(readings)
        if self.root == Path("/"):
            try:
                import psutil

                sensors = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
            except OSError:
                sensors = {}
            values = [t.current for name, entries in sensors.items()
                      if name in ("coretemp", "k10temp", "cpu_thermal", "soc_thermal") for t in entries]
            if values:
                return max(values)
        return None

    def _throttled(self) -> bool | None:
        # Raspberry Pi firmware: the value `vcgencmd get_throttled` prints (bit 1: ARM frequency
        # capped, bit 2: currently throttled).
        # The firmware file prints the value in hex, with or without a 0x prefix.
        rpi_text = _read(self.root / "sys/devices/platform/soc/soc:firmware/get_throttled")
        if rpi_text:
            try:
                return bool(int(rpi_text.split()[0], 16) & 0b110)
            except ValueError:
                pass
        cpus = sorted((self.root / "sys/devices/system/cpu").glob("cpu[0-9]*"))
        # x86: the kernel counts thermal throttling events per core; a rise since the last
        # sample means the CPU throttled in between.
        counts = [c for c in (_read_int(cpu / "thermal_throttle/core_throttle_count") for cpu in cpus) if c is not None]
        if counts:
            total = sum(counts)
            previous, self._last_throttle_count = self._last_throttle_count, total
            if previous is not None and total > previous:
                return True
        # ARM SoCs under thermal control lower cpufreq's scaling_max_freq below the hardware max.
        capped = None
        for cpu in cpus:
            hw_max = _read_int(cpu / "cpufreq/cpuinfo_max_freq")
            cap = _read_int(cpu / "cpufreq/scaling_max_freq")
            if hw_max and cap:
                capped = bool(capped) or cap < hw_max * 0.95
        if capped is not None:
            return capped
        return False if counts else None

    def sample(self) -> ResourceSample:
        with self._lock:
            return self._sample()

    def _sample(self) -> ResourceSample:
        now = time.monotonic()
        host = self._host_available_mb()
        problems: list[str] = []
        cgroup = self._cgroup_memory(problems)
        available = min(host, cgroup.headroom_mb) if cgroup else host
        return ResourceSample(
            time=now,
            available_memory_mb=available,
            host_available_memory_mb=host,
            cgroup_headroom_mb=cgroup.headroom_mb if cgroup else None,
            cgroup_limit_mb=cgroup.limit_mb if cgroup else None,
            process_rss_mb=self._rss_mb(),
            cpu_percent=max(self._host_cpu_percent(now), self._cgroup_cpu_percent(now)),
            temperature_c=self._temperature_c(),
            throttled=self._throttled(),
            cgroup_error="; ".join(problems) or None,
        )


# ---------------------------------------------------------------------------------------------
# A scripted source for tests and simulations


class FakeSource:
    """Returns scripted readings: set :attr:`values` (or call :meth:`set`) and sample.

    With ``script`` (an iterable of dicts), each :meth:`sample` takes the next entry and keeps
    the last one once the script runs out.
    """

    def __init__(self, script: Iterable[dict[str, float | bool | None]] | None = None, **values: float | bool | None) -> None:
        self.values: dict[str, float | bool | None] = {
            "available_memory_mb": 8192.0, "process_rss_mb": 100.0, "cpu_percent": 10.0,
            "temperature_c": 45.0, "throttled": False,
        }
        self._check_keys(values)
        self.values.update(values)
        self._script = iter(script) if script is not None else None
        self._lock = threading.Lock()
        self.samples_taken = 0

    def _check_keys(self, values: dict[str, float | bool | None]) -> None:
        # A misspelt key would otherwise leave the default in place and the test pass for the wrong reason.
        unknown = sorted(set(values) - set(self.values))
        if unknown:
            raise ConfigError(f"FakeSource: unknown reading(s) {unknown} (known: {sorted(self.values)})")

    def set(self, **values: float | bool | None) -> None:
        self._check_keys(values)
        with self._lock:
            self.values.update(values)

    def sample(self) -> ResourceSample:
        with self._lock:
            if self._script is not None:
                step = next(self._script, None)
                if step is not None:
                    self._check_keys(step)
                    self.values.update(step)
            self.samples_taken += 1
            v = dict(self.values)
        available = float(v["available_memory_mb"])  # type: ignore[arg-type]
        return ResourceSample(
            time=time.monotonic(), available_memory_mb=available, host_available_memory_mb=available,
            cgroup_headroom_mb=None, cgroup_limit_mb=None, process_rss_mb=float(v["process_rss_mb"]),  # type: ignore[arg-type]
            cpu_percent=float(v["cpu_percent"]),  # type: ignore[arg-type]
            temperature_c=v["temperature_c"],  # type: ignore[arg-type]
            throttled=v["throttled"],  # type: ignore[arg-type]
        )


# ---------------------------------------------------------------------------------------------
# The background sampler

Subscriber = Callable[[ResourceSample], None]


class ResourceMonitor:
    """Samples ``source`` every ``interval_s`` on a daemon thread and hands each reading to the
    subscribers (in the sampler thread; keep callbacks short or hand work to another thread).

    ``latest`` is the most recent reading; :meth:`sample_now` takes one synchronously (tests, and
    the first reading before the thread starts).
    """

    def __init__(self, source: ResourceSource | None = None, interval_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ConfigError(f"monitor interval must be > 0 seconds, got {interval_s}")
        self.source: ResourceSource = source if source is not None else SystemSource()
        self.interval_s = interval_s
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.latest: ResourceSample | None = None
        self.errors: list[str] = []  # last few subscriber/source failures (never kill the thread)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(sample)`` on every reading; returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def sample_now(self) -> ResourceSample:
        """Take one reading, publish it to subscribers, and return it."""
        sample = self.source.sample()
        self.latest = sample
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(sample)
            except Exception as exc:  # a subscriber's bug must not stop the sampling
                self.errors = (self.errors + [f"{type(exc).__name__}: {exc}"])[-10:]
        return sample

    def start(self) -> ResourceMonitor:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="edge-sdk-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample_now()
            except Exception as exc:
                self.errors = (self.errors + [f"{type(exc).__name__}: {exc}"])[-10:]
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ResourceMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
