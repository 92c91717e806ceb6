"""The memory ladder: which (precision, backend memory mode) steps save memory, by measurement.

A *rung* is a precision served in one :class:`~edge_sdk.types.MemoryMode`; rungs are ordered by
quality (FP32 before FP16 before MIXED before INT8; a precision's default mode before its lean
mode, which computes the same numbers more slowly). Each rung's footprint is the peak RSS measured
for the variant that serves it on its backend (the device's own figures when it has measured
them, else the build machine's, see :mod:`~edge_sdk.runtime.footprint`).

A *memory step* from rung ``c`` is a lower rung whose footprint is at most ``(1 - min_saving)``
of ``c``'s: stepping there frees at least that share of what ``c`` takes. Lower rungs that do not
(FP16 on onnxruntime x86, which casts its weights back to FP32 at load and takes *more* memory,
or a lean mode that changes nothing on that backend) are skipped, and :meth:`Ladder.memory_steps`
says why. Without figures for a rung the ladder falls back to what it was before measurements
existed: every lower precision counts as a memory step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ..manifest import Footprint
from ..types import PRECISION_LADDER, MemoryMode, Precision

DEFAULT_MIN_SAVING = 0.10


class Rung(NamedTuple):
    """One step of the ladder: a precision served in a backend memory mode."""

    precision: Precision
    memory: MemoryMode = MemoryMode.DEFAULT

    def __str__(self) -> str:
        return self.precision.value + ("" if self.memory is MemoryMode.DEFAULT else f" ({self.memory.value})")

    @property
    def quality(self) -> tuple[int, int]:
        """Sort key: lower is better (more accurate, then faster)."""
        return PRECISION_LADDER.index(self.precision), 0 if self.memory is MemoryMode.DEFAULT else 1


@dataclass(frozen=True)
class Ladder:
    """Rungs best first, each with its measured footprint (MB of peak RSS) where known."""

    rungs: list[Rung]
    footprint_mb: dict[Rung, float] = field(default_factory=dict)
    min_saving: float = DEFAULT_MIN_SAVING
    sources: dict[Rung, str] = field(default_factory=dict)  # "device" / "build" per rung with figures

    def footprint(self, rung: Rung) -> float | None:
        return self.footprint_mb.get(rung)

    def below(self, rung: Rung) -> list[Rung]:
        """Rungs of lower quality than ``rung``, best first."""
        return [r for r in self.rungs if r.quality > rung.quality]

    def above(self, rung: Rung) -> list[Rung]:
        """Rungs of higher quality than ``rung``, best first."""
        return [r for r in self.rungs if r.quality < rung.quality]

    def saving(self, current: Rung, target: Rung) -> float | None:
        """Share of ``current``'s footprint that stepping to ``target`` frees (negative: costs more)."""
        have, want = self.footprint(current), self.footprint(target)
        if have is None or want is None or have <= 0:
            return None
        return (have - want) / have

    def _skip_reason(self, rung: Rung, current: Rung, saving: float) -> str:
        return (f"{rung} is not a memory step from {current}: measured {self.footprint(rung):.0f} MB vs "
                f"{self.footprint(current):.0f} MB ({'saves' if saving >= 0 else 'costs'} {abs(saving) * 100:.0f}%, "
                f"a step must save >= {self.min_saving * 100:.0f}%)")

    def _is_step(self, current: Rung, rung: Rung) -> tuple[bool, str | None]:
        saving = self.saving(current, rung)
        if saving is None:
            # Unmeasured: a lower precision is assumed to save (the ladder before figures existed);
            # a lean mode is only ever a rung when it was measured.
            return rung.memory is MemoryMode.DEFAULT and rung.precision != current.precision, None
        if saving >= self.min_saving:
            return True, None
        return False, self._skip_reason(rung, current, saving)

    def memory_steps(self, current: Rung) -> tuple[list[Rung], list[str]]:
        """(lower rungs that save at least ``min_saving`` of ``current``'s memory, best first;
        one reason per lower rung that does not)."""
        steps, skipped = [], []
        for rung in self.below(current):
            step, why = self._is_step(current, rung)
            if step:
                steps.append(rung)
            elif why:
                skipped.append(why)
        return steps, skipped

    def chain(self) -> tuple[list[Rung], list[str]]:
        """The memory ladder from the top rung, walked in quality order: a rung is a step when it
        saves ``min_saving`` of the last step's footprint; the reasons for the rungs that are not."""
        if not self.rungs:
            return [], []
        chain, skipped = [self.rungs[0]], []
        for rung in self.rungs[1:]:
            step, why = self._is_step(chain[-1], rung)
            if step:
                chain.append(rung)
            elif why:
                skipped.append(why)
        return chain, skipped

    def describe(self) -> dict[str, object]:
        """JSON-ready: the chain, skipped rungs with reasons, footprint per rung."""
        chain, skipped = self.chain()
        return {"memory_steps": [str(r) for r in chain], "skipped": skipped,
                "footprint_mb": {str(r): round(mb, 1) for r, mb in self.footprint_mb.items()},
                "sources": {str(r): s for r, s in self.sources.items()}, "min_saving": self.min_saving}


def build_ladder(precisions: Sequence[Precision], footprints: Mapping[Precision, tuple[Footprint, str]] | None = None,
                 *, min_saving: float = DEFAULT_MIN_SAVING, lean_modes: bool = True) -> Ladder:
    """The ladder of ``precisions`` with ``footprints`` (per precision: the serving variant's
    footprint and where it was measured). A lean rung exists where its figures do."""
    footprints = footprints or {}
    rungs: list[Rung] = []
    sizes: dict[Rung, float] = {}
    sources: dict[Rung, str] = {}
    for precision in sorted(set(precisions), key=PRECISION_LADDER.index):
        default = Rung(precision)
        rungs.append(default)
        measured = footprints.get(precision)
        if measured is None:
            continue
        footprint, source = measured
        sizes[default], sources[default] = footprint.default.peak_rss_mb, source
        if lean_modes and footprint.lean is not None:
            lean = Rung(precision, MemoryMode.LEAN)
            rungs.append(lean)
            sizes[lean], sources[lean] = footprint.lean.peak_rss_mb, source
    return Ladder(rungs=rungs, footprint_mb=sizes, min_saving=min_saving, sources=sources)
