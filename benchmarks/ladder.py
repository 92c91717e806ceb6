"""The precision ladder from measured memory and the device's own benchmark; prints JSON.

* ``variants``: per backend x variant, the footprint measured in fresh processes (peak RSS and
  RSS added by loading, default and lean memory mode), next to the artifact size and the
  converter's 2x-file-size guess it replaces; p50/p99 latency in both memory modes (one process,
  variants timed one after another) and the device's paired ratio to FP32 with its verdict.
* ``ladders``: per backend, the memory steps the runtime takes and the rungs it skips, and why.
* ``pressure``: in a real memory cgroup (root only), a process serving the onnxruntime variants
  under 4 calling threads: time to step down after the limit tightens, time to step back up after
  it is raised, failed calls, OOM kills, RSS against the limit.

Run: ``nice -n 10 python benchmarks/ladder.py [--targets onnx,openvino,tflite,ncnn] [--width 2048]
[--layers 7] [--budget 10]``. Targets that fail to convert here are reported and left out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import edge_sdk  # noqa: E402
from edge_sdk import samples  # noqa: E402
from edge_sdk.manifest import load_manifest  # noqa: E402
from edge_sdk.runtime.acceptance import DeviceChecks  # noqa: E402
from edge_sdk.runtime.bench import bench_variant  # noqa: E402
from edge_sdk.runtime.model import EdgeModel  # noqa: E402
from edge_sdk.types import MemoryMode  # noqa: E402

PROFILE = "generic-x86_64"  # lists all four targets
MB = 2**20


def build(folder: Path, targets: list[str], width: int, layers: int) -> tuple[Path, list[str], float]:
    onnx_path = samples.save(samples.make_mlp(width=width, layers=layers), folder / "mlp.onnx")
    notes, kept = [], []
    for target in targets:  # one conversion per target, so a target that fails here costs only itself
        started = time.perf_counter()
        out = folder / f"release-{target}"
        try:
            edge_sdk.convert(onnx_path, [PROFILE], out, calibration="random", targets=[target], model_name="mlp",
                             latency_runs=5, speed_gate=False, max_accuracy_drop=100.0, mixed_precision=False)
            kept.append((out, time.perf_counter() - started))
        except edge_sdk.EdgeSDKError as exc:
            notes.append(f"target {target} left out: {str(exc).splitlines()[0]}")
    return kept, notes, onnx_path.stat().st_size / MB


def variants_table(release: Path, threads: int) -> list[dict]:
    manifest = load_manifest(release)
    rows = []
    for variant in manifest.variants:
        fp = variant.validation.footprint
        row = {"variant": variant.id, "backend": variant.backend, "precision": variant.precision.value,
               "status": variant.status.value, "artifact_mb": round(sum(f.size for f in variant.files) / MB, 1),
               "old_guess_2x_file_mb": round(2 * sum(f.size for f in variant.files) / MB, 1)}
        if fp is not None:
            row.update(peak_rss_mb=fp.default.peak_rss_mb, load_rss_mb=fp.default.load_rss_mb,
                       lean_peak_rss_mb=fp.lean.peak_rss_mb if fp.lean else None)
        if variant.ok:
            for mode in (MemoryMode.DEFAULT, MemoryMode.LEAN):
                result = bench_variant(release, manifest, variant, runs=60, warmup=5, threads=threads, memory=mode)
                suffix = "" if mode is MemoryMode.DEFAULT else "_lean"
                row[f"p50_ms{suffix}"] = None if result.p50_ms is None else round(result.p50_ms, 3)
                row[f"p99_ms{suffix}"] = None if result.p99_ms is None else round(result.p99_ms, 3)
                if result.error:
                    row[f"error{suffix}"] = result.error
        rows.append(row)
    return rows


def ladder_of(release: Path, backend: str, budget: float, threads: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="ladder-")) / "release"
    shutil.copytree(release, folder)  # fresh: no device figures yet, measured at this load
    started = time.perf_counter()
    with EdgeModel.load(folder, profile=PROFILE, backend=backend, monitor=False, threads=threads,
                        device_checks=DeviceChecks(acceptance_budget_s=budget)) as model:
        load_s = time.perf_counter() - started
        info = model.info()
    shutil.rmtree(folder.parent, ignore_errors=True)
    device = info.device or {}
    return {"backend": backend, "load_with_checks_s": round(load_s, 2), "ladder": info.ladder,
            "acceptance": device.get("acceptance"),
            "device": {vid: {k: v.get(k) for k in ("p50_ms", "p99_ms", "latency_ratio", "latency_ratio_ci", "verdict",
                                                     "footprint_mb", "footprint_lean_mb", "used")}
                       for vid, v in device.get("variants", {}).items()}}


def pressure(release: Path) -> dict:
    from cgroups import PRESSURE, make_memory_cgroup, oom_kills, remove

    if os.geteuid() != 0:
        return {"skipped": "needs root for a memory cgroup"}
    made = make_memory_cgroup(limit_mb=1200)
    if made is None:
        return {"skipped": "no writable memory cgroup here"}
    folder, version = made
    copy = Path(tempfile.mkdtemp(prefix="pressure-")) / "release"
    shutil.copytree(release, copy)
    try:
        proc = subprocess.run([sys.executable, str(PRESSURE), str(copy), str(folder), version, PROFILE], capture_output=True,
                              text=True, timeout=600,
                              preexec_fn=lambda: (folder / "cgroup.procs").write_text(str(os.getpid())))
        kills = oom_kills(folder, version)
    finally:
        remove(folder)
        shutil.rmtree(copy.parent, ignore_errors=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] }", "oom_kills": kills}
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = [(e["kind"], e["to_precision"], e.get("swap_ms"), e.get("paused")) for e in report["events"]
             if e["kind"] in ("step_down", "step_up")]
    return {"cgroup": version, "calls": report["calls"], "failed_calls": len(report["errors"]), "oom_kills": kills,
            "step_down_s": report.get("step_down_s"), "step_up_s": report.get("step_up_s"),
            "stepped_down": report["stepped_down"], "held_int8_under_tight_limit": report["held_int8"],
            "stepped_up": report["stepped_up"], "tight_limit_mb": round(report["tight_limit_mb"], 1),
            "rss_under_tight_limit_mb": round(report["rss_under_tight_mb"], 1),
            "serving_fp32_rss_mb": round(report["serving_fp32_mb"], 1), "serving_int8_rss_mb": round(report["serving_int8_mb"], 1),
            "switches": [{"kind": k, "to": p, "swap_ms": round(ms, 1) if ms else None, "paused": paused}
                         for k, p, ms, paused in steps]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="onnx,openvino", help="comma-separated export targets")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--budget", type=float, default=10.0, help="on-device acceptance budget, seconds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-pressure", action="store_true", help="skip the memory-cgroup run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ladder-") as tmp:
        releases, notes, model_mb = build(Path(tmp), args.targets.split(","), args.width, args.layers)
        result: dict = {"model": {"kind": "mlp", "width": args.width, "layers": args.layers, "fp32_mb": round(model_mb, 1)},
                        "notes": notes, "conversion_s": {}, "variants": [], "ladders": []}
        onnx_release = None
        for release, seconds in releases:
            result["conversion_s"][release.name] = round(seconds, 1)
            result["variants"] += variants_table(release, args.threads)
            backend = load_manifest(release).variants[0].backend
            result["ladders"].append(ladder_of(release, backend, args.budget, args.threads))
            if backend == "onnxruntime":
                onnx_release = release
        if onnx_release is not None and not args.no_pressure:
            result["pressure"] = pressure(onnx_release)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
