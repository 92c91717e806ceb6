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
    config = load_config(write(tmp_path, GOOD + "sync:\n  public_key: keys/root.json\n"))
    assert config.sync.public_key == tmp_path / "keys/root.json"
    assert config.state_dir == tmp_path / "state"
    assert config.models[0].release == tmp_path / "rel/fusion"
    assert config.http.host == "127.0.0.1" and config.sync.broker is None


@pytest.mark.parametrize("snippet, key, line", [
    ("http:\n  port: 70000\n", "http.port", 7),                   # int out of range
    ("http:\n  port: eighty\n", "http.port", 7),                  # int of the wrong type
    ("api:\n  max_body_bytes: 10\n", "api.max_body_bytes", 7),  # below the minimum
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


SYNC = "sync:\n  broker: mqtt://127.0.0.1:1883\n  allow_unsigned: true\n"


@pytest.mark.parametrize("text, needle", [
    # A missing required key: the line of the mapping it is missing from.
    ("device_id: d\nmodels:\n  - name: a\n    release: r\n", "state_dir (line 1): Field required"),
    ("device_id: d\nstate_dir: s\nmodels:\n  - release: r\n", "models.0.name (line 4): Field required"),
    # Cross-field errors name the field concerned, not "(top level)".
    ("device_id: d\nstate_dir: s\nmodels:\n  - name: a\n    release: r\n  - name: a\n    release: r\n",
     "models.1.name (line 6): model names must be unique"),
    ("device_id: d\nstate_dir: s\nmodels:\n  - name: a\n", "models.0.release (line 4): models ['a'] have no 'release'"),
    (GOOD + "pipelines:\n  - model: other\n    reference: cam\n    streams: {imu: {}}\n",
     "pipelines.0.model (line 7): pipeline for model 'other'"),
    (GOOD + "pipelines:\n  - model: fusion\n    reference: cam\n    streams:\n      cam: {}\n",
     "pipelines.0.streams.cam (line 10): stream 'cam' is both"),
    (GOOD + "sync:\n  broker: mqtt://127.0.0.1:1883\n", "sync.public_key (line 7): releases must be signed"),
    (GOOD, "sync.public_key (line 1): releases must be signed"),  # local releases too
    (GOOD + "drain_timeout_s: 30\n", "drain_timeout_s (line 6): must be less than shutdown_timeout_s (20)"),
    # sync.broker is parsed the way the transport parses it.
    (GOOD + "sync:\n  broker: http://example.com\n  allow_unsigned: true\n", "sync.broker (line 7): broker URL 'http://example.com'"),
    (GOOD + "sync:\n  broker: mqtt://host:99999\n  allow_unsigned: true\n", "sync.broker (line 7)"),
    # mqtts:// needs sync.tls (the CA); a client key needs its certificate.
    (GOOD + "sync:\n  broker: mqtts://host:8883\n  allow_unsigned: true\n", "sync.tls (line 7): sync.broker uses mqtts://"),
    (GOOD + SYNC + "  tls:\n    ca: ca.crt\n    key: device.key\n", "sync.tls.cert (line 10): key is set but cert is not"),
    (GOOD + "sync:\n  tls: {ca: ca.crt}\n", "sync.tls (line 7): tls is set but broker is not"),
    # Device profiles and backends are the known ones.
    (GOOD + "    profile: raspberry-pi-9\n", "models.0.profile (line 6): Value error, unknown device profile 'raspberry-pi-9'"),
    (GOOD + "    backend: tensorrt\n", "models.0.backend (line 6): Value error, unknown backend 'tensorrt'"),
])
def test_errors_name_the_key_and_its_line(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert needle in str(err.value)
    assert "(top level)" not in str(err.value)


def test_config_check_names_a_bad_broker_and_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "sync:\n  fleet: lab\n  broker: mqtt//no-scheme\n")
    result = runner.invoke(app, ["config", "check", str(path)])
    assert result.exit_code != 0
    assert "sync.broker (line 8)" in " ".join(str(result.exception).split()) + " ".join(result.output.split())


def test_known_profiles_backends_and_tls_paths(tmp_path: Path) -> None:
    text = GOOD.replace("    release: rel/fusion\n", "    release: rel/fusion\n    profile: raspberry-pi-5\n    backend: tflite\n")
    text += "  - name: custom\n    release: rel/custom\n    profile: profiles/board.yaml\n"
    text += "sync:\n  broker: mqtts://broker.lan\n  allow_unsigned: true\n  tls: {ca: certs/ca.crt, cert: certs/dev.crt, key: certs/dev.key}\n"
    config = load_config(write(tmp_path, text))
    assert config.models[0].profile == "raspberry-pi-5" and config.models[0].backend == "tflite"
    assert config.models[1].profile == str(tmp_path / "profiles/board.yaml")
    tls = config.sync.tls
    assert (tls.ca, tls.cert, tls.key) == (tmp_path / "certs/ca.crt", tmp_path / "certs/dev.crt", tmp_path / "certs/dev.key")
