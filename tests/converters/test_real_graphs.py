"""What real graphs contain, through the whole pipeline: integer inputs, symbolic dims fixed from the
samples, embeddings judged by cosine, held-out validation, and bad data that names itself."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import edge_sdk
from edge_sdk import samples
from edge_sdk.errors import ConfigError
from edge_sdk.manifest import load_manifest


def _token_samples(folder, count: int, seq: int = 12, dtype=np.int64, seed: int = 1):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        mask = np.ones((1, seq), np.int64)
        mask[0, rng.integers(seq // 2, seq):] = 0
        np.savez(folder / f"s{i:02d}.npz", input_ids=rng.integers(0, 64, (1, seq)).astype(dtype), attention_mask=mask)
    return folder


@pytest.fixture(scope="module")
def token_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    model = samples.save(samples.make_token_model(), root / "encoder.onnx")
    out = root / "release"
    manifest = edge_sdk.convert(model, ["intel-nuc"], out, calibration=_token_samples(root / "calib", 24),
                                targets=["onnx"], latency_runs=10)
    return out, manifest


def test_integer_inputs_pass_through_unchanged_and_are_never_quantized(token_release):
    out, manifest = token_release
    assert any("dynamic dims ['seq'] fixed to [12], the size every sample has" in n for n in manifest.report.notes)
    for variant in manifest.variants:
        assert [(s.name, s.dtype, s.shape) for s in variant.inputs] == [("input_ids", "int64", [1, 12]),
                                                                       ("attention_mask", "int64", [1, 12])]
    int8 = manifest.variant("onnx-int8")
    assert int8.validation.nodes_quantized > 0 and int8.files
    graph = onnx.load(str(out / int8.files[0].path)).graph
    assert [i.type.tensor_type.elem_type for i in graph.input] == [onnx.TensorProto.INT64] * 2
    quantized_inputs = {i for n in graph.node if n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") for i in n.input}
    assert not quantized_inputs & {"input_ids", "attention_mask"}
    self_test = np.load(out / manifest.self_test.inputs.path)
    assert self_test["input_ids"].dtype == np.int64


def test_an_embedding_is_judged_by_cosine_on_held_out_samples(token_release):
    _, manifest = token_release
    assert manifest.report.metric == "cosine similarity"
    assert manifest.report.calibration.samples + manifest.report.validation.samples == 24
    assert manifest.report.validation.samples == 8 and "held out" in manifest.report.validation.source
    for variant in manifest.variants:
        assert variant.validation.metric_name == "cosine similarity" and variant.validation.recipe
    tried = {a.recipe: a.outcome for a in manifest.report.recipes["onnx-int8"]}
    assert tried["dynamic-matmul"] != "skipped"  # a MatMul graph: dynamic INT8 competes with static QDQ
    assert tried["dynamic"] == "skipped"


def test_calibration_of_the_wrong_dtype_for_an_integer_input_names_the_file(tmp_path):
    model = samples.save(samples.make_token_model(), tmp_path / "encoder.onnx")
    folder = _token_samples(tmp_path / "calib", 4, dtype=np.float32)
    with pytest.raises(ConfigError, match=r"s00.npz: input 'input_ids' has dtype float32, the model expects int64"):
        edge_sdk.convert(model, ["intel-nuc"], tmp_path / "rel", calibration=folder, targets=["onnx"])
    assert not (tmp_path / "rel").exists()


def test_a_small_validation_folder_is_a_warning_and_validation_never_overlaps_calibration(cnn_path, cnn_calibration_dir,
                                                                                        tmp_path):
    held_out = tmp_path / "validation"
    held_out.mkdir()
    for path in sorted(cnn_calibration_dir.glob("*.npy"))[:5]:
        np.save(held_out / f"v_{path.name}", np.load(path) + 0.01)
    manifest = edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "rel", calibration=cnn_calibration_dir,
                                validation=held_out, targets=["onnx"], latency_runs=3, max_accuracy_drop=100,
                                mixed_precision=False)
    assert manifest.report.validation.samples == 5 and manifest.report.calibration.samples == 16
    assert any("validation has only 5 samples (fewer than 8)" in w for w in manifest.report.warnings)
    assert load_manifest(tmp_path / "rel").variant("onnx-fp32").validation.samples == 5
