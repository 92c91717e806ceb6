"""Chunk cuts that follow tensors: per format, a re-trained layer moves only its own chunks."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from needs import need_module, need_toolchain

from edge_sdk import samples
from edge_sdk.chunking import BLOCK, ChunkSizes, chunk_bytes, chunk_file, cut_points, sha256_file
from edge_sdk.layouts import onnx_tensors, tensor_spans
from edge_sdk.manifest import TensorSpec
from edge_sdk.types import Precision


def new_bytes(old: Path, new: Path) -> int:
    have = {c.sha256 for c in chunk_file(old).chunks}
    return sum(c.size for c in chunk_file(new).chunks if c.sha256 not in have)


def _check_cover(path: Path) -> None:
    chunked = chunk_file(path)
    data = path.read_bytes()
    assert chunked.sha256 == sha256_file(path) and chunked.size == len(data)
    assert sum(c.size for c in chunked.chunks) == len(data)
    assert all(c.offset == sum(x.size for x in chunked.chunks[:i]) for i, c in enumerate(chunked.chunks))


def test_onnx_tensor_spans_are_exactly_the_raw_data(tmp_path):
    model = samples.make_cnn(width=64)
    path = samples.save(model, tmp_path / "m.onnx")
    data = path.read_bytes()
    spans, external = onnx_tensors(path)
    assert not external
    raw = sorted(init.raw_data for init in model.graph.initializer)
    assert sorted(data[o:o + n] for o, n in spans) == raw  # every initializer, byte for byte


def test_onnx_last_layer_change_moves_only_that_tensor(tmp_path):
    base = samples.make_cnn(width=96)
    old = samples.save(base, tmp_path / "v1.onnx")
    new = samples.save(samples.with_new_last_layer(base, 7), tmp_path / "v2.onnx")
    _check_cover(new)
    fc = next(i for i in base.graph.initializer if i.name == "fc.weight")
    moved = new_bytes(old, new)
    sizes = ChunkSizes.for_file(new.stat().st_size)
    assert len(fc.raw_data) <= moved <= len(fc.raw_data) + 2 * sizes.min, (moved, len(fc.raw_data))
    # Content-defined cutting alone (today's chunker on the same file) moves far more.
    plain = {c.sha256 for c in chunk_bytes(old.read_bytes(), sizes=ChunkSizes(16384, 65536, 262144))}
    plain_moved = sum(c.size for c in chunk_bytes(new.read_bytes(), sizes=ChunkSizes(16384, 65536, 262144))
                      if c.sha256 not in plain)
    assert moved * 4 < plain_moved


def test_metadata_insertion_shifts_no_tensor_chunk(tmp_path):
    base = samples.make_cnn(width=96)
    old = samples.save(base, tmp_path / "v1.onnx")
    shifted = onnx.ModelProto.FromString(base.SerializeToString())
    shifted.doc_string = "retrained on site 7 (build 4711)"  # serialized before the graph: every offset moves
    new = samples.save(shifted, tmp_path / "v2.onnx")
    assert new_bytes(old, new) <= 2 * ChunkSizes.for_file(new.stat().st_size).max


def test_onnx_external_data_is_cut_at_its_tensors(tmp_path):
    def save(model: onnx.ModelProto, folder: Path) -> Path:
        folder.mkdir()
        model = onnx.ModelProto.FromString(model.SerializeToString())  # onnx.save moves the tensors out in place
        onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="m.onnx.data", size_threshold=0)
        return folder

    base = samples.make_cnn(width=96)
    v1, v2 = save(base, tmp_path / "v1"), save(samples.with_new_last_layer(base, 3), tmp_path / "v2")
    data = v1 / "m.onnx.data"
    spans = tensor_spans(data)
    _, external = onnx_tensors(v1 / "m.onnx")
    assert len(spans) == len(external) == len(base.graph.initializer)
    assert sum(n for _, n in spans) == sum(len(i.raw_data) for i in base.graph.initializer)
    fc = next(i for i in base.graph.initializer if i.name == "fc.weight")
    moved = new_bytes(data, v2 / "m.onnx.data")
    assert len(fc.raw_data) <= moved <= len(fc.raw_data) + 2 * ChunkSizes.for_file(data.stat().st_size).min
    assert new_bytes(v1 / "m.onnx", v2 / "m.onnx") == 0  # the graph file holds no tensor bytes
    # A model over 2 GB must use external data; its tensors load back from the chunks' bytes.
    loaded = onnx.load(str(v2 / "m.onnx"))
    w = numpy_helper.to_array(next(i for i in loaded.graph.initializer if i.name == "fc.weight"))
    assert w.shape == numpy_helper.to_array(fc).shape


def test_chunking_is_streamed_with_bounded_memory(tmp_path):
    path = tmp_path / "big.bin"
    rng = np.random.default_rng(0)
    with open(path, "wb") as handle:
        for _ in range(48):
            handle.write(rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    tracemalloc.start()
    try:
        chunked = chunk_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert chunked.sha256 == sha256_file(path)
    assert peak < 16 * BLOCK, peak  # 48 MiB file; the old chunker peaked at ~12x the file size


def test_streamed_cuts_equal_in_memory_cuts():
    data = os.urandom(3 * BLOCK + 12345)  # crosses block borders: the gear window is carried over
    sizes = ChunkSizes()
    assert [c.offset + c.size for c in chunk_bytes(data, sizes=sizes)] == cut_points(data)


def test_small_files_get_small_chunks():
    sizes = ChunkSizes.for_file(200_000)
    assert sizes.min == 2048 and sizes.max == 16384
    assert ChunkSizes.for_file(50 << 20) == ChunkSizes()


def test_a_broken_layout_falls_back_to_plain_cuts(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x0f" + os.urandom(300_000))  # not protobuf: no spans, still chunked
    assert tensor_spans(bad) == []
    _check_cover(bad)
    xml, bin_ = tmp_path / "ov.xml", tmp_path / "ov.bin"
    xml.write_text("<net><layers><layer")  # truncated IR next to its .bin
    bin_.write_bytes(os.urandom(100_000))
    assert tensor_spans(bin_) == []
    _check_cover(bin_)


# --- the other export targets: real exports of a v1 and a last-layer v2 ----------------------------

def _export(target: str, model: onnx.ModelProto, out: Path, precision: Precision) -> list[Path]:
    from edge_sdk.converters.targets.base import ExportRequest, get_target

    path = samples.save(model, out / "source.onnx")
    spec_in = [TensorSpec(name="image", dtype="float32", shape=[1, 3, 32, 32])]
    spec_out = [TensorSpec(name="logits", dtype="float32", shape=[1, 10])]
    rng = np.random.default_rng(5)
    calibration = [{"image": rng.random((1, 3, 32, 32), dtype=np.float32)} for _ in range(4)]
    request = ExportRequest(model_path=path, precision=precision, out_dir=out / "artifacts", variant_id=f"cnn-{target}",
                            inputs=spec_in, outputs=spec_out, calibration=calibration)
    return get_target(target).export(request).files


@pytest.mark.toolchain
@pytest.mark.slow  # three exports per case (onnx2tf: ~30 s each)
@pytest.mark.parametrize("target,precision,tensor_file", [
    ("openvino", Precision.FP32, ".bin"), ("openvino", Precision.INT8, ".bin"),
    ("ncnn", Precision.FP32, ".bin"), ("ncnn", Precision.FP16, ".bin"),
    ("tflite", Precision.FP32, ".tflite"),
])
def test_export_targets_cut_at_tensors_and_rebuild_identically(tmp_path, target, precision, tensor_file):
    need_module("openvino", "the openvino extra") if target == "openvino" else need_toolchain(target)
    base = samples.make_cnn(width=64)
    builds = {name: _export(target, m, tmp_path / name, precision)
              for name, m in (("v1", base), ("v1-again", base), ("v2", samples.with_new_last_layer(base, 7)))}
    for old, again in zip(builds["v1"], builds["v1-again"]):
        assert old.read_bytes() == again.read_bytes(), f"{old.name} differs between two builds of one model"
    weights = next(p for p in builds["v2"] if p.name.endswith(tensor_file))
    old_weights = next(p for p in builds["v1"] if p.name.endswith(tensor_file))
    spans = tensor_spans(weights)
    assert len(spans) >= 6 and sum(n for _, n in spans) > 0.95 * weights.stat().st_size
    _check_cover(weights)
    moved = new_bytes(old_weights, weights)
    fc_bytes = {Precision.FP32: 4, Precision.FP16: 2, Precision.INT8: 1}[precision] * 10 * 128
    assert moved <= fc_bytes + 4 * ChunkSizes.for_file(weights.stat().st_size).min, moved
