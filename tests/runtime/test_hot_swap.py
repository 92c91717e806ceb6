"""Hot swap under load: precision switches while threads call ``run`` - zero failed calls, every
output right for the variant that served it, old sessions closed only once drained."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from needs import missing
from edge_sdk.chunking import sha256_file
from edge_sdk.errors import BackendError
from edge_sdk.manifest import load_manifest
from edge_sdk.profiles import Hysteresis, PolicySettings, Thresholds
from edge_sdk.runtime.backends.base import BACKENDS, BackendOptions, Session
from edge_sdk.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_sdk.runtime.model import EdgeModel
from edge_sdk.runtime.monitor import FakeSource
from edge_sdk.runtime.policy import EventKind
from edge_sdk.types import Precision

from .conftest import TARGET_OF, ServedBy, missing_runtime

FP32, FP16, INT8 = Precision.FP32, Precision.FP16, Precision.INT8
PROFILE = "intel-nuc"
INPUTS = [np.random.default_rng(seed).random((1, 3, 32, 32), dtype=np.float32) for seed in range(4)]
# Free memory levels that put the policy on each rung (thresholds below).
LEVEL = {FP32: 4096.0, FP16: 1500.0, INT8: 100.0}
SETTINGS = PolicySettings(thresholds={FP32: Thresholds(min_free_memory_mb=2048), FP16: Thresholds(min_free_memory_mb=1024)},
                          min_dwell_s=0)


def references(model: EdgeModel) -> dict[str, list[np.ndarray]]:
    """Each variant's own outputs on INPUTS (pinned one at a time, before any concurrency)."""
    refs = {}
    for precision in model.plan.precisions:
        model.pin(precision)
        refs[model.info().variant] = [model.run({"image": x})["logits"] for x in INPUTS]
    model.unpin()
    return refs


class Callers:
    """``n`` threads calling ``model.run`` in a loop, checking each output as it comes against the
    variant that served it."""

    def __init__(self, served_by: ServedBy, model: EdgeModel, refs: dict[str, list[np.ndarray]],
                 tolerance: dict[str, float], n: int = 4, fp32: str = "onnx-fp32", own_atol: float = 1e-5) -> None:
        self.served_by = served_by
        self.model, self.refs, self.tolerance, self.fp32, self.own_atol = model, refs, tolerance, fp32, own_atol
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.served: dict[str, int] = {}
        self.calls = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(n)]

    def _loop(self, index: int) -> None:
        i = index
        while not self.stop.is_set():
            k = i % len(INPUTS)
            try:
                out, variant = self.served_by.run(self.model, {"image": INPUTS[k]})
                logits = out["logits"]
                own = np.abs(logits - self.refs[variant.id][k]).max()
                vs_fp32 = np.abs(logits - self.refs[self.fp32][k]).max()
                problem = None
                if own > self.own_atol:
                    problem = f"{variant.id} output differs from its own reference by {own}"
                elif vs_fp32 > self.tolerance[variant.id]:
                    problem = f"{variant.id} output differs from fp32 by {vs_fp32}"
            except Exception as exc:  # any failure is a failed call
                problem = f"{type(exc).__name__}: {exc}"
                variant = None
            with self._lock:
                self.calls += 1
                if problem:
                    self.errors.append(problem)
                elif variant is not None:
                    self.served[variant.id] = self.served.get(variant.id, 0) + 1
            i += 1

    def __enter__(self) -> Callers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def tolerances(release: Path) -> dict[str, float]:
    manifest = load_manifest(release)
    return {v.id: 4 * max(v.validation.self_test_tolerance or 0.0, 1e-5) for v in manifest.variants}


# --- drain semantics, observed with a backend that can hold a call inside native code --------


class TrackingBackend(OnnxRuntimeBackend):
    """The real onnxruntime backend, remembering its sessions and whether each was closed; a
    call on a closed session fails loudly."""

    name = "tracking-onnxruntime"
    sessions: list[Session] = []

    def load(self, files, inputs, outputs, options=BackendOptions()):
        session = super().load(files, inputs, outputs, options)
        native = session._run_native
        session.closed = False

        def checked(feeds):
            if session.closed:
                raise RuntimeError("ran on a closed session")
            return native(feeds)

        def close():
            session.closed = True

        session._run_native = checked
        session.close = close
        TrackingBackend.sessions.append(session)
        return session


def tracking_copy(release: Path, tmp_path: Path) -> Path:
    BACKENDS.register(TrackingBackend.name)(TrackingBackend)
    folder = tmp_path / "tracking"
    shutil.copytree(release, folder)
    data = json.loads((folder / "manifest.json").read_text())
    for variant in data["variants"]:
        variant["backend"] = TrackingBackend.name
    (folder / "manifest.json").write_text(json.dumps(data))
    (folder / "manifest.sig").unlink(missing_ok=True)
    return folder


def test_hundred_switches_under_four_calling_threads(cnn_release: Path, tmp_path: Path, served_by: ServedBy) -> None:
    # Real onnxruntime sessions that fail any call made after they were closed.
    folder = tracking_copy(cnn_release, tmp_path)
    TrackingBackend.sessions.clear()
    source = FakeSource(available_memory_mb=LEVEL[FP32])
    with EdgeModel.load(folder, profile=PROFILE, monitor=source, policy=SETTINGS, interval_s=3600) as model:
        refs = references(model)
        assert set(refs) == {"onnx-fp32", "onnx-fp16", "onnx-int8"}
        cycle = [FP16, INT8, FP16, FP32, INT8, FP32]
        events = []
        with Callers(served_by, model, refs, tolerances(cnn_release)) as callers:
            for n in range(100):
                target = cycle[n % len(cycle)]
                source.set(available_memory_mb=LEVEL[target])
                event = model.evaluate()
                assert event is not None and event.to_precision == target and event.error is None, event
                events.append(event)
                calls_before = callers.calls
                # Let the callers make progress on this variant before the next switch.
                while callers.calls < calls_before + 8 and not callers.errors:
                    threading.Event().wait(0.001)
        assert callers.errors == []
        assert len(events) == 100 and all(e.kind in (EventKind.STEP_DOWN, EventKind.STEP_UP) for e in events)
        assert all(e.swap_ms is not None and e.swap_ms > 0 and not e.paused for e in events)
        assert set(callers.served) == set(refs)  # every variant really served calls
        assert callers.calls >= 800
        assert model.info().swaps >= 100
        # Every replaced session was closed once drained; only the active one is open.
        assert len(TrackingBackend.sessions) >= 103
        assert [s.closed for s in TrackingBackend.sessions].count(False) == 1


def test_in_flight_call_finishes_on_the_old_session_which_closes_after(cnn_release: Path, tmp_path: Path,
                                                                       served_by: ServedBy) -> None:
    """Order: call in flight → swap completes without waiting → old still open → call returns → closed."""
    folder = tracking_copy(cnn_release, tmp_path)
    with EdgeModel.load(folder, profile=PROFILE, precision="fp32", monitor=False) as model:
        old = TrackingBackend.sessions[-1]
        fp32_out = model.run({"image": INPUTS[1]})["logits"]
        # Hold one call inside the old session's native run.
        old_native = old._run_native
        hold = threading.Event()
        inside = threading.Event()

        def held(feeds):
            inside.set()
            hold.wait(30)
            return old_native(feeds)

        old._run_native = held
        result: dict = {}
        caller = threading.Thread(target=lambda: result.update(zip(("out", "variant"),
                                                                    served_by.run(model, {"image": INPUTS[1]}))))
        caller.start()
        assert inside.wait(10)
        event = model.pin("int8")  # returns while the old call is still running
        assert event.to_precision == INT8 and model.precision == INT8
        assert not old.closed
        out, variant = served_by.run(model, {"image": INPUTS[1]})
        assert variant.precision == INT8
        hold.set()
        caller.join(10)
        assert result["variant"].precision == FP32
        np.testing.assert_array_equal(result["out"]["logits"], fp32_out)
        assert old.closed  # by the call that returned last
        assert not TrackingBackend.sessions[-1].closed


def test_memory_too_tight_for_both_pauses_and_queues_calls(cnn_release: Path, served_by: ServedBy) -> None:
    # 60 MB free: FP32 may run (threshold 50 MB) but cannot hold a second session beside it.
    source = FakeSource(available_memory_mb=4096)
    settings = PolicySettings(thresholds={FP32: Thresholds(min_free_memory_mb=50)}, min_dwell_s=0)
    with EdgeModel.load(cnn_release, profile=PROFILE, monitor=source, policy=settings, interval_s=3600,
                        swap_reserve_mb=64) as model:
        refs = references(model)
        with Callers(served_by, model, refs, tolerances(cnn_release)) as callers:
            for n in range(10):
                source.set(available_memory_mb=40.0 if n % 2 == 0 else 4096.0)
                event = model.evaluate()
                assert event is not None and event.error is None
                if event.to_precision == FP16:
                    assert event.paused and "paused calls" in event.reason
                else:
                    assert not event.paused
                before = callers.calls
                while callers.calls < before + 8 and not callers.errors:
                    threading.Event().wait(0.001)
        assert callers.errors == []
        assert callers.served.get("onnx-fp16", 0) > 0 and callers.served.get("onnx-fp32", 0) > 0


def test_a_step_up_waits_until_the_better_variant_fits_beside_the_serving_one(cnn_release: Path) -> None:
    # A step up is for quality: it never pauses calls (a paused load overshooting a tight limit
    # would meet the OOM killer), so it waits until both sessions fit for a moment.
    source = FakeSource(available_memory_mb=4096)
    settings = PolicySettings(thresholds={FP32: Thresholds(min_free_memory_mb=50)},
                              hysteresis=Hysteresis(memory_mb=0), min_dwell_s=0)
    with EdgeModel.load(cnn_release, profile=PROFILE, monitor=source, policy=settings, interval_s=3600,
                        swap_reserve_mb=64) as model:
        source.set(available_memory_mb=40.0)
        down = model.evaluate()
        assert down.kind == EventKind.STEP_DOWN and down.paused and model.precision != FP32
        source.set(available_memory_mb=60.0)  # FP32's threshold holds, two sessions would not fit
        assert model.evaluate() is None and model.precision != FP32
        source.set(available_memory_mb=4096.0)
        up = model.evaluate()
        assert up.kind == EventKind.STEP_UP and up.to_precision == FP32 and not up.paused


def test_failed_loads_under_load_keep_serving(cnn_release: Path, tmp_path: Path, served_by: ServedBy) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(cnn_release, folder)
    data = json.loads((folder / "manifest.json").read_text())
    entry = next(v for v in data["variants"] if v["precision"] == "int8")["files"][0]
    path = folder / entry["path"]
    path.write_bytes(b"not an onnx model" * 100)
    entry["size"], entry["sha256"], entry["chunks"] = path.stat().st_size, sha256_file(path), []
    (folder / "manifest.json").write_text(json.dumps(data))
    (folder / "manifest.sig").unlink()
    source = FakeSource(available_memory_mb=LEVEL[FP32])
    with EdgeModel.load(folder, profile=PROFILE, monitor=source, policy=SETTINGS, interval_s=3600) as model:
        refs = {}
        for precision in (FP32, FP16):
            model.pin(precision)
            refs[model.info().variant] = [model.run({"image": x})["logits"] for x in INPUTS]
        model.unpin()
        refs["onnx-int8"] = []
        with Callers(served_by, model, refs, tolerances(cnn_release)) as callers:
            failures = 0
            for n in range(10):
                source.set(available_memory_mb=LEVEL[INT8] if n % 2 == 0 else LEVEL[FP32])
                event = model.evaluate()
                if event is not None and event.kind == EventKind.SWAP_FAILED:
                    failures += 1
                    assert "onnxruntime cannot load" in event.error
                    assert model.precision in (FP32, FP16)
        assert callers.errors == []
        assert failures >= 3
        assert callers.calls > 0


# --- every backend: the same switching under load on the other runtimes ---------------------


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "tflite", "ncnn"])
def test_hundred_switches_under_load_on_each_backend(all_backends_release: Path, backend: str,
                                                     served_by: ServedBy) -> None:
    why = missing_runtime(backend)
    if why is not None:
        missing(f"{backend}: {why}")
    manifest = load_manifest(all_backends_release)
    variants = [v for v in manifest.variants if v.backend == backend and v.ok]
    # Installed means built: a backend with no usable variant, or only one to switch between, is a
    # failure. A variant rejected for accuracy on this model just leaves fewer rungs (e.g. fp32<->fp16).
    rejected = {v.id: v.reason for v in manifest.variants if v.backend == backend and not v.ok}
    assert len(variants) >= 2, f"{backend}: usable variants {[v.id for v in variants]}, rejected {rejected}"
    with EdgeModel.load(all_backends_release, profile="generic-x86_64", backend=backend, monitor=False) as model:
        refs = references(model)
        fp32 = next((v.id for v in variants if v.precision == FP32), None)
        assert fp32 is not None and set(refs) == {v.id for v in variants}
        precisions = model.plan.precisions
        with Callers(served_by, model, refs, tolerances(all_backends_release), fp32=fp32, own_atol=1e-4) as callers:
            for n in range(100):
                event = model.pin(precisions[(n + 1) % len(precisions)])
                assert event.error is None
                before = callers.calls
                while callers.calls < before + 4 and not callers.errors:
                    threading.Event().wait(0.001)
        assert callers.errors == []
        assert set(callers.served) == set(refs)
        assert callers.calls >= 400
        assert model.info().backend == backend and model.info().swaps >= 100


# --- paused swaps (memory too tight for two sessions) that fail -----------------------------


def corrupt_variant(folder: Path, precision: str, keep_hash: bool) -> Path:
    """Overwrite ``precision``'s artifact; ``keep_hash=False`` also updates the manifest so the
    native runtime (not the hash check) is what rejects it. Returns the artifact path."""
    data = json.loads((folder / "manifest.json").read_text())
    entry = next(v for v in data["variants"] if v["precision"] == precision)["files"][0]
    path = folder / entry["path"]
    path.write_bytes(b"not an onnx model" * 100)
    if not keep_hash:
        entry["size"], entry["sha256"], entry["chunks"] = path.stat().st_size, sha256_file(path), []
        (folder / "manifest.json").write_text(json.dumps(data))
        (folder / "manifest.sig").unlink(missing_ok=True)
    return path


def test_paused_swap_to_a_corrupt_artifact_keeps_the_old_variant_serving(cnn_release: Path, tmp_path: Path) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(cnn_release, folder)
    corrupt_variant(folder, "int8", keep_hash=False)
    # 40 MB free: too tight to hold two sessions, so every switch pauses.
    with EdgeModel.load(folder, profile=PROFILE, precision="fp32", monitor=FakeSource(available_memory_mb=40),
                        interval_s=3600) as model:
        want = model.run({"image": INPUTS[0]})["logits"]
        with pytest.raises(BackendError, match="onnxruntime cannot load"):
            model.pin("int8")
        assert model.precision == FP32 and model.events[-1].kind == EventKind.SWAP_FAILED
        np.testing.assert_array_equal(model.run({"image": INPUTS[0]})["logits"], want)
        event = model.pin("fp16")  # and the next switch works
        assert event.paused and model.precision == FP16


def test_paused_swap_losing_both_variants_gives_a_clear_error_then_recovers(cnn_release: Path, tmp_path: Path,
                                                                             monkeypatch) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(cnn_release, folder)
    corrupt_variant(folder, "int8", keep_hash=False)
    with EdgeModel.load(folder, profile=PROFILE, precision="fp32", monitor=FakeSource(available_memory_mb=40),
                        interval_s=3600) as model:
        fp32_file = folder / model.plan.candidates[FP32][0].files[0].path
        good = fp32_file.read_bytes()
        corrupt_variant(folder, "fp32", keep_hash=True)  # reloading FP32 now fails its hash check
        with pytest.raises(BackendError, match="reloading fp32 failed too"):
            model.pin("int8")
        # No closed session is left behind: callers get the reason as an SDK error.
        for call in (lambda: model.run({"image": INPUTS[0]}), model.info, lambda: model.precision):
            with pytest.raises(BackendError, match="no loaded variant: switching to int8 failed"):
                call()
        fp32_file.write_bytes(good)
        model.pin("fp32")  # the next switch brings a variant back
        assert model.precision == FP32 and model.run({"image": INPUTS[0]})["logits"].shape == (1, 10)

        # A non-SDK failure while loading (a native MemoryError) is reported as a BackendError too.
        real_load = OnnxRuntimeBackend.load

        def out_of_memory(self, files, *args, **kwargs):
            if "fp16" in str(files[0]):
                raise MemoryError("std::bad_alloc")
            return real_load(self, files, *args, **kwargs)

        monkeypatch.setattr(OnnxRuntimeBackend, "load", out_of_memory)
        with pytest.raises(BackendError, match="MemoryError"):
            model.pin("fp16")
        assert model.precision == FP32 and model.run({"image": INPUTS[0]})["logits"].shape == (1, 10)
