"""Corpus case: Magika (``magika==1.0.3``), Google's file-type classifier, on real files.

The model takes 2,048 int32 byte tokens (the first and last 1,024 bytes of a file after
stripping whitespace, padded with token 256) and returns scores over 214 content types.
Features are extracted as ``magika.Magika._extract_features_from_seekable`` does.

Files are real: Python's own standard library (sources, bytecode, extension modules, test data
in XML/TOML/PEM/WAV/GIF), images, fonts and documents shipped by matplotlib and scikit-image,
numpy's C headers, scikit-learn's CSV data and dataset descriptions; and files written by the
standard writers for formats with few such files here (gzip/bzip2/xz/zip/tar archives of stdlib
sources, JPEG/BMP/TIFF/WebP encodings of bundled photos, NumPy arrays, SQLite databases,
pydoc's HTML, JSON and YAML dumps). The label is the file's known type; the metric is top-1
accuracy. Files of each type are split across calibration, validation and test.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import json
import lzma
import re
import sqlite3
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .cases import Split, ZooCase, ZooData, package_dir, package_file

MODEL = "models/standard_v3_3"
PER_TYPE = 27  # files per content type (at most): a third each for calibration, validation, test
BEG = END = 1024
BLOCK = 4096
PADDING = 256


def model_path() -> Path:
    return package_file("magika", f"{MODEL}/model.onnx")


@functools.cache
def labels() -> tuple[str, ...]:
    return tuple(json.loads(package_file("magika", f"{MODEL}/config.min.json").read_text())["target_labels_space"])


def features(content: bytes) -> np.ndarray:
    """[1, 2048] int32: stripped first and last ``BEG``/``END`` bytes of the first/last ``BLOCK``."""
    block = min(BLOCK, len(content))
    head = content[:block].lstrip()[:BEG]
    tail = content[len(content) - block:].rstrip()[-END:]
    tokens = list(head) + [PADDING] * (BEG - len(head)) + [PADDING] * (END - len(tail)) + list(tail)
    return np.asarray(tokens, np.int32)[None]


# --- the files -------------------------------------------------------------------------------

def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _files(root: Path, *patterns: str) -> Iterator[bytes]:
    """Contents of files under ``root`` (sorted paths, none from a site-packages inside it)."""
    for path in sorted({p for pattern in patterns for p in root.glob(pattern)}):
        if path.is_file() and "site-packages" not in path.relative_to(root).parts:
            yield path.read_bytes()


def _sources() -> list[bytes]:
    return list(_files(_stdlib(), "*.py"))


def _photos() -> list[np.ndarray]:
    from PIL import Image

    names = ("astronaut.png", "coffee.png", "rocket.jpg", "chelsea.png", "ihc.png", "motorcycle_left.png")
    return [np.asarray(Image.open(package_dir("skimage") / "data" / name).convert("RGB")) for name in names]


def _crops(rng: np.random.Generator, count: int) -> Iterator[np.ndarray]:
    photos = _photos()
    for _ in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        height, width = (int(v) for v in rng.integers(48, 256, 2))
        top, left = int(rng.integers(0, photo.shape[0] - height)), int(rng.integers(0, photo.shape[1] - width))
        yield photo[top:top + height, left:left + width]


def _encoded(image_format: str, **options) -> Callable[[np.random.Generator], Iterator[bytes]]:
    def make(rng: np.random.Generator) -> Iterator[bytes]:
        from PIL import Image

        for crop in _crops(rng, PER_TYPE):
            out = io.BytesIO()
            Image.fromarray(crop).save(out, image_format, **options)
            yield out.getvalue()

    return make


def _compressed(compress: Callable[[bytes], bytes]) -> Callable[[np.random.Generator], Iterator[bytes]]:
    def make(rng: np.random.Generator) -> Iterator[bytes]:
        sources = _sources()
        for i in rng.choice(len(sources), PER_TYPE, replace=False):
            yield compress(sources[i])

    return make


def _archives(kind: str) -> Callable[[np.random.Generator], Iterator[bytes]]:
    def make(rng: np.random.Generator) -> Iterator[bytes]:
        sources = _sources()
        for _ in range(PER_TYPE):
            members = rng.choice(len(sources), int(rng.integers(2, 6)), replace=False)
            out = io.BytesIO()
            if kind == "zip":
                with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
                    for i in members:
                        archive.writestr(zipfile.ZipInfo(f"pkg/module_{i}.py", (2020, 1, 1, 0, 0, 0)), sources[i])
            else:
                with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
                    for i in members:
                        info = tarfile.TarInfo(f"pkg/module_{i}.py")
                        info.size, info.mtime = len(sources[i]), 1577836800
                        archive.addfile(info, io.BytesIO(sources[i]))
            yield out.getvalue()

    return make


def _arrays(kind: str) -> Callable[[np.random.Generator], Iterator[bytes]]:
    def make(rng: np.random.Generator) -> Iterator[bytes]:
        for crop in _crops(rng, PER_TYPE):
            out = io.BytesIO()
            if kind == "npy":
                np.save(out, crop.astype(rng.choice(["uint8", "float32", "int16"])))
            else:
                np.savez(out, image=crop, mean=crop.mean(axis=(0, 1)), histogram=np.histogram(crop, 32)[0])
            yield out.getvalue()

    return make


def _sqlite(rng: np.random.Generator) -> Iterator[bytes]:
    """Databases holding rows of scikit-learn's CSV datasets."""
    tables = [p.read_text() for p in sorted((package_dir("sklearn") / "datasets/data").glob("*.csv"))]
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(PER_TYPE):
            rows = [line.split(",") for line in tables[n % len(tables)].splitlines()[1:int(rng.integers(20, 200))]]
            width = min(len(r) for r in rows)
            path = Path(tmp) / f"{n}.sqlite"
            db = sqlite3.connect(path)
            with db:
                db.execute(f"CREATE TABLE samples ({', '.join(f'c{i} TEXT' for i in range(width))})")
                db.executemany(f"INSERT INTO samples VALUES ({', '.join('?' * width)})", [r[:width] for r in rows])
            db.close()
            yield path.read_bytes()


def _pydoc_html(rng: np.random.Generator) -> Iterator[bytes]:
    import importlib
    import pydoc

    names = ["json", "csv", "textwrap", "heapq", "bisect", "fractions", "statistics", "shlex", "string",
             "calendar", "colorsys", "difflib", "fnmatch", "glob", "graphlib", "ipaddress", "pprint", "queue"]
    # Not enum, dataclasses and the like: in a long test process their pages came out different.
    for name in names[:PER_TYPE]:
        module = importlib.import_module(name)
        page = pydoc.html.page(pydoc.describe(module), pydoc.html.document(module, name))
        yield re.sub(r"(&nbsp;| )at(&nbsp;| )0x[0-9a-f]+", "", page).encode()  # object reprs: a new address each run


def _json(rng: np.random.Generator) -> Iterator[bytes]:
    import tomllib

    for content in list(_files(_stdlib(), "test/test_tomllib/data/valid/**/*.toml"))[:PER_TYPE]:
        yield json.dumps(tomllib.loads(content.decode()), indent=int(rng.integers(0, 5)) or None, default=str).encode()


def _yaml(rng: np.random.Generator) -> Iterator[bytes]:
    import tomllib

    import yaml

    for content in list(_files(_stdlib(), "test/test_tomllib/data/valid/**/*.toml"))[-PER_TYPE:]:
        yield yaml.safe_dump(json.loads(json.dumps(tomllib.loads(content.decode()), default=str))).encode()


def _found(root: Callable[[], Path], *patterns: str) -> Callable[[np.random.Generator], Iterator[bytes]]:
    def make(rng: np.random.Generator) -> Iterator[bytes]:
        found = [c for c in _files(root(), *patterns) if len(c.strip()) >= 8]
        for i in np.sort(rng.choice(len(found), min(PER_TYPE, len(found)), replace=False)):
            yield found[i]

    return make


def _package(name: str) -> Callable[[], Path]:
    return lambda: package_dir(name)


# Content type (a Magika label) → where its files come from.
SOURCES: dict[str, Callable[[np.random.Generator], Iterator[bytes]]] = {
    "python": _found(_stdlib, "*.py"),
    "pythonbytecode": _found(_stdlib, "__pycache__/*.cpython-311.pyc"),
    "elf": _found(_stdlib, "lib-dynload/*.so"),
    "xml": _found(_stdlib, "test/xmltestdata/**/*.xml"),
    "toml": _found(_stdlib, "test/test_tomllib/data/valid/**/*.toml"),
    "pem": _found(_stdlib, "test/*.pem"),
    "gif": _found(_stdlib, "idlelib/Icons/*.gif", "test/imghdrdata/*.gif"),
    "wav": _found(_package("scipy"), "io/tests/data/*.wav"),
    "png": _found(_package("matplotlib"), "mpl-data/images/*.png"),
    "svg": _found(_package("matplotlib"), "mpl-data/images/*.svg"),
    "pdf": _found(_package("matplotlib"), "mpl-data/images/*.pdf"),
    "ttf": _found(_package("matplotlib"), "mpl-data/fonts/ttf/*.ttf"),
    "c": _found(_package("numpy"), "_core/include/numpy/*.h"),
    "rst": _found(_package("sklearn"), "datasets/descr/*.rst"),
    "jpeg": _encoded("JPEG", quality=85),
    "bmp": _encoded("BMP"),
    "tiff": _encoded("TIFF"),
    "webp": _encoded("WEBP", quality=80),
    "gzip": _compressed(lambda b: gzip.compress(b, mtime=0)),
    "bzip": _compressed(bz2.compress),
    "xz": _compressed(lzma.compress),
    "zip": _archives("zip"),
    "tar": _archives("tar"),
    "npy": _arrays("npy"),
    "npz": _arrays("npz"),
    "sqlite": _sqlite,
    "html": _pydoc_html,
    "json": _json,
    "yaml": _yaml,
}


def _prepare() -> ZooData:
    space = labels()
    parts: list[list[tuple[np.ndarray, int]]] = [[], [], []]
    seen: set[bytes] = set()  # files the model cannot tell apart (same stripped head and tail) count once
    for index, (label, make) in enumerate(sorted(SOURCES.items())):
        tokens = []
        for content in make(np.random.default_rng(1000 + index)):
            token = features(content)
            if token.tobytes() not in seen:
                seen.add(token.tobytes())
                tokens.append(token)
        order = np.random.default_rng(2000 + index).permutation(len(tokens))
        for position, i in enumerate(order):
            parts[position % 3].append((tokens[i], space.index(label)))
    calibration, validation, test = ([{"bytes": f} for f, _ in part] for part in parts)
    return ZooData(calibration, Split(validation, np.array([y for _, y in parts[1]])),
                   Split(test, np.array([y for _, y in parts[2]])))


def _score(outputs, truth) -> float:
    predicted = np.array([int(o["target_label"][0].argmax()) for o in outputs])
    return float(np.mean(predicted == truth))


CASE = ZooCase(
    name="magika",
    family="file-type classifier (int32 byte tokens, dense + MatMul head, 214 classes)",
    package="magika==1.0.3",
    licence="Apache-2.0",
    metric_name="content_type_top1",
    model=model_path,
    prepare=_prepare,
    score=_score,
    input_shapes={"bytes": (1, BEG + END)},
    modules=("magika", "matplotlib", "skimage", "sklearn", "numpy", "scipy", "PIL", "yaml"),
    data_version=6,
)
