"""Device twin: desired-state parsing and merging, typed --set values, reported state on a broker."""

from __future__ import annotations

import json
import queue

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.transport import Transport, TransportConfig
from edge_sdk.runtime.sync.twin import DesiredState, Twin, merge_desired, parse_set


def test_device_level_wins_and_policies_merge():
    fleet = DesiredState(models={"cnn": {"version": 3}, "detector": {"version": 1, "store": "https://cdn/c"}},
                         policy={"pin_precision": "fp16", "min_dwell_s": 5, "thresholds": {"fp32": {"max_cpu_percent": 90}}})
    device = DesiredState(models={"cnn": {"version": 2}, "detector": None, "classifier": {"version": 4, "store": "s3://b/p"}},
                          policy={"pin_precision": None,
                                  "thresholds": {"fp32": {"min_free_memory_mb": 512}, "fp16": {"max_cpu_percent": 95}}})
    merged = merge_desired(fleet, device)
    # The device's entry for a model wins whole; null takes a fleet model off this device.
    assert {name: (e.version, e.store) for name, e in merged.wanted.items()} == {"cnn": (2, None),
                                                                              "classifier": (4, "s3://b/p")}
    # Key by key, nested keys too; an explicit null (unpin) is kept and wins.
    assert merged.policy.as_dict() == {"pin_precision": None, "min_dwell_s": 5,
                                       "thresholds": {"fp32": {"max_cpu_percent": 90, "min_free_memory_mb": 512},
                                                      "fp16": {"max_cpu_percent": 95}}}
    assert merged.policy.sets_pin and merged.policy.pin_precision is None
    assert merge_desired(fleet, DesiredState()).policy.pin_precision.value == "fp16"  # no device opinion
    assert merge_desired(fleet, None) == fleet


def test_single_model_form_and_read_modify_write():
    legacy = DesiredState.from_payload(b'{"model": "cnn", "version": 2}', "t")
    assert {name: e.version for name, e in legacy.wanted.items()} == {"cnn": 2}
    state = legacy.with_model("detector", 5, "https://cdn.example.com/chunks").with_model("cnn", 3)
    assert json.loads(state.to_payload()) == {"models": {"cnn": {"version": 3},
                                                         "detector": {"version": 5, "store": "https://cdn.example.com/chunks"}}}
    assert list(state.without_model("cnn").wanted) == ["detector"]


@pytest.mark.parametrize("payload, message", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"models": {"cnn": {"version": 0}}}', "models.cnn.version"),
    (b'{"version": 2}', "needs both 'model' and 'version'"),
    (b'{"model": "cnn", "version": 2, "models": {}}', "either 'models'"),
    (b'{"models": {"cnn": {"version": 2, "store": "ftp://x/y"}}}', "unknown scheme 'ftp'"),
    (b'{"models": {"a/b": {"version": 2}}}', "cannot be an MQTT topic level"),
    (b'{"models": {"cnn": {"version": 2, "colour": "red"}}}', "models.cnn.colour: unknown key"),
    (b'{"models": {}, "policy": {"pin_precision": "int4"}}', "pin_precision"),
    (b'{"colour": "red"}', "colour: unknown key"),
    (b'{"policy": {"max_cpu": 80}}', "policy.max_cpu: unknown key"),
    (b'{"policy": {"thresholds": {"fp32": {"max_cpu": 80}}}}', "policy.thresholds.fp32.max_cpu: unknown key"),
    (b'{"policy": {"thresholds": {"fp64": {"max_cpu_percent": 80}}}}', "policy.thresholds.fp64"),
    (b'{"policy": {"thresholds": {"fp32": {"max_cpu_percent": 180}}}}', "max_cpu_percent"),
    (b'{"policy": {"hysteresis": {"memory_mb": -1}}}', "hysteresis.memory_mb"),
    (b"\xff\xfe", "not JSON"),
])
def test_bad_desired_payloads_name_the_problem(payload, message):
    with pytest.raises(ConfigError, match=message):
        DesiredState.from_payload(payload, "edge/f/desired")


def test_empty_payload_means_cleared():
    assert DesiredState.from_payload(b"", "t") is None
    state = DesiredState(models={"cnn": {"version": 2}}, policy={"pin_precision": None, "hysteresis": {"memory_mb": 64}})
    again = DesiredState.from_payload(state.to_payload(), "t")
    assert again == state and again.policy.sets_pin  # the explicit null survives the round trip


def test_parse_set_is_typed():
    assert parse_set(["pin_precision=int8", "max_cpu_percent=80", "ratio=0.5", "enabled=true", "off=null",
                      "name=cam 7"]) == {"pin_precision": "int8", "max_cpu_percent": 80, "ratio": 0.5, "enabled": True,
                                         "off": None, "name": "cam 7"}
    # Dotted keys reach nested policy keys, so every key can be set from the command line.
    policy = parse_set(["thresholds.fp32.max_cpu_percent=80", "thresholds.fp32.min_free_memory_mb=512",
                        "hysteresis.memory_mb=64"])
    assert DesiredState(policy=policy).policy.as_dict() == {
        "thresholds": {"fp32": {"max_cpu_percent": 80, "min_free_memory_mb": 512}}, "hysteresis": {"memory_mb": 64}}
    with pytest.raises(ConfigError, match="already"):
        parse_set(["thresholds=1", "thresholds.fp32.max_cpu_percent=80"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["thresholds..x=1"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["novalue"])
    with pytest.raises(ConfigError, match="scalar"):
        parse_set(["x=[1,2]"])


def test_reported_state_is_retained_with_errors_and_progress(mosquitto):
    topics = Topics("f")
    device = Transport(TransportConfig.from_url(mosquitto.url, client_id="cam-9", status_topic=topics.status("cam-9")))
    device.start()
    assert device.wait_connected(5)
    twin = Twin(topics.reported("cam-9"), lambda t, p: device.publish(t, p, qos=1, retain=True, wait=5), throttle_s=60)
    twin.set(release={"model": "cnn", "version": 2}, backend="onnxruntime", precision="fp32")
    twin.error("bad_signature", "manifest signature does not verify")
    twin.error("bad_signature", "again")
    twin.progress(state="fetching", chunks_done=1, chunks_total=10)
    sent = twin.published
    twin.progress(state="fetching", chunks_done=2)  # throttled: same state, within throttle_s
    assert twin.published == sent
    device.stop()

    box: queue.Queue = queue.Queue()
    reader = Transport(TransportConfig.from_url(mosquitto.url, client_id="reader", session_expiry_s=0))
    reader.subscribe(topics.reported("cam-9"), lambda m: box.put(("reported", m.payload)))
    reader.subscribe(topics.status("cam-9"), lambda m: box.put(("status", m.payload)))
    reader.start()
    got = dict(box.get(timeout=5) for _ in range(2))
    reader.stop()
    reported = json.loads(got["reported"])
    assert reported["release"] == {"model": "cnn", "version": 2} and reported["backend"] == "onnxruntime"
    assert reported["errors"] == {"bad_signature": 2} and reported["last_error"]["reason"] == "again"
    assert reported["sync"] == {"state": "fetching", "chunks_done": 1, "chunks_total": 10}
    assert reported["resources"]["memory_available_mb"] > 0
    assert json.loads(got["status"]) == {"online": False}
