"""Task metrics the corpus cases share, each in [0, 1], higher is better."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``[x1, y1, x2, y2]`` box with each row of ``boxes``."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def nms(boxes: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of ``[x1, y1, x2, y2, score]`` rows kept by greedy non-maximum suppression."""
    order = np.argsort(-boxes[:, 4], kind="stable")
    keep = []
    suppressed = np.zeros(len(boxes), bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou(boxes[i, :4], boxes[:, :4]) >= threshold
    return np.asarray(keep, int)


def detection_f1(detections: Sequence[np.ndarray], truth: Sequence[np.ndarray], min_iou: float = 0.5) -> float:
    """F1 of detections (``[K, 5]`` per image: box + score) against true boxes (``[N, 4]``).

    Greedy matching by score: a detection is a true positive when it overlaps a not yet matched
    true box of its image at IoU ≥ ``min_iou`` (the PASCAL/ICDAR rule).
    """
    tp = n_true = n_found = 0
    for boxes, true in zip(detections, truth, strict=True):
        n_true += len(true)
        n_found += len(boxes)
        matched = np.zeros(len(true), bool)
        for box in boxes[np.argsort(-boxes[:, 4], kind="stable")] if len(true) else []:
            overlaps = np.where(matched, -1.0, iou(box[:4], true))
            best = int(np.argmax(overlaps))
            if overlaps[best] >= min_iou:
                matched[best] = True
                tp += 1
    return 2 * tp / (n_true + n_found) if n_true + n_found else 1.0


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
    return row[-1]


def character_accuracy(predicted: Sequence[str], truth: Sequence[str]) -> float:
    """1 − character error rate over all lines (total edits / total true characters), floored at 0."""
    edits = sum(edit_distance(p, t) for p, t in zip(predicted, truth, strict=True))
    return max(0.0, 1.0 - edits / max(1, sum(len(t) for t in truth)))


def binary_f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    tp = int(np.sum(predicted & truth))
    total = int(predicted.sum() + truth.sum())
    return 2 * tp / total if total else 1.0


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)
