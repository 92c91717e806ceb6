"""Precision policy: which precision should run now, given the latest resource reading.

A precision may run while its conditions hold (the profile's ``policy.thresholds``: enough free
memory, CPU below a ceiling, temperature below a ceiling). The policy walks the ladder
FP32 → FP16 → MIXED → INT8 restricted to the precisions the release actually has:

* **step down** at once (as far as needed) when the current precision's conditions fail -
  waiting would risk the OOM killer or thermal shutdown;
* **step up** only when a higher precision's conditions hold *with the hysteresis margins*, at
  least ``min_dwell_s`` has passed since the last switch, so a signal oscillating around a
  threshold never makes it flap, and the better variant can load beside the serving one (the
  caller's ``fits_beside``): a step up is for quality, so it never pauses calls, and a paused load
  whose real peak overshoots a tight memory limit would meet the OOM killer;
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
from ..types import PRECISION_LADDER, MemoryMode, Precision, StrEnum
from .ladder import Ladder, Rung, build_ladder
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
    LADDER = "ladder"  # the memory ladder this release gets here: its steps, and the rungs skipped and why
    MEASURED = "measured"  # device figures measured, read or unreadable (a side file, a cgroup file)
    ACCEPTANCE = "acceptance"  # the on-device benchmark of a release's variants: a verdict or skipped


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
    from_memory: MemoryMode | None = None  # the backend memory mode before and after (see runtime/ladder.py)
    to_memory: MemoryMode | None = None

    @property
    def to_rung(self) -> Rung | None:
        return Rung(self.to_precision, self.to_memory or MemoryMode.DEFAULT) if self.to_precision else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("kind", "from_precision", "to_precision", "from_memory", "to_memory"):
            value = getattr(self, key)
            data[key] = value.value if value is not None else None
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
                 history: int = 256, ladder: Ladder | None = None) -> None:
        if not available:
            raise ConfigError("precision policy: no precision available to run")
        self.ladder: list[Precision] = sorted(set(available), key=_rank)
        #: Rungs (precision x backend memory mode) with measured footprints: what memory steps go by.
        self.memory_ladder: Ladder = ladder if ladder is not None else build_ladder(self.ladder)
        self.current_memory: MemoryMode = MemoryMode.DEFAULT
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

    @property
    def rung(self) -> Rung:
        """What serves now: the current precision in the current memory mode."""
        return Rung(self.current, self.current_memory)

    def free_if(self, rung: Rung, sample: ResourceSample, serving: Rung | None) -> float:
        """Free memory once ``rung`` serves instead of ``serving`` (``None``: nothing loaded yet),
        from the measured footprints; the sample's figure as is where they are not known."""
        available = sample.available_memory_mb
        if serving == rung:
            return available
        want = self.memory_ladder.footprint(rung)
        if want is None:
            return available
        if serving is None:
            return available - want
        have = self.memory_ladder.footprint(serving)
        return available if have is None else available + have - want

    def violations(self, precision: Precision, sample: ResourceSample, margin: Hysteresis | None = None, *,
                   memory: MemoryMode = MemoryMode.DEFAULT, serving: Rung | None | bool = True) -> list[str]:
        """Why ``precision`` (in ``memory`` mode) may not run on ``sample`` (empty: it may).
        ``margin`` adds hysteresis. ``serving`` is the rung the sample was taken under (``True``:
        this one; ``None``: nothing loaded): free memory is then corrected by the footprints."""
        limits = self.thresholds(precision)
        reasons: list[str] = []
        mem_margin = margin.memory_mb if margin else 0.0
        rung = Rung(precision, memory)
        free = self.free_if(rung, sample, rung if serving is True else serving)  # type: ignore[arg-type]
        # A precision without thresholds may always run - as long as its measured footprint fits.
        need = (limits.min_free_memory_mb if limits is not None else 0.0) + mem_margin
        if (limits is not None or free != sample.available_memory_mb) and free < need:
            reasons.append(f"free memory {free:.0f} MB < {need:.0f} MB"
                           + ("" if free == sample.available_memory_mb else f" (measured footprints: {sample.available_memory_mb:.0f} MB free now)"))
        if limits is None:
            return reasons
        cpu_margin = margin.cpu_percent if margin else 0.0
        temp_margin = margin.temperature_c if margin else 0.0
        if limits.max_cpu_percent < 100 and sample.cpu_percent > limits.max_cpu_percent - cpu_margin:
            reasons.append(f"CPU {sample.cpu_percent:.0f}% > {limits.max_cpu_percent - cpu_margin:.0f}%")
        if sample.temperature_c is not None and sample.temperature_c > limits.max_temperature_c - temp_margin:
            reasons.append(f"temperature {sample.temperature_c:.1f} °C > {limits.max_temperature_c - temp_margin:.1f} °C")
        # Throttling is a fact, not a level: no margin to recover by, so only the top precision
        # (the one with the tightest limits) is refused while the SoC throttles.
        if self.step_down_on_throttle and sample.throttled and precision == self.ladder[0] and len(self.ladder) > 1:
            reasons.append("CPU is throttled")
        return reasons

    def _rung_violations(self, rung: Rung, sample: ResourceSample, serving: Rung | None,
                         margin: Hysteresis | None = None) -> list[str]:
        return self.violations(rung.precision, sample, margin, memory=rung.memory, serving=serving)

    # -- decisions -----------------------------------------------------------------------------
    def decide(self, sample: ResourceSample, fits_beside: Callable[[Rung, ResourceSample], bool] | None = None
               ) -> PolicyEvent | None:
        """The switch ``sample`` calls for, or ``None`` to stay; updates :attr:`current`.
        ``fits_beside(rung, sample)``: whether ``rung`` can load while the serving one still runs;
        a rung that cannot is not stepped up to (None: every rung can).

        The caller carries the switch out and then publishes the event with :meth:`record`
        (with the swap's timing), or reports a failed switch with :meth:`report_failure`.
        """
        with self._lock:
            event = self._decide(sample, fits_beside=fits_beside)
            if event is not None and event.kind in (EventKind.STEP_DOWN, EventKind.STEP_UP):
                self.current = event.to_precision  # type: ignore[assignment]
                self.current_memory = event.to_memory or MemoryMode.DEFAULT
                self._last_switch = self._clock()
        return event

    def _decide(self, sample: ResourceSample, honour_dwell: bool = True,
                fits_beside: Callable[[Rung, ResourceSample], bool] | None = None) -> PolicyEvent | None:
        if self.pinned is not None:
            return None
        figures = sample.as_dict()
        current = self.rung
        problems = self._rung_violations(current, sample, current)
        if problems:
            # Step down as far as needed: the first lower rung whose conditions hold (free memory
            # corrected by the measured footprints), or the cheapest one. Short of memory, only
            # rungs that save measured memory are steps; the others are named in the reason.
            short_of_memory = self.free_if(current, sample, current) < self._min_free(current)
            skipped: list[str] = []
            if short_of_memory:
                cheaper, skipped = self.memory_ladder.memory_steps(current)
            else:
                cheaper = [r for r in self.memory_ladder.below(current) if r.precision != current.precision]
            reason = "; ".join(problems) + (f"; skipped: {'; '.join(skipped)}" if skipped else "")
            if not cheaper:
                if self._held:  # said so already; do not repeat it on every sample
                    return None
                self._held = True
                why = (f"{current} is the cheapest variant available" if not self.memory_ladder.below(current)
                       else f"no variant left that {'saves memory' if short_of_memory else 'is cheaper'} than {current}")
                return PolicyEvent(EventKind.HELD, current.precision, current.precision, f"{reason}, but {why}", figures,
                                   from_memory=current.memory, to_memory=current.memory)
            target = next((r for r in cheaper if not self._rung_violations(r, sample, current)), None)
            if target is None:
                sized = [r for r in cheaper if self.memory_ladder.footprint(r) is not None]
                target = min(sized, key=lambda r: self.memory_ladder.footprint(r)) if short_of_memory and sized else cheaper[-1]
            return PolicyEvent(EventKind.STEP_DOWN, current.precision, target.precision, reason, figures,
                               from_memory=current.memory, to_memory=target.memory)
        self._held = False
        if honour_dwell and self._last_switch is not None and self._clock() - self._last_switch < self.settings.min_dwell_s:
            return None
        for candidate in self.memory_ladder.above(current):  # best first
            if fits_beside is not None and not fits_beside(candidate, sample):
                continue
            if not self._rung_violations(candidate, sample, current, self.settings.hysteresis):
                why = "resources recovered beyond the hysteresis band"
                if self.thresholds(candidate.precision) is not None:
                    why += (f" (free memory {sample.available_memory_mb:.0f} MB, CPU {sample.cpu_percent:.0f}%"
                            + (f", {sample.temperature_c:.1f} °C" if sample.temperature_c is not None else "") + ")")
                return PolicyEvent(EventKind.STEP_UP, current.precision, candidate.precision, why, figures,
                                   from_memory=current.memory, to_memory=candidate.memory)
        return None

    def _min_free(self, rung: Rung) -> float:
        limits = self.thresholds(rung.precision)
        return limits.min_free_memory_mb if limits is not None else 0.0

    def initial(self, sample: ResourceSample | None) -> Precision:
        """The precision to start with: the best rung whose conditions hold now (no hysteresis;
        free memory less the rung's measured footprint, since nothing is loaded yet)."""
        with self._lock:
            if self.pinned is not None:
                return self.pinned
            start = self.memory_ladder.rungs[0]
            if sample is not None:
                start = next((r for r in self.memory_ladder.rungs if not self._rung_violations(r, sample, None)),
                             self._cheapest())
            self.current, self.current_memory = start.precision, start.memory
            self._last_switch = self._clock()
        return start.precision

    def _cheapest(self) -> Rung:
        sized = [r for r in self.memory_ladder.rungs if self.memory_ladder.footprint(r) is not None]
        if sized:
            return min(sized, key=lambda r: (self.memory_ladder.footprint(r), r.quality))
        return Rung(self.ladder[-1])

    def pin(self, precision: Precision) -> PolicyEvent:
        """Run ``precision`` until :meth:`unpin`, whatever the resources (event not yet published)."""
        precision = parse_precision(precision)
        if precision not in self.ladder:
            raise ConfigError(f"cannot pin {precision}: this release has no usable {precision} variant here "
                              f"(available: {', '.join(p.value for p in self.ladder)})")
        with self._lock:
            event = PolicyEvent(EventKind.PIN, self.current, precision, "pinned by the caller",
                                from_memory=self.current_memory, to_memory=MemoryMode.DEFAULT)
            self.pinned = precision
            self.current = precision
            self.current_memory = MemoryMode.DEFAULT
            self._last_switch = self._clock()
        return event

    def unpin(self, sample: ResourceSample | None,
              fits_beside: Callable[[Rung, ResourceSample], bool] | None = None) -> PolicyEvent:
        """Hand control back to the policy; returns where it goes from here (not yet published).

        The pin counted as a switch for the dwell time, but the policy does not wait it out
        here: it moves at once to what ``sample`` allows (stepping up still needs the margins).
        """
        with self._lock:
            self.pinned = None
            before = self.rung
            decision = self._decide(sample, honour_dwell=False, fits_beside=fits_beside) if sample is not None else None
            target = decision.to_rung if decision is not None and decision.to_rung else before
            self.current, self.current_memory = target.precision, target.memory
            self._last_switch = self._clock()
            reason = "unpinned: the policy decides again" + (f" ({decision.reason})" if decision and target != before else "")
            return PolicyEvent(EventKind.UNPIN, before.precision, target.precision, reason, sample.as_dict() if sample else {},
                               from_memory=before.memory, to_memory=target.memory)

    def report_failure(self, event: PolicyEvent, actual: Precision, error: str,
                       actual_memory: MemoryMode = MemoryMode.DEFAULT) -> PolicyEvent:
        """The switch ``event`` asked for failed; ``actual`` (in ``actual_memory``) still serves."""
        with self._lock:
            self.current, self.current_memory = actual, actual_memory
            failure = PolicyEvent(EventKind.SWAP_FAILED, actual, event.to_precision,
                                  f"could not switch to {event.to_rung}: {error}", event.figures, error=error,
                                  from_memory=actual_memory, to_memory=event.to_memory)
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
