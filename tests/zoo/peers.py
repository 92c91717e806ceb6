"""The bar: what a user gets from plain onnxruntime quantization done well, or from NNCF, on the
same model and the same calibration data.

onnxruntime (on the model after ``quant_pre_process``: symbolic shape inference + optimization):
static QDQ (uint8 activations, int8 weights) per-channel and per-tensor, op types limited to
Conv/MatMul/Gemm, MinMax or percentile calibration, the first and last quantizable nodes left
FP32; dynamic INT8 (MatMul only, and onnxruntime's default op set, which covers LSTM inside
subgraphs). A recipe that crashes is retried with ``QDQDisableWeightAdjustForInt32Bias``, the
known workaround. NNCF: ``nncf.quantize`` on the ONNX model, with ``ModelType.TRANSFORMER``
too where the graph has MatMuls. Each candidate is scored on the validation split; :func:`best`
keeps the fastest within the accuracy budget, as a user tuning by hand would.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cases import ZooCase, ZooData
from .measure import interleaved_medians, onnx_session

QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]


@dataclass
class PeerResult:
    tool: str  # "onnxruntime" | "nncf"
    recipe: str
    path: Path | None = None
    error: str | None = None
    validation_metric: float | None = None
    latency_ratio: float | None = None  # quick interleaved estimate used to choose; the benchmark re-times


@dataclass(frozen=True)
class _Recipe:
    tool: str
    name: str
    make: Callable[[Path, Path, list], None]  # (fp32 model, output path, calibration feeds)


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of feeds dicts."""

    def __init__(self, feeds: list) -> None:
        self._items = iter(feeds)

    def get_next(self):
        return next(self._items, None)

    def rewind(self) -> None:  # pragma: no cover - only some calibrators call it
        pass


def _quantizable_ends(model_path: Path) -> list[str]:
    import onnx

    nodes = [n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node if n.op_type in QUANTIZED_OPS]
    return sorted({nodes[0], nodes[-1]}) if nodes else []


def _ort_static(per_channel: bool, method: str = "minmax", exclude_ends: bool = False):
    def make(source: Path, out: Path, calibration: list) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        options = {"percentile": {"CalibPercentile": 99.999}}.get(method, {})
        arguments = dict(quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS, per_channel=per_channel,
                         activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                         calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[method],
                         nodes_to_exclude=_quantizable_ends(source) if exclude_ends else None)
        try:
            quantize_static(str(source), str(out), _Reader(calibration), extra_options=options, **arguments)
        except Exception:  # noqa: BLE001 - the known crash on per-channel weights with int32 bias
            quantize_static(str(source), str(out), _Reader(calibration),
                            extra_options={**options, "QDQDisableWeightAdjustForInt32Bias": True}, **arguments)

    return make


def _ort_dynamic(op_types: list[str] | None):
    def make(source: Path, out: Path, calibration: list) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(source), str(out), op_types_to_quantize=op_types, weight_type=QuantType.QInt8)

    return make


def _nncf(transformer: bool):
    def make(source: Path, out: Path, calibration: list) -> None:
        import nncf
        import onnx

        logging.getLogger("nncf").setLevel(logging.ERROR)
        model = onnx.load(str(source))
        options = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quantized = nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration), **options)
        onnx.save(quantized, str(out))

    return make


def recipes(model_path: Path) -> list[_Recipe]:
    import onnx

    has_matmul = any(n.op_type == "MatMul" for n in onnx.load(str(model_path), load_external_data=False).graph.node)
    found = [
        _Recipe("onnxruntime", "qdq-per-channel-conv-matmul", _ort_static(True)),
        _Recipe("onnxruntime", "qdq-per-channel-conv-matmul-percentile", _ort_static(True, "percentile")),
        _Recipe("onnxruntime", "qdq-per-tensor-conv-matmul", _ort_static(False)),
        _Recipe("onnxruntime", "qdq-per-channel-conv-matmul-ends-fp32", _ort_static(True, exclude_ends=True)),
        _Recipe("onnxruntime", "dynamic-default-ops", _ort_dynamic(None)),
        _Recipe("nncf", "nncf", _nncf(False)),
    ]
    if has_matmul:
        found += [_Recipe("onnxruntime", "dynamic-matmul", _ort_dynamic(["MatMul"])),
                  _Recipe("nncf", "nncf-transformer", _nncf(True))]
    return found


def preprocessed(source: Path, out: Path) -> Path:
    """onnxruntime's recommended preparation for quantization (shape inference, then graph
    optimization: BatchNorm folded, Constant nodes turned into initializers, which the quantizer
    needs to see weights). Symbolic shape inference gives up on some graphs: then without it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for options in ({}, {"skip_symbolic_shape": True}):
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                quant_pre_process(str(source), str(out), **options)
            onnx_session(out)
            return out
        except Exception:  # noqa: BLE001 - try the next preparation
            continue
    return source


def build(case: ZooCase, data: ZooData, work: Path, timing_repeats: int = 30) -> list[PeerResult]:
    """Every peer recipe on ``case``, scored on the validation split and timed against FP32."""
    work.mkdir(parents=True, exist_ok=True)
    reference = case.static_model()
    source = preprocessed(reference, work / "preprocessed.onnx")
    reference_run = onnx_session(reference)
    results = []
    for recipe in recipes(source):
        out = work / f"{recipe.tool}-{recipe.name}.onnx"
        result = PeerResult(recipe.tool, recipe.name)
        try:
            recipe.make(source, out, data.calibration)
            run = onnx_session(out)
            result.validation_metric = case.evaluate(run, data.validation)
            sample = data.validation.feeds[0]
            fp32_ms, peer_ms = interleaved_medians([lambda: reference_run(sample), lambda: run(sample)], timing_repeats, 3)
            result.path, result.latency_ratio = out, peer_ms / fp32_ms
        except Exception as exc:  # noqa: BLE001 - a peer recipe that fails is reported, not fatal
            result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        results.append(result)
    return results


def best(case: ZooCase, results: list[PeerResult], fp32_metric: float, max_drop: float = 1.0,
         tool: str | None = None) -> PeerResult | None:
    """The fastest candidate within ``max_drop`` points on validation, else the most accurate."""
    usable = [r for r in results if r.path is not None and (tool is None or r.tool == tool)]
    if not usable:
        return None
    within = [r for r in usable if case.drop_points(fp32_metric, r.validation_metric) <= max_drop]
    if within:
        return min(within, key=lambda r: (round(r.latency_ratio, 2), r.path.stat().st_size))
    return min(usable, key=lambda r: case.drop_points(fp32_metric, r.validation_metric))


def fp32_validation_metric(case: ZooCase, data: ZooData) -> float:
    return case.evaluate(onnx_session(case.static_model()), data.validation)

