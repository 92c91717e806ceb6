"""Precision policy: which precision should run now, given the latest resource reading.

A precision may run while its conditions hold (the profile's ``policy.thresholds``: enough free
memory, CPU below a ceiling, temperature below a ceiling). The policy walks the ladder
FP32 → FP16 → MIXED → INT8 restricted to the precisions the release actually has:

* **step down** at once (as far as needed) when the current precision's conditions fail -
  waiting would risk the OOM killer or thermal shutdown;
* **step up** only when a higher precision's conditions hold *with the hysteresis margins* and
  at least ``min_dwell_s`` has passed since the last switch, so a signal oscillating around a
  threshold never makes it flap;
* a manual pin overrides everything until unpinned.

The policy is pure decision logic (no threads, no sessions): :class:`~.model.EdgeModel` feeds it
samples, carries out its decisions and then publishes each as a :class:`PolicyEvent` (kept in a
bounded :attr:`PrecisionPolicy.history` and handed to subscribers).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import Field

from ..config import StrictModel
from ..errors import ConfigError
from ..profiles import Hysteresis, PolicySettings, Thresholds
from ..types import PRECISION_LADDER, Precision, StrEnum
from .monitor import ResourceSample


class EventKind(StrEnum):
    """What kind of decision an event records."""

    STEP_DOWN = "step_down"
    STEP_UP = "step_up"
    PIN = "pin"
    UNPIN = "unpin"
    INITIAL = "initial"
    SWAP_FAILED = "swap_failed"  # the decided precision could not be loaded; the old one serves on
    HELD = "held"  # conditions fail but there is no cheaper variant to step down to


@dataclass(frozen=True)
class PolicyEvent:
    """One decision: from which precision to which, why, on what figures, and when."""

    kind: EventKind
    from_precision: Precision | None
    to_precision: Precision | None
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)  # wall clock, for logs and telemetry
    swap_ms: float | None = None  # set once the swap it caused is done
    paused: bool = False  # the swap paused calls (not enough memory to hold both sessions)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        data["from_precision"] = self.from_precision.value if self.from_precision else None
        data["to_precision"] = self.to_precision.value if self.to_precision else None
        return data


def parse_precision(value: str | Precision) -> Precision:
    """``"fp16"`` → :attr:`Precision.FP16`; anything else is a :class:`ConfigError` listing the choices."""
    try:
        return Precision(value)
    except ValueError:
        raise ConfigError(f"unknown precision {value!r} (choose from {', '.join(p.value for p in Precision)})") from None


class ThresholdsOverride(StrictModel):
    """Per-precision limits to override; an absent field keeps the profile's value."""

    min_free_memory_mb: float | None = Field(None, ge=0)
    max_cpu_percent: float | None = Field(None, gt=0, le=100)
    max_temperature_c: float | None = Field(None, gt=0)


class HysteresisOverride(StrictModel):
    """Hysteresis margins to override; an absent field keeps the profile's value."""

    memory_mb: float | None = Field(None, ge=0)
    cpu_percent: float | None = Field(None, ge=0)
    temperature_c: float | None = Field(None, ge=0)


class PolicyOverride(StrictModel):
    """Runtime policy set from outside (the twin's desired ``policy``), applied without reloading.

    Key names follow the profile's ``policy`` section (``thresholds.<precision>.max_cpu_percent``,
    ``hysteresis.memory_mb``, ``min_dwell_s``). ``pin_precision`` pins a precision; an explicit
    ``null`` unpins; leaving it out leaves the pin as it is. Unknown keys are errors, so a typo in
    the cloud cannot be silently ignored on every device.
    """

    pin_precision: Precision | None = None
    thresholds: dict[Precision, ThresholdsOverride] = Field(default_factory=dict)
    hysteresis: HysteresisOverride = HysteresisOverride()
    min_dwell_s: float | None = Field(None, ge=0)

    @property
    def sets_pin(self) -> bool:
        """Whether ``pin_precision`` was given (``None`` given means unpin)."""
        return "pin_precision" in self.model_fields_set

    def as_dict(self) -> dict[str, Any]:
        """Only what was set, JSON-ready (an explicit ``pin_precision: null`` is kept)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def apply_to(self, settings: PolicySettings) -> PolicySettings:
        """``settings`` with these overrides laid over it (``settings`` itself is not changed)."""
        thresholds = dict(settings.thresholds)
        for precision, override in self.thresholds.items():
            base = thresholds.get(precision, Thresholds())
            thresholds[precision] = base.model_copy(update=override.model_dump(exclude_none=True))
        return PolicySettings(
            thresholds=thresholds,
            hysteresis=settings.hysteresis.model_copy(update=self.hysteresis.model_dump(exclude_none=True)),
            min_dwell_s=settings.min_dwell_s if self.min_dwell_s is None else self.min_dwell_s,
        )


def _rank(precision: Precision) -> int:
    return PRECISION_LADDER.index(precision)


class PrecisionPolicy:
    """Decides the precision to run from resource samples.

    ``available`` are the precisions the release can serve on this device (any order);
    ``settings`` the profile's policy (thresholds per precision, hysteresis, dwell). A precision
    without thresholds may always run. ``clock`` is injectable for tests (monotonic seconds).
    """

    def __init__(self, available: Sequence[Precision], settings: PolicySettings = PolicySettings(), *,
                 step_down_on_throttle: bool = True, clock: Callable[[], float] = time.monotonic,
                 history: int = 256) -> None:
        if not available:
            raise ConfigError("precision policy: no precision available to run")
        self.ladder: list[Precision] = sorted(set(available), key=_rank)
        self.settings = settings
        self.step_down_on_throttle = step_down_on_throttle
        self._clock = clock
        self._lock = threading.Lock()
        self.current: Precision = self.ladder[0]
        self.pinned: Precision | None = None
        self._last_switch: float | None = None
        self._held = False
        self.history: deque[PolicyEvent] = deque(maxlen=history)
        self._subscribers: list[Callable[[PolicyEvent], None]] = []

    # -- conditions ----------------------------------------------------------------------------
    def configure(self, settings: PolicySettings) -> None:
        """Replace thresholds, hysteresis and dwell; the next decision uses them."""
        with self._lock:
            self.settings = settings

    def thresholds(self, precision: Precision) -> Thresholds | None:
        return self.settings.thresholds.get(precision)

    def violations(self, precision: Precision, sample: ResourceSample, margin: Hysteresis | None = None) -> list[str]:
        """Why ``precision`` may not run on ``sample`` (empty: it may). ``margin`` adds hysteresis."""
        limits = self.thresholds(precision)
        reasons: list[str] = []
        if limits is None:
            return reasons
        mem_margin = margin.memory_mb if margin else 0.0
        cpu_margin = margin.cpu_percent if margin else 0.0
        temp_margin = margin.temperature_c if margin else 0.0
        if sample.available_memory_mb < limits.min_free_memory_mb + mem_margin:
            reasons.append(f"free memory {sample.available_memory_mb:.0f} MB < {limits.min_free_memory_mb + mem_margin:.0f} MB")
        if limits.max_cpu_percent < 100 and sample.cpu_percent > limits.max_cpu_percent - cpu_margin:
            reasons.append(f"CPU {sample.cpu_percent:.0f}% > {limits.max_cpu_percent - cpu_margin:.0f}%")
        if sample.temperature_c is not None and sample.temperature_c > limits.max_temperature_c - temp_margin:
            reasons.append(f"temperature {sample.temperature_c:.1f} °C > {limits.max_temperature_c - temp_margin:.1f} °C")
        # Throttling is a fact, not a level: no margin to recover by, so only the top precision
        # (the one with the tightest limits) is refused while the SoC throttles.
        if self.step_down_on_throttle and sample.throttled and precision == self.ladder[0] and len(self.ladder) > 1:
            reasons.append("CPU is throttled")
        return reasons

    # -- decisions -----------------------------------------------------------------------------
    def decide(self, sample: ResourceSample) -> PolicyEvent | None:
        """The switch ``sample`` calls for, or ``None`` to stay; updates :attr:`current`.

        The caller carries the switch out and then publishes the event with :meth:`record`
        (with the swap's timing), or reports a failed switch with :meth:`report_failure`.
        """
        with self._lock:
            event = self._decide(sample)
            if event is not None and event.kind in (EventKind.STEP_DOWN, EventKind.STEP_UP):
                self.current = event.to_precision  # type: ignore[assignment]
                self._last_switch = self._clock()
        return event

    def _decide(self, sample: ResourceSample, honour_dwell: bool = True) -> PolicyEvent | None:
        if self.pinned is not None:
            return None
        figures = sample.as_dict()
        current = self.current
        problems = self.violations(current, sample)
        if problems:
            # Step down as far as needed: the first cheaper precision whose conditions hold, or
            # the cheapest one.
            cheaper = self.ladder[self.ladder.index(current) + 1:]
            if not cheaper:
                if self._held:  # said so already; do not repeat it on every sample
                    return None
                self._held = True
                return PolicyEvent(EventKind.HELD, current, current,
                                   f"{'; '.join(problems)}, but {current} is the cheapest variant available", figures)
            target = next((p for p in cheaper if not self.violations(p, sample)), cheaper[-1])
            return PolicyEvent(EventKind.STEP_DOWN, current, target, "; ".join(problems), figures)
        self._held = False
        if honour_dwell and self._last_switch is not None and self._clock() - self._last_switch < self.settings.min_dwell_s:
            return None
        for candidate in self.ladder[:self.ladder.index(current)]:  # best first
            if not self.violations(candidate, sample, self.settings.hysteresis):
                why = "resources recovered beyond the hysteresis band"
                if self.thresholds(candidate) is not None:
                    why += (f" (free memory {sample.available_memory_mb:.0f} MB, CPU {sample.cpu_percent:.0f}%"
                            + (f", {sample.temperature_c:.1f} °C" if sample.temperature_c is not None else "") + ")")
                return PolicyEvent(EventKind.STEP_UP, current, candidate, why, figures)
        return None

    def initial(self, sample: ResourceSample | None) -> Precision:
        """The precision to start with: the best whose conditions hold now (no hysteresis)."""
        with self._lock:
            if self.pinned is not None:
                return self.pinned
            start = self.ladder[0]
            if sample is not None:
                start = next((p for p in self.ladder if not self.violations(p, sample)), self.ladder[-1])
            self.current = start
            self._last_switch = self._clock()
        return start

    def pin(self, precision: Precision) -> PolicyEvent:
        """Run ``precision`` until :meth:`unpin`, whatever the resources (event not yet published)."""
        precision = parse_precision(precision)
        if precision not in self.ladder:
            raise ConfigError(f"cannot pin {precision}: this release has no usable {precision} variant here "
                              f"(available: {', '.join(p.value for p in self.ladder)})")
        with self._lock:
            event = PolicyEvent(EventKind.PIN, self.current, precision, "pinned by the caller")
            self.pinned = precision
            self.current = precision
            self._last_switch = self._clock()
        return event

    def unpin(self, sample: ResourceSample | None) -> PolicyEvent:
        """Hand control back to the policy; returns where it goes from here (not yet published).

        The pin counted as a switch for the dwell time, but the policy does not wait it out
        here: it moves at once to what ``sample`` allows (stepping up still needs the margins).
        """
        with self._lock:
            self.pinned = None
            before = self.current
            decision = self._decide(sample, honour_dwell=False) if sample is not None else None
            target = decision.to_precision if decision is not None and decision.to_precision else before
            self.current = target
            self._last_switch = self._clock()
            reason = "unpinned: the policy decides again" + (f" ({decision.reason})" if decision and target != before else "")
            return PolicyEvent(EventKind.UNPIN, before, target, reason, sample.as_dict() if sample else {})

    def report_failure(self, event: PolicyEvent, actual: Precision, error: str) -> PolicyEvent:
        """The switch ``event`` asked for failed; ``actual`` still serves."""
        with self._lock:
            self.current = actual
            failure = PolicyEvent(EventKind.SWAP_FAILED, actual, event.to_precision,
                                  f"could not switch to {event.to_precision}: {error}", event.figures, error=error)
        self._publish(failure)
        return failure

    def record(self, event: PolicyEvent) -> None:
        """Publish a decision once it has been carried out (history + subscribers)."""
        self._publish(event)

    # -- events --------------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[PolicyEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every decision; returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    @property
    def last_event(self) -> PolicyEvent | None:
        return self.history[-1] if self.history else None

    def _publish(self, event: PolicyEvent) -> None:
        with self._lock:
            self.history.append(event)
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:  # noqa: S110 - a subscriber's bug must not break inference
                pass
