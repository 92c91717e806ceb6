"""Content-defined chunking (FastCDC-style gear hash) and content addressing.

A release's artifacts are cut into chunks whose boundaries depend on the bytes around them, not
on their offsets, so an update that changes one layer of a model changes only the chunks that
hold that layer. The gear hash over a 32-byte window is computed for the whole buffer at once
with NumPy (no Python loop per byte); only the few candidate cut points are visited in Python.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_CHUNK = 16 * 1024
AVG_CHUNK = 64 * 1024
MAX_CHUNK = 256 * 1024
_WINDOW = 32  # bytes that influence one gear hash value (uint32, shifted one bit per byte)

# A fixed table: changing it changes every chunk boundary ever published.
_GEAR = np.random.default_rng(0x5EED_ED6E).integers(0, 2**32, size=256, dtype=np.uint64).astype(np.uint32)


@dataclass(frozen=True)
class Chunk:
    offset: int
    size: int
    sha256: str


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while buf := handle.read(block):
            digest.update(buf)
    return digest.hexdigest()


def _gear_hashes(data: np.ndarray) -> np.ndarray:
    """h[i] = sum_k GEAR[data[i-k]] << k (mod 2^32) for k < 32: the rolling gear hash at i."""
    g = _GEAR[data]
    h = np.zeros_like(g)
    for k in range(_WINDOW):
        h[k:] += g[: len(g) - k] << np.uint32(k)
    return h


def cut_points(data: bytes | memoryview, min_size: int = MIN_CHUNK, avg_size: int = AVG_CHUNK, max_size: int = MAX_CHUNK) -> list[int]:
    """End offsets of the chunks of ``data`` (the last one is ``len(data)``)."""
    if not 0 < min_size <= avg_size <= max_size:
        raise ValueError("need 0 < min_size <= avg_size <= max_size")
    n = len(data)
    if n <= min_size:
        return [n] if n else []
    arr = np.frombuffer(data, dtype=np.uint8)
    bits = max(1, int(round(np.log2(avg_size - min_size))))
    mask = np.uint32(((1 << bits) - 1) << (32 - bits))  # high bits: they depend on the whole window
    candidates = np.flatnonzero((_gear_hashes(arr) & mask) == 0) + 1  # cut *after* the matching byte
    cuts: list[int] = []
    start = 0
    idx = 0
    while n - start > max_size or (n - start > min_size and idx < len(candidates)):
        lo = start + min_size
        idx = int(np.searchsorted(candidates, lo, side="left"))
        if idx < len(candidates) and candidates[idx] <= start + max_size and candidates[idx] < n:
            end = int(candidates[idx])
        elif n - start > max_size:
            end = start + max_size
        else:
            break
        cuts.append(end)
        start = end
    cuts.append(n)
    return cuts


def chunk_bytes(data: bytes | memoryview) -> list[Chunk]:
    """Cut ``data`` into content-defined chunks with their sha256."""
    view = memoryview(data)
    chunks, start = [], 0
    for end in cut_points(view):
        chunks.append(Chunk(start, end - start, sha256_bytes(view[start:end])))
        start = end
    return chunks


def chunk_file(path: Path | str) -> list[Chunk]:
    return chunk_bytes(Path(path).read_bytes())
