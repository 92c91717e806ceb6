"""Chunks that follow tensors, and content addressing.

A release's files are cut into chunks so that an update moves only the chunks it changed, and
chunks shared by versions and variants are stored and sent once. Cuts follow the file's
structure (see :mod:`edge_sdk.layouts`):

* every tensor's data is cut off from what surrounds it, so a re-trained layer changes the
  chunks of that tensor and of the few bytes of metadata around it, nothing else; a tensor
  with the same bytes in another file (FP32 weights of ONNX, OpenVINO and ncnn) is the same
  chunk there;
* content-defined chunking (a FastCDC-style gear hash) cuts only inside regions larger than
  the maximum chunk: large tensors and large stretches of metadata. Its boundaries depend on
  the bytes around them, not on offsets, so an insertion shifts nothing after it;
* runs of small tensors and metadata are grouped up to the minimum chunk size, cut only where
  one ends; a group smaller than that before a large region joins that region's first chunk;
* chunk sizes scale with the file: small files get a smaller minimum, so an FP16 or INT8 file
  of a few hundred KB is not one or two chunks.

Files are read in blocks: memory stays bounded whatever the file size (the gear hash of a
block is computed with NumPy; only candidate cut points are visited in Python).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_CHUNK = 16 * 1024
AVG_CHUNK = 64 * 1024
MAX_CHUNK = 128 * 1024  # fits the 128 KB payload limit of managed MQTT brokers (AWS IoT Core)
SMALLEST_MIN_CHUNK = 2 * 1024
BLOCK = 1 << 20  # bytes read (and gear-hashed) at once
_WINDOW = 32  # bytes that influence one gear hash value (uint32, shifted one bit per byte)

# A fixed table: changing it changes every chunk boundary ever published.
_GEAR = np.random.default_rng(0x5EED_ED6E).integers(0, 2**32, size=256, dtype=np.uint64).astype(np.uint32)


@dataclass(frozen=True)
class Chunk:
    offset: int
    size: int
    sha256: str


@dataclass(frozen=True)
class ChunkSizes:
    """Bounds of content-defined chunks; ``min`` is also the size small regions are grouped to."""

    min: int = MIN_CHUNK
    avg: int = AVG_CHUNK
    max: int = MAX_CHUNK

    def __post_init__(self) -> None:
        if not 0 < self.min <= self.avg <= self.max:
            raise ValueError("need 0 < min <= avg <= max")

    @classmethod
    def for_file(cls, size: int) -> ChunkSizes:
        """Sizes for a file of ``size`` bytes: the defaults from 2 MiB up, scaled down below (at
        least ~128 chunks of a small file, never below a 2 KiB minimum)."""
        minimum = min(MIN_CHUNK, max(SMALLEST_MIN_CHUNK, size // 128))
        return cls(minimum, minimum * (AVG_CHUNK // MIN_CHUNK), minimum * (MAX_CHUNK // MIN_CHUNK))


@dataclass(frozen=True)
class ChunkedFile:
    size: int
    sha256: str
    chunks: list[Chunk]


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str, block: int = BLOCK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while buf := handle.read(block):
            digest.update(buf)
    return digest.hexdigest()


def _gear_hashes(data: np.ndarray) -> np.ndarray:
    """h[i] = sum_k GEAR[data[i-k]] << k (mod 2^32) for k < 32: the rolling gear hash at i."""
    g = _GEAR[data]
    h = np.zeros_like(g)
    for k in range(min(_WINDOW, len(g))):
        h[k:] += g[: len(g) - k] << np.uint32(k)
    return h


class _Cdc:
    """Content-defined cuts inside one region, fed block by block (the last 31 bytes carried)."""

    def __init__(self, start: int, end: int, sizes: ChunkSizes) -> None:
        self.end, self.sizes, self.chunk_start = end, sizes, start
        bits = max(1, int(round(np.log2(max(sizes.avg - sizes.min, 2)))))
        self.mask = np.uint32(((1 << bits) - 1) << (32 - bits))  # high bits depend on the whole window
        self.history = np.zeros(0, np.uint8)

    def feed(self, block_start: int, block: bytes | memoryview) -> list[int]:
        """End offsets of chunks that end inside this block (never the region's end)."""
        arr = np.frombuffer(block, dtype=np.uint8)
        joined = np.concatenate([self.history, arr]) if len(self.history) else arr
        hashes = _gear_hashes(joined)[len(self.history):]
        self.history = joined[-(_WINDOW - 1):].copy()
        candidates = np.flatnonzero((hashes & self.mask) == 0) + (block_start + 1)  # cut after the match
        block_end = block_start + len(arr)
        cuts = []
        while True:
            lo, hi = self.chunk_start + self.sizes.min, self.chunk_start + self.sizes.max
            i = int(np.searchsorted(candidates, lo))
            if i < len(candidates) and candidates[i] <= hi and candidates[i] < self.end:
                cut = int(candidates[i])
            elif hi <= block_end and hi < self.end:
                cut = hi
            else:
                return cuts
            cuts.append(cut)
            self.chunk_start = cut


def _regions(size: int, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) intervals covering the file, split at every tensor span's start and end."""
    points = {0, size}
    for offset, length in spans:
        points.update((offset, offset + length))
    edges = sorted(p for p in points if 0 <= p <= size)
    return list(zip(edges[:-1], edges[1:]))


def plan_cuts(size: int, spans: list[tuple[int, int]], sizes: ChunkSizes) -> Iterator[tuple[int, int, int | None]]:
    """(start, end, cdc_start) per planned piece: small regions are grouped here; a piece with a
    ``cdc_start`` is a large region (from ``cdc_start``) that content-defined chunking cuts further
    while it is read, with a small group before it (from ``start``) joining its first chunk."""
    group_start = group_end = None
    for start, end in _regions(size, spans):
        if end - start > sizes.max:
            piece_start = start
            if group_start is not None:
                if group_end - group_start >= sizes.min:
                    yield group_start, group_end, None
                else:
                    piece_start = group_start
                group_start = None
            yield piece_start, end, start
            continue
        if group_start is not None and end - group_start > sizes.max:
            yield group_start, group_end, None
            group_start = None
        if group_start is None:
            group_start = start
        group_end = end
        if group_end - group_start >= sizes.min:
            yield group_start, group_end, None
            group_start = None
    if group_start is not None:
        yield group_start, group_end, None


def chunk_stream(read, size: int, spans: list[tuple[int, int]] | None = None,
                 sizes: ChunkSizes | None = None) -> ChunkedFile:
    """Chunk ``size`` bytes delivered by ``read(n)`` in order (a file object's ``read``)."""
    sizes = sizes or ChunkSizes.for_file(size)
    whole = hashlib.sha256()
    chunks: list[Chunk] = []
    for start, end, cdc_start in plan_cuts(size, spans or [], sizes):
        cdc = _Cdc(cdc_start, end, sizes) if cdc_start is not None else None
        chunk_start, digest, pos = start, hashlib.sha256(), start
        while pos < end:
            # A group before a large region is read on its own: the region's cuts see only its bytes.
            stop = cdc_start if cdc is not None and pos < cdc_start else end
            block = read(min(BLOCK, stop - pos))
            if not block:
                raise OSError(f"file ended at byte {pos} of {size} while it was being chunked")
            view = memoryview(block)
            whole.update(view)
            cuts = cdc.feed(pos, view) if cdc is not None and pos >= cdc_start else []
            offset = pos
            for cut in cuts:
                digest.update(view[offset - pos: cut - pos])
                chunks.append(Chunk(chunk_start, cut - chunk_start, digest.hexdigest()))
                chunk_start, digest, offset = cut, hashlib.sha256(), cut
            digest.update(view[offset - pos:])
            pos += len(view)
        chunks.append(Chunk(chunk_start, end - chunk_start, digest.hexdigest()))
    return ChunkedFile(size, whole.hexdigest(), chunks)


def chunk_file(path: Path | str, spans: list[tuple[int, int]] | None = None) -> ChunkedFile:
    """Chunk one file, streamed; ``spans`` default to the tensors :mod:`edge_sdk.layouts` finds."""
    from .layouts import tensor_spans

    path = Path(path)
    if spans is None:
        spans = tensor_spans(path)
    with open(path, "rb") as handle:
        return chunk_stream(handle.read, path.stat().st_size, spans)


def cut_points(data: bytes | memoryview, min_size: int = MIN_CHUNK, avg_size: int = AVG_CHUNK,
               max_size: int = MAX_CHUNK) -> list[int]:
    """End offsets of the content-defined chunks of ``data`` (the last one is ``len(data)``)."""
    sizes = ChunkSizes(min_size, avg_size, max_size)
    n = len(data)
    if n == 0:
        return []
    cdc = _Cdc(0, n, sizes)
    view = memoryview(data)
    cuts = []
    for pos in range(0, n, BLOCK):
        cuts += cdc.feed(pos, view[pos:pos + BLOCK])
    return cuts + [n]


def chunk_bytes(data: bytes | memoryview, spans: list[tuple[int, int]] | None = None,
                sizes: ChunkSizes | None = None) -> list[Chunk]:
    """Cut in-memory ``data`` as :func:`chunk_file` cuts a file (default sizes: the fixed ones)."""
    view = memoryview(data)
    pos = 0

    def read(n: int) -> memoryview:
        nonlocal pos
        pos += n
        return view[pos - n: pos]

    return chunk_stream(read, len(view), spans, sizes or ChunkSizes()).chunks
