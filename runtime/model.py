"""``EdgeModel``: the Python API embedded apps run models with.

::

    model = edge_sdk.EdgeModel.load("release/")          # profile/precision "auto"
    outputs = model.run({"image": x})                     # thread-safe
    model.pin("int8"); model.unpin(); model.info()

Loading verifies the release (signature when a public key is given or configured, then each
file's size and sha256) and runs the release's self-test on every variant before it serves.

**Hot swap.** The active variant lives in a slot with a reference count. ``run`` takes a
reference under a short lock and runs outside it, so a switch (policy decision or ``pin``)
loads and self-tests the new variant in the background, swaps the slot pointer atomically, and
the old session is closed by whichever call returns last. A failed load keeps the old variant
serving and is reported as an event. When free memory cannot hold both sessions at once, the
swap *pauses* instead: new calls wait (they are queued, not failed), in-flight calls drain, the
old session is closed, the new one loaded, and calls resume; the event says ``paused=True``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from ..config import describe_validation_error
from ..errors import BackendError, ConfigError, EdgeSDKError, InputError, IntegrityError, MissingDependencyError
from ..manifest import Manifest, Variant, load_manifest, verify_file
from ..profiles import AUTO, DeviceProfile, PolicySettings, ResolvedProfile, resolve_profile
from ..types import MemoryMode, Precision
from .acceptance import DeviceChecks, DeviceReport, check_release
from .backends.base import BackendOptions, Session, get_backend, zero_feeds
from .ladder import Rung, build_ladder
from .monitor import MB, ResourceMonitor, ResourceSample, ResourceSource, SystemSource
from .policy import EventKind, PolicyEvent, PolicyOverride, PrecisionPolicy, parse_precision
from .selection import Plan, plan_variants, rejected_reason

PUBLIC_KEY_ENV = "EDGE_SDK_PUBLIC_KEY"  # path of the fleet's release-signing public key (PEM)


_LIBC: Any = None


def release_freed_memory() -> None:
    """Hand memory freed by a closed session back to the OS (glibc ``malloc_trim``).

    glibc raises its mmap threshold after large frees, so a model's weight buffers end up on the
    heap, where freeing them keeps them resident: without a trim, stepping down to a smaller
    variant would not lower RSS, and loading it could push the process over a cgroup limit.
    Elsewhere (musl, macOS) this does nothing.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MB


class _Slot:
    """One loaded variant plus the number of calls running on it."""

    __slots__ = ("session", "variant", "refs", "retired", "closed", "load_ms", "rss_delta_mb", "lock", "check_finite",
                 "memory")

    def __init__(self, session: Session, variant: Variant, load_ms: float, rss_delta_mb: float,
                 check_finite: bool, memory: MemoryMode = MemoryMode.DEFAULT) -> None:
        self.session = session
        self.memory = memory
        self.variant = variant
        self.refs = 0
        self.retired = False
        self.closed = False
        self.load_ms = load_ms
        self.rss_delta_mb = rss_delta_mb
        # Backends whose native session is not thread-safe say so (``thread_safe = False``).
        self.lock = None if getattr(session, "thread_safe", True) else threading.Lock()
        self.check_finite = check_finite  # scan inputs for NaN/inf before this variant runs

    def close(self, trim: bool = False) -> None:
        """Close the session; ``trim`` hands the freed heap back to the OS at once (paused swaps:
        the next variant loads into that memory). Otherwise the switch trims once it is recorded,
        so neither a caller nor the event waits for it."""
        try:
            self.session.close()
        except Exception:  # noqa: S110 - closing must never fail a caller's request
            pass
        self.session = None  # type: ignore[assignment]  # the native session goes with its last reference
        if trim:
            release_freed_memory()


@dataclass(frozen=True)
class ModelInfo:
    """What :meth:`EdgeModel.info` reports; also readable as a mapping (``info["precision"]``)."""

    model: str
    version: int
    release_dir: str
    profile: str
    backend: str
    target: str
    precision: Precision
    variant: str
    threads: int | None
    load_time_ms: float
    memory_mb: float  # process RSS growth when this variant was loaded, at least its weights
    pinned: bool
    available_precisions: list[str]
    last_decision: dict[str, Any] | None
    selection: str
    monitoring: bool
    swaps: int = 0
    memory_mode: str = MemoryMode.DEFAULT.value  # the backend memory mode serving (lean: memory-saving options)
    ladder: dict[str, Any] | None = None  # memory steps, skipped rungs and why, footprint per rung
    device: dict[str, Any] | None = None  # figures measured on this device: footprint, p50/p99, verdicts

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["precision"] = self.precision.value
        return data


def resolve_public_key(public_key: Any) -> Any:
    """A :class:`~edge_sdk.trust.TrustRoot` from a root, key, ``root.json``/PEM path or bytes;
    ``None`` reads ``$EDGE_SDK_PUBLIC_KEY`` (no check if unset)."""
    from ..trust import load_trust

    if public_key is None:
        configured = os.environ.get(PUBLIC_KEY_ENV)
        return load_trust(configured) if configured else None
    return load_trust(public_key)


class EdgeModel:
    """A release loaded for inference, switching precision as resources change.

    Create with :meth:`load`. ``run`` is safe to call from many threads at once, including
    during precision switches.
    """

    def __init__(self, release_dir: Path, manifest: Manifest, plan: Plan, policy: PrecisionPolicy,
                 options: BackendOptions, monitor: ResourceMonitor | None, swap_reserve_mb: float) -> None:
        # Use EdgeModel.load(); this constructor expects validated parts.
        self.release_dir = release_dir
        self.manifest = manifest
        self.plan = plan
        self.policy = policy
        self.monitor = monitor
        self._options = options
        self._swap_reserve_mb = swap_reserve_mb
        self._lock = threading.Lock()  # guards _active, _paused and slot refcounts
        self._cond = threading.Condition(self._lock)  # paused swaps: callers wait, swapper waits for drain
        self._swap_lock = threading.Lock()
        self._active: _Slot | None = None
        self._paused = False
        self._closed = False
        self._swaps = 0
        self._unsubscribe: Callable[[], None] | None = None
        self._owns_monitor = False
        self._reject_non_finite: bool | None = None  # None: only for quantized variants
        self._base_settings = policy.settings  # what set_policy overrides are laid over
        self._policy_pin: Precision | None = None  # a pin that came from set_policy
        self._unavailable: str | None = None  # why no variant serves (both loads of a paused swap failed)
        self._self_test: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
        self.device: DeviceReport | None = None  # what this device measured (footprints, acceptance)
        self._cgroup_error: str | None = None  # the last unreadable-cgroup problem reported

    # ------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def load(cls, release_dir: str | Path, profile: str | DeviceProfile | ResolvedProfile = AUTO,
             precision: str | Precision = AUTO,
             backend: str | None = None, *, public_key: Any = None, threads: int | None = None,
             monitor: ResourceMonitor | ResourceSource | bool | None = None, interval_s: float = 1.0,
             policy: PolicySettings | None = None, swap_reserve_mb: float = 64.0,
             reject_non_finite: bool | None = None, device_checks: DeviceChecks | None = None) -> EdgeModel:
        """Verify and load a release folder.

        ``profile``: a profile id, a profile YAML path, a :class:`DeviceProfile`, ``"auto"``, or
        what :func:`~edge_sdk.profiles.resolve_profile` made of one of those.
        ``precision``: ``"auto"`` (the policy decides and keeps deciding) or a precision, which
        pins it. ``backend``: restrict to one backend's variants. ``public_key``: PEM path/bytes
        or key; defaults to the file named by ``$EDGE_SDK_PUBLIC_KEY``; when set, an unsigned or
        wrongly signed release is refused. ``monitor``: ``None`` samples this machine
        (cgroup-aware) every ``interval_s``; a :class:`ResourceSource` or
        :class:`ResourceMonitor` to inject one; ``False`` for no automatic switching.
        ``policy`` overrides the profile's thresholds/hysteresis/dwell. ``swap_reserve_mb``: free
        memory to keep beyond a second session's size, else a switch pauses calls instead.
        ``reject_non_finite``: raise :class:`InputError` for NaN/inf inputs, at the cost of one
        scan per input. ``None`` (default) does so while an INT8/mixed variant serves - quantizing
        turns NaN into plausible-looking garbage - and lets float variants propagate NaN as is;
        ``True``/``False`` force it on/off for every variant. ``device_checks``: what this device
        measures itself before serving (footprint per variant, the on-device acceptance benchmark,
        see :mod:`~edge_sdk.runtime.acceptance`); default :meth:`DeviceChecks.from_env`.
        """
        release_dir = Path(release_dir)
        if not release_dir.is_dir():
            raise IntegrityError(f"release {release_dir}: no such folder")
        manifest = load_manifest(release_dir, resolve_public_key(public_key))
        choice = resolve_profile(profile)
        device_profile = choice.profile
        requested = None if precision == AUTO else parse_precision(precision)
        plan = plan_variants(manifest, device_profile, backend=backend, detected=choice.detected)
        if requested is not None and requested not in plan.candidates:
            why = rejected_reason(manifest, device_profile.id, requested)
            raise ConfigError(f"release {manifest.model} v{manifest.version} has no usable {requested} variant for profile "
                              f"{device_profile.id!r}" + (f": {why}" if why else "")
                              + f" (available: {', '.join(p.value for p in plan.precisions)})")
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        options = BackendOptions(
            threads=threads or min(device_profile.threads, os.cpu_count() or 1),
            cpu_affinity=tuple(device_profile.cpu.big_cores) or None,
        )
        settings = policy if policy is not None else device_profile.policy
        if monitor is None or monitor is True:
            resource_monitor: ResourceMonitor | None = ResourceMonitor(SystemSource(), interval_s)
        elif monitor is False:
            resource_monitor = None
        elif isinstance(monitor, ResourceMonitor):
            resource_monitor = monitor
        else:
            resource_monitor = ResourceMonitor(monitor, interval_s)
        # Refuse a release with any bad file up front, not at the first switch to it; each
        # variant is checked again right before it loads (files can change on disk later).
        for candidates in plan.candidates.values():
            for variant in candidates:
                for entry in variant.files:
                    verify_file(release_dir, entry)
        checks = device_checks if device_checks is not None else DeviceChecks.from_env()
        first_sample = resource_monitor.source.sample() if resource_monitor is not None else None
        plan, device = check_release(release_dir, manifest, plan, checks, options, first_sample)
        if requested is not None and requested not in plan.candidates:
            raise ConfigError(f"release {manifest.model} v{manifest.version}: the {requested} variant failed this "
                              f"device's checks: {'; '.join(device.rejected.values())}")
        footprints = {p: found for p, vs in plan.candidates.items() if (found := device.footprint(vs[0])) is not None}
        ladder = build_ladder(plan.precisions, footprints, min_saving=checks.min_memory_saving,
                              lean_modes=checks.memory_modes)
        precision_policy = PrecisionPolicy(plan.precisions, settings, ladder=ladder)
        model = cls(release_dir, manifest, plan, precision_policy, options, resource_monitor, swap_reserve_mb)
        model.device = device
        model._reject_non_finite = reject_non_finite
        model._load_self_test()
        model._start(requested)
        return model

    def _load_self_test(self) -> None:
        test = self.manifest.self_test
        if test is None:
            return
        inputs_path = verify_file(self.release_dir, test.inputs)
        expected_path = verify_file(self.release_dir, test.expected)
        if test.expected.sha256 != test.digest:
            raise IntegrityError("self_test: expected-output digest does not match its file entry")
        try:
            with np.load(inputs_path, allow_pickle=False) as data:  # (strings are stored as unicode, fed as str objects)
                inputs = {k: data[k].astype(object) if data[k].dtype.kind == "U" else data[k] for k in data.files}
            with np.load(expected_path, allow_pickle=False) as data:
                expected = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"self_test: cannot read {test.inputs.path}/{test.expected.path}: {exc}") from None
        self._self_test = (inputs, expected)

    def _start(self, requested: Precision | None) -> None:
        self._publish_checks()
        sample = self.monitor.sample_now() if self.monitor is not None else None
        self._note_cgroup_error(sample)
        if requested is not None:
            self.policy.pin(requested)
            slot = self._open(requested)
            reason = f"precision {requested} requested (pinned)"
        else:
            self.policy.initial(sample)
            start = self.policy.rung
            errors: list[EdgeSDKError] = []
            slot = None
            # Auto mode: a variant that fails to load or self-test is skipped for a cheaper one.
            rungs = self.policy.memory_ladder.rungs
            for rung in rungs[rungs.index(start):]:
                try:
                    slot = self._open(rung.precision, rung.memory)
                    break
                except EdgeSDKError as exc:
                    errors.append(exc)
            if slot is None:
                raise combine_errors(errors)
            self.policy.current, self.policy.current_memory = slot.variant.precision, slot.memory
            reason = "auto: the best precision the resources allow" + (f" (skipped: {'; '.join(map(str, errors))})" if errors else "")
        self._active = slot
        self.policy.record(PolicyEvent(EventKind.INITIAL, None, slot.variant.precision, reason,
                                       sample.as_dict() if sample else {}, swap_ms=slot.load_ms, to_memory=slot.memory))
        if self.monitor is not None:
            self._unsubscribe = self.monitor.subscribe(self._on_sample)
            if not self.monitor.running:
                self.monitor.start()
                self._owns_monitor = True  # a monitor the caller already ran stays theirs to stop

    def _publish_checks(self) -> None:
        """The device checks' findings and the memory ladder, as events (before the first load)."""
        if self.device is not None:
            for kind, text in self.device.notes:
                self.policy.record(PolicyEvent(EventKind(kind), None, None, text))
        ladder = self.policy.memory_ladder
        if ladder.footprint_mb:
            described = ladder.describe()
            steps = " -> ".join(described["memory_steps"])  # type: ignore[arg-type]
            skipped = described["skipped"]
            self.policy.record(PolicyEvent(EventKind.LADDER, None, None, f"memory steps: {steps}"
                                           + (f"; skipped: {'; '.join(skipped)}" if skipped else ""),  # type: ignore[arg-type]
                                           described))

    def _open(self, precision: Precision, memory: MemoryMode = MemoryMode.DEFAULT) -> _Slot:
        """Verify, load, self-test and warm up the best loadable variant of ``precision``."""
        errors: list[EdgeSDKError] = []
        # A backend whose package is missing, or a variant that fails, yields to the next one.
        for variant in self.plan.candidates[precision]:
            try:
                return self._open_variant(variant, memory)
            except EdgeSDKError as exc:
                errors.append(exc)
        raise combine_errors(errors)

    def _open_variant(self, variant: Variant, memory: MemoryMode = MemoryMode.DEFAULT) -> _Slot:
        files = [verify_file(self.release_dir, entry) for entry in variant.files]
        options = dataclasses.replace(self._options, precision=variant.precision, memory=memory)
        rss_before = _rss_mb()
        started = time.perf_counter()
        try:
            session = get_backend(variant.backend).load(files, variant.inputs, variant.outputs, options)
            session.variant_id = variant.id
            try:
                self._check_self_test(session, variant)  # doubles as the warm-up run
            except BaseException:
                session.close()
                raise
        except EdgeSDKError:
            raise
        except Exception as exc:  # e.g. MemoryError from a native runtime: keep callers on one error tree
            raise BackendError(f"loading {variant.id} failed: {type(exc).__name__}: {exc}") from exc
        load_ms = (time.perf_counter() - started) * 1000
        check = self._reject_non_finite
        if check is None:
            check = variant.precision in (Precision.INT8, Precision.MIXED)
        # RSS growth under-reports when the allocator reuses memory an earlier session freed (it
        # reads 0 for a small model), but the weights are resident either way: at least their size.
        weights_mb = sum(f.size for f in variant.files) / MB
        return _Slot(session, variant, load_ms, max(_rss_mb() - rss_before, weights_mb), check, memory)

    def _check_self_test(self, session: Session, variant: Variant) -> None:
        if self._self_test is None:
            feeds = zero_feeds(variant.inputs)
            session.run(feeds)
            return
        inputs, expected = self._self_test
        outputs = session.run(inputs)
        scale = max((float(np.max(np.abs(v))) for v in expected.values() if v.size and v.dtype.kind in "biuf"), default=1.0)
        tolerance = variant.validation.self_test_tolerance
        if tolerance is None:
            # Older manifests carry no tolerance: FP32 must match closely, reduced precisions
            # within a tenth of the output scale (catches garbage, not rounding).
            tolerance = (1e-3 if variant.precision == Precision.FP32 else 0.1) * max(scale, 1.0)
        for name, want in expected.items():
            got = outputs.get(name)
            if got is None:
                raise IntegrityError(f"self-test of {variant.id}: output {name!r} missing")
            if got.shape != want.shape:
                raise IntegrityError(f"self-test of {variant.id}: output {name!r} shape {list(got.shape)} != expected {list(want.shape)}")
            if want.dtype.kind == "U":  # strings: exactly the expected ones
                if not np.array_equal(np.asarray(got).astype(str), want):
                    raise IntegrityError(f"self-test of {variant.id} failed: output {name!r} differs from the expected strings")
                continue
            error = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
            if not np.isfinite(error) or error > tolerance:
                raise IntegrityError(f"self-test of {variant.id} failed: output {name!r} max abs error {error:.3g} > tolerance {tolerance:.3g}")

    # ------------------------------------------------------------------------------------------
    # Inference

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the active variant on ``inputs`` (original names, dtypes and layout)."""
        # Hot path: one plain-lock round trip on each side of the call (C-level, no Python
        # frames); the condition variable is only touched while a paused swap is under way.
        lock = self._lock
        with lock:
            slot = self._active
            if self._paused or slot is None:
                slot = self._wait_for_slot()
            slot.refs += 1
        try:
            if slot.check_finite:
                _check_finite(inputs, slot.variant)
            if slot.lock is None:
                return slot.session.run(inputs)
            with slot.lock:
                return slot.session.run(inputs)
        finally:
            with lock:
                slot.refs -= 1
                last = slot.refs == 0 and slot.retired and not slot.closed
                if last:
                    slot.closed = True
                if self._paused and slot.refs == 0:
                    self._cond.notify_all()
            if last:
                slot.close()

    def _wait_for_slot(self) -> _Slot:
        """Called with the lock held: wait out a paused swap; the slot to run on."""
        while self._paused:
            self._cond.wait()
        if self._active is None:
            raise self._no_variant()
        return self._active

    def _no_variant(self) -> EdgeSDKError:
        if self._closed:
            return EdgeSDKError("model is closed")
        return BackendError("model has no loaded variant" + (f": {self._unavailable}" if self._unavailable else ""))

    # ------------------------------------------------------------------------------------------
    # Switching

    def _note_cgroup_error(self, sample: ResourceSample | None) -> None:
        """Say once (until it changes) that cgroup figures could not be read and host figures stand in."""
        error = sample.cgroup_error if sample is not None else None
        if error == self._cgroup_error:
            return
        self._cgroup_error = error
        if error:
            self.policy.record(PolicyEvent(EventKind.MEASURED, None, None,
                                           f"cgroup figures unreadable ({error}): the policy uses host figures"))

    def _on_sample(self, sample: ResourceSample) -> None:
        self._note_cgroup_error(sample)
        # Runs in the monitor thread. A pin/unpin in progress owns the swap lock; this sample
        # is simply skipped (the next one re-evaluates).
        if self._swap_lock.acquire(blocking=False):
            try:
                self._evaluate_locked(sample)
            finally:
                self._swap_lock.release()

    def evaluate(self, sample: ResourceSample | None = None) -> PolicyEvent | None:
        """Run one policy step now (on ``sample``, or a fresh reading) and carry it out."""
        if sample is None:
            if self.monitor is None:
                raise ConfigError("no resource monitor: pass a sample, or load with monitor enabled")
            sample = self.monitor.source.sample()
        with self._swap_lock:
            return self._evaluate_locked(sample)

    def _evaluate_locked(self, sample: ResourceSample) -> PolicyEvent | None:
        if self._closed:
            return None
        event = self.policy.decide(sample, fits_beside=self._fits_beside)
        if event is None:
            return None
        if event.kind == EventKind.HELD or event.to_precision is None:
            self.policy.record(event)
            return event
        return self._carry_out(event, sample)

    def _serving(self) -> Rung | None:
        slot = self._active
        return Rung(slot.variant.precision, slot.memory) if slot is not None else None

    def _carry_out(self, event: PolicyEvent, sample: ResourceSample | None = None) -> PolicyEvent:
        """Swap to ``event.to_rung``; publish the event (or a SWAP_FAILED one)."""
        current = self._serving()
        target = event.to_rung
        if target == current:
            self.policy.record(event)
            return event
        try:
            swap_ms, paused = self._swap(target.precision, sample, target.memory)  # type: ignore[union-attr]
        except EdgeSDKError as exc:
            # With no variant serving (a paused swap lost both), the policy stays where it was.
            actual = current if current is not None else Rung(event.from_precision, event.from_memory or MemoryMode.DEFAULT)  # type: ignore[arg-type]
            return self.policy.report_failure(event, actual.precision, str(exc), actual.memory)
        done = dataclasses.replace(event, swap_ms=swap_ms, paused=paused,
                                   reason=event.reason + (" (paused calls: not enough memory for both variants)" if paused else ""))
        self.policy.record(done)
        release_freed_memory()  # the old session's heap, once the switch is on record
        return done

    def _fits_beside(self, rung: Rung, sample: ResourceSample) -> bool:
        return not self._memory_too_tight(rung.precision, sample, rung.memory)

    def _memory_too_tight(self, precision: Precision, sample: ResourceSample | None,
                          memory: MemoryMode = MemoryMode.DEFAULT) -> bool:
        if self.monitor is None:
            return False
        sample = sample or self.monitor.latest or self.monitor.source.sample()
        # Holding both sessions for a moment needs the new one's measured peak RSS; without
        # figures, weights plus the runtime's working buffers: about twice the artifact size.
        need_mb = self.policy.memory_ladder.footprint(Rung(precision, memory))
        if need_mb is None:
            variant = self.plan.candidates[precision][0]
            need_mb = 2 * sum(f.size for f in variant.files) / MB
        return sample.available_memory_mb < need_mb + self._swap_reserve_mb

    def _swap(self, precision: Precision, sample: ResourceSample | None = None,
              memory: MemoryMode = MemoryMode.DEFAULT) -> tuple[float, bool]:
        """Make a ``precision`` variant active in ``memory`` mode; returns (milliseconds, paused?).
        Caller holds the swap lock."""
        started = time.perf_counter()
        if self._memory_too_tight(precision, sample, memory):
            self._swap_paused(precision, memory)
            self._swaps += 1
            return (time.perf_counter() - started) * 1000, True
        new = self._open(precision, memory)  # loads and self-tests while the old one keeps serving
        with self._cond:
            old, self._active = self._active, new
            close_now = False
            if old is not None:
                old.retired = True
                close_now = old.refs == 0 and not old.closed
                if close_now:
                    old.closed = True
        if close_now:
            old.close()  # type: ignore[union-attr]
        self._swaps += 1
        return (time.perf_counter() - started) * 1000, False

    def _swap_paused(self, precision: Precision, memory: MemoryMode = MemoryMode.DEFAULT) -> None:
        with self._cond:
            self._paused = True
            while self._active is not None and self._active.refs > 0:
                self._cond.wait()
            old = self._active
        new: _Slot | None = None
        try:
            if old is not None:
                old.closed = True
                old.close(trim=True)
            try:
                new = self._open(precision, memory)
            except EdgeSDKError as exc:
                if old is None:
                    raise
                # Bring the previous variant back before reporting the failure.
                try:
                    new = self._open(old.variant.precision, old.memory)
                except EdgeSDKError as restore_exc:
                    # Nothing serves now: callers get this reason (a BackendError) until a later
                    # switch loads a variant again.
                    self._unavailable = (f"switching to {precision} failed ({exc}) and reloading "
                                         f"{old.variant.precision} failed too ({restore_exc})")
                    raise BackendError(self._unavailable) from exc
                raise
        finally:
            with self._cond:
                self._active = new  # never the closed old slot
                if new is not None:
                    self._unavailable = None
                self._paused = False
                self._cond.notify_all()

    def pin(self, precision: str | Precision) -> PolicyEvent:
        """Run ``precision`` until :meth:`unpin`; returns once the swap is done.

        Raises :class:`ConfigError` for a precision the release cannot serve here, or the load
        error (the current variant keeps serving) when the switch fails.
        """
        precision = parse_precision(precision)
        if precision not in self.plan.candidates:
            why = rejected_reason(self.manifest, self.plan.profile.id, precision)
            raise ConfigError(f"cannot pin {precision}: no usable {precision} variant in this release for profile "
                              f"{self.plan.profile.id!r}" + (f" ({why})" if why else "")
                              + f" (available: {', '.join(p.value for p in self.plan.precisions)})")
        with self._swap_lock:
            before = self._active.variant.precision if self._active else None
            swap_ms, paused = (0.0, False)
            if Rung(precision) != self._serving():
                try:
                    swap_ms, paused = self._swap(precision)
                except EdgeSDKError as exc:
                    self.policy.record(PolicyEvent(EventKind.SWAP_FAILED, before, precision,
                                                   f"pin {precision} failed: {exc}", error=str(exc)))
                    raise
            event = dataclasses.replace(self.policy.pin(precision), from_precision=before, swap_ms=swap_ms, paused=paused)
            self.policy.record(event)
            return event

    def unpin(self) -> PolicyEvent:
        """Hand precision back to the policy; returns once any resulting swap is done."""
        with self._swap_lock:
            sample = None
            if self.monitor is not None:
                sample = self.monitor.source.sample()
            event = self.policy.unpin(sample, fits_beside=self._fits_beside)
            return self._carry_out(event, sample)

    def set_policy(self, policy: PolicyOverride | dict[str, Any]) -> PolicyEvent | None:
        """Apply runtime policy overrides now, without reloading (e.g. from the twin's desired state).

        ``policy`` (a :class:`PolicyOverride` or a mapping of its keys) replaces any earlier
        overrides: thresholds, hysteresis and dwell are laid over the settings the model was
        loaded with, so a key left out goes back to those. ``pin_precision`` pins (``None``
        unpins); a pin made by an earlier ``set_policy`` and left out now is released. Without a
        pin change the policy re-evaluates at once on a fresh reading, so a new threshold takes
        effect immediately. Returns the resulting decision, if any. Raises :class:`ConfigError`
        for an invalid policy or a precision this release cannot serve (nothing is changed then).
        """
        if not isinstance(policy, PolicyOverride):
            try:
                policy = PolicyOverride.model_validate(policy)
            except ValidationError as exc:
                raise ConfigError(describe_validation_error("policy", exc)) from None
        pin = policy.pin_precision
        if pin is not None and pin not in self.plan.candidates:
            raise ConfigError(f"cannot pin {pin}: no usable {pin} variant in this release for profile "
                              f"{self.plan.profile.id!r} (available: {', '.join(p.value for p in self.plan.precisions)})")
        with self._swap_lock:
            self.policy.configure(policy.apply_to(self._base_settings))
        if pin is not None:
            event = self.pin(pin)
            self._policy_pin = pin
            return event
        if policy.sets_pin or self._policy_pin is not None:
            self._policy_pin = None
            if self.policy.pinned is not None:
                return self.unpin()
        if self.monitor is None or self._closed:
            return None
        return self.evaluate()

    # ------------------------------------------------------------------------------------------
    # Introspection and lifetime

    @property
    def precision(self) -> Precision:
        slot = self._active
        if slot is None:
            raise self._no_variant()
        return slot.variant.precision

    @property
    def events(self) -> list[PolicyEvent]:
        """Recent decisions, oldest first (bounded)."""
        return list(self.policy.history)

    def subscribe(self, callback: Callable[[PolicyEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` on every decision; returns an unsubscribe function."""
        return self.policy.subscribe(callback)

    def info(self) -> ModelInfo:
        """Backend, precision, variant, threads, load time, memory, pinned?, last decision."""
        slot = self._active
        if slot is None:
            raise self._no_variant()
        last = self.policy.last_event
        variant = slot.variant
        return ModelInfo(
            model=self.manifest.model, version=self.manifest.version, release_dir=str(self.release_dir),
            profile=self.plan.profile.id, backend=variant.backend, target=variant.target.value,
            precision=variant.precision, variant=variant.id, threads=self._options.threads,
            load_time_ms=round(slot.load_ms, 3), memory_mb=round(slot.rss_delta_mb, 2),
            pinned=self.policy.pinned is not None, available_precisions=[p.value for p in self.plan.precisions],
            last_decision=last.as_dict() if last else None, selection=self.plan.note,
            monitoring=self.monitor is not None and self.monitor.running, swaps=self._swaps,
            memory_mode=slot.memory.value, ladder=self.policy.memory_ladder.describe(),
            device=self.device.as_dict() if self.device is not None else None,
        )

    def close(self) -> None:
        """Stop monitoring and release the sessions (waits for calls in flight)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self.monitor is not None and self._owns_monitor:
            self.monitor.stop()
        with self._swap_lock, self._cond:
            self._closed = True
            slot, self._active = self._active, None
            if slot is not None:
                slot.retired = True
                close_now = slot.refs == 0 and not slot.closed
                if close_now:
                    slot.closed = True
        if slot is not None and close_now:
            slot.close()

    def __enter__(self) -> EdgeModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        slot = self._active
        state = f"{slot.variant.id} ({slot.variant.backend}, {slot.variant.precision})" if slot else "closed"
        return f"<EdgeModel {self.manifest.model} v{self.manifest.version}: {state}>"


def _check_finite(inputs: dict[str, np.ndarray], variant: Variant) -> None:
    if isinstance(inputs, dict):
        for name, array in inputs.items():
            if isinstance(array, np.ndarray) and array.dtype.kind in "fc" and not np.isfinite(array).all():
                bad = int(array.size - np.count_nonzero(np.isfinite(array)))
                raise InputError(f"input {name!r}: {bad} of {array.size} values are NaN or infinite, which the "
                                 f"{variant.precision} variant {variant.id} cannot represent "
                                 "(load with reject_non_finite=False to pass them through)")


def combine_errors(errors: list[EdgeSDKError]) -> EdgeSDKError:
    """One error for several failed attempts, of the first attempt's kind (a single one as is)."""
    if len(errors) == 1:
        return errors[0]
    message = "no variant could be loaded: " + "; ".join(str(e) for e in errors)
    kind = next((type(e) for e in errors if not isinstance(e, MissingDependencyError)), BackendError)
    try:
        return kind(message)
    except TypeError:  # an error class with a structured constructor
        return BackendError(message)
