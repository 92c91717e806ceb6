"""The daemon config file: example passes, every kind of bad value names its key and line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_sdk.cli import _load_commands
from edge_sdk.cli.app import app
from edge_sdk.daemon.config import EXAMPLE_YAML, load_config
from edge_sdk.errors import ConfigError

_load_commands()
runner = CliRunner()

GOOD = """\
device_id: dev-1
state_dir: state
models:
  - name: fusion
    release: rel/fusion
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge.yaml"
    path.write_text(text)
    return path


def test_example_prints_and_passes_check(tmp_path: Path) -> None:
    printed = runner.invoke(app, ["config", "example"])
    assert printed.exit_code == 0
    assert printed.output == EXAMPLE_YAML
    assert "#" in printed.output  # it is commented
    path = write(tmp_path, printed.output)
    checked = runner.invoke(app, ["config", "check", str(path)])
    assert checked.exit_code == 0, checked.output
    assert "ok" in checked.output
    config = load_config(path)
    assert config.device_id == "pi-kitchen-01" and config.models[0].name == "fusion"


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.state_dir == tmp_path / "state"
    assert config.models[0].release == tmp_path / "rel/fusion"
    assert config.http.host == "127.0.0.1" and config.sync.broker is None


@pytest.mark.parametrize("snippet, key, line", [
    ("http:\n  port: 70000\n", "http.port", 7),                   # int out of range
    ("http:\n  port: eighty\n", "http.port", 7),                  # int of the wrong type
    ("http:\n  max_body_bytes: 10\n", "http.max_body_bytes", 7),  # below the minimum
    ("drain_timeout_s: -1\n", "drain_timeout_s", 6),              # float must be > 0
    ("logging:\n  format: xml\n", "logging.format", 7),           # enum
    ("logging:\n  level: loud\n", "logging.level", 7),            # enum
    ("policy:\n  enabled: maybe\n", "policy.enabled", 7),         # bool
    ("outbox:\n  policy: keep_all\n", "outbox.policy", 7),        # closed set
    ("sync:\n  telemetry_interval_s: 0\n", "sync.telemetry_interval_s", 7),
    ("surprise: 1\n", "surprise", 6),                             # unknown top-level key
    ("http:\n  hots: 1.2.3.4\n", "http.hots", 7),                 # unknown nested key (typo)
])
def test_bad_values_name_key_and_line(tmp_path: Path, snippet: str, key: str, line: int) -> None:
    path = write(tmp_path, GOOD + snippet)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{key} (line {line})" in str(err.value)
    result = runner.invoke(app, ["config", "check", str(path)])
    assert result.exit_code != 0


@pytest.mark.parametrize("text, needle", [
    ("device_id: dev-1\nstate_dir: s\nmodels: []\n", "models"),
    ("device_id: 'bad id!'\nstate_dir: s\nmodels:\n  - name: a\n    release: r\n", "device_id (line 1)"),
    ("device_id: d\nstate_dir: s\nmodels:\n  - name: a\n    release: r\n    precision: fp64\n", "models.0.precision (line 6)"),
    ("device_id: d\nstate_dir: s\nmodels:\n  - name: a\n    release: r\n  - name: a\n    release: r\n", "repeated: ['a']"),
    ("device_id: d\nstate_dir: s\nmodels:\n  - name: a\n", "no 'release' folder and sync.broker is not set"),
    ("device_id: d\nmodels:\n  - name: a\n    release: r\n", "state_dir"),
    ("- just\n- a list\n", "expected a mapping"),
    ("device_id: [unclosed\n", "malformed YAML (line"),
])
def test_bad_structure(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert needle in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "check", str(tmp_path / "nope.yaml")])
    assert result.exit_code != 0
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
