"""Serve a release under 4 calling threads inside a memory cgroup while it tightens and loosens.

Run as ``python tests/support/pressure.py RELEASE CGROUP_FOLDER v1|v2 [PROFILE]`` from inside that cgroup
(tests/runtime/test_ladder.py, benchmarks/ladder.py). It loads the release's onnxruntime variants
with device checks on (footprints measured here), then: tightens the limit to 40 MB above its
working set (FP32's threshold fails, INT8's holds) and waits for the step down; sets a limit that
holds INT8 but could not hold FP32 at all and checks it stays; raises the limit and waits for the
step back up. Prints one JSON report: calls, failed calls, timings, RSS, events.
"""

import json, os, sys, threading, time
from pathlib import Path
import numpy as np
from edge_sdk.profiles import Hysteresis, PolicySettings, Thresholds
from edge_sdk.runtime.acceptance import DeviceChecks
from edge_sdk.runtime.model import EdgeModel
from edge_sdk.runtime.monitor import SystemSource

release, folder, version = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
profile = sys.argv[4] if len(sys.argv) > 4 else "intel-nuc"
limit_file = folder / ("memory.limit_in_bytes" if version == "v1" else "memory.max")
usage_file = folder / ("memory.usage_in_bytes" if version == "v1" else "memory.current")
MB = 2**20

def working_set_mb():
    # What the kernel charges and cannot simply drop: usage less inactive page cache.
    stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
    inactive = int(stat.get("total_inactive_file", stat.get("inactive_file", 0)))
    return (int(usage_file.read_text()) - inactive) / MB

def set_limit(mb):
    print(f"limit {mb:.0f} MB (rss {rss_mb():.0f} MB, working set {working_set_mb():.0f} MB, {model.precision.value})",
          file=sys.stderr, flush=True)
    limit_file.write_text(str(int(mb * MB)))

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB

# Memory only: 4 calling threads keep the CPU busy, which must not hold FP32 back here.
settings = PolicySettings(thresholds={"fp32": Thresholds(min_free_memory_mb=100, max_cpu_percent=100)},
                          hysteresis=Hysteresis(memory_mb=40), min_dwell_s=0)
model = EdgeModel.load(release, profile=profile, backend="onnxruntime", monitor=SystemSource(), interval_s=0.05,
                       policy=settings, device_checks=DeviceChecks(acceptance_budget_s=0, memory_modes=False))
ladder = model.info().ladder
report = {"initial": model.precision.value, "ladder": ladder, "calls": 0, "errors": [], "timeline": [], "max_rss_mb": 0}
stop = threading.Event()
lock = threading.Lock()
x = np.random.default_rng(0).random((1, 256), dtype=np.float32)

def call():
    while not stop.is_set():
        try:
            model.run({"x": x})
            with lock:
                report["calls"] += 1
        except Exception as exc:
            with lock:
                report["errors"].append(repr(exc))
        time.sleep(0.002)  # callers with gaps, as requests come: the swap's load gets some CPU too

def wait_for(precision, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report["max_rss_mb"] = max(report["max_rss_mb"], rss_mb())
        if model.precision.value == precision:
            return True
        time.sleep(0.02)
    return False

threads = [threading.Thread(target=call) for _ in range(4)]
for t in threads:
    t.start()
time.sleep(0.5)
fp32_mb, int8_mb = ladder["footprint_mb"]["fp32"], ladder["footprint_mb"]["int8"]
serving_fp32 = rss_mb()
# Tighten the limit to a little above what FP32 takes now: its threshold fails, INT8's holds.
set_limit(working_set_mb() + 40)
started = time.monotonic()
report["stepped_down"] = wait_for("int8", 120)
report["step_down_s"] = round(time.monotonic() - started, 3)
time.sleep(0.5)
serving_int8, charged_int8 = rss_mb(), working_set_mb()
# Now a limit that holds INT8 but could not hold FP32 at all.
tight = charged_int8 + (fp32_mb - int8_mb) / 2
set_limit(tight)
report.update(tight_limit_mb=tight, serving_fp32_mb=serving_fp32, serving_int8_mb=serving_int8,
              charged_int8_mb=charged_int8)
time.sleep(1.5)
report["held_int8"] = model.precision.value == "int8"
report["rss_under_tight_mb"] = rss_mb()
set_limit(4096)
started = time.monotonic()
report["stepped_up"] = wait_for("fp32", 120)
report["step_up_s"] = round(time.monotonic() - started, 3)
stop.set()
for t in threads:
    t.join()
report["events"] = [e.as_dict() for e in model.events]
report["latest"], report["monitor_errors"] = model.monitor.latest.as_dict(), model.monitor.errors
model.close()
print(json.dumps(report))
