"""INT8 for ncnn models: calibration (what ncnn's ``ncnn2table`` does) and conversion (``ncnn2int8``).

ncnn's quantization tools ship neither in a wheel nor in the ``ncnn`` source distribution on PyPI
(it holds the library and the Python binding, not ``tools/``) nor in Debian 12, so this module
does their work with the ``ncnn`` Python package the runtime already uses:

* ncnn's own layer loaders walk the FP32 ``.bin`` (a Python ``DataReader`` counts the bytes each
  layer reads), so every tensor is located without re-implementing ncnn's file format;
* activation ranges come from running the FP32 net on the calibration feeds: ``minmax``,
  ``entropy`` (the KL-divergence threshold search of ncnn2table, 2048 bins into 128) or
  ``percentile`` (99.99 % of |x|);
* Convolution, ConvolutionDepthWise and InnerProduct layers get INT8 weights (one scale per output
  channel, per group for depthwise) plus their input scale, written in the layout their
  ``load_model`` reads with ``int8_scale_term`` set; every other byte of the model is copied as is.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import ConversionError, MissingDependencyError
from .base import CalibrationMethod, Feeds

_INT8_TAG = struct.pack("<I", 0x000D4B38)  # ncnn ModelBin: int8 weights follow
_FP32_TAG = b"\0\0\0\0"  # ncnn ModelBin: raw float32 weights follow
HISTOGRAM_BINS = 2048
_TARGET_BINS = 128
PERCENTILE = 99.99

# type -> (param id of the channel count that gets one weight scale each, int8_scale_term to set)
_QUANTIZABLE = {"Convolution": (0, 2), "ConvolutionDepthWise": (7, 1), "InnerProduct": (0, 2)}
# type -> (param id of weight_data_size, of bias_term)
_WEIGHT_PARAMS = {"Convolution": (6, 5), "ConvolutionDepthWise": (6, 5), "InnerProduct": (2, 1)}


def import_ncnn():
    try:
        import ncnn
    except ImportError:
        raise MissingDependencyError("ncnn", "ncnn", "ncnn INT8 calibration") from None
    return ncnn


@dataclass
class ParamLayer:
    """One layer line of an ncnn ``.param`` file; ``params`` keeps each ``key=value`` token as written."""

    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[str, str]

    @classmethod
    def parse(cls, line: str) -> ParamLayer:
        tokens = line.split()
        n_bottom, n_top = int(tokens[2]), int(tokens[3])
        blobs = tokens[4:4 + n_bottom + n_top]
        params = dict(t.split("=", 1) for t in tokens[4 + n_bottom + n_top:])
        return cls(tokens[0], tokens[1], blobs[:n_bottom], blobs[n_bottom:], params)

    def format(self) -> str:
        head = f"{self.type:<24} {self.name:<24} {len(self.bottoms)} {len(self.tops)}"
        return " ".join([head, *self.bottoms, *self.tops, *(f"{k}={v}" for k, v in self.params.items())])

    def int_param(self, key: int, default: int = 0) -> int:
        return int(self.params.get(str(key), default))


def parse_param(text: str) -> tuple[list[str], list[ParamLayer]]:
    """(the two header lines, the layers) of an ncnn ``.param`` text."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or lines[0].strip() != "7767517":
        raise ConversionError("ncnn int8: not an ncnn param file (magic 7767517 missing)")
    return lines[:2], [ParamLayer.parse(ln) for ln in lines[2:]]


def end_layers(param_text: str) -> tuple[str, ...]:
    """The quantizable layers at the ends of the net: those reading an input blob directly (the
    first convolution sees raw pixels or features) and those with no quantizable layer after
    them (the heads), whose INT8 error reaches the outputs unfiltered."""
    _, layers = parse_param(param_text)
    inputs = {top for layer in layers if layer.type == "Input" for top in layer.tops}
    consumers: dict[str, list[ParamLayer]] = {}
    for layer in layers:
        for blob in layer.bottoms:
            consumers.setdefault(blob, []).append(layer)

    def feeds_a_quantizable_layer(layer: ParamLayer) -> bool:
        frontier, seen = list(layer.tops), set()
        while frontier:
            blob = frontier.pop()
            for consumer in consumers.get(blob, []):
                if consumer.name in seen:
                    continue
                seen.add(consumer.name)
                if consumer.type in _QUANTIZABLE:
                    return True
                frontier.extend(consumer.tops)
        return False

    return tuple(layer.name for layer in layers if layer.type in _QUANTIZABLE
                 and (any(b in inputs for b in layer.bottoms) or not feeds_a_quantizable_layer(layer)))


@dataclass(frozen=True)
class LayerBytes:
    """Where one layer's data sits in the ``.bin``: ``[start, end)`` and each tensor read's offset."""

    name: str
    type: str
    start: int
    end: int
    reads: tuple[tuple[int, int], ...]  # (offset, size) of each read ncnn's loader made


def layer_bytes(param: Path, weights: bytes) -> list[LayerBytes]:
    """Run ncnn's own ``load_model`` of every layer over ``weights``, recording what each one reads."""
    ncnn = import_ncnn()
    capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    capsule_pointer.restype, capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]

    class CountingReader(ncnn.DataReader):
        def __init__(self) -> None:
            super().__init__()
            self.pos = 0
            self.reads: list[tuple[int, int]] = []

        def read(self, buf, size: int) -> int:  # buf: a capsule around ncnn's destination pointer
            n = max(0, min(size, len(weights) - self.pos))
            ctypes.memmove(capsule_pointer(buf, None), weights[self.pos:self.pos + n], n)
            self.reads.append((self.pos, n))
            self.pos += n
            return n

    net = ncnn.Net()
    if net.load_param(str(param)) != 0:
        raise ConversionError(f"ncnn int8: ncnn cannot read {param.name}")
    reader = CountingReader()
    model_bin = ncnn.ModelBinFromDataReader(reader)
    found = []
    for layer in net.layers():
        start, first_read = reader.pos, len(reader.reads)
        if layer.load_model(model_bin) != 0:
            raise ConversionError(f"ncnn int8: ncnn cannot load the weights of layer {layer.name} ({layer.type})")
        found.append(LayerBytes(layer.name, layer.type, start, reader.pos, tuple(reader.reads[first_read:])))
    if reader.pos != len(weights):
        raise ConversionError(f"ncnn int8: the layers read {reader.pos} of {len(weights)} weight bytes")
    net.clear()
    return found


@dataclass
class BlobStats:
    absmax: float = 0.0
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_BINS, np.int64))  # of |x| > 0
    zeros: int = 0  # values exactly 0

    def add_to_histogram(self, values: np.ndarray) -> None:
        """Count ``|x|`` (``values``, already absolute) into the bins of ``[0, absmax]``.

        Exact zeros (a ReLU's whole negative half) say nothing about the range and, as in
        ncnn2table, stay out of the histogram: counted in, bin 0 outweighs every other bin and the
        KL search clips at a fraction of the range (CenterFace: F1 -99 points). Percentiles still
        count them.
        """
        if self.absmax <= 0:
            return
        nonzero = values[values != 0]
        self.zeros += values.size - nonzero.size
        index = np.minimum((nonzero / self.absmax * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)
        self.histogram += np.bincount(index, minlength=HISTOGRAM_BINS)

    def threshold(self, method: CalibrationMethod) -> float:
        if method is CalibrationMethod.MINMAX or self.absmax == 0.0:
            return self.absmax
        width = self.absmax / HISTOGRAM_BINS
        if method is CalibrationMethod.PERCENTILE:
            counts = self.histogram.copy()
            counts[0] += self.zeros  # a percentile of all values, zeros included
            cdf = np.cumsum(counts) / max(int(counts.sum()), 1)
            return float((np.searchsorted(cdf, PERCENTILE / 100) + 1) * width)
        return (entropy_threshold_bin(self.histogram) + 0.5) * width


def entropy_threshold_bin(histogram: np.ndarray, target_bins: int = _TARGET_BINS) -> int:
    """The histogram bin (>= ``target_bins``) whose clipped distribution, squeezed into
    ``target_bins`` levels and expanded back, diverges least (KL) from the original: ncnn2table's
    (and TensorRT's) entropy calibration."""
    total = float(histogram.sum())
    if total == 0:
        return len(histogram) - 1
    hist = histogram.astype(np.float64) / total
    eps = 1e-4
    tails = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tails[i] = sum(hist[i:])
    best, best_kl = len(hist), np.inf
    for threshold in range(target_bins, len(hist) + 1):
        kept = hist[:threshold]
        p = kept.copy()
        p[-1] += tails[threshold]  # what lies beyond the threshold clips to it
        # The INT8 view: the kept bins merged into target_bins levels, spread back over the non-empty bins.
        starts = (np.arange(target_bins) * threshold) // target_bins
        used = kept != 0
        mass = np.add.reduceat(kept, starts)
        count = np.add.reduceat(used.astype(np.float64), starts)
        level = np.divide(mass, count, out=np.zeros_like(mass), where=count > 0)
        q = np.repeat(level, np.diff(np.append(starts, threshold))) * used
        p, q = p + eps, q + eps
        p, q = p / p.sum(), q / q.sum()
        kl = float(np.sum(p * np.log(p / q)))
        if kl < best_kl:
            best, best_kl = threshold, kl
    return best - 1


def _feed(ncnn, extractor, blob: str, array: np.ndarray) -> None:
    data = np.ascontiguousarray(array[0], dtype=np.float32)  # ncnn Mats have no batch axis
    if extractor.input(blob, ncnn.Mat(data).clone()) != 0:
        raise ConversionError(f"ncnn int8: the model has no input blob {blob!r}")


def collect_stats(param: Path, weights: Path, blobs: Sequence[str], calibration: Sequence[Feeds],
                  input_blobs: dict[str, str], method: CalibrationMethod) -> dict[str, BlobStats]:
    """Activation statistics of ``blobs`` over ``calibration`` (``input_blobs``: feed name -> ncnn blob)."""
    ncnn = import_ncnn()
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.use_fp16_packed = net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
    net.opt.num_threads = 1
    if net.load_param(str(param)) != 0 or net.load_model(str(weights)) != 0:
        raise ConversionError("ncnn int8: ncnn cannot load the FP32 model it was given")
    stats = {blob: BlobStats() for blob in blobs}

    def activations():
        for feeds in calibration:
            extractor = net.create_extractor()
            extractor.set_light_mode(False)  # keep every intermediate: one forward serves all blobs
            for name, blob in input_blobs.items():
                _feed(ncnn, extractor, blob, feeds[name])
            for blob in blobs:
                status, mat = extractor.extract(blob)
                if status != 0:
                    raise ConversionError(f"ncnn int8: computing blob {blob!r} on a calibration sample failed")
                yield blob, np.abs(np.asarray(mat, dtype=np.float32)).ravel()
            extractor.clear()

    for blob, values in activations():
        if values.size:
            stats[blob].absmax = max(stats[blob].absmax, float(values.max()))
    if method is not CalibrationMethod.MINMAX:
        for blob, values in activations():
            stats[blob].add_to_histogram(values)
    net.clear()
    return stats


def _round_to_int8(values: np.ndarray) -> np.ndarray:
    """ncnn's float2int8: round half away from zero, clamp to [-127, 127]."""
    rounded = np.sign(values) * np.floor(np.abs(values) + 0.5)
    return np.clip(rounded, -127, 127).astype(np.int8)


@dataclass
class Int8Result:
    param_text: str
    weights: bytes
    quantized: list[str]  # ncnn layer names now INT8
    skipped: list[str]  # quantizable layers left FP32, with why
    table: list[str]  # ncnn2table-style lines: "<layer>_param_0 <weight scales...>" and "<layer> <input scale>"


def quantize(param: Path, weights: Path, calibration: Sequence[Feeds], input_blobs: dict[str, str],
             method: CalibrationMethod = CalibrationMethod.MINMAX, exclude: Sequence[str] = ()) -> Int8Result:
    """INT8 weights and activation scales for the quantizable layers of an FP32 ncnn model."""
    if not calibration:
        raise ConversionError("ncnn int8 needs calibration data (activation ranges)")
    header, layers = parse_param(param.read_text(encoding="utf-8"))
    data = weights.read_bytes()
    located = {b.name: b for b in layer_bytes(param, data)}
    skipped: list[str] = []
    candidates = []
    for layer in layers:
        if layer.type not in _QUANTIZABLE or layer.name in exclude:
            continue
        size_key, bias_key = _WEIGHT_PARAMS[layer.type]
        weight_size, bias = layer.int_param(size_key), layer.int_param(bias_key)
        where = located[layer.name]
        expected = 4 + 4 * weight_size + (4 * layer.int_param(0) if bias else 0)
        if layer.int_param(8) or layer.int_param(19) or len(layer.bottoms) != 1:
            skipped.append(f"{layer.name}: already int8 or dynamic weights")
        elif data[where.start:where.start + 4] != _FP32_TAG or where.end - where.start != expected:
            skipped.append(f"{layer.name}: weights are not plain float32")
        else:
            candidates.append(layer)
    if not candidates:
        raise ConversionError("ncnn int8: no Convolution/ConvolutionDepthWise/InnerProduct layer to quantize"
                              + (f" ({'; '.join(skipped[:3])})" if skipped else ""))
    stats = collect_stats(param, weights, sorted({c.bottoms[0] for c in candidates}), calibration, input_blobs, method)

    replaced: dict[str, bytes] = {}
    table = []
    for layer in candidates:
        channel_key, scale_term = _QUANTIZABLE[layer.type]
        where = located[layer.name]
        weight_size = layer.int_param(_WEIGHT_PARAMS[layer.type][0])
        w = np.frombuffer(data, np.float32, weight_size, where.start + 4).reshape(layer.int_param(channel_key), -1)
        absmax = np.abs(w).max(axis=1)
        weight_scales = (127.0 / np.where(absmax == 0, 127.0, absmax)).astype(np.float32)  # all-zero rows: 1
        threshold = stats[layer.bottoms[0]].threshold(method)
        input_scale = np.float32(127.0 / threshold if threshold > 0 else 1.0)
        q = _round_to_int8(w * weight_scales[:, None]).tobytes()
        q += b"\0" * (-len(q) % 4)  # ncnn pads int8 weights to 4 bytes
        bias = data[where.start + 4 + 4 * weight_size:where.end]
        replaced[layer.name] = _INT8_TAG + q + bias + weight_scales.tobytes() + np.float32(input_scale).tobytes()
        layer.params["8"] = str(scale_term)
        table.append(f"{layer.name}_param_0 " + " ".join(f"{s:g}" for s in weight_scales))
        table.append(f"{layer.name} {float(input_scale):g}")

    out = bytearray()
    for layer in layers:
        where = located[layer.name]
        out += replaced.get(layer.name, data[where.start:where.end])
    text = "\n".join([*header, *(layer.format() for layer in layers)]) + "\n"
    return Int8Result(text, bytes(out), [c.name for c in candidates], skipped, table)
