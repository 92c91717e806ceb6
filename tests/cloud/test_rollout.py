"""Staged rollouts: planning, verdicts, bad input, and 50 real SyncClients through a halting rollout
with the controller killed -9 mid-wave and resumed."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import simfleet
from polling import wait_until

import edge_sdk
from edge_sdk import samples
from edge_sdk.cloud.connection import collect_retained, connect
from edge_sdk.cloud.desire import write_desired
from edge_sdk.cloud.fleet import DeviceReport, FleetView, ModelReport, parse_reported, read_fleet
from edge_sdk.cloud.publish import publish_release
from edge_sdk.cloud.rollout import (
    DeviceStep, HealthBounds, RolloutController, RolloutSpec, RolloutState, RolloutStore, Wave, judge, plan_waves,
    rollout_status, start_rollout,
)
from edge_sdk.errors import ConfigError
from edge_sdk.manifest import FileEntry, load_manifest, write_manifest
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.desired import DesiredState
from edge_sdk.signing import load_private_key

FLEET = "f"
A, B = "intel-nuc", "generic-x86_64"  # v2's self-test fails on B


def view_of(n: int, model: str = "cnn", version: int = 1, labels=lambda i: {"site": f"s{i % 3}"}) -> FleetView:
    devices = {f"dev{i:02d}": DeviceReport(f"dev{i:02d}", {model: ModelReport(model, version)}, profile=A if i % 5 else B,
                                           labels=labels(i), updated=time.time()) for i in range(n)}
    return FleetView(FLEET, devices)


def spec(**kw) -> RolloutSpec:
    return RolloutSpec.build(**{"model": "cnn", "version": 2, "waves": [Wave.parse("dev01,dev02"), Wave.parse("20%"),
                                                                          Wave.parse("100%")], **kw})


# -- planning and bad input ---------------------------------------------------------------------------
def test_waves_are_canary_then_cumulative_percentages_then_groups():
    view = view_of(50)
    waves = plan_waves(spec(), view, "r1")
    assert [len(w) for w in waves] == [2, 8, 40] and waves[0] == ["dev01", "dev02"]
    assert sorted(d for w in waves for d in w) == sorted(view.devices)  # each device once
    assert plan_waves(spec(), view, "r1") == waves  # deterministic, so a restart plans the same
    grouped = plan_waves(spec(waves=[Wave.parse("site=s0"), Wave.parse("profile=generic-x86_64"), Wave.parse("100%")]),
                         view, "r1")
    assert all(view.devices[d].labels["site"] == "s0" for d in grouped[0])
    assert all(view.devices[d].profile == B and view.devices[d].labels["site"] != "s0" for d in grouped[1])
    assert sum(map(len, grouped)) == 50
    only = plan_waves(spec(group={"site": "s1"}, waves=[Wave.parse("100%")]), view, "r1")
    assert only == [sorted(d for d, r in view.devices.items() if r.labels["site"] == "s1")]


@pytest.mark.parametrize("kw, message", [
    ({"waves": [Wave.parse("dev01,nosuch")]}, "nosuch is not a device of this rollout"),
    ({"waves": [Wave.parse("site=plant9")]}, "no device of this rollout has these labels"),
    ({"group": {"site": "plant9"}}, "no device of fleet 'f' reports model 'cnn' with labels"),
    ({"model": "other"}, "reports model 'other'"),
])
def test_a_wave_naming_unknown_devices_or_groups_is_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        plan_waves(spec(**kw), view_of(10), "r1")


@pytest.mark.parametrize("kw, message", [
    ({"max_failure": 1.5}, "max_failure: Input should be less than or equal to 1"),
    ({"max_failure": -0.1}, "max_failure"),
    ({"bounds": {"max_error_rate": 2}}, "bounds.max_error_rate"),
    ({"waves": []}, "waves"),
    ({"version": 0}, "version"),
])
def test_thresholds_outside_zero_to_one_and_empty_plans_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        spec(**kw)
    with pytest.raises(ConfigError, match="at most 100"):
        Wave.parse("120%")


def test_cli_refuses_an_unpublished_release_naming_it(mosquitto, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edge_sdk", "cloud", "rollout", "start", "--broker", mosquitto.url,
                           "--fleet", FLEET, "--model", "cnn", "--version", "7", "--wave", "100%",
                           "--state", str(tmp_path / "r.db")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "release cnn v7 is not published in fleet 'f'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--wave", "100%", "--max-failure", "1.5"], "max_failure"),
    (["--wave", "100%", "--max-error-rate", "-0.5"], "max_error_rate"),
    (["--wave", "site=plant9"], "no device of this rollout has these labels"),
    (["--wave", "100%", "--group", "site=plant9"], "no device of fleet 'f' reports model 'cnn' with labels"),
    (["--canary", "dev01,ghost", "--wave", "100%"], "ghost is not a device of this rollout"),
])
def test_cli_refuses_bad_thresholds_and_unknown_groups_in_one_line(mosquitto, tmp_path, args, message):
    topics = Topics(FLEET)
    with connect(mosquitto.url, "seed") as t:
        t.publish(topics.manifest("cnn", 2), b"x", qos=1, retain=True, wait=5)
        for d in ("dev01", "dev02"):
            t.publish(topics.reported(d), json.dumps({"release": {"model": "cnn", "version": 1}, "labels": {"site": "p1"},
                                                      "updated": time.time()}).encode(), qos=1, retain=True, wait=5)
    proc = subprocess.run([sys.executable, "-m", "edge_sdk", "cloud", "rollout", "start", "--broker", mosquitto.url,
                           "--fleet", FLEET, "--model", "cnn", "--version", "2", "--state", str(tmp_path / "r.db"), *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3, proc.stderr


# -- verdicts -------------------------------------------------------------------------------------------
def test_a_device_passes_after_its_soak_and_fails_on_any_broken_bound(tmp_path):
    store = RolloutStore(tmp_path / "r.db")
    s = spec(bounds=HealthBounds(max_error_rate=0.1, max_p99_ms=50, min_calls=10, soak_s=30, wave_timeout_s=100))
    store.create(FLEET, "edge/f", s, [["d"]], "r")
    store.touch("r", "d", None, 1)

    def verdict(now, **m):
        report = DeviceReport("d", {"cnn": ModelReport("cnn", **m)})
        return judge(report, s, store.devices("r")[0], now, store, "r")

    t0 = store.devices("r")[0].touched
    assert verdict(t0 + 5, version=1) is None  # still on v1: wait
    assert verdict(t0 + 6, version=2, calls=100, errors=1, p99_ms=20) is None  # active: soak starts now
    assert verdict(t0 + 20, version=2, calls=150, errors=3, p99_ms=20) is None  # 2/50 errors, within bounds
    assert verdict(t0 + 40, version=2, calls=200, errors=5, p99_ms=20).passed  # soaked, 4/100 = 0.04
    bad = verdict(t0 + 40, version=2, calls=200, errors=30, p99_ms=20)
    assert not bad.passed and "error rate 29/100" in bad.reason
    slow = verdict(t0 + 40, version=2, calls=200, errors=1, p99_ms=80)
    assert not slow.passed and "p99 80.00 ms > 50 ms" in slow.reason
    failed = verdict(t0 + 1, version=1, sync_state="failed", sync_version=2, sync_reason="self-test of cnn v2 failed")
    assert not failed.passed and "self-test of cnn v2 failed" in failed.reason
    assert not verdict(t0 + 101, version=1).passed  # never became active
    store.close()


def test_garbage_reported_state_is_left_out_and_counted():
    for payload, why in [(b"\xff", "not JSON"), (b"[1]", "JSON object"), (b'{"labels": {"a": 1}}', "labels"),
                         (b'{"models": {"cnn": {"release": {"version": "2"}}}}', "models.cnn.release.version"),
                         (b'{"release": {"model": "cnn", "version": true}}', "release.version")]:
        with pytest.raises(Exception, match=why):
            parse_reported("d", payload)
    today = parse_reported("d", json.dumps({"release": {"model": "cnn", "version": 2}, "backend": "onnxruntime",
                                            "precision": "fp32", "sync": {"state": "idle", "model": "cnn", "version": 2},
                                            "telemetry": {"queued_rows": 7}, "updated": 5.0}).encode())
    assert today.models["cnn"].version == 2 and today.outbox_depth == 7 and today.models["cnn"].backend == "onnxruntime"


# -- 50 real SyncClients ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rollout_releases(tmp_path_factory, release_keypair):
    """v1 for profiles A and B; v2 whose variants for B hold v1's weights (correctly hashed and
    signed), so the self-test fails on B devices only."""
    folder = tmp_path_factory.mktemp("rollout-releases")
    base = samples.make_cnn(width=8)
    for version, model in ((1, base), (2, samples.with_new_last_layer(base, 3))):
        path = samples.save(model, folder / f"v{version}.onnx")
        edge_sdk.convert(path, [A, B], folder / f"v{version}", targets=["onnx"], calibration="random", model_name="cnn",
                         release_version=version, latency_runs=3, max_accuracy_drop=100.0, speed_gate=False,
                         sign_key=release_keypair[0])
    v1, v2 = folder / "v1", folder / "v2"
    manifest, old = load_manifest(v2), load_manifest(v1)
    variants, broken = [], []
    for variant in manifest.variants:
        variants.append(variant.model_copy(update={"profiles": [p for p in variant.profiles if p != B]}))
        if variant.ok and B in variant.profiles:
            files = []
            for entry in old.variant(variant.id).files:
                dst = v2 / f"b-{Path(entry.path).name}"
                shutil.copyfile(v1 / entry.path, dst)
                files.append(FileEntry.from_file(v2, dst))
            broken.append(variant.model_copy(update={"id": f"{variant.id}-b", "profiles": [B], "files": files}))
    defaults = {**manifest.defaults, B: f"{manifest.defaults[B]}-b"}
    write_manifest(v2, manifest.model_copy(update={"variants": variants + broken, "defaults": defaults}),
                   load_private_key(release_keypair[0]))
    return v1, v2


def reported(broker, devices: list[str]) -> dict[str, dict]:
    with connect(broker.url, "test") as t:
        found = collect_retained(t, Topics(FLEET), f"edge/{FLEET}/+/reported")
    return {d: json.loads(found[Topics(FLEET).reported(d)]) for d in devices if Topics(FLEET).reported(d) in found}


@pytest.mark.slow
def test_fifty_devices_rollout_halts_at_the_first_wave_with_the_bad_profile_and_survives_kill9(
        mosquitto, rollout_releases, release_keypair, tmp_path):
    v1, v2 = rollout_releases
    publish_release(v1, mosquitto.url, FLEET)
    publish_release(v2, mosquitto.url, FLEET)
    write_desired(mosquitto.url, FLEET, DesiredState(model="cnn", version=1))
    names = [f"dev{i:02d}" for i in range(50)]
    profile = {d: A if i % 5 else B for i, d in enumerate(names)}  # 10 B devices
    procs = [simfleet.spawn({"broker": mosquitto.url, "fleet": FLEET, "root": str(tmp_path / "devices"),
                             "public_key": str(release_keypair[1]),
                             "devices": [{"device": d, "profile": profile[d], "labels": {"site": f"s{i % 2}"}}
                                         for i, d in enumerate(names) if i % 5 == k]}, tmp_path, f"fleet{k}")
             for k in range(5)]
    state = tmp_path / "rollouts.db"
    try:
        def on_v1() -> list[str]:
            now = reported(mosquitto, names)
            return [d for d in names if (now.get(d) or {}).get("release") != {"model": "cnn", "version": 1}]

        assert wait_until(lambda: not on_v1(), 240, 1.0), {d: reported(mosquitto, names).get(d) for d in on_v1()[:3]}
        cli = [sys.executable, "-m", "edge_sdk", "cloud", "rollout"]
        start = subprocess.Popen([*cli, "start", "--broker", mosquitto.url, "--fleet", FLEET, "--model", "cnn",
                                  "--version", "2", "--canary", "dev01,dev02", "--wave", "20%", "--wave", "100%",
                                  "--max-failure", "0.1", "--soak", "2", "--wave-timeout", "120", "--poll", "0.5",
                                  "--id", "r1", "--state", str(state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)

        def touched_in_wave_2() -> bool:
            if not state.exists():
                return False
            store = RolloutStore(state)
            try:
                return any(d.step is not DeviceStep.PENDING for d in store.devices("r1", 1))
            except ConfigError:
                return False
            finally:
                store.close()

        if not wait_until(touched_in_wave_2, 240, 0.2):
            store = RolloutStore(state)
            raise AssertionError((start.communicate(timeout=5), rollout_status(store, "r1")["devices"][:3],
                                  reported(mosquitto, ["dev01"])))
        start.send_signal(signal.SIGKILL)  # mid-wave
        start.wait()
        resumed = subprocess.run([*cli, "resume", "r1", "--broker", mosquitto.url, "--state", str(state), "--poll", "0.5"],
                                 capture_output=True, text=True, timeout=600)
        store = RolloutStore(state)
        status = rollout_status(store, "r1")
        assert resumed.returncode == 1 and "halted" in resumed.stderr, (resumed.stdout, resumed.stderr)
        first_with_b = next(w for w in range(3) if any(profile[d["device"]] == B for d in status["devices"] if d["wave"] == w + 1))
        assert status["state"] == "halted" and status["reason"].startswith(f"wave {first_with_b + 1}:"), status["reason"]
        assert status["wave"] == first_with_b + 1
        touched = [d for d in status["devices"] if d["wave"] <= first_with_b + 1]
        untouched = [d for d in status["devices"] if d["wave"] > first_with_b + 1]
        assert all(d["step"] == "reverted" and d["previous_version"] == 1 for d in touched)
        assert all(d["step"] == "pending" for d in untouched)
        # every touched device is told to run v1 again; the B devices never left it
        with connect(mosquitto.url, "test") as t:
            desired = collect_retained(t, Topics(FLEET), f"edge/{FLEET}/+/desired")
        for d in touched:
            assert json.loads(desired[Topics(FLEET).desired(d["device"])]) == {"models": {"cnn": {"version": 1}}}
        assert not any(Topics(FLEET).desired(d["device"]) in desired for d in untouched)
        # … and every one of them runs it again: the B devices never left it, and the devices of the
        # waves that passed (they had activated v2) take back the release they kept
        assert first_with_b > 0  # so some touched devices had activated v2
        back = [d["device"] for d in touched]

        def not_back() -> list[str]:
            now = reported(mosquitto, back)
            return [d for d in back if (now.get(d) or {}).get("release") != {"model": "cnn", "version": 1}]

        assert wait_until(lambda: not not_back(), 120, 1.0), {d: reported(mosquitto, back).get(d) for d in not_back()[:3]}
        assert any("self-test" in (d["verdict"] or "") for d in touched if profile[d["device"]] == B)
        events = [e["message"] for e in status["events"]]
        assert any("touched devices set back" in e for e in events)
        store.close()
    finally:
        simfleet.stop(procs)


def test_pause_resume_and_abort_from_another_process(mosquitto, tmp_path):
    """The controller stops at a pause written by another store handle, and abort reverts what it touched."""
    topics = Topics(FLEET)
    with connect(mosquitto.url, "devices") as t:
        for i in range(4):
            t.publish(topics.reported(f"d{i}"), json.dumps({"release": {"model": "cnn", "version": 1},
                                                            "updated": time.time()}).encode(), qos=1, retain=True, wait=5)
        t.publish(topics.manifest("cnn", 2), b"x", qos=1, retain=True, wait=5)
        before = {"models": {"cnn": {"version": 1, "store": "file:///srv/chunks"}, "other": {"version": 4}},
                  "policy": {"pin_precision": "int8"}}
        t.publish(topics.desired("d0"), json.dumps(before).encode(), qos=1, retain=True, wait=5)
    store, other = RolloutStore(tmp_path / "r.db"), RolloutStore(tmp_path / "r.db")
    with connect(mosquitto.url, "rollout") as t:
        r = start_rollout(store, t, topics, spec(waves=[Wave.parse("d0,d1"), Wave.parse("100%")]), "r")
        controller = RolloutController(store, t, r.id)
        assert controller.step() is RolloutState.RUNNING
        assert [d.step for d in store.devices("r", 0)] == [DeviceStep.TOUCHED] * 2
        during = collect_retained(t, topics, f"edge/{FLEET}/+/desired")
        assert json.loads(during[topics.desired("d0")])["models"] == {"cnn": {"version": 2, "store": "file:///srv/chunks"},
                                                                      "other": {"version": 4}}
        assert other.set_state("r", RolloutState.PAUSED, only_from=(RolloutState.RUNNING,))
        assert controller.run(poll_s=0.1) is RolloutState.PAUSED
        assert other.set_state("r", RolloutState.ABORTED, "operator", only_from=(RolloutState.PAUSED,))
        assert controller.step() is RolloutState.ABORTED
        desired = collect_retained(t, topics, f"edge/{FLEET}/+/desired")
    assert json.loads(desired[topics.desired("d0")]) == {"models": {"cnn": {"version": 1, "store": "file:///srv/chunks"},
                                                                    "other": {"version": 4}},
                                                         "policy": {"pin_precision": "int8"}}
    assert json.loads(desired[topics.desired("d1")]) == {"models": {"cnn": {"version": 1}}}
    assert topics.desired("d2") not in desired  # never touched
    assert [d.step for d in store.devices("r")] == [DeviceStep.REVERTED] * 2 + [DeviceStep.PENDING] * 2
    with connect(mosquitto.url, "view") as t:
        assert set(read_fleet(t, topics).devices) == {"d0", "d1", "d2", "d3"}
