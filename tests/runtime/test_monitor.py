"""Resource monitor: cgroup v1/v2 budgets, thermal, throttling, CPU, and the sampler thread.

The cgroup/thermal tests build real file trees (the layout the kernel exposes) under a temp
root and point :class:`SystemSource` at it.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.runtime.monitor import MB, FakeSource, ResourceMonitor, SystemSource


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def host(root: Path, available_mb: int = 4000, pid: int = 4242, rss_pages: int = 2560, cgroup: str = "0::/\n") -> int:
    write(root, "proc/meminfo", f"MemTotal:       8000000 kB\nMemFree:         100000 kB\nMemAvailable:   {available_mb * 1024} kB\n")
    write(root, f"proc/{pid}/statm", f"100000 {rss_pages} 500 1 0 900 0\n")
    write(root, f"proc/{pid}/cgroup", cgroup)
    write(root, "proc/stat", "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 50 0 50 400 0 0 0 0 0 0\n")
    return pid


def test_host_memory_only_when_no_cgroup_limit(tmp_path: Path) -> None:
    pid = host(tmp_path, available_mb=4000)
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    write(tmp_path, "sys/fs/cgroup/memory.max", "max\n")
    sample = SystemSource(tmp_path, pid=pid).sample()
    assert sample.available_memory_mb == pytest.approx(4000)
    assert sample.cgroup_limit_mb is None and sample.cgroup_headroom_mb is None
    assert sample.process_rss_mb == pytest.approx(2560 * os.sysconf("SC_PAGE_SIZE") / MB)


def test_cgroup_v2_budget_is_tighter_than_host(tmp_path: Path) -> None:
    pid = host(tmp_path, available_mb=4000, cgroup="0::/system.slice/app.service\n")
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    app = "sys/fs/cgroup/system.slice/app.service"
    write(tmp_path, f"{app}/memory.max", f"{512 * MB}\n")
    write(tmp_path, f"{app}/memory.current", f"{400 * MB}\n")
    # 100 MB of inactive page cache is reclaimable: working set 300 MB, headroom 212 MB.
    write(tmp_path, f"{app}/memory.stat", f"anon {250 * MB}\nfile {150 * MB}\ninactive_file {100 * MB}\nactive_file {50 * MB}\n")
    sample = SystemSource(tmp_path, pid=pid).sample()
    assert sample.cgroup_limit_mb == pytest.approx(512)
    assert sample.cgroup_headroom_mb == pytest.approx(212)
    assert sample.available_memory_mb == pytest.approx(212)
    assert sample.host_available_memory_mb == pytest.approx(4000)


def test_cgroup_v2_limit_on_a_parent_counts(tmp_path: Path) -> None:
    pid = host(tmp_path, available_mb=4000, cgroup="0::/kubepods/pod1/ctr\n")
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "memory\n")
    base = "sys/fs/cgroup/kubepods"
    write(tmp_path, f"{base}/pod1/ctr/memory.max", "max\n")
    write(tmp_path, f"{base}/pod1/ctr/memory.current", f"{100 * MB}\n")
    write(tmp_path, f"{base}/pod1/memory.max", f"{1024 * MB}\n")
    write(tmp_path, f"{base}/pod1/memory.current", f"{900 * MB}\n")
    write(tmp_path, f"{base}/memory.max", f"{8192 * MB}\n")
    write(tmp_path, f"{base}/memory.current", f"{1000 * MB}\n")
    sample = SystemSource(tmp_path, pid=pid).sample()
    assert sample.cgroup_headroom_mb == pytest.approx(124)  # the pod's limit binds
    assert sample.available_memory_mb == pytest.approx(124)


def test_cgroup_v1_limit_and_usage(tmp_path: Path) -> None:
    pid = host(tmp_path, available_mb=3000, cgroup="4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    base = "sys/fs/cgroup/memory/docker/abc"
    write(tmp_path, f"{base}/memory.limit_in_bytes", f"{256 * MB}\n")
    write(tmp_path, f"{base}/memory.usage_in_bytes", f"{200 * MB}\n")
    write(tmp_path, f"{base}/memory.stat", f"cache {20 * MB}\ntotal_inactive_file {8 * MB}\n")
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")  # unlimited
    write(tmp_path, "sys/fs/cgroup/memory/memory.usage_in_bytes", f"{5000 * MB}\n")
    sample = SystemSource(tmp_path, pid=pid).sample()
    assert sample.cgroup_limit_mb == pytest.approx(256)
    assert sample.cgroup_headroom_mb == pytest.approx(64)
    assert sample.available_memory_mb == pytest.approx(64)


def test_cgroup_v1_namespaced_path_falls_back_to_mount_root(tmp_path: Path) -> None:
    # Inside a container /proc/self/cgroup names the host path, but the mount is the container's cgroup.
    pid = host(tmp_path, available_mb=3000, cgroup="4:memory:/docker/abc\n")
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", f"{1024 * MB}\n")
    write(tmp_path, "sys/fs/cgroup/memory/memory.usage_in_bytes", f"{1000 * MB}\n")
    sample = SystemSource(tmp_path, pid=pid).sample()
    assert sample.available_memory_mb == pytest.approx(24)


def test_host_is_the_limit_when_cgroup_headroom_is_larger(tmp_path: Path) -> None:
    pid = host(tmp_path, available_mb=300, cgroup="4:memory:/\n")
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", f"{2048 * MB}\n")
    write(tmp_path, "sys/fs/cgroup/memory/memory.usage_in_bytes", f"{100 * MB}\n")
    sample = SystemSource(tmp_path, pid=pid).sample()
    assert sample.cgroup_headroom_mb == pytest.approx(1948)
    assert sample.available_memory_mb == pytest.approx(300)


def test_cpu_percent_from_proc_stat_deltas(tmp_path: Path) -> None:
    pid = host(tmp_path)
    source = SystemSource(tmp_path, pid=pid)
    assert source.sample().cpu_percent == 0.0  # no previous reading yet
    time.sleep(0.12)
    # +300 busy (user+system) and +100 idle jiffies: 75 %.
    write(tmp_path, "proc/stat", "cpu  300 0 200 900 0 0 0 0 0 0\n")
    assert source.sample().cpu_percent == pytest.approx(75.0)
    # A reading right after (an on-demand sample beside the sampler thread) reuses the figure
    # instead of dividing a few jiffies by a few jiffies.
    write(tmp_path, "proc/stat", "cpu  301 0 200 900 0 0 0 0 0 0\n")
    assert source.sample().cpu_percent == pytest.approx(75.0)
    time.sleep(0.12)
    write(tmp_path, "proc/stat", "cpu  301 0 200 1000 0 0 0 0 0 0\n")  # +1 busy, +100 idle since the 75 % one
    assert source.sample().cpu_percent == pytest.approx(100 * 1 / 101)


def test_cgroup_cpu_quota_share(tmp_path: Path) -> None:
    pid = host(tmp_path)
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "cpu\n")
    write(tmp_path, "sys/fs/cgroup/cpu.max", "50000 100000\n")  # half a core
    write(tmp_path, "sys/fs/cgroup/cpu.stat", "usage_usec 1000000\n")
    source = SystemSource(tmp_path, pid=pid)
    first = source.sample()
    time.sleep(0.2)
    write(tmp_path, "sys/fs/cgroup/cpu.stat", "usage_usec 10000000\n")  # far more than half a core in 0.2 s
    second = source.sample()
    assert first.cpu_percent == 0.0
    assert second.cpu_percent == pytest.approx(100.0)


def test_temperature_prefers_cpu_zones(tmp_path: Path) -> None:
    pid = host(tmp_path)
    write(tmp_path, "sys/class/thermal/thermal_zone0/type", "acpitz\n")
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "95000\n")
    write(tmp_path, "sys/class/thermal/thermal_zone1/type", "cpu-thermal\n")
    write(tmp_path, "sys/class/thermal/thermal_zone1/temp", "61234\n")
    write(tmp_path, "sys/class/thermal/thermal_zone2/type", "x86_pkg_temp\n")
    write(tmp_path, "sys/class/thermal/thermal_zone2/temp", "58000\n")
    assert SystemSource(tmp_path, pid=pid).sample().temperature_c == pytest.approx(61.234)


def test_no_thermal_or_throttle_information_is_none(tmp_path: Path) -> None:
    pid = host(tmp_path)
    sample = SystemSource(tmp_path, pid=pid).sample()
    assert sample.temperature_c is None
    assert sample.throttled is None


def test_raspberry_pi_firmware_throttle_bits(tmp_path: Path) -> None:
    pid = host(tmp_path)
    path = "sys/devices/platform/soc/soc:firmware/get_throttled"
    write(tmp_path, path, "50000\n")  # bits 16/18: throttled *since boot*, not now
    source = SystemSource(tmp_path, pid=pid)
    assert source.sample().throttled is False
    write(tmp_path, path, "0x4\n")  # currently throttled
    assert source.sample().throttled is True


def test_x86_throttle_counter_rising_means_throttled(tmp_path: Path) -> None:
    pid = host(tmp_path)
    for cpu in (0, 1):
        write(tmp_path, f"sys/devices/system/cpu/cpu{cpu}/thermal_throttle/core_throttle_count", "7\n")
    source = SystemSource(tmp_path, pid=pid)
    assert source.sample().throttled is False
    assert source.sample().throttled is False
    write(tmp_path, "sys/devices/system/cpu/cpu1/thermal_throttle/core_throttle_count", "9\n")
    assert source.sample().throttled is True


def test_cpufreq_cap_below_hardware_max_means_throttled(tmp_path: Path) -> None:
    pid = host(tmp_path)
    for cpu in range(4):
        write(tmp_path, f"sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq", "1800000\n")
        write(tmp_path, f"sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_max_freq", "1800000\n")
    source = SystemSource(tmp_path, pid=pid)
    assert source.sample().throttled is False
    write(tmp_path, "sys/devices/system/cpu/cpu2/cpufreq/scaling_max_freq", "1200000\n")
    assert source.sample().throttled is True


def test_real_machine_sample_is_sane() -> None:
    import psutil

    sample = SystemSource().sample()
    assert 0 < sample.available_memory_mb <= psutil.virtual_memory().total / MB
    assert sample.process_rss_mb == pytest.approx(psutil.Process().memory_info().rss / MB, rel=0.2)
    assert 0.0 <= sample.cpu_percent <= 100.0


def test_monitor_samples_in_background_and_survives_bad_subscribers() -> None:
    source = FakeSource(script=[{"available_memory_mb": float(v)} for v in range(1000, 0, -1)])
    monitor = ResourceMonitor(source, interval_s=0.01)
    got: list[float] = []
    enough = threading.Event()

    def good(sample) -> None:
        got.append(sample.available_memory_mb)
        if len(got) >= 5:
            enough.set()

    def bad(sample) -> None:
        raise RuntimeError("subscriber bug")

    monitor.subscribe(bad)
    unsubscribe = monitor.subscribe(good)
    with monitor:
        assert enough.wait(5)
        assert monitor.running
    assert not monitor.running
    assert got[:5] == [1000.0, 999.0, 998.0, 997.0, 996.0]
    assert monitor.latest is not None and monitor.latest.available_memory_mb == got[-1]
    assert any("subscriber bug" in e for e in monitor.errors)
    unsubscribe()
    monitor.sample_now()
    assert len(got) == source.samples_taken - 1  # the unsubscribed callback saw no more


def test_monitor_interval_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="interval"):
        ResourceMonitor(FakeSource(), interval_s=0)


def test_fake_source_refuses_misspelt_readings() -> None:
    with pytest.raises(ConfigError, match="available_mem_mb"):
        FakeSource(available_mem_mb=10)
    source = FakeSource(script=[{"cpu_percent": 50.0}, {"temprature_c": 90.0}])
    with pytest.raises(ConfigError, match="temprature_c"):
        source.set(temprature_c=90.0)
    assert source.sample().cpu_percent == 50.0
    with pytest.raises(ConfigError, match="temprature_c"):
        source.sample()


def test_unreadable_cgroup_file_is_named_and_host_figures_are_used(tmp_path: Path) -> None:
    pid = host(tmp_path, available_mb=4000, cgroup="0::/app\n")
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    (tmp_path / "sys/fs/cgroup/app/memory.max").mkdir(parents=True)  # exists, cannot be read as a file
    sample = SystemSource(tmp_path, pid=pid).sample()
    assert sample.available_memory_mb == pytest.approx(4000) and sample.cgroup_limit_mb is None
    assert "app/memory.max: cannot be read" in sample.cgroup_error
    write(tmp_path, "sys/fs/cgroup/memory.max", "lots\n")  # a parent level with garbage in it
    sample = SystemSource(tmp_path, pid=pid).sample()
    assert "sys/fs/cgroup/memory.max: not a number ('lots')" in sample.cgroup_error
    assert sample.available_memory_mb == pytest.approx(4000)


def test_cgroup_cpu_quota_on_a_parent_counts_v2(tmp_path: Path) -> None:
    pid = host(tmp_path, cgroup="0::/system.slice/app.service\n")
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    write(tmp_path, "sys/fs/cgroup/system.slice/cpu.max", "20000 100000\n")  # CPUQuota=20% on the slice
    write(tmp_path, "sys/fs/cgroup/system.slice/app.service/cpu.max", "max 100000\n")
    source = SystemSource(tmp_path, pid=pid)
    cores, version, folder = source.cpu_quota()
    assert cores == pytest.approx(0.2) and version == 2 and folder.name == "system.slice"


def test_cgroup_cpu_quota_v1_with_cpuacct_usage(tmp_path: Path) -> None:
    pid = host(tmp_path, cgroup="4:cpuacct:/app\n3:cpu:/app\n")
    write(tmp_path, "sys/fs/cgroup/cpu/app/cpu.cfs_quota_us", "50000\n")
    write(tmp_path, "sys/fs/cgroup/cpu/app/cpu.cfs_period_us", "100000\n")
    write(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n")
    write(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n")
    write(tmp_path, "sys/fs/cgroup/cpuacct/app/cpuacct.usage", "1000000000\n")
    source = SystemSource(tmp_path, pid=pid)
    assert source.cpu_quota()[:2] == (pytest.approx(0.5), 1)
    source.sample()
    time.sleep(0.2)
    write(tmp_path, "sys/fs/cgroup/cpuacct/app/cpuacct.usage", "1050000000\n")  # 50 ms of CPU in ~0.2 s
    busy = source.sample().cpu_percent
    assert 20 < busy <= 50  # ~50 ms / (0.2 s x 0.5 CPU)
