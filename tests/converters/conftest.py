"""Checks shared by the converter tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from edge_sdk.manifest import MANIFEST_NAME, SIGNATURE_NAME, load_manifest


@pytest.fixture(scope="session")
def assert_release_lists_every_file() -> Callable[[Path], None]:
    """``check(release)``: every file in the folder but the manifest and its signature is listed in
    manifest.json (a variant's files, the self-test or a tool log of the report), and every listed file is there."""

    def check(release: Path) -> None:
        manifest = load_manifest(release)
        listed = {entry.path for variant in manifest.variants for entry in variant.files}
        if manifest.self_test is not None:
            listed |= {manifest.self_test.inputs.path, manifest.self_test.expected.path}
        listed |= set(manifest.report.logs.values())
        on_disk = {p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()}
        on_disk -= {MANIFEST_NAME, SIGNATURE_NAME}
        assert on_disk == listed, {"unlisted": sorted(on_disk - listed), "missing": sorted(listed - on_disk)}

    return check
