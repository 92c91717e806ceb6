"""Corpus cases: the three PP-OCR models of ``rapidocr-onnxruntime==1.4.4`` on rendered English text.

Text is real prose (the Lee news corpus bundled with gensim), rendered with the DejaVu fonts
matplotlib ships (12 faces: sans, serif, mono × regular, bold, oblique), random sizes and
colours, plus a little sensor noise; detector pages have scikit-image's bundled photos behind
the text. The word stream is cut into disjoint parts so calibration,
validation and test never share a sentence. Pre- and post-processing follow rapidocr's own
(``config.yaml``: BGR, ``(x / 255 − 0.5) / 0.5``; DB threshold 0.3, box threshold 0.5, unclip
1.6; CTC greedy decoding over the dictionary stored in the recognizer's metadata).

- ``ocr-det``: DBNet text detector (PP-OCRv4 det), F1 of text-line boxes at IoU ≥ 0.5.
- ``ocr-rec``: CRNN-style line recognizer with SVTR neck (PP-OCRv4 rec), character accuracy (1 − CER).
- ``ocr-cls``: the 0°/180° text-line orientation classifier (PP-OCR mobile v2 cls), accuracy.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from .cases import Split, ZooCase, ZooData, package_dir, package_file
from .metrics import character_accuracy, detection_f1

DET_SIZE = 320
REC_SHAPE = (48, 320)
CLS_SHAPE = (48, 192)
ANNOTATION_MARGIN = 0.15  # of the line height, around each true text box
# Parts of the word stream: calibration, validation, test.
TEXT_PARTS = {"calibration": (0.0, 0.4), "validation": (0.4, 0.6), "test": (0.6, 1.0)}


def _model(name: str):
    return lambda: package_file("rapidocr_onnxruntime", f"models/{name}")


@functools.cache
def fonts() -> tuple[Path, ...]:
    """The DejaVu faces in matplotlib's wheel (not the *Display* cuts, which lack most glyphs)."""
    found = sorted(p for p in (package_dir("matplotlib") / "mpl-data/fonts/ttf").glob("DejaVu*.ttf") if "Display" not in p.name)
    if not found:
        raise FileNotFoundError("matplotlib ships no DejaVu fonts here")
    return tuple(found)


@functools.cache
def words() -> tuple[str, ...]:
    text = (package_dir("gensim") / "test/test_data/lee_background.cor").read_text(encoding="utf-8")
    return tuple(re.findall(r"[A-Za-z0-9][A-Za-z0-9'.,%-]*", text))


class _Text:
    """Phrases drawn from one part of the word stream."""

    def __init__(self, part: str, rng: np.random.Generator) -> None:
        stream = words()
        start, stop = TEXT_PARTS[part]
        self.words = stream[int(start * len(stream)):int(stop * len(stream))]
        self.rng = rng

    def phrase(self, max_words: int, max_chars: int) -> str:
        n = int(self.rng.integers(1, max_words + 1))
        start = int(self.rng.integers(0, len(self.words) - n))
        return " ".join(self.words[start:start + n])[:max_chars].strip()


def _font(rng: np.random.Generator, low: int, high: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(fonts()[int(rng.integers(len(fonts())))]), int(rng.integers(low, high + 1)))


def _noisy(image, rng: np.random.Generator) -> np.ndarray:
    pixels = np.asarray(image, np.float32)
    return np.clip(pixels + rng.normal(0.0, 6.0, pixels.shape), 0, 255)


def _line(text: str, rng: np.random.Generator, size: tuple[int, int], rotate: bool = False) -> np.ndarray:
    """One text line, resized to height H keeping its aspect, left-aligned and zero-padded to
    width W, normalized: [1, 3, H, W] float32 (rapidocr's ``resize_norm_img``)."""
    from PIL import Image, ImageDraw

    font = _font(rng, 18, 34)
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(3, 9))
    box = (right - left + 2 * pad, bottom - top + 2 * pad)
    if rng.random() < 0.5:
        image = Image.fromarray(_photo_background(rng, *box))
    else:
        image = Image.new("RGB", box, tuple(int(v) for v in rng.integers(175, 256, 3)))
    ImageDraw.Draw(image).text((pad - left, pad - top), text, font=font, fill=tuple(int(v) for v in rng.integers(0, 120, 3)))
    if rotate:
        image = image.rotate(180)
    height, width = size
    resized = min(width, int(np.ceil(image.width * height / image.height)))
    pixels = _noisy(image.resize((resized, height), Image.BILINEAR), rng)[..., ::-1]  # BGR, as cv2 reads
    tensor = np.zeros((1, 3, height, width), np.float32)
    tensor[0, :, :, :resized] = (pixels.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return tensor


# --- detector ----------------------------------------------------------------------------------

def _page(text: _Text, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A page of text lines at random positions; returns the normalized [1, 3, S, S] tensor and line boxes."""
    from PIL import Image, ImageDraw

    size = DET_SIZE
    image = Image.fromarray(_photo_background(rng, size, size))
    draw = ImageDraw.Draw(image)
    boxes = []
    y = int(rng.integers(4, 24))
    while True:
        font = _font(rng, 12, 30)
        line = text.phrase(4, 60)
        left, top, right, bottom = font.getbbox(line)
        while right - left > size - 8 and " " in line:  # drop words until the line fits
            line = line.rsplit(" ", 1)[0]
            left, top, right, bottom = font.getbbox(line)
        if y + bottom - top > size - 4 or right - left > size - 8:
            break
        x = int(rng.integers(4, size - (right - left) - 3))
        draw.text((x - left, y - top), line, font=font, fill=tuple(int(v) for v in rng.integers(0, 140, 3)))
        margin = ANNOTATION_MARGIN * (bottom - top)  # annotated boxes enclose the line with a small margin
        boxes.append([x - margin, y - margin, x + right - left + margin, y + bottom - top + margin])
        y += bottom - top + int(rng.integers(6, 32))
    pixels = _noisy(image, rng)[..., ::-1]
    return ((pixels.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5)[None].astype(np.float32), np.asarray(boxes, np.float32)


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    from PIL import Image

    names = ("astronaut.png", "coffee.png", "rocket.jpg", "ihc.png", "hubble_deep_field.jpg", "motorcycle_left.png")
    return tuple(np.asarray(Image.open(package_dir("skimage") / "data" / name).convert("RGB")) for name in names)


def _photo_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random crop of one of scikit-image's bundled photos, washed out towards a light colour."""
    photo = _photos()[int(rng.integers(len(_photos())))]
    grow = max(width / photo.shape[1], height / photo.shape[0], 1.0)
    if grow > 1.0:
        from PIL import Image

        photo = np.asarray(Image.fromarray(photo).resize((int(np.ceil(photo.shape[1] * grow)), int(np.ceil(photo.shape[0] * grow)))))
    top = int(rng.integers(0, photo.shape[0] - height + 1))
    left = int(rng.integers(0, photo.shape[1] - width + 1))
    crop = photo[top:top + height, left:left + width].astype(np.float32)
    light = rng.integers(200, 256, 3).astype(np.float32)
    alpha = rng.uniform(0.35, 0.7)
    return (alpha * crop + (1 - alpha) * light).astype(np.uint8)


def decode_text_boxes(probability: np.ndarray, threshold: float = 0.3, box_threshold: float = 0.5,
                      unclip_ratio: float = 1.6) -> np.ndarray:
    """DB post-processing for upright text: binarize, dilate 2×2, one box per connected region
    whose mean probability reaches ``box_threshold``, grown by area × ratio / perimeter."""
    from scipy import ndimage

    prob = probability[0, 0]
    regions, _ = ndimage.label(ndimage.binary_dilation(prob > threshold, np.ones((2, 2), bool)))
    boxes = []
    for index, (rows, cols) in enumerate(ndimage.find_objects(regions), 1):
        height, width = rows.stop - rows.start, cols.stop - cols.start
        if min(height, width) < 3:
            continue
        confidence = float(prob[rows, cols][regions[rows, cols] == index].mean())
        if confidence < box_threshold:
            continue
        grow = height * width * unclip_ratio / (2 * (height + width))
        boxes.append([cols.start - grow, rows.start - grow, cols.stop + grow, rows.stop + grow, confidence])
    return np.asarray(boxes, np.float32).reshape(-1, 5)


def _det_split(part: str, count: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    text = _Text(part, rng)
    pages = [_page(text, rng) for _ in range(count)]
    return Split([{"x": image} for image, _ in pages], [boxes for _, boxes in pages])


def _det_score(outputs, truth) -> float:
    return detection_f1([decode_text_boxes(o["sigmoid_0.tmp_0"]) for o in outputs], truth)


DET = ZooCase(
    name="ocr-det",
    family="text detector (DBNet, dense probability map)",
    package="rapidocr-onnxruntime==1.4.4",
    licence="Apache-2.0",
    metric_name="text_box_f1_iou50",
    model=_model("ch_PP-OCRv4_det_infer.onnx"),
    prepare=lambda: ZooData(_det_split("calibration", 16, 11).feeds, _det_split("validation", 20, 12),
                            _det_split("test", 24, 13)),
    score=_det_score,
    input_shapes={"x": (1, 3, DET_SIZE, DET_SIZE)},
    modules=("rapidocr_onnxruntime", "matplotlib", "gensim", "PIL", "skimage"),
    data_version=2,
)


# --- recognizer --------------------------------------------------------------------------------

@functools.cache
def characters() -> tuple[str, ...]:
    """CTC classes: blank, the dictionary in the model's metadata, space (as rapidocr builds them)."""
    import onnx

    model = onnx.load(str(package_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx")))
    dictionary = next(p.value for p in model.metadata_props if p.key == "character").splitlines()
    return ("", *dictionary, " ")


def ctc_decode(probabilities: np.ndarray) -> str:
    """Greedy CTC: best class per time step, repeats merged, blanks dropped."""
    chars = characters()
    best = probabilities[0].argmax(-1)
    keep = np.concatenate([[True], best[1:] != best[:-1]]) & (best != 0)
    return "".join(chars[i] for i in best[keep]).strip()


def _rec_split(part: str, count: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    text = _Text(part, rng)
    lines = [text.phrase(5, 32) for _ in range(count)]
    return Split([{"x": _line(line, rng, REC_SHAPE)} for line in lines], lines)


def _rec_score(outputs, truth) -> float:
    return character_accuracy([ctc_decode(o["softmax_11.tmp_0"]) for o in outputs], truth)


REC = ZooCase(
    name="ocr-rec",
    family="text-line recognizer (conv + SVTR transformer neck, CTC over 6,625 classes)",
    package="rapidocr-onnxruntime==1.4.4",
    licence="Apache-2.0",
    metric_name="character_accuracy",
    model=_model("ch_PP-OCRv4_rec_infer.onnx"),
    prepare=lambda: ZooData(_rec_split("calibration", 32, 21).feeds, _rec_split("validation", 48, 22),
                            _rec_split("test", 64, 23)),
    score=_rec_score,
    input_shapes={"x": (1, 3, *REC_SHAPE)},
    modules=("rapidocr_onnxruntime", "matplotlib", "gensim", "PIL", "skimage"),
    data_version=2,
)


# --- orientation classifier --------------------------------------------------------------------

def _cls_split(part: str, count: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    text = _Text(part, rng)
    flipped = rng.permutation(np.arange(count) % 2).astype(bool)  # half upside down
    feeds = [{"x": _line(text.phrase(3, 16), rng, CLS_SHAPE, rotate=bool(f))} for f in flipped]
    return Split(feeds, flipped.astype(np.int64))


def _cls_score(outputs, truth) -> float:
    predicted = np.array([int(o["save_infer_model/scale_0.tmp_1"][0].argmax()) for o in outputs])
    return float(np.mean(predicted == truth))


CLS = ZooCase(
    name="ocr-cls",
    family="small image classifier (MobileNetV3, text-line orientation 0/180)",
    package="rapidocr-onnxruntime==1.4.4",
    licence="Apache-2.0",
    metric_name="orientation_accuracy",
    model=_model("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    prepare=lambda: ZooData(_cls_split("calibration", 64, 31).feeds, _cls_split("validation", 200, 32),
                            _cls_split("test", 256, 33)),
    score=_cls_score,
    input_shapes={"x": (1, 3, *CLS_SHAPE)},
    modules=("rapidocr_onnxruntime", "matplotlib", "gensim", "PIL", "skimage"),
    data_version=2,
)
