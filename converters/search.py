"""The recipe search: a target's recipes for one precision, tried in order, the best candidate kept.

For each recipe of :meth:`ExportTarget.recipes` (see ``targets/base.py`` for what a recipe is):

1. it is skipped, with the reason, when it does not apply to this model, needs calibration data
   there is not, is a :attr:`When.FALLBACK` and an earlier recipe was already accepted with a clear
   accuracy margin (a drop within half the budget: the validation sample is small, so a candidate
   near the budget may well be over it on data the gate never saw, and a fallback that quantizes
   less is worth measuring beside it; measured on magika: 0.66 points on validation, 1.36 held
   out, where the Conv/MatMul-only fallback loses none) (or, keeping
   nodes in FP32 to recover accuracy, no earlier candidate missed the accuracy budget), or names a recipe
   (``only_after_failure_of``) that did not fail;
2. otherwise ``attempt(recipe)`` exports and validates it: a failure is :class:`RecipeFailed`
   carrying one clean line (step, recipe, cause), and the next recipe is tried;
3. every candidate that ran is judged by the gate (accuracy budget, then speed).

The best accepted candidate becomes the variant: candidates whose speed verdict is clear beat
inconclusive ones; among those, a later candidate replaces the current best only when it is
clearly faster (its latency-ratio interval lies wholly below the best's, and its ratio is at least
10% lower) or, at a speed tie, clearly smaller (under 90% of the size) or, at a size tie too, more
accurate on the validation samples (recipes that differ only in calibration make files of one size
and speed). Recipe order breaks every other tie, so the same measurements always choose the same recipe. With nothing accepted, the most accurate candidate
stands as the rejected variant, its reason naming what every recipe gave.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..manifest import Validation
from ..report import RecipeAttempt
from ..types import RecipeOutcome, SpeedVerdict
from .targets.base import ExportResult, ModelFacts, Recipe, When
from .validate import SpeedComparison, accuracy_drop, judged_drop

SMALLER = 0.9  # at a speed tie, a candidate wins on size only below this fraction of the best's size
CLEAR_MARGIN = 0.5  # an accepted candidate's drop within this share of the budget stops the fallbacks


class RecipeFailed(Exception):
    """A recipe gave no runnable artifact; ``line`` says where and why, in the SDK's words."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


@dataclass
class Candidate:
    """A recipe's validated artifact (its files sit in a scratch folder until it is chosen)."""

    recipe: Recipe
    result: ExportResult
    validation: Validation
    size_bytes: int
    speed: SpeedComparison | None = None
    verdict: SpeedVerdict | None = None
    reason: str | None = None  # why the gate rejected it; None: accepted
    inaccurate: bool = False  # rejected on accuracy (keeping nodes in FP32 may help), not on speed

    @property
    def accepted(self) -> bool:
        return self.reason is None

    @property
    def drop(self) -> float:
        """The drop the gate judged (points; see ``validate.judged_drop``)."""
        return judged_drop(self.validation)


@dataclass
class SearchResult:
    candidates: list[Candidate] = field(default_factory=list)
    attempts: list[RecipeAttempt] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # one per recipe that failed or was rejected
    chosen: Candidate | None = None
    max_drop: float | None = None  # the accuracy budget the candidates were judged by
    _recipes: list[tuple[str, bool]] = field(default_factory=list)  # each line's recipe, and whether it names it
    _inaccurate: dict[int, tuple[str, Validation]] = field(default_factory=dict)  # line index -> recipe, validation

    def miss(self, recipe: Recipe, line: str, inaccurate: Validation | None = None) -> None:
        """Record why ``recipe`` gave no accepted candidate (``inaccurate``: it missed the budget with these figures)."""
        if inaccurate is not None:
            self._inaccurate[len(self.lines)] = (recipe.name, inaccurate)
        self.lines.append(line)
        self._recipes.append((recipe.name, line.startswith(f"{recipe.name}: ")))

    def summary(self) -> str:
        """The lines as one; recipes that missed for the same cause share it ("a, b: cause"), and
        several accuracy misses share one clause with each recipe's figure."""
        causes: dict[str, list[tuple[str, bool]]] = {}
        grouped = len(self._inaccurate) > 1 and self.max_drop is not None
        for index, ((name, named), line) in enumerate(zip(self._recipes, self.lines, strict=True)):
            if grouped and index in self._inaccurate:
                causes.setdefault(self._accuracy_clause(), [])
                continue
            causes.setdefault(line.removeprefix(f"{name}: ") if named else line, []).append((name, named))
        # A target's one plain recipe (named after its precision) goes unnamed, unless it shares a cause.
        return "; ".join(f"{', '.join(name for name, _ in group)}: {cause}" if len(group) > 1 or group and group[0][1]
                         else cause for cause, group in causes.items())

    def _accuracy_clause(self) -> str:
        misses = list(self._inaccurate.values())
        what = accuracy_drop(misses[0][1])[0]
        figures = ", ".join(f"{name} {accuracy_drop(v)[1]:.2f}" + (f" ±{v.metric_margin:.2f}" if v.metric_margin else "")
                            for name, v in misses)
        return f"{what} dropped more than max_accuracy_drop {self.max_drop:g} vs FP32: {figures} points"

    def most_accurate(self) -> Candidate | None:
        """The candidate that stands for a rejected variant: one that changed something, then the most accurate."""
        return min(self.candidates, key=lambda c: (c.result.nodes_quantized == 0, c.drop), default=None)


def run_recipes(recipes: Sequence[Recipe], attempt: Callable[[Recipe], Candidate], *, facts: ModelFacts,
                has_calibration: bool, refuse: Callable[[Recipe], str | None] = lambda recipe: None,
                max_drop: float | None = None) -> SearchResult:
    """Try ``recipes`` in order (``refuse`` adds the caller's own reasons to skip one) and choose.
    ``max_drop`` is the gate's accuracy budget in points (None: any accepted candidate stops the
    fallbacks)."""
    search = SearchResult(max_drop=max_drop)
    failed: set[str] = set()
    for recipe in recipes:
        skip = _skip_reason(recipe, search, failed, facts, has_calibration, max_drop) or refuse(recipe)
        if skip is not None:
            search.attempts.append(RecipeAttempt(recipe=recipe.name, outcome=RecipeOutcome.SKIPPED, reason=skip))
            continue
        try:
            candidate = attempt(recipe)
        except RecipeFailed as failure:
            failed.add(recipe.name)
            search.miss(recipe, failure.line)
            search.attempts.append(RecipeAttempt(recipe=recipe.name, outcome=RecipeOutcome.FAILED, reason=failure.line))
            continue
        search.candidates.append(candidate)
        if not candidate.accepted:
            search.miss(recipe, recipe.says(candidate.reason), candidate.validation if candidate.inaccurate else None)
    search.chosen = choose(search.candidates)
    for candidate in search.candidates:
        outcome = (RecipeOutcome.CHOSEN if candidate is search.chosen
                   else RecipeOutcome.ACCEPTED if candidate.accepted else RecipeOutcome.REJECTED)
        search.attempts.append(RecipeAttempt(
            recipe=candidate.recipe.name, outcome=outcome, reason=candidate.reason, size_bytes=candidate.size_bytes,
            accuracy_drop=round(accuracy_drop(candidate.validation)[1], 4),
            latency_ratio=round(candidate.speed.ratio, 4) if candidate.speed else None, speed=candidate.verdict))
    order = {r.name: i for i, r in enumerate(recipes)}
    search.attempts.sort(key=lambda a: order[a.recipe])
    return search


def choose(candidates: Sequence[Candidate]) -> Candidate | None:
    """The best accepted candidate (module docstring), or None."""
    accepted = [c for c in candidates if c.accepted]
    clear = [c for c in accepted if c.verdict != SpeedVerdict.INCONCLUSIVE]
    best = None
    for candidate in clear or accepted:
        if best is None or _better(candidate, best):
            best = candidate
    return best


def _better(candidate: Candidate, best: Candidate) -> bool:
    if candidate.speed is not None and best.speed is not None:
        if candidate.speed.clearly_faster_than(best.speed):
            return True
        if best.speed.clearly_faster_than(candidate.speed):
            return False
    if candidate.size_bytes < SMALLER * best.size_bytes:
        return True
    if best.size_bytes < SMALLER * candidate.size_bytes:
        return False
    return candidate.drop < best.drop


def _skip_reason(recipe: Recipe, search: SearchResult, failed: set[str], facts: ModelFacts,
                 has_calibration: bool, max_drop: float | None) -> str | None:
    if recipe.only_after_failure_of is not None and recipe.only_after_failure_of not in failed:
        return f"only tried when {recipe.only_after_failure_of} fails"
    margin = None if max_drop is None else CLEAR_MARGIN * max_drop
    if recipe.when == When.FALLBACK and any(c.accepted and (margin is None or c.drop <= margin) for c in search.candidates):
        return "a fallback, and an earlier recipe was accepted" + ("" if margin is None else f" within {margin:g} points")
    if recipe.when == When.FALLBACK and (recipe.keeps_sensitive_nodes or recipe.recovers_accuracy) \
            and not any(c.inaccurate for c in search.candidates):
        return "no earlier candidate missed the accuracy budget"
    return recipe.skip_reason(facts, has_calibration)
