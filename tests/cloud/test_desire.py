"""`edge-sdk cloud desire`: typed, validated, retained desired state at fleet or device level."""

from __future__ import annotations

import json

import pytest

from edge_sdk.cli import main


def _ok(args: list[str]) -> None:
    """Run the CLI; it exits (status 0 on success)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
from edge_sdk.cloud.connection import collect_retained, connect
from edge_sdk.runtime.sync.topics import Topics


def _desired(broker, fleet: str) -> dict[str, dict]:
    topics = Topics(fleet)
    with connect(broker.url, "test") as t:
        found = collect_retained(t, topics, f"{topics.prefix}/+/desired")
        found.update(collect_retained(t, topics, topics.desired(None)))
    return {k: json.loads(v) for k, v in found.items()}


def test_cli_writes_typed_desired_state(mosquitto, capsys):
    _ok(["cloud", "desire", "--broker", mosquitto.url, "--fleet", "f", "--model", "cnn", "--version", "3",
          "--set", "thresholds.fp32.max_cpu_percent=80", "--set", "pin_precision=null"])
    _ok(["cloud", "desire", "--broker", mosquitto.url, "--fleet", "f", "--device", "cam-2", "--model", "cnn",
          "--version", "2", "--set", "pin_precision=int8", "--set", "min_dwell_s=0.25"])
    assert _desired(mosquitto, "f") == {
        "edge/f/desired": {"models": {"cnn": {"version": 3}},
                           "policy": {"thresholds": {"fp32": {"max_cpu_percent": 80}}, "pin_precision": None}},
        "edge/f/cam-2/desired": {"models": {"cnn": {"version": 2}}, "policy": {"pin_precision": "int8", "min_dwell_s": 0.25}},
    }
    # Another model (with its own store) joins the fleet's desired state; the first is kept.
    _ok(["cloud", "desire", "--broker", mosquitto.url, "--fleet", "f", "--model", "detector", "--version", "7",
         "--store", "https://cdn.example.com/chunks"])
    assert _desired(mosquitto, "f")["edge/f/desired"]["models"] == {
        "cnn": {"version": 3}, "detector": {"version": 7, "store": "https://cdn.example.com/chunks"}}
    _ok(["cloud", "desire", "--broker", mosquitto.url, "--fleet", "f", "--model", "cnn", "--remove"])
    assert _desired(mosquitto, "f")["edge/f/desired"]["models"] == {
        "detector": {"version": 7, "store": "https://cdn.example.com/chunks"}}
    _ok(["cloud", "desire", "--broker", mosquitto.url, "--fleet", "f", "--device", "cam-2", "--clear"])
    assert list(_desired(mosquitto, "f")) == ["edge/f/desired"]


@pytest.mark.parametrize("args, message", [
    (["--version", "2"], "needs --model"),
    (["--model", "cnn"], "needs --version"),
    (["--model", "cnn", "--version", "2", "--set", "pin_precision=int4"], "pin_precision"),
    (["--model", "cnn", "--version", "2", "--set", "ratio=0.25"], "policy.ratio: unknown key"),
    (["--model", "cnn", "--version", "2", "--set", "oops"], "key=value"),
    (["--model", "cnn", "--version", "2", "--store", "ftp://x"], "unknown scheme 'ftp'"),
    (["--model", "a+b", "--version", "2"], "model name"),
    (["--device", "blobs", "--model", "cnn", "--version", "2"], "reserved"),
    (["--clear", "--model", "cnn"], "--clear"),
    (["--remove", "--model", "cnn", "--version", "2"], "--remove"),
])
def test_bad_desired_state_is_refused_before_publishing(mosquitto, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["cloud", "desire", "--broker", mosquitto.url, "--fleet", "g", *args])
    assert exit_info.value.code == 1
    assert message in capsys.readouterr().err
    assert _desired(mosquitto, "g") == {}
