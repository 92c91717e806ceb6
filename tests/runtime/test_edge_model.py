"""EdgeModel on real releases built by the converters: loading, verification, errors, pin/unpin, info."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import edge_sdk
from edge_sdk.chunking import sha256_file
from edge_sdk.errors import BackendError, ConfigError, EdgeSDKError, InputError, IntegrityError
from edge_sdk.manifest import load_manifest
from edge_sdk.profiles import Hysteresis, PolicySettings, Thresholds, detect_profile
from edge_sdk.runtime.model import EdgeModel
from edge_sdk.runtime.monitor import FakeSource
from edge_sdk.runtime.policy import EventKind
from edge_sdk.signing import generate_keypair
from edge_sdk.types import Precision

from .conftest import ServedBy

PROFILE = "intel-nuc"


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 3, 32, 32), dtype=np.float32)


def copy_release(release: Path, tmp_path: Path, edit=None) -> Path:
    """A writable copy; ``edit(manifest_dict, folder)`` may change it (the signature is dropped)."""
    folder = tmp_path / "release"
    shutil.copytree(release, folder)
    if edit is not None:
        data = json.loads((folder / "manifest.json").read_text())
        edit(data, folder)
        (folder / "manifest.json").write_text(json.dumps(data, indent=2))
        (folder / "manifest.sig").unlink(missing_ok=True)
    return folder


def variant_entry(data: dict, precision: str) -> dict:
    return next(v for v in data["variants"] if v["precision"] == precision)


def load(release: Path, **kwargs) -> EdgeModel:
    kwargs.setdefault("profile", PROFILE)
    kwargs.setdefault("monitor", False)
    return EdgeModel.load(release, **kwargs)


def test_lazy_public_name_and_fp32_matches_raw_onnxruntime(cnn_release: Path) -> None:
    assert edge_sdk.EdgeModel is EdgeModel
    manifest = load_manifest(cnn_release)
    fp32 = next(v for v in manifest.variants if v.precision == Precision.FP32)
    raw = ort.InferenceSession(str(cnn_release / fp32.files[0].path), providers=["CPUExecutionProvider"])
    with load(cnn_release, precision="fp32") as model:
        for seed in range(3):
            got = model.run({"image": image(seed)})
            want = raw.run(None, {"image": image(seed)})[0]
            assert set(got) == {"logits"}
            np.testing.assert_allclose(got["logits"], want, rtol=0, atol=1e-5)


def test_each_precision_serves_within_its_validated_tolerance(cnn_release: Path, served_by: ServedBy) -> None:
    manifest = load_manifest(cnn_release)
    with load(cnn_release, precision="fp32") as model:
        reference = model.run({"image": image(7)})["logits"]
        for variant in manifest.variants_for(PROFILE):
            model.pin(variant.precision)
            out, served = served_by.run(model, {"image": image(7)})
            assert served.id == variant.id
            error = float(np.abs(out["logits"] - reference).max())
            assert error <= max(variant.validation.self_test_tolerance or 0, 1e-5) * 4
            if variant.precision != Precision.FP32:
                assert error > 0  # really a different artifact


def test_info_reports_what_serves(cnn_release: Path) -> None:
    with load(cnn_release, precision="fp16", threads=1) as model:
        info = model.info()
        assert info.backend == "onnxruntime" and info["precision"] == "fp16" and info.variant == "onnx-fp16"
        assert info.target == "onnx" and info.threads == 1 and info.pinned is True
        assert info.profile == PROFILE and info.model == "cnn" and info.version == 1
        weights_mb = sum(f.size for f in model.plan.candidates[Precision.FP16][0].files) / 2**20
        assert info.load_time_ms > 0 and info.memory_mb >= round(weights_mb, 2) > 0
        assert info.last_decision["kind"] == "initial" and info.last_decision["to_precision"] == "fp16"
        assert "fp32" in info.available_precisions
        assert json.dumps(info.as_dict())  # serialisable for telemetry


def test_auto_precision_starts_at_fp32_with_plenty_of_memory(cnn_release: Path) -> None:
    with load(cnn_release, monitor=FakeSource(available_memory_mb=64_000)) as model:
        assert model.precision == Precision.FP32 and not model.info().pinned
    with load(cnn_release, monitor=FakeSource(available_memory_mb=1500)) as model:
        assert model.precision == Precision.FP16  # intel-nuc: FP32 needs 2048 MB free


def test_auto_profile_detection_runs_the_release(cnn_path: Path, tmp_path: Path) -> None:
    # Converted with --profile auto on this machine, loaded with profile auto: whatever it is
    # (x86_64 here, aarch64 in the arm64 proof), the two detections agree.
    release = edge_sdk.convert(cnn_path, ["auto"], tmp_path / "rel", calibration="random", targets=["onnx"],
                               latency_runs=3, speed_gate=False)
    with EdgeModel.load(tmp_path / "rel", monitor=False) as model:
        assert model.run({"image": image()})["logits"].shape == (1, 10)
        assert model.info().selection
        here = detect_profile().profile.id
        assert model.info().variant in {v.id for v in release.variants if here in v.profiles}


def test_signature_checked_when_a_public_key_is_given(cnn_release: Path, release_keypair, tmp_path: Path, monkeypatch) -> None:
    with load(cnn_release, public_key=release_keypair[1]) as model:
        assert model.run({"image": image()})["logits"].shape == (1, 10)
    _, other_pub = generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    with pytest.raises(IntegrityError, match="signature does not verify"):
        load(cnn_release, public_key=other_pub)
    monkeypatch.setenv("EDGE_SDK_PUBLIC_KEY", str(other_pub))  # a configured key applies by default
    with pytest.raises(IntegrityError, match="signature does not verify"):
        load(cnn_release)
    monkeypatch.setenv("EDGE_SDK_PUBLIC_KEY", str(release_keypair[1]))
    with pytest.raises(IntegrityError, match="not signed"):
        load(copy_release(cnn_release, tmp_path, edit=lambda d, f: None))


def test_edited_manifest_breaks_the_signature(cnn_release: Path, release_keypair, tmp_path: Path) -> None:
    folder = copy_release(cnn_release, tmp_path)
    data = json.loads((folder / "manifest.json").read_text())
    data["version"] = 99
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="signature"):
        load(folder, public_key=release_keypair[1])


def test_tampered_artifact_is_refused(cnn_release: Path, tmp_path: Path) -> None:
    folder = copy_release(cnn_release, tmp_path)
    artifact = folder / variant_entry(json.loads((folder / "manifest.json").read_text()), "fp32")["files"][0]["path"]
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256 does not match"):
        load(folder, precision="fp32")
    with pytest.raises(IntegrityError, match="onnx-fp32.onnx: sha256 does not match"):
        load(folder, precision="int8")  # the whole release is refused, not just that variant


def test_artifact_tampered_after_load_is_caught_at_the_switch(cnn_release: Path, tmp_path: Path) -> None:
    folder = copy_release(cnn_release, tmp_path)
    with load(folder, precision="fp32") as model:
        path = folder / variant_entry(json.loads((folder / "manifest.json").read_text()), "int8")["files"][0]["path"]
        path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
        with pytest.raises(IntegrityError, match="sha256 does not match"):
            model.pin("int8")
        assert model.precision == Precision.FP32
        assert model.run({"image": image()})["logits"].shape == (1, 10)


def test_missing_artifact_and_missing_release(cnn_release: Path, tmp_path: Path) -> None:
    folder = copy_release(cnn_release, tmp_path)
    path = variant_entry(json.loads((folder / "manifest.json").read_text()), "fp16")["files"][0]["path"]
    (folder / path).unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load(folder, precision="fp16")
    with pytest.raises(IntegrityError, match="no such folder"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IntegrityError, match="no manifest.json"):
        load(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        load(tmp_path / "empty")


def test_tampered_self_test_is_refused(cnn_release: Path, tmp_path: Path) -> None:
    folder = copy_release(cnn_release, tmp_path)
    expected = folder / json.loads((folder / "manifest.json").read_text())["self_test"]["expected"]["path"]
    np.savez(expected, logits=np.zeros((1, 10), np.float32))
    with pytest.raises(IntegrityError, match="self_test|expected"):
        load(folder)


def test_unknown_precision_profile_and_backend(cnn_release: Path) -> None:
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        load(cnn_release, precision="fp8")
    with pytest.raises(ConfigError, match="no variant for device profile 'raspberry-pi-4'.*built for: intel-nuc"):
        load(cnn_release, profile="raspberry-pi-4")
    with pytest.raises(ConfigError, match="unknown device profile"):
        load(cnn_release, profile="toaster")
    with pytest.raises(ConfigError, match="no usable variant for backend 'tflite'.*backends: onnxruntime"):
        load(cnn_release, backend="tflite")
    with pytest.raises(ConfigError, match="threads"):
        load(cnn_release, threads=0)


def test_rejected_variant_is_never_loaded(cnn_release: Path, tmp_path: Path) -> None:
    def reject_int8(data, folder):
        entry = variant_entry(data, "int8")
        entry["status"], entry["reason"] = "rejected", "top-1 agreement dropped 40 points"

    folder = copy_release(cnn_release, tmp_path, edit=reject_int8)
    with pytest.raises(ConfigError, match="no usable int8 variant.*top-1 agreement dropped 40 points"):
        load(folder, precision="int8")
    source = FakeSource(available_memory_mb=10)  # below every threshold
    with load(folder, monitor=source) as model:
        assert model.precision == Precision.FP16  # the cheapest usable one
        assert "int8" not in model.info().available_precisions
        with pytest.raises(ConfigError, match="cannot pin int8.*rejected"):
            model.pin("int8")


def test_bad_inputs_are_clear_errors_and_the_model_keeps_serving(cnn_release: Path) -> None:
    with load(cnn_release, precision="fp32") as model:
        good = model.run({"image": image()})["logits"]
        cases = [
            ({"img": image()}, "missing \\['image'\\]"),
            ({"image": image().astype(np.float64)}, "dtype float64"),
            ({"image": image()[0]}, "rank 3"),
            ({"image": np.zeros((1, 3, 16, 16), np.float32)}, "axis 2"),
            ({"image": image().tolist()}, "numpy array"),
            ([image()], "dict"),
        ]
        for inputs, message in cases:
            with pytest.raises(InputError, match=message):
                model.run(inputs)
        np.testing.assert_array_equal(model.run({"image": image()})["logits"], good)


def test_pin_unpin_and_policy_switches(cnn_release: Path) -> None:
    source = FakeSource(available_memory_mb=64_000)
    settings = PolicySettings(thresholds={Precision.FP32: Thresholds(min_free_memory_mb=2048),
                                          Precision.FP16: Thresholds(min_free_memory_mb=1024)}, min_dwell_s=0)
    seen = []
    with load(cnn_release, monitor=source, policy=settings, interval_s=3600) as model:
        model.subscribe(seen.append)
        assert model.precision == Precision.FP32
        event = model.pin("int8")
        assert model.precision == Precision.INT8 and model.info().pinned
        assert event.kind == EventKind.PIN and event.swap_ms > 0
        assert model.evaluate() is None  # pinned: the policy stays out
        source.set(available_memory_mb=1500)
        event = model.unpin()
        assert event.kind == EventKind.UNPIN and model.precision == Precision.FP16 and not model.info().pinned
        source.set(available_memory_mb=500)
        event = model.evaluate()
        assert event.kind == EventKind.STEP_DOWN and event.to_precision == Precision.INT8 and event.swap_ms > 0
        assert model.precision == Precision.INT8
        source.set(available_memory_mb=64_000)
        assert model.evaluate().to_precision == Precision.FP32
        assert model.info().last_decision["kind"] == "step_up"
        assert model.info().swaps == 4
    assert [e.kind for e in seen] == [EventKind.PIN, EventKind.UNPIN, EventKind.STEP_DOWN, EventKind.STEP_UP]


def test_background_monitor_drives_switches(cnn_release: Path) -> None:
    import threading

    source = FakeSource(available_memory_mb=64_000)
    switched = threading.Event()
    with load(cnn_release, monitor=source, interval_s=0.02) as model:
        model.subscribe(lambda e: switched.set() if e.kind == EventKind.STEP_DOWN else None)
        assert model.info().monitoring
        source.set(available_memory_mb=100)
        assert switched.wait(10)
        assert model.precision == Precision.INT8


def test_failed_self_test_keeps_the_current_variant(cnn_release: Path, tmp_path: Path) -> None:
    def break_int8(data, folder):
        variant_entry(data, "int8")["validation"]["self_test_tolerance"] = 1e-12

    folder = copy_release(cnn_release, tmp_path, edit=break_int8)
    with load(folder, precision="fp32") as model:
        with pytest.raises(IntegrityError, match="self-test of onnx-int8 failed"):
            model.pin("int8")
        assert model.precision == Precision.FP32 and model.run({"image": image()})["logits"].shape == (1, 10)
        assert model.events[-1].kind == EventKind.SWAP_FAILED and "self-test" in model.events[-1].error


def test_auto_start_skips_a_variant_that_fails_its_self_test(cnn_release: Path, tmp_path: Path) -> None:
    def break_fp32(data, folder):
        # FP32 reproduces the expected output exactly, so only a negative tolerance fails it.
        variant_entry(data, "fp32")["validation"]["self_test_tolerance"] = -1.0
        variant_entry(data, "fp16")["validation"]["self_test_tolerance"] = -1.0

    folder = copy_release(cnn_release, tmp_path, edit=break_fp32)
    with load(folder, monitor=FakeSource(available_memory_mb=64_000)) as model:
        assert model.precision == Precision.INT8
        assert "skipped" in model.events[0].reason
    with pytest.raises(IntegrityError, match="self-test of onnx-fp32 failed"):
        load(folder, precision="fp32")


def test_corrupt_artifact_rejected_by_the_runtime_keeps_serving(cnn_release: Path, tmp_path: Path) -> None:
    def corrupt_int8(data, folder):
        entry = variant_entry(data, "int8")["files"][0]
        path = folder / entry["path"]
        path.write_bytes(b"\x08\x07garbage that is not an onnx protobuf" * 10)
        # Hashes match the corrupt bytes: only the native runtime can tell.
        entry["size"], entry["sha256"], entry["chunks"] = path.stat().st_size, sha256_file(path), []

    folder = copy_release(cnn_release, tmp_path, edit=corrupt_int8)
    source = FakeSource(available_memory_mb=64_000)
    settings = PolicySettings(thresholds={Precision.FP32: Thresholds(min_free_memory_mb=2048)}, min_dwell_s=0)
    with load(folder, monitor=source, policy=settings, interval_s=3600) as model:
        with pytest.raises(BackendError, match="onnxruntime cannot load"):
            model.pin("int8")
        assert model.precision == Precision.FP32
        source.set(available_memory_mb=100)
        model.evaluate()  # FP32 → FP16 works (FP16 has no thresholds, so INT8 is not needed)
        assert model.precision == Precision.FP16
        assert model.run({"image": image()})["logits"].shape == (1, 10)


def test_closed_model_refuses_calls(cnn_release: Path) -> None:
    model = load(cnn_release, precision="fp32")
    model.close()
    with pytest.raises(EdgeSDKError, match="closed"):
        model.run({"image": image()})


def test_multimodal_release_runs_with_three_inputs(multimodal_release: Path) -> None:
    manifest = load_manifest(multimodal_release)
    with load(multimodal_release, precision="fp32") as model:
        variant = manifest.variant(model.info().variant)
        rng = np.random.default_rng(0)
        feeds = {s.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in s.shape]).astype(s.dtype)
                 for s in variant.inputs}
        assert set(feeds) == {"image", "audio", "imu"}
        out = model.run(feeds)
        assert set(out) == {s.name for s in variant.outputs}
        assert all(np.isfinite(a).all() for a in out.values())


def test_non_finite_inputs_rejected_when_asked(cnn_release: Path) -> None:
    x = image()
    x[0, 1, 2, 3] = np.nan
    x[0, 2, 0, 0] = np.inf
    with load(cnn_release, precision="int8", reject_non_finite=True) as model:
        with pytest.raises(InputError, match="input 'image': 2 of 3072 values are NaN or infinite"):
            model.run({"image": x})
        assert np.isfinite(model.run({"image": image()})["logits"]).all()
    with load(cnn_release, precision="fp32") as model:  # default: passed through to the runtime
        assert np.isnan(model.run({"image": x})["logits"]).any()


def test_background_policy_does_not_flap_inside_the_hysteresis_band(cnn_release: Path) -> None:
    import math
    import time

    # Free memory swings 1950..2200 MB around FP32's 2048 MB threshold (band: +256 MB), sampled
    # every 5 ms by the real sampler thread, with no dwell time: hysteresis alone must hold it.
    script = [{"available_memory_mb": 2075 + 125 * math.sin(i / 2)} for i in range(300)]
    settings = PolicySettings(thresholds={Precision.FP32: Thresholds(min_free_memory_mb=2048),
                                          Precision.FP16: Thresholds(min_free_memory_mb=1024)},
                              hysteresis=Hysteresis(memory_mb=256), min_dwell_s=0)
    source = FakeSource(script=[{"available_memory_mb": 4096.0}] + script)
    with load(cnn_release, monitor=source, policy=settings, interval_s=0.005) as model:
        deadline = time.monotonic() + 30
        while source.samples_taken < len(script) + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert source.samples_taken > len(script)
        switches = [e for e in model.events if e.kind in (EventKind.STEP_DOWN, EventKind.STEP_UP)]
        assert [(e.from_precision, e.to_precision) for e in switches] == [(Precision.FP32, Precision.FP16)]
        assert model.precision == Precision.FP16


# --- runtime policy set live (the twin's desired policy), NaN inputs -------------------------


def test_set_policy_pins_and_overrides_thresholds_live(cnn_release: Path) -> None:
    source = FakeSource(available_memory_mb=8192)
    with load(cnn_release, monitor=source, interval_s=3600) as model:
        assert model.precision == Precision.FP32
        # Raising FP32's memory bar steps down at once, without a reload or a new sample.
        event = model.set_policy({"thresholds": {"fp32": {"min_free_memory_mb": 100_000}}})
        assert event.kind == EventKind.STEP_DOWN and model.precision == Precision.FP16
        assert model.policy.thresholds(Precision.FP32).max_cpu_percent == 85  # the profile's other limits stay
        event = model.set_policy({"pin_precision": "int8"})
        assert event.kind == EventKind.PIN and model.precision == Precision.INT8 and model.info().pinned
        # A policy without the pin releases the pin it made; thresholds back to the profile's: FP32 again.
        model.set_policy({"hysteresis": {"memory_mb": 0}, "min_dwell_s": 0})
        assert not model.info().pinned and model.precision == Precision.FP32
        assert model.policy.settings.min_dwell_s == 0 and model.policy.settings.hysteresis.memory_mb == 0
        with pytest.raises(ConfigError, match="unknown key"):
            model.set_policy({"max_cpu": 80})
        with pytest.raises(ConfigError, match="cannot pin mixed"):
            model.set_policy({"pin_precision": "mixed"})
        assert model.precision == Precision.FP32 and not model.info().pinned  # nothing changed


def test_non_finite_inputs_are_refused_by_quantized_variants(cnn_release: Path) -> None:
    bad = image()
    bad[0, 1, 2, 3] = np.nan
    with load(cnn_release, precision="int8") as model:
        with pytest.raises(InputError, match="input 'image': 1 of 3072 values are NaN.*int8"):
            model.run({"image": bad})
        model.pin("fp32")  # a float variant propagates NaN as is
        assert np.isnan(model.run({"image": bad})["logits"]).any()
    with load(cnn_release, precision="int8", reject_non_finite=False) as model:  # the opt-out
        assert model.run({"image": bad})["logits"].shape == (1, 10)
    with load(cnn_release, precision="fp32", reject_non_finite=True) as model:
        with pytest.raises(InputError, match="NaN"):
            model.run({"image": bad})
