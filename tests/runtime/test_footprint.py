"""Memory footprint per variant, measured in fresh processes: by the converter into the manifest,
and by the device into ``device-figures.json`` beside the release."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from edge_sdk.errors import BackendError
from edge_sdk.manifest import MANIFEST_NAME, Manifest, load_manifest
from edge_sdk.runtime.footprint import FIGURES_NAME, DeviceFigures, FootprintMeter
from edge_sdk.types import MemoryMode, Precision

MB = 2**20


def by_id(release: Path) -> dict:
    return {v.id: v for v in load_manifest(release).variants}


@pytest.mark.slow
def test_converter_writes_measured_footprint_per_variant(mlp_release: Path) -> None:
    variants = by_id(mlp_release)
    for variant in variants.values():
        assert variant.ok, (variant.id, variant.reason)
        fp = variant.validation.footprint
        assert fp is not None, variant.id
        assert fp.backend == variant.backend and fp.weights_bytes == sum(f.size for f in variant.files)
        assert fp.default.peak_rss_mb >= fp.default.load_rss_mb > 0
        assert fp.lean is not None  # both backends have a lean mode to measure
        assert variant.backend in fp.machine
    ort = {v.precision: v.validation.footprint for v in variants.values() if v.backend == "onnxruntime"}
    ov = {v.precision: v.validation.footprint for v in variants.values() if v.backend == "openvino"}
    weights = ort[Precision.FP32].weights_bytes / MB
    assert weights > 90
    # The weights are resident after loading on every backend.
    assert ort[Precision.FP32].default.load_rss_mb > 0.9 * weights
    assert ov[Precision.FP32].default.load_rss_mb > 0.9 * weights
    # INT8 weights are a quarter: it takes well under FP32's memory on both backends.
    assert ort[Precision.INT8].default.peak_rss_mb < 0.6 * ort[Precision.FP32].default.peak_rss_mb
    assert ov[Precision.INT8].default.peak_rss_mb < 0.6 * ov[Precision.FP32].default.peak_rss_mb
    # onnxruntime pre-packs a second copy of the MatMul weights: turning it off saves memory
    # (how much varies from run to run with what the pre-packer allocates: 3-30% measured).
    assert ort[Precision.FP32].lean.peak_rss_mb < ort[Precision.FP32].default.peak_rss_mb
    # onnxruntime on x86 casts FP16 weights back to FP32 at load: FP16 does not save memory there.
    assert ort[Precision.FP16].default.peak_rss_mb > 0.9 * ort[Precision.FP32].default.peak_rss_mb


def test_manifest_without_footprint_still_loads(cnn_release: Path) -> None:
    data = json.loads((cnn_release / MANIFEST_NAME).read_bytes())
    for variant in data["variants"]:
        variant["validation"].pop("footprint", None)
    manifest = Manifest.from_bytes(json.dumps(data).encode())
    assert all(v.validation.footprint is None for v in manifest.variants)


def test_meter_measures_each_variant_from_a_clean_process(mlp_release: Path) -> None:
    manifest = load_manifest(mlp_release)
    int8 = manifest.variant("onnx-int8")
    files = [mlp_release / f.path for f in int8.files]
    with FootprintMeter() as meter:
        first = meter.measure_files(files, int8, modes=[MemoryMode.DEFAULT])
        # This process loads the variant itself meanwhile: the next measurement does not see it.
        from edge_sdk.runtime.backends.base import get_backend

        session = get_backend("onnxruntime").load(files, int8.inputs, int8.outputs)
        session.run({"x": np.zeros((1, 256), np.float32)})
        again = meter.measure_files(files, int8, modes=[MemoryMode.DEFAULT])
        session.close()
    assert first.lean is None
    assert again.default.peak_rss_mb == pytest.approx(first.default.peak_rss_mb, rel=0.15)
    assert first.default.load_rss_mb > 0.9 * first.weights_bytes / MB


def test_meter_failure_names_the_variant(mlp_release: Path, tmp_path: Path) -> None:
    manifest = load_manifest(mlp_release)
    int8 = manifest.variant("onnx-int8")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with FootprintMeter() as meter, pytest.raises(BackendError, match=r"footprint of onnx-int8 \(default\).*cannot load"):
        meter.measure_files([broken], int8, modes=[MemoryMode.DEFAULT])


def test_device_figures_file_round_trip_and_corruption(tmp_path: Path) -> None:
    assert DeviceFigures.read(tmp_path) == (None, None)
    figures = DeviceFigures(machine="x86_64 onnxruntime 1.0")
    assert figures.write(tmp_path) is None
    read, problem = DeviceFigures.read(tmp_path)
    assert problem is None and read.machine == "x86_64 onnxruntime 1.0"
    assert [p.name for p in tmp_path.iterdir()] == [FIGURES_NAME]  # no temp file left behind
    (tmp_path / FIGURES_NAME).write_text("{not json")
    read, problem = DeviceFigures.read(tmp_path)
    assert read is None and FIGURES_NAME in problem and "measuring again" in problem


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "tflite", "ncnn"])
def test_footprint_and_ladder_on_every_backend(all_backends_release: Path, tmp_path: Path, backend: str) -> None:
    """The small CNN's artifacts on all four runtimes (where installed): each measured in both memory
    modes by the converter, and the ladder the device builds from its own figures saves at every step."""
    from edge_sdk.runtime.acceptance import DeviceChecks
    from edge_sdk.runtime.model import EdgeModel
    from needs import missing

    from .conftest import missing_runtime

    why = missing_runtime(backend)
    if why is not None:
        missing(why)
    variants = [v for v in load_manifest(all_backends_release).variants if v.backend == backend and v.ok]
    assert variants
    for variant in variants:
        fp = variant.validation.footprint
        assert fp is not None and fp.backend == backend, variant.id
        assert fp.default.peak_rss_mb > 0 and fp.lean is not None and fp.lean.peak_rss_mb > 0
    folder = tmp_path / "release"
    shutil.copytree(all_backends_release, folder)
    with EdgeModel.load(folder, profile="generic-x86_64", backend=backend, monitor=False,
                        device_checks=DeviceChecks(acceptance_budget_s=0)) as model:
        ladder = model.info().ladder
    steps, sizes = ladder["memory_steps"], ladder["footprint_mb"]
    assert steps[0] == "fp32" and set(ladder["sources"].values()) == {"device"}
    assert all(sizes[b] <= 0.9 * sizes[a] for a, b in zip(steps, steps[1:]))
    # Every rung that is not a step is named with its figures.
    named = {s.split(" is not a memory step")[0] for s in ladder["skipped"]}
    assert named == set(sizes) - set(steps)
