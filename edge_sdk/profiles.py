"""Device profiles: what a kind of device is and what it runs.

Profiles are YAML files shipped in ``edge_sdk.device_profiles`` and validated on load; an
unknown key or bad value is a :class:`~edge_sdk.errors.ConfigError` naming the file and key.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from .config import StrictModel, load_yaml_model
from .errors import ConfigError
from .types import TARGET_ARCHES, TARGET_PRECISIONS, Arch, Precision, Target


class CPU(StrictModel):
    model: str
    cores: int = Field(ge=1, le=512)
    big_cores: list[int] = Field(default_factory=list, description="core ids of the fast cluster")
    features: list[str] = Field(default_factory=list, description="ISA features as /proc/cpuinfo names them")
    max_mhz: int | None = Field(default=None, ge=1)


class Thresholds(StrictModel):
    """Conditions under which a precision may run; below them the policy steps down."""

    min_free_memory_mb: float = Field(default=0, ge=0)
    max_cpu_percent: float = Field(default=100, gt=0, le=100)
    max_temperature_c: float = Field(default=200, gt=0)


class Hysteresis(StrictModel):
    """Margins a signal must recover by before the policy steps back up."""

    memory_mb: float = Field(default=128, ge=0)
    cpu_percent: float = Field(default=10, ge=0)
    temperature_c: float = Field(default=5, ge=0)


class PolicySettings(StrictModel):
    thresholds: dict[Precision, Thresholds] = Field(default_factory=dict)
    hysteresis: Hysteresis = Hysteresis()
    min_dwell_s: float = Field(default=10.0, ge=0)


class Detect(StrictModel):
    """Hints for ``--profile auto``: strings matched in /proc/device-tree/model or the CPU name."""

    device_tree_model: list[str] = Field(default_factory=list)
    cpu_model: list[str] = Field(default_factory=list)


class DeviceProfile(StrictModel):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    name: str
    arch: Arch
    soc: str | None = None
    cpu: CPU
    ram_mb: int = Field(ge=64)
    accelerators: list[str] = Field(default_factory=list)
    targets: list[Target] = Field(min_length=1, description="in order of preference")
    precisions: list[Precision] = Field(min_length=1)
    threads: int = Field(ge=1)
    policy: PolicySettings = PolicySettings()
    detect: Detect = Detect()
    generic: bool = False

    @field_validator("targets", "precisions")
    @classmethod
    def _no_duplicates(cls, value: list) -> list:
        if len(set(value)) != len(value):
            raise ValueError("listed twice")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        for target in self.targets:
            if self.arch not in TARGET_ARCHES[target]:
                raise ValueError(f"targets: {target} has no runtime for {self.arch}")
        runnable = set().union(*(TARGET_PRECISIONS[t] for t in self.targets))
        for precision in self.precisions:
            if precision not in runnable:
                raise ValueError(f"precisions: none of the targets {[str(t) for t in self.targets]} can run {precision}")
        for precision in self.policy.thresholds:
            if precision not in self.precisions:
                raise ValueError(f"policy.thresholds: {precision} is not in precisions")
        for core in self.cpu.big_cores:
            if core >= self.cpu.cores:
                raise ValueError(f"cpu.big_cores: core id {core} >= cores ({self.cpu.cores})")
        if self.threads > self.cpu.cores:
            raise ValueError(f"threads: {self.threads} > cpu.cores ({self.cpu.cores})")
        return self


def load_profile_file(path: Path | str) -> DeviceProfile:
    """Load and validate one profile YAML file; the id must match the file name."""
    path = Path(path)
    profile = load_yaml_model(DeviceProfile, path)
    if profile.id != path.stem:
        raise ConfigError(f"{path}: id: {profile.id!r} does not match the file name {path.stem!r}")
    return profile


@lru_cache(maxsize=1)
def builtin_profiles() -> dict[str, DeviceProfile]:
    """All profiles shipped with the SDK, by id."""
    folder = resources.files("edge_sdk.device_profiles")
    profiles = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            with resources.as_file(entry) as path:
                profile = load_profile_file(path)
            profiles[profile.id] = profile
    return profiles


#: Profile (and precision) value meaning "decide here": detect this machine's profile.
AUTO = "auto"


def get_profile(profile_id: str) -> DeviceProfile:
    """A built-in profile by id, or a profile YAML file by path; ``auto`` detects this machine."""
    return resolve_profile(profile_id).profile


@dataclass(frozen=True)
class ResolvedProfile:
    """The profile a caller's choice stands for; ``detection`` is set when :data:`AUTO` picked it
    (then a release built for a sibling profile of the same architecture may serve too)."""

    profile: DeviceProfile
    detection: Detection | None = None

    @property
    def detected(self) -> bool:
        return self.detection is not None


def resolve_profile(spec: str | DeviceProfile | ResolvedProfile = AUTO) -> ResolvedProfile:
    """The one place :data:`AUTO` is interpreted: a profile id, a YAML path, a profile, or ``auto``."""
    if isinstance(spec, ResolvedProfile):
        return spec
    if isinstance(spec, DeviceProfile):
        return ResolvedProfile(spec)
    if spec == AUTO:
        detection = detect_profile()
        return ResolvedProfile(detection.profile, detection)
    if spec.endswith((".yaml", ".yml")) or os.sep in spec:
        return ResolvedProfile(load_profile_file(spec))
    profiles = builtin_profiles()
    try:
        return ResolvedProfile(profiles[spec])
    except KeyError:
        raise ConfigError(
            f"unknown device profile {spec!r} (known: {', '.join(profiles)}; or a path to a profile .yaml)"
        ) from None


# ---------------------------------------------------------------------------------------------
# Detection


@dataclass(frozen=True)
class MachineFacts:
    arch: str
    cores: int
    ram_mb: int
    cpu_model: str
    features: frozenset[str]
    device_tree_model: str

    @classmethod
    def read(cls, root: Path = Path("/")) -> MachineFacts:
        import psutil

        cpuinfo = _read_text(root / "proc/cpuinfo")
        flags: set[str] = set()
        cpu_model = ""
        for line in cpuinfo.splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("flags", "features"):
                flags.update(value.split())
            elif key in ("model name", "cpu model", "hardware") and not cpu_model:
                cpu_model = value.strip()
        if "asimd" in flags:
            flags.add("neon")
        if "asimddp" in flags:
            flags.add("dotprod")
        dt_model = _read_text(root / "proc/device-tree/model").rstrip("\x00").strip()
        arch = platform.machine().lower()
        arch = {"arm64": "aarch64", "amd64": "x86_64", "armv8l": "armv7l"}.get(arch, arch)
        return cls(
            arch=arch,
            cores=os.cpu_count() or 1,
            ram_mb=int(psutil.virtual_memory().total / 2**20),
            cpu_model=cpu_model,
            features=frozenset(flags),
            device_tree_model=dt_model,
        )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class Detection:
    profile: DeviceProfile
    score: float
    reasons: tuple[str, ...]

    def explain(self) -> str:
        return f"picked profile {self.profile.id!r}: " + "; ".join(self.reasons)


def detect_profile(facts: MachineFacts | None = None, profiles: dict[str, DeviceProfile] | None = None) -> Detection:
    """Pick the built-in profile closest to this machine and say why.

    A device-tree or CPU-model hint that matches wins outright; otherwise profiles of the same
    architecture are scored on the ISA features they require that this CPU has, core count and
    RAM, and a ``generic`` profile is the fallback.
    """
    facts = facts or MachineFacts.read()
    profiles = profiles or builtin_profiles()
    candidates = [p for p in profiles.values() if p.arch.value == facts.arch]
    if not candidates:
        raise ConfigError(f"no device profile for architecture {facts.arch!r}; pass --profile ID explicitly")
    best: Detection | None = None
    for profile in candidates:
        score, reasons = 0.0, [f"arch {facts.arch}"]
        hints = [h for h in profile.detect.device_tree_model if h.lower() in facts.device_tree_model.lower()]
        hints += [h for h in profile.detect.cpu_model if re.search(h, facts.cpu_model, re.IGNORECASE)]
        if hints:
            score += 100
            reasons.append(f"matched {hints[0]!r} in {facts.device_tree_model or facts.cpu_model!r}")
        missing = [f for f in profile.cpu.features if f not in facts.features]
        if missing and not profile.generic:
            # A profile that assumes ISA features this CPU lacks would pick kernels that crash.
            continue
        score += len(profile.cpu.features)
        if profile.cpu.features:
            reasons.append(f"CPU has {', '.join(profile.cpu.features)}")
        score -= abs(profile.cpu.cores - facts.cores) * 0.5
        score -= abs(profile.ram_mb - facts.ram_mb) / 4096
        reasons.append(f"{facts.cores} cores vs {profile.cpu.cores}, {facts.ram_mb} MB RAM vs {profile.ram_mb}")
        if profile.generic:
            score -= 5
            reasons.append("generic fallback")
        if best is None or score > best.score:
            best = Detection(profile, score, tuple(reasons))
    if best is None:
        raise ConfigError(f"no device profile fits this {facts.arch} machine; pass --profile ID explicitly")
    return best
