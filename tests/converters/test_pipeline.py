"""End to end through edge_sdk.convert: plan, gate, defaults, signing, atomic release folders."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edge_sdk
from edge_sdk import samples
from edge_sdk.converters.pipeline import plan_builds
from edge_sdk.converters.targets.base import TARGETS, ExportRequest, ExportResult
from edge_sdk.converters.targets.onnx import OnnxTarget
from edge_sdk.errors import ConfigError, ConversionError, IntegrityError, ModelError
from edge_sdk.manifest import MANIFEST_NAME, SIGNATURE_NAME, load_manifest, verify_file
from edge_sdk.profiles import get_profile
from edge_sdk.signing import generate_keypair, load_public_key
from edge_sdk.types import Precision, Target


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".staging-" in p.name)


def test_plan_shares_variants_across_profiles():
    plan = plan_builds((get_profile("intel-nuc"), get_profile("raspberry-pi-4")), frozenset({Target.ONNX}))
    ids = [p.id for p in plan]
    assert ids == ["onnx-fp32", "onnx-fp16", "onnx-int8", "onnx-mixed"]
    assert len(ids) == len(set(ids))
    fp32 = next(p for p in plan if p.precision == Precision.FP32)
    assert fp32.profiles == ["intel-nuc", "raspberry-pi-4"]
    with pytest.raises(ConfigError, match="none of the requested targets"):
        plan_builds((get_profile("intel-nuc"),), frozenset({Target.NCNN}))


def test_two_profiles_release(cnn_path, cnn_calibration_dir, tmp_path):
    steps = []
    manifest = edge_sdk.convert(cnn_path, ["intel-nuc", "raspberry-pi-4"], tmp_path / "rel", calibration=cnn_calibration_dir,
                                targets=["onnx"], max_accuracy_drop=20, latency_runs=5,
                                progress=lambda step, done, total: steps.append((step, done, total)))
    assert steps[0][1] == 0 and steps[-1][1] == steps[-1][2]
    on_disk = load_manifest(tmp_path / "rel")
    assert on_disk.model_dump() == manifest.model_dump()
    assert set(manifest.defaults) == {"intel-nuc", "raspberry-pi-4"}
    for variant in manifest.variants:
        assert variant.profiles == ["intel-nuc", "raspberry-pi-4"]
        for entry in variant.files:
            verify_file(tmp_path / "rel", entry)
            assert entry.chunks and sum(c.size for c in entry.chunks) == entry.size
        if variant.ok:  # 8 of the 16 samples calibrate, the other 8 validate
            assert variant.latency_ms > 0 and variant.validation.samples == 8
    assert manifest.report.calibration.samples == 8 and "held out" in manifest.report.validation.source
    assert manifest.source_sha256 == __import__("hashlib").sha256(cnn_path.read_bytes()).hexdigest()
    assert _leftovers(tmp_path) == []


def test_labels_give_a_task_metric(cnn_path, cnn_calibration_dir, tmp_path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(cnn_path), providers=["CPUExecutionProvider"])
    files = sorted(cnn_calibration_dir.glob("*.npy"))
    predicted = [int(session.run(None, {"image": np.load(f)})[0].argmax()) for f in files]
    labels = tmp_path / "labels.txt"
    # Half the labels agree with the FP32 prediction, half are wrong: FP32 accuracy is exactly 0.5.
    lines = [f"{f.name},{p if i % 2 == 0 else (p + 1) % 10}" for i, (f, p) in enumerate(zip(files, predicted))]
    labels.write_text("\n".join(lines) + "\n")
    manifest = edge_sdk.convert(cnn_path, ["generic-x86_64"], tmp_path / "rel", calibration=cnn_calibration_dir,
                                labels=labels, targets=["onnx"], max_accuracy_drop=50, latency_runs=5)
    fp32 = manifest.variant("onnx-fp32").validation
    assert fp32.metric_name == "top1_accuracy" and fp32.metric == fp32.metric_fp32 == 0.5


class _BadFp16(OnnxTarget):
    """FP16 export that flips the classifier's sign: a deliberately bad variant."""

    def export(self, request: ExportRequest) -> ExportResult:
        result = super().export(request)
        if request.precision == Precision.FP16:
            _negate_fc(result.files[0])
        return result


def test_gate_rejects_a_bad_variant_and_never_makes_it_default(cnn_path, cnn_calibration_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(TARGETS._entries, "onnx", _BadFp16)
    manifest = edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "rel", calibration=cnn_calibration_dir,
                                targets=["onnx"], max_accuracy_drop=20, latency_runs=5)
    fp16 = manifest.variant("onnx-fp16")
    assert fp16.status == "rejected" and "top-1 agreement dropped" in fp16.reason
    assert fp16.validation.top1_agreement < 0.5
    assert manifest.defaults["intel-nuc"] != "onnx-fp16"
    assert manifest.variant("onnx-fp32").ok


@pytest.mark.parametrize("speed_gate", [True, False])
def test_speed_gate_rejects_slow_variants_unless_turned_off(cnn_path, cnn_calibration_dir, tmp_path, monkeypatch,
                                                            speed_gate):
    from edge_sdk.converters import validate

    three_times = validate.SpeedComparison(reference_ms=1.0, candidate_ms=3.0, ratio=3.0, low=2.9, high=3.1, pairs=50)
    monkeypatch.setattr(validate, "compare_speed", lambda *a, **k: three_times)  # every variant 3x FP32
    manifest = edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "rel", calibration=cnn_calibration_dir,
                                targets=["onnx"], max_accuracy_drop=100, latency_runs=1, speed_gate=speed_gate)
    for precision in ("fp16", "int8"):
        variant = manifest.variant(f"onnx-{precision}")
        assert variant.latency_ms == 3.0  # measured and reported either way
        if speed_gate:
            assert variant.status == "rejected" and "slower than FP32 on the build machine (x3.00" in variant.reason
        else:
            assert variant.ok, variant.reason
    assert manifest.variant("onnx-fp32").ok  # the yardstick is never speed-gated


def test_if_bodies_are_quantized_by_the_dynamic_recipe_where_static_ones_quantize_nothing(tmp_path):
    source = tmp_path / "if.onnx"
    onnx.save(samples.make_if_model(), str(source))  # every MatMul sits inside the If's branches
    # A loose budget: on random inputs the toy model's top-1 flips on a few of 16 samples (onnxruntime 1.32: 4).
    manifest = edge_sdk.convert(source, ["intel-nuc"], tmp_path / "rel", calibration="random", targets=["onnx"],
                                latency_runs=5, max_accuracy_drop=50)
    tried = {a.recipe: a for a in manifest.report.recipes["onnx-int8"]}
    assert tried["qdq-per-channel"].reason == "nothing was quantized (the file is still FP32)"
    assert tried["dynamic-matmul"].outcome in ("chosen", "accepted") or "slower" in tried["dynamic-matmul"].reason
    int8 = manifest.variant("onnx-int8")
    assert int8.validation.recipe == "dynamic-matmul" and int8.validation.nodes_quantized == 2
    assert "dynamic int8: 2 of the quantized nodes are inside subgraphs (If/Loop/Scan bodies)" in int8.validation.notes
    assert any("random" in w for w in manifest.report.warnings)


def test_nothing_quantized_is_rejected(tmp_path):
    model = samples.make_if_model()
    for branch in model.graph.node[0].attribute:  # Add instead of MatMul: nothing any quantizer quantizes
        branch.g.node[0].op_type = "Add"
    source = tmp_path / "if_add.onnx"
    onnx.save(model, str(source))
    manifest = edge_sdk.convert(source, ["intel-nuc"], tmp_path / "rel", calibration="random", targets=["onnx"],
                                latency_runs=5)
    int8 = manifest.variant("onnx-int8")
    assert int8.status == "rejected" and "nothing was quantized" in int8.reason
    assert int8.validation.nodes_quantized == 0
    assert any("nodes inside subgraphs (If/Loop/Scan bodies) left FP32" in note for note in int8.validation.notes)
    assert manifest.defaults["intel-nuc"] != "onnx-int8"


class _Crash(OnnxTarget):
    """INT8 export that writes half a file, then dies with ``error`` (not an EdgeSDKError)."""

    error: Exception = RuntimeError("simulated crash in the middle of a conversion")

    def export(self, request: ExportRequest) -> ExportResult:
        if request.precision == Precision.INT8:
            request.out_dir.mkdir(parents=True, exist_ok=True)
            (request.out_dir / f"{request.variant_id}.onnx").write_bytes(b"half a model")
            raise self.error
        return super().export(request)


def test_a_crashing_export_is_a_rejected_row_and_the_rest_completes(cnn_path, cnn_calibration_dir, tmp_path, monkeypatch,
                                                                    assert_release_lists_every_file):
    monkeypatch.setitem(TARGETS._entries, "onnx", _Crash)
    manifest = edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "rel", calibration=cnn_calibration_dir,
                                targets=["onnx"], max_accuracy_drop=20, latency_runs=3)
    int8 = manifest.variant("onnx-int8")
    assert int8.status == "rejected" and int8.files == []
    # Every recipe was tried and named, with where the crash happened (one clause: they share the
    # cause); never the raw exception text.
    assert int8.reason == ("qdq-per-channel, qdq-per-channel-no-bias-adjust, qdq-conv-matmul, qdq-conv-matmul-no-bias-adjust, "
                           "qdq-conv-matmul-percentile, qdq-per-tensor, qdq-per-tensor-conv-matmul, dynamic: export failed: "
                           "RuntimeError in tests (test_pipeline.py, export)")
    outcomes = {a.recipe: a.outcome for a in manifest.report.recipes["onnx-int8"]}
    assert outcomes.pop("dynamic-matmul") == outcomes.pop("qdq-conv-matmul-dynamic-lstm") == "skipped"  # a conv net
    assert set(outcomes.values()) == {"failed"}
    log = (tmp_path / "rel" / manifest.report.logs["onnx-int8"]).read_text()
    assert "simulated crash in the middle of a conversion" in log and "Traceback" in log
    assert manifest.variant("onnx-fp32").ok
    assert manifest.defaults["intel-nuc"] in {"onnx-fp32", "onnx-fp16"}
    assert not (tmp_path / "rel" / "onnx" / "onnx-int8.onnx").exists()  # the half-written file is gone
    assert_release_lists_every_file(tmp_path / "rel")


def test_a_recipe_naming_the_method_the_user_gave_is_not_run_twice(cnn_path, cnn_calibration_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(TARGETS._entries, "onnx", _Crash)
    manifest = edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "rel", calibration=cnn_calibration_dir,
                                calibration_method="percentile", targets=["onnx"], latency_runs=3)
    attempts = {a.recipe: a for a in manifest.report.recipes["onnx-int8"]}
    assert attempts["qdq-conv-matmul"].outcome == "failed"
    skipped = attempts["qdq-conv-matmul-percentile"]
    assert skipped.outcome == "skipped"
    assert skipped.reason == "qdq-conv-matmul already calibrates with --calibration-method percentile"


class _DiskFull(_Crash):
    error = OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_an_export_aborts_with_no_output(cnn_path, cnn_calibration_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(TARGETS._entries, "onnx", _DiskFull)
    with pytest.raises(ConversionError, match="disk full"):
        edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "rel", calibration=cnn_calibration_dir, targets=["onnx"],
                         latency_runs=2)
    assert not (tmp_path / "rel").exists()
    assert _leftovers(tmp_path) == []


def test_disk_full_inside_the_quantizer_aborts_and_leaves_no_partial_file(cnn_path, cnn_calibration_dir, tmp_path,
                                                                          monkeypatch):
    """onnxruntime's quantizer hits ENOSPC half-way: quantize.py wraps it, the pipeline still aborts."""
    import onnxruntime.quantization as ortq

    def full_disk(model_input, model_output, *args, **kwargs):
        Path(model_output).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ortq, "quantize_static", full_disk)
    with pytest.raises(ConversionError, match="disk full"):
        edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "rel", calibration=cnn_calibration_dir, targets=["onnx"],
                         latency_runs=2)
    assert not (tmp_path / "rel").exists() and _leftovers(tmp_path) == []

    from edge_sdk.converters import quantize

    with pytest.raises(ConversionError, match="static int8 quantization"):
        quantize.quantize_static_int8(cnn_path, tmp_path / "q.onnx", [{"image": np.zeros((1, 3, 32, 32), np.float32)}])
    assert not (tmp_path / "q.onnx").exists()


class _BadInt8(OnnxTarget):
    """INT8 export that flips the classifier's sign, so the mixed-precision search runs."""

    def export(self, request: ExportRequest) -> ExportResult:
        result = super().export(request)
        if request.precision == Precision.INT8:
            _negate_fc(result.files[0])
        return result


def _negate_fc(path: Path) -> None:
    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}
    weight = next(n for n in model.graph.node if n.name == "fc").input[1]
    if weight in producers and producers[weight].op_type == "DequantizeLinear":
        weight = producers[weight].input[0]  # its INT8 weights, not its scale (two sign flips cancel)
    tensor = next(t for t in model.graph.initializer if t.name == weight)
    tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor), tensor.name))
    onnx.save(model, str(path))


def test_a_mixed_search_that_keeps_nothing_leaves_no_file(cnn_path, cnn_calibration_dir, tmp_path, monkeypatch,
                                                         assert_release_lists_every_file):
    from edge_sdk.converters import sensitivity

    def search(export, evaluate, ranking, max_drop):
        export([])  # writes an onnx-mixed.onnx, then finds nothing worth keeping
        return sensitivity.KeepSearch(None, None, [])

    monkeypatch.setitem(TARGETS._entries, "onnx", _BadInt8)
    monkeypatch.setattr(sensitivity, "keep_fp32_search", search)
    manifest = edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "rel", calibration=cnn_calibration_dir,
                                targets=["onnx"], max_accuracy_drop=5, latency_runs=3)
    assert "onnx-mixed" not in {v.id for v in manifest.variants}, manifest.report.recipes
    assert manifest.variant("onnx-int8").status == "rejected", manifest.report.recipes  # its file stays: the manifest lists it
    assert manifest.variant("onnx-int8").files
    assert any("mixed-precision search found no variant" in n for n in manifest.report.notes)
    assert_release_lists_every_file(tmp_path / "rel")


def test_validation_runs_each_variant_at_its_own_precision(cnn_path, tmp_path, monkeypatch):
    """The backend gets the variant's precision (OpenVINO's hint, ncnn's fp16/int8 flags), as on a device."""
    from edge_sdk.runtime.backends import onnxruntime as ort_backend

    seen = []
    original = ort_backend.OnnxRuntimeBackend.load

    def load(self, files, inputs, outputs, options):
        seen.append((Path(files[0]).name, options.precision))
        return original(self, files, inputs, outputs, options)

    monkeypatch.setattr(ort_backend.OnnxRuntimeBackend, "load", load)
    edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "rel", calibration="random", targets=["onnx"], latency_runs=2,
                     max_accuracy_drop=100)
    assert ("onnx-fp16.onnx", Precision.FP16) in seen and ("onnx-int8.onnx", Precision.INT8) in seen
    assert ("onnx-fp32.onnx", Precision.FP32) in seen


def test_profile_auto_says_which_profile_and_why(cnn_path, tmp_path):
    from edge_sdk.profiles import detect_profile

    detection = detect_profile()
    manifest = edge_sdk.convert(cnn_path, ["auto"], tmp_path / "rel", targets=["onnx"], latency_runs=2,
                                max_accuracy_drop=100)
    assert manifest.report.profiles == [detection.profile.id]
    assert f"--profile auto: {detection.explain()}" in manifest.report.notes


def test_report_keeps_the_fp32_reference_figures(cnn_path, tmp_path):
    manifest = edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "rel", targets=["onnx"], latency_runs=3,
                                max_accuracy_drop=100)
    reference = manifest.report.reference
    assert reference.size_bytes == manifest.variant("onnx-fp32").size_bytes
    assert reference.latency_ms > 0


def test_disk_full_while_writing_is_one_clear_error(cnn_path, tmp_path, monkeypatch):
    from edge_sdk.converters import release

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(release, "write_manifest", full)
    with pytest.raises(ConversionError, match="disk full"):
        edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "rel", targets=["onnx"], latency_runs=2)
    assert not (tmp_path / "rel").exists() and _leftovers(tmp_path) == []


def test_bad_inputs_fail_before_writing(cnn_path, tmp_path):
    not_empty = tmp_path / "busy"
    not_empty.mkdir()
    (not_empty / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        edge_sdk.convert(cnn_path, ["intel-nuc"], not_empty)
    assert (not_empty / "x").read_text() == "keep me"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="not writable|not a folder"):
        edge_sdk.convert(cnn_path, ["intel-nuc"], a_file / "rel")
    with pytest.raises(ConfigError, match="unknown device profile"):
        edge_sdk.convert(cnn_path, ["no-such-device"], tmp_path / "r1")
    with pytest.raises(ConfigError, match="unknown target"):
        edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "r1", targets=["coreml"])
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(cnn_path.read_bytes()[:1000])
    with pytest.raises(ModelError, match="corrupt.onnx"):
        edge_sdk.convert(corrupt, ["intel-nuc"], tmp_path / "r1")
    empty = tmp_path / "empty_calib"
    empty.mkdir()
    with pytest.raises(ConfigError, match="empty folder"):
        edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "r1", calibration=empty)
    assert not (tmp_path / "r1").exists() and _leftovers(tmp_path) == []


def test_signed_release_verifies_and_tampering_is_detected(cnn_path, tmp_path):
    private, public = generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    out = tmp_path / "rel"
    edge_sdk.convert(cnn_path, ["intel-nuc"], out, targets=["onnx"], sign_key=private, release_version=7, latency_runs=2)
    key = load_public_key(public)
    manifest = load_manifest(out, key)
    assert manifest.version == 7 and (out / SIGNATURE_NAME).is_file()
    # Tampering with the manifest (one byte) breaks the signature.
    data = (out / MANIFEST_NAME).read_bytes()
    (out / MANIFEST_NAME).write_bytes(data.replace(b'"version": 7', b'"version": 8'))
    with pytest.raises(IntegrityError, match="signature"):
        load_manifest(out, key)
    (out / MANIFEST_NAME).write_bytes(data)
    # Tampering with an artifact breaks its sha256 in the (still valid) manifest.
    entry = manifest.variant("onnx-fp32").files[0]
    artifact = out / entry.path
    blob = bytearray(artifact.read_bytes())
    blob[-1] ^= 0xFF
    artifact.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match="sha256"):
        verify_file(out, entry)
    # An unsigned release is refused when a key is configured.
    (out / SIGNATURE_NAME).unlink()
    with pytest.raises(IntegrityError, match="not signed"):
        load_manifest(out, key)
    other_private, _ = generate_keypair(tmp_path / "o.pem", tmp_path / "o.pub")
    shutil.rmtree(out)
    edge_sdk.convert(cnn_path, ["intel-nuc"], out, targets=["onnx"], sign_key=other_private, latency_runs=2)
    with pytest.raises(IntegrityError, match="signature"):
        load_manifest(out, key)


def test_the_same_conversion_twice_gives_the_same_statuses_and_identical_artifacts(cnn_path, cnn_calibration_dir,
                                                                                  tmp_path):
    def convert(out):
        manifest = edge_sdk.convert(cnn_path, ["intel-nuc"], out, calibration=cnn_calibration_dir, targets=["onnx"],
                                    latency_runs=5, max_accuracy_drop=20)
        return {v.id: (v.status, v.validation.recipe, [f.sha256 for f in v.files]) for v in manifest.variants}

    first = convert(tmp_path / "a")
    assert first == convert(tmp_path / "b")
    assert first["onnx-int8"][0] == "ok"


def test_interrupt_leaves_no_output(cnn_path, tmp_path):
    def interrupt(step: str, done: int, total: int) -> None:
        if "int8" in step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "rel", targets=["onnx"], latency_runs=2, progress=interrupt)
    assert not (tmp_path / "rel").exists() and _leftovers(tmp_path) == []


class _RecoversEverything(OnnxTarget):
    """INT8 whose plain recipe is wrong (sign-flipped classifier) and whose accuracy-recovering
    fallback keeps the whole model FP32 but one quantized op: accurate, and no smaller."""

    def recipes(self, precision: Precision):
        from edge_sdk.converters.targets.base import Recipe, When

        if precision != Precision.INT8:
            return super().recipes(precision)
        return (Recipe("int8", Precision.INT8, "wrong INT8"),
                Recipe("recover-all", Precision.INT8, "everything back to FP32", when=When.FALLBACK,
                       needs_calibration=True, recovers_accuracy=True))

    def export(self, request: ExportRequest) -> ExportResult:
        if request.precision != Precision.INT8:
            return super().export(request)
        if request.recipe.name == "int8":
            result = super().export(request)
            _negate_fc(result.files[0])
            return result
        out = request.out_dir / f"{request.variant_id}.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(request.model_path, out)
        return ExportResult(files=[out], inputs=list(request.inputs), outputs=list(request.outputs), nodes_quantized=1)


def test_an_accuracy_recovery_that_keeps_the_fp32_size_gains_nothing_and_is_rejected(cnn_path, cnn_calibration_dir,
                                                                                   tmp_path, monkeypatch):
    monkeypatch.setitem(TARGETS._entries, "onnx", _RecoversEverything)
    manifest = edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "rel", calibration=cnn_calibration_dir,
                                targets=["onnx"], max_accuracy_drop=5, latency_runs=3)
    int8 = manifest.variant("onnx-int8")
    assert int8.status == "rejected", manifest.report.recipes
    assert "recover-all: kept so much in FP32 that it is 1.00x the FP32 size: nothing gained" in int8.reason
    assert "top-1 agreement dropped" in int8.reason  # and the plain recipe's own miss
