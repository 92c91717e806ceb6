"""Writing a release folder atomically.

Artifacts go into a hidden staging folder next to the output (same filesystem, so the final
``rename`` is atomic); the manifest is written last, then the folder is renamed into place. Any
failure - including a full disk or a read-only output - removes the staging folder, so there is
never a half release at the output path.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import numpy as np

from ..chunking import sha256_file
from ..errors import ConfigError, ConversionError
from ..manifest import FileEntry, Manifest, SelfTest, write_manifest
from ..signing import load_private_key

SELF_TEST_INPUTS = "self_test/inputs.npz"
SELF_TEST_EXPECTED = "self_test/expected.npz"


def check_output(output: Path) -> None:
    """Fail early (before any heavy work) when ``output`` cannot become a release folder."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output {output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        raise ConfigError(f"output {output}: folder exists and is not empty; choose a new folder or remove it")
    parent = output.parent
    existing = next((p for p in [parent, *parent.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output {output}: folder {existing or parent} is not writable")


class Staging:
    """``with Staging(output) as stage: ...; stage.commit(manifest)``; cleans up unless committed."""

    def __init__(self, output: Path, sign_key: Path | str | None = None) -> None:
        self.output = Path(output)
        self.private_key = load_private_key(sign_key) if sign_key else None
        self.dir: Path | None = None
        self._committed = False

    def __enter__(self) -> Staging:
        check_output(self.output)
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.staging-", dir=self.output.parent))
        except OSError as exc:
            raise _os_error(self.output, exc) from None
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self._committed and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _os_error(self.output, exc) from None

    def write_self_test(self, inputs: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> SelfTest:
        """Save the self-test input and its FP32 outputs as .npz; return their manifest entry."""
        assert self.dir is not None  # noqa: S101 - internal invariant (inside the with-block)
        folder = self.dir / "self_test"
        folder.mkdir(exist_ok=True)
        # String tensors as fixed-width unicode: an object array would be pickled, which devices refuse to load.
        np.savez(self.dir / SELF_TEST_INPUTS, **{k: _storable(v) for k, v in inputs.items()})
        np.savez(self.dir / SELF_TEST_EXPECTED, **{k: _storable(v) for k, v in expected.items()})
        expected_path = self.dir / SELF_TEST_EXPECTED
        return SelfTest(inputs=FileEntry.from_file(self.dir, self.dir / SELF_TEST_INPUTS),
                        expected=FileEntry.from_file(self.dir, expected_path), digest=sha256_file(expected_path))

    def commit(self, manifest: Manifest) -> Path:
        """Write (and sign) the manifest, sync, and move the folder into place."""
        assert self.dir is not None  # noqa: S101
        try:
            write_manifest(self.dir, manifest, self.private_key)
            _fsync_tree(self.dir)
            if self.output.is_dir():
                self.output.rmdir()  # check_output allowed only an empty folder
            os.rename(self.dir, self.output)
        except OSError as exc:
            raise _os_error(self.output, exc) from None
        self._committed = True
        return self.output


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# A full or read-only disk fails every later write too: it aborts the release instead of rejecting one variant.
_FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def fatal_write_error(exc: BaseException) -> OSError | None:
    """The disk-full/read-only OSError behind ``exc`` (itself, or what it was raised from), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in _FATAL_ERRNOS:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _os_error(output: Path, exc: OSError) -> ConversionError | ConfigError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ConversionError(f"output {output}: disk full while writing the release ({exc.strerror}); nothing was written")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ConfigError(f"output {output}: not writable ({exc.strerror}); nothing was written")
    return ConversionError(f"output {output}: cannot write the release ({exc}); nothing was written")


def _storable(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != object:
        return array
    return np.vectorize(lambda x: x.decode("utf-8") if isinstance(x, bytes) else str(x), otypes=[str])(array) \
        if array.size else array.astype(str)
