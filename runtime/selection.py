"""Which variants of a release may run here: per precision, the candidates in preference order.

The device profile decides: variants built for it (or, when the profile was auto-detected and the
release was built for another profile of the same architecture, those), precisions the profile
allows, targets in the profile's order of preference; ``rejected`` variants never run. The
runtime then walks each precision's candidates until one loads (a backend whose package is not
installed is skipped).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..manifest import Manifest, Variant
from ..profiles import DeviceProfile, builtin_profiles
from ..types import PRECISION_LADDER, TARGET_ARCHES, Precision


@dataclass(frozen=True)
class Plan:
    """The variants this device may run, cheapest precision last."""

    profile: DeviceProfile
    candidates: dict[Precision, list[Variant]]  # ladder order; within a precision, best first
    note: str  # how the variants were chosen, for info() and logs

    @property
    def precisions(self) -> list[Precision]:
        return list(self.candidates)


def _allowed_precisions(profile: DeviceProfile) -> set[Precision]:
    allowed = set(profile.precisions)
    if Precision.INT8 in allowed:
        allowed.add(Precision.MIXED)  # INT8 with FP32 islands runs wherever INT8 does
    return allowed


def plan_variants(manifest: Manifest, profile: DeviceProfile, *, backend: str | None = None,
                  detected: bool = False) -> Plan:
    """Candidates per precision for ``profile`` (optionally restricted to one ``backend``).

    Raises :class:`ConfigError` naming what the release has when nothing fits.
    """
    where = f"release {manifest.model} v{manifest.version}"
    note = f"variants built for profile {profile.id}"
    variants = manifest.variants_for(profile.id, ok_only=False)
    if not variants and detected:
        # The auto-detected profile is a guess; a release built for a sibling profile of the
        # same architecture runs fine here.
        known = builtin_profiles()
        variants = [v for v in manifest.variants if profile.arch in TARGET_ARCHES[v.target]
                    and any(p in known and known[p].arch == profile.arch for p in v.profiles)]
        note = f"no variant built for the detected profile {profile.id}; using the release's {profile.arch} variants"
    if not variants:
        built_for = sorted({p for v in manifest.variants for p in v.profiles})
        raise ConfigError(f"{where} has no variant for device profile {profile.id!r} (built for: {', '.join(built_for) or 'none'})")
    ok = [v for v in variants if v.ok]
    if not ok:
        reasons = "; ".join(f"{v.id}: {v.reason or 'rejected'}" for v in variants)
        raise ConfigError(f"{where}: every variant for profile {profile.id!r} was rejected by validation ({reasons})")
    if backend is not None:
        chosen = [v for v in ok if v.backend == backend]
        if not chosen:
            have = sorted({v.backend for v in ok})
            raise ConfigError(f"{where} has no usable variant for backend {backend!r} on profile {profile.id!r} "
                              f"(backends: {', '.join(have)})")
        ok = chosen
    allowed = _allowed_precisions(profile)
    runnable = [v for v in ok if v.precision in allowed]
    if not runnable:
        raise ConfigError(f"{where}: profile {profile.id!r} allows {', '.join(p.value for p in profile.precisions)}, "
                          f"but the usable variants are {', '.join(sorted({v.precision.value for v in ok}))}")
    order = {t: i for i, t in enumerate(profile.targets)}
    candidates: dict[Precision, list[Variant]] = {}
    for precision in PRECISION_LADDER:
        found = [v for v in runnable if v.precision == precision]
        if found:
            candidates[precision] = sorted(found, key=lambda v: order.get(v.target, len(order)))
    return Plan(profile=profile, candidates=candidates, note=note)


def rejected_reason(manifest: Manifest, profile_id: str, precision: Precision) -> str | None:
    """Why the release has no usable ``precision`` variant for ``profile_id``, if it was rejected."""
    rejected = [v for v in manifest.variants if v.precision == precision and not v.ok
                and (profile_id in v.profiles or not manifest.variants_for(profile_id, ok_only=False))]
    return "; ".join(f"{v.id} was rejected: {v.reason or 'no reason given'}" for v in rejected) or None
