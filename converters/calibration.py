"""Calibration and validation samples: a folder of .npy/.npz, a folder of images, or random.

Every sample is one feeds dict (input name → array in the model's own shape and dtype). Anything
that does not match the model is a :class:`ConfigError` naming the file. Random data is allowed
but recorded as a loud warning: INT8 ranges calibrated on noise rarely fit real inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol
from pathlib import Path

import numpy as np

from ..errors import ConfigError, MissingDependencyError
from ..manifest import TensorSpec
from .targets.base import Feeds

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy", ".npz")


class Layout(str, Enum):
    NCHW = "nchw"
    NHWC = "nhwc"


@dataclass(frozen=True)
class ImageOptions:
    """How image files become an input tensor: resize to the input's H×W, scale to [0, 1], normalize."""

    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0
    layout: Layout | None = None  # None: guess from where the input shape has 3 channels
    bgr: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", Layout(self.layout) if self.layout is not None else None)
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise ConfigError(f"image mean {self.mean} and std {self.std}: give 1 or 3 values each, as many of both")
        if any(v <= 0 for v in self.std):
            raise ConfigError(f"image std {self.std}: every value must be > 0")


@dataclass
class SampleSet:
    """Samples plus where they came from (for the report)."""

    samples: list[Feeds]
    source: str
    names: list[str] = field(default_factory=list)  # file stem per sample (to match labels)
    warnings: list[str] = field(default_factory=list)


class CalibrationSource(Protocol):
    """Where calibration/validation samples come from (:func:`source_for` picks one)."""

    def read(self, inputs: Sequence[TensorSpec]) -> SampleSet:
        """Samples for a model with these inputs; ConfigError naming the file when one does not fit."""
        ...


@dataclass(frozen=True)
class ArrayFiles:
    """A folder of ``.npy`` (single-input models) / ``.npz`` (keyed by input name), or one such file.

    A file may hold one sample in the model's shape, or N samples stacked on a leading axis.
    """

    path: Path

    def read(self, inputs: Sequence[TensorSpec]) -> SampleSet:
        samples: list[Feeds] = []
        names: list[str] = []
        for file in _listing(self.path, ARRAY_SUFFIXES):
            loaded = _read_arrays(file, inputs)
            samples.extend(loaded)
            names.extend([file.stem] if len(loaded) == 1 else [f"{file.stem}[{i}]" for i in range(len(loaded))])
        return SampleSet(samples, source=str(self.path), names=names)


@dataclass(frozen=True)
class ImageFiles:
    """A folder of images, resized to the input's H×W, scaled, normalized and laid out as the input."""

    path: Path
    options: ImageOptions = ImageOptions()

    def read(self, inputs: Sequence[TensorSpec]) -> SampleSet:
        files = _listing(self.path, IMAGE_SUFFIXES)
        return SampleSet([_read_image(f, inputs, self.options) for f in files], source=str(self.path),
                         names=[f.stem for f in files])


@dataclass(frozen=True)
class RandomInputs:
    """Standard-normal inputs of the model's shapes: an explicit opt-in, reported as a warning."""

    count: int = 16
    seed: int = 0

    def read(self, inputs: Sequence[TensorSpec]) -> SampleSet:
        return random_samples(inputs, self.count, self.seed)


def source_for(spec: Path | str, image_options: ImageOptions = ImageOptions()) -> CalibrationSource:
    """``"random"`` / ``"random:N"``, or a path whose content decides between arrays and images."""
    text = str(spec)
    if text == "random" or text.startswith("random:"):
        count = text.partition(":")[2] or "16"
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(f"calibration {text!r}: expected random or random:N with N >= 1")
        return RandomInputs(count=int(count))
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"calibration {path}: no such file or folder")
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    arrays = [f for f in files if f.suffix.lower() in ARRAY_SUFFIXES]
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if not arrays and not images:
        raise ConfigError(f"calibration {path}: no .npy/.npz or image files found (empty folder?)")
    if arrays and images:
        raise ConfigError(f"calibration {path}: mixes array files ({arrays[0].name}) and images ({images[0].name}); use one kind")
    return ArrayFiles(path) if arrays else ImageFiles(path, image_options)


def load_samples(path: Path | str | None, inputs: Sequence[TensorSpec], *, random_count: int = 16,
                 image_options: ImageOptions = ImageOptions(), seed: int = 0) -> SampleSet:
    """Read calibration samples from ``path`` (folder or single file, or ``"random[:N]"``); None → random."""
    if path is None:
        return random_samples(inputs, random_count, seed)
    return source_for(path, image_options).read(inputs)


def is_random(spec: object) -> bool:
    """Whether a calibration/validation spec asks for random data (``"random"`` / ``"random:N"``)."""
    return isinstance(spec, str) and (spec == "random" or spec.startswith("random:"))


def split_held_out(samples: SampleSet, limit: int, seed: int = 0, *, consecutive: bool = False) -> tuple[SampleSet, SampleSet]:
    """(calibration, validation): a seeded, disjoint split, so the gate judges on data calibration did not see.

    A quarter goes to validation (at least 8 when there are 16 or more, at most ``limit``); fewer
    than 2 samples cannot be split and both sets are the same object. ``consecutive``: the
    samples are steps of streams (recurrent state), and validation is the last steps, in one piece.
    """
    count = len(samples.samples)
    if count < 2:
        return samples, samples
    held = min(limit, max(count // 4, min(8, count // 2)))
    order = np.arange(count)[::-1] if consecutive else np.random.default_rng(seed).permutation(count)
    validation, calibration = sorted(order[:held].tolist()), sorted(order[held:].tolist())
    return _pick(samples, calibration, "calibration split"), _pick(samples, validation, "held out")


def subset(samples: SampleSet, limit: int, seed: int = 0, *, consecutive: bool = False) -> SampleSet:
    """At most ``limit`` samples, a seeded choice that keeps their order (the same every run);
    ``consecutive``: the first ``limit`` (steps of streams must stay adjacent)."""
    count = len(samples.samples)
    if count <= limit:
        return samples
    picked = range(limit) if consecutive else sorted(np.random.default_rng(seed).permutation(count)[:limit].tolist())
    return _pick(samples, list(picked), f"{limit} of {count}")


def _pick(samples: SampleSet, indices: Sequence[int], what: str) -> SampleSet:
    names = [samples.names[i] for i in indices] if samples.names else []
    return SampleSet([samples.samples[i] for i in indices], f"{samples.source} ({what}: {len(indices)})", names,
                     list(samples.warnings))


def _listing(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes)


def random_samples(inputs: Sequence[TensorSpec], count: int, seed: int = 0) -> SampleSet:
    rng = np.random.default_rng(seed)
    samples = [{s.name: _random_array(s, rng) for s in inputs} for _ in range(count)]
    warning = (f"WARNING: INT8 ranges were calibrated on {count} random samples (calibration='random'), "
               "which rarely match real inputs - pass --calibration with real samples")
    return SampleSet(samples, source="random", names=[f"random_{i}" for i in range(count)], warnings=[warning])


def _random_array(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    shape = _shape(spec)
    if None in shape:
        raise ConfigError(f"random samples for input {spec.name!r}: its shape {spec.shape} has dynamic dims; "
                          f"pass --input-shape {spec.name}=...")
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return np.asarray(rng.standard_normal(shape).astype(dtype))
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)  # a 0-d comparison gives a numpy scalar, not an array
    return np.asarray(rng.integers(0, 2, size=shape).astype(dtype))


def _read_arrays(file: Path, inputs: Sequence[TensorSpec]) -> list[Feeds]:
    try:
        loaded = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"calibration {file}: cannot read ({exc})") from None
    if isinstance(loaded, np.ndarray):
        if len(inputs) != 1:
            raise ConfigError(f"calibration {file}: a .npy holds one array but the model has inputs "
                              f"{[s.name for s in inputs]}; use .npz files keyed by input name")
        per_input = {inputs[0].name: loaded}
    else:
        with loaded:
            missing = [s.name for s in inputs if s.name not in loaded.files]
            if missing:
                raise ConfigError(f"calibration {file}: missing arrays for inputs {missing} (has {loaded.files})")
            per_input = {s.name: loaded[s.name] for s in inputs}
    layouts = {spec.name: _stacking(file, spec, per_input[spec.name]) for spec in inputs}
    counts = {name: count for name, (count, _) in layouts.items()}
    if len(set(counts.values())) != 1:
        raise ConfigError(f"calibration {file}: inputs hold different sample counts {counts}")
    count = next(iter(counts.values()))
    samples = []
    for i in range(count):
        sample = {}
        for spec in inputs:
            array = per_input[spec.name]
            _, stacked = layouts[spec.name]
            # A stacked file holds N samples along a new leading axis, or along a batch axis of 1.
            sample[spec.name] = array if stacked is None else array[i] if stacked == "new" else array[i:i + 1]
        samples.append(sample)
    return samples


def _shape(spec: TensorSpec) -> list[int | None]:
    """The input's shape, None where a dim is still symbolic (any size fits there)."""
    return [d if isinstance(d, int) and d > 0 else None for d in spec.shape]


def _fits(shape: Sequence[int], wanted: Sequence[int | None]) -> bool:
    return len(shape) == len(wanted) and all(w is None or s == w for s, w in zip(shape, wanted))


def _stacking(file: Path, spec: TensorSpec, array: np.ndarray) -> tuple[int, str | None]:
    """(samples in ``array``, how they are stacked: None one sample, "batch" on a batch axis of 1, "new" on a new axis)."""
    shape = _shape(spec)
    if array.dtype != np.dtype(spec.dtype):
        raise ConfigError(f"calibration {file}: input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}")
    if _fits(array.shape, shape):
        return 1, None
    if shape and shape[0] == 1 and _fits(array.shape[1:], shape[1:]):
        return array.shape[0], "batch"  # N samples stacked along the batch axis
    if array.ndim == len(shape) + 1 and _fits(array.shape[1:], shape):
        return array.shape[0], "new"
    raise ConfigError(f"calibration {file}: input {spec.name!r} has shape {list(array.shape)}, the model expects "
                      f"{[d if d is not None else spec.shape[i] for i, d in enumerate(shape)]}")


def _read_image(file: Path, inputs: Sequence[TensorSpec], options: ImageOptions) -> Feeds:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise MissingDependencyError("pillow", "dev", "reading calibration images") from None
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise ConfigError(f"calibration {file}: image folders need a model with one 4-D image input, "
                          f"got {[(s.name, s.shape) for s in inputs]}")
    spec = inputs[0]
    shape = _shape(spec)
    if None in shape[1:]:
        raise ConfigError(f"calibration {file}: input {spec.name!r} has dynamic dims {spec.shape}; image folders need "
                          f"its size: pass --input-shape {spec.name}=1,3,H,W (or the NHWC form)")
    layout = options.layout or (Layout.NCHW if shape[1] in (1, 3) else Layout.NHWC)
    channels, height, width = (shape[1], shape[2], shape[3]) if layout == Layout.NCHW else (shape[3], shape[1], shape[2])
    if channels not in (1, 3):
        raise ConfigError(f"calibration {file}: input {spec.name!r} shape {shape} has {channels} channels in {layout.value} layout; images need 1 or 3")
    try:
        with Image.open(file) as image:
            image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.float32)
    except (OSError, UnidentifiedImageError) as exc:
        raise ConfigError(f"calibration {file}: cannot read image ({exc})") from None
    array = array.reshape(height, width, channels)
    if options.bgr and channels == 3:
        array = array[..., ::-1]
    array = (array * options.scale - np.asarray(options.mean[:channels], np.float32)) / np.asarray(options.std[:channels], np.float32)
    if layout == Layout.NCHW:
        array = array.transpose(2, 0, 1)
    array = np.ascontiguousarray(array[None]).astype(spec.dtype)
    if list(array.shape) != shape:
        raise ConfigError(f"calibration {file}: image became {list(array.shape)}, the model expects {shape}")
    return {spec.name: array}


def load_labels(labels: Path | str | Sequence[int] | np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Integer class labels, one per sample: an array, a .npy, or a text file of ``label`` or ``name,label`` lines."""
    if isinstance(labels, (str, Path)):
        path = Path(labels)
        if not path.is_file():
            raise ConfigError(f"labels {path}: no such file")
        if path.suffix == ".npy":
            try:
                values = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"labels {path}: cannot read ({exc})") from None
        else:
            values = _parse_label_lines(path, names)
        source = str(path)
    else:
        values, source = np.asarray(labels), "labels"
    if values.ndim != 1 or values.dtype.kind not in "iu":
        raise ConfigError(f"{source}: expected one integer class per sample, got dtype {values.dtype} shape {list(values.shape)}")
    if len(values) != len(names):
        raise ConfigError(f"{source}: {len(values)} labels for {len(names)} calibration samples")
    return values.astype(np.int64)


def _parse_label_lines(path: Path, names: Sequence[str]) -> np.ndarray:
    by_name: dict[str, int] = {}
    plain: list[int] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.rpartition(",")
        try:
            label = int(value)
        except ValueError:
            raise ConfigError(f"labels {path}:{number}: {value.strip()!r} is not an integer class") from None
        if sep:
            by_name[Path(name.strip()).stem] = label
        else:
            plain.append(label)
    if by_name:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ConfigError(f"labels {path}: no label for samples {missing[:5]}")
        return np.array([by_name[n] for n in names], np.int64)
    return np.array(plain, np.int64)
