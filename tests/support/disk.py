"""Filling a file system, for disk-full tests (real ENOSPC on a small tmpfs)."""

from __future__ import annotations

from pathlib import Path


def fill_disk(folder: Path) -> None:
    """Take every byte left on ``folder``'s file system with a ballast file (``folder/ballast``)."""
    with open(folder / "ballast", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass
