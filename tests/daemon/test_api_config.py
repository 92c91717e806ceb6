"""The API's config keys: ``http.max_body_bytes``/``http.max_concurrent_infer`` moved to ``api:``; an
old config keeps loading (a device upgraded with its old edge.yaml keeps serving) and says where
they went; a config that sets both ways differently is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_sdk.cli import _load_commands
from edge_sdk.cli.app import app
from edge_sdk.daemon.config import load_config
from edge_sdk.errors import ConfigError

_load_commands()

BASE = "device_id: dev-1\nstate_dir: state\nmodels:\n  - name: fusion\n    release: rel/fusion\n"
UNSIGNED = "sync:\n  allow_unsigned: true\n"  # (after the case's lines: their line numbers stay)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge.yaml"
    path.write_text(BASE + text + UNSIGNED)
    return path


def test_an_old_config_loads_into_api_with_a_warning_naming_the_new_key(tmp_path: Path) -> None:
    path = write(tmp_path, "http:\n  port: 9000\n  max_body_bytes: 2000000\n  max_concurrent_infer: 2\n")
    config = load_config(path)
    assert (config.api.max_body_bytes, config.api.max_concurrent_infer, config.http.port) == (2_000_000, 2, 9000)
    assert config.deprecations == [
        "http.max_body_bytes is deprecated: it moved to api.max_body_bytes (read as that; move it there)",
        "http.max_concurrent_infer is deprecated: it moved to api.max_concurrent_infer (read as that; move it there)"]
    checked = CliRunner().invoke(app, ["config", "check", str(path)])
    assert checked.exit_code == 0, checked.output
    assert "warning: http.max_body_bytes is deprecated: it moved to api.max_body_bytes" in checked.output
    assert load_config(write(tmp_path, "api:\n  max_body_bytes: 2000000\n")).deprecations == []


@pytest.mark.parametrize("text, message", [
    ("api:\n  max_body_bytes: 3000000\nhttp:\n  max_body_bytes: 2000000\n",
     "http.max_body_bytes (line 9): moved to api.max_body_bytes, which is also set (to 3000000): keep only "
     "api.max_body_bytes"),
    ("http:\n  max_concurrent_infer: 0\n", "http.max_concurrent_infer (line 7): Input should be greater than or equal to 1"),
])
def test_a_conflicting_or_bad_old_key_is_one_line_naming_it(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {message}"
