"""Precision policy: stepping down/up, hysteresis, dwell, pins, held states, events."""

from __future__ import annotations

import math

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.profiles import Hysteresis, PolicySettings, Thresholds, get_profile
from edge_sdk.runtime.monitor import FakeSource
from edge_sdk.runtime.policy import EventKind, PrecisionPolicy, parse_precision
from edge_sdk.types import Precision

FP32, FP16, INT8, MIXED = Precision.FP32, Precision.FP16, Precision.INT8, Precision.MIXED

SETTINGS = PolicySettings(
    thresholds={
        FP32: Thresholds(min_free_memory_mb=1024, max_cpu_percent=85, max_temperature_c=75),
        FP16: Thresholds(min_free_memory_mb=512, max_cpu_percent=92, max_temperature_c=80),
    },
    hysteresis=Hysteresis(memory_mb=128, cpu_percent=10, temperature_c=5),
    min_dwell_s=10,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(available=(FP32, FP16, INT8), settings=SETTINGS):
    clock = Clock()
    policy = PrecisionPolicy(available, settings, clock=clock)
    source = FakeSource(available_memory_mb=4096, cpu_percent=20, temperature_c=50)
    policy.initial(source.sample())
    return policy, source, clock


def step(policy, source, clock, dt=1.0, **values):
    clock.now += dt
    source.set(**values)
    event = policy.decide(source.sample())
    if event is not None:
        policy.record(event)
    return event


def test_starts_at_the_best_precision_the_resources_allow() -> None:
    policy, source, _ = make()
    assert policy.current == FP32
    source.set(available_memory_mb=700)
    assert policy.initial(source.sample()) == FP16
    source.set(available_memory_mb=100)
    assert policy.initial(source.sample()) == INT8


@pytest.mark.parametrize(("values", "expected", "reason"), [
    ({"available_memory_mb": 900}, FP16, "free memory 900 MB < 1024 MB"),
    ({"cpu_percent": 88}, FP16, "CPU 88% > 85%"),
    ({"temperature_c": 77}, FP16, "temperature 77.0 °C > 75.0 °C"),
    ({"available_memory_mb": 300}, INT8, "free memory 300 MB < 1024 MB"),  # skips FP16, which fails too
    ({"temperature_c": 81}, INT8, "temperature 81.0 °C > 75.0 °C"),
])
def test_steps_down_as_far_as_needed_at_once(values, expected, reason) -> None:
    policy, source, clock = make()
    event = step(policy, source, clock, dt=0.1, **values)  # well inside the dwell time: stepping down never waits
    assert event is not None and event.kind == EventKind.STEP_DOWN
    assert (event.from_precision, event.to_precision) == (FP32, expected)
    assert event.reason == reason
    assert policy.current == expected
    assert event.figures["available_memory_mb"] == source.values["available_memory_mb"]


def test_steps_up_only_beyond_the_hysteresis_band_and_after_the_dwell_time() -> None:
    policy, source, clock = make()
    assert step(policy, source, clock, available_memory_mb=900).to_precision == FP16
    # Recovered above the threshold but inside the band (1024..1152): stays.
    assert step(policy, source, clock, dt=30, available_memory_mb=1100) is None
    # Beyond the band, but only 2 s after the last switch: the dwell time holds it.
    assert step(policy, source, clock, dt=-29, available_memory_mb=1200) is None
    event = step(policy, source, clock, dt=9, available_memory_mb=1200)  # 11 s after the switch
    assert event is not None and event.kind == EventKind.STEP_UP and event.to_precision == FP32
    assert "hysteresis" in event.reason


def test_signal_oscillating_inside_the_band_never_flaps() -> None:
    policy, source, clock = make()
    events = []
    # Free memory swings 980..1140 MB around the 1024 MB threshold, for ten simulated minutes.
    for i in range(600):
        value = 1060 + 80 * math.sin(i / 3)
        event = step(policy, source, clock, dt=1.0, available_memory_mb=value)
        if event is not None:
            events.append(event)
    assert [(e.from_precision, e.to_precision) for e in events] == [(FP32, FP16)]


def test_cpu_oscillation_inside_the_band_never_flaps() -> None:
    policy, source, clock = make()
    kinds = [step(policy, source, clock, dt=20, cpu_percent=80 if i % 2 else 90) for i in range(50)]
    assert [e.to_precision for e in kinds if e is not None] == [FP16]  # 80% is inside 75..85


def test_recovery_goes_back_up_step_by_step_as_the_band_allows() -> None:
    policy, source, clock = make()
    step(policy, source, clock, available_memory_mb=100)
    assert policy.current == INT8
    # 700 MB: FP16 needs 512 + 128 → up to FP16, not FP32.
    assert step(policy, source, clock, dt=11, available_memory_mb=700).to_precision == FP16
    assert step(policy, source, clock, dt=11, available_memory_mb=1100) is None
    assert step(policy, source, clock, dt=11, available_memory_mb=1200).to_precision == FP32


def test_never_moves_to_a_precision_the_release_lacks() -> None:
    # The release's FP16 variant was rejected: the ladder is FP32 → INT8.
    policy, source, clock = make(available=(FP32, INT8))
    event = step(policy, source, clock, available_memory_mb=900)
    assert event.to_precision == INT8
    assert step(policy, source, clock, dt=11, available_memory_mb=1100) is None
    assert step(policy, source, clock, dt=11, available_memory_mb=1200).to_precision == FP32


def test_mixed_sits_between_fp16_and_int8() -> None:
    policy, source, clock = make(available=(INT8, FP32, MIXED))
    assert policy.ladder == [FP32, MIXED, INT8]
    assert step(policy, source, clock, available_memory_mb=900).to_precision == MIXED


def test_held_at_the_cheapest_variant_is_reported_once() -> None:
    policy, source, clock = make(available=(FP32,))
    first = step(policy, source, clock, temperature_c=99)
    assert first.kind == EventKind.HELD and first.to_precision == FP32
    assert "cheapest" in first.reason
    assert step(policy, source, clock, temperature_c=99) is None
    assert step(policy, source, clock, temperature_c=50) is None  # recovered: nothing to do
    assert step(policy, source, clock, temperature_c=99).kind == EventKind.HELD  # a new episode


def test_throttling_refuses_the_top_precision() -> None:
    policy, source, clock = make()
    event = step(policy, source, clock, throttled=True)
    assert event.to_precision == FP16 and "throttled" in event.reason
    assert step(policy, source, clock, dt=11, throttled=True) is None
    assert step(policy, source, clock, dt=11, throttled=False).to_precision == FP32


def test_pin_overrides_the_policy_until_unpinned() -> None:
    policy, source, clock = make()
    pin = policy.pin(INT8)
    assert pin.kind == EventKind.PIN and policy.current == INT8 and policy.pinned == INT8
    assert step(policy, source, clock, dt=100, available_memory_mb=8000) is None
    assert step(policy, source, clock, dt=100, available_memory_mb=10) is None
    source.set(available_memory_mb=700)
    unpin = policy.unpin(source.sample())
    assert unpin.kind == EventKind.UNPIN and unpin.to_precision == FP16 and policy.pinned is None
    policy.pin(FP32)
    source.set(available_memory_mb=300)
    assert policy.unpin(source.sample()).to_precision == INT8  # stepping down after a pin is immediate


def test_pin_rejects_unknown_and_unavailable_precisions() -> None:
    policy, _, _ = make(available=(FP32, INT8))
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        policy.pin("fp8")
    with pytest.raises(ConfigError, match="no usable fp16 variant"):
        policy.pin(FP16)
    assert parse_precision("int8") == INT8


def test_events_reach_subscribers_and_history_is_bounded() -> None:
    clock = Clock()
    policy = PrecisionPolicy((FP32, FP16), SETTINGS.model_copy(update={"min_dwell_s": 0}), clock=clock, history=5)
    source = FakeSource(available_memory_mb=4096)
    seen = []
    unsubscribe = policy.subscribe(seen.append)
    for i in range(12):
        step(policy, source, clock, available_memory_mb=100 if i % 2 == 0 else 4096)
    assert len(seen) == 12 and len(policy.history) == 5
    assert [e.kind for e in seen[:2]] == [EventKind.STEP_DOWN, EventKind.STEP_UP]
    assert policy.last_event is seen[-1]
    unsubscribe()
    step(policy, source, clock, available_memory_mb=100)
    assert len(seen) == 12


def test_failed_switch_is_reported_and_current_restored() -> None:
    policy, source, clock = make()
    event = policy.decide(_sample(source, available_memory_mb=900))
    assert policy.current == FP16
    failure = policy.report_failure(event, FP32, "corrupt artifact")
    assert failure.kind == EventKind.SWAP_FAILED and failure.error == "corrupt artifact"
    assert policy.current == FP32 and policy.last_event is failure


def _sample(source, **values):
    source.set(**values)
    return source.sample()


def test_profile_thresholds_drive_the_policy() -> None:
    profile = get_profile("raspberry-pi-4")
    policy = PrecisionPolicy(profile.precisions, profile.policy)
    source = FakeSource(available_memory_mb=3000, cpu_percent=30, temperature_c=60)
    assert policy.initial(source.sample()) == FP32
    source.set(temperature_c=78)  # Pi 4: FP32 up to 75 °C, FP16 up to 80 °C
    assert policy.decide(source.sample()).to_precision == FP16


def test_empty_ladder_is_an_error() -> None:
    with pytest.raises(ConfigError):
        PrecisionPolicy([], SETTINGS)
