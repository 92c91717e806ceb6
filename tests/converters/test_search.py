"""The recipe search on fixed candidates: what is tried, what is skipped and why, which candidate wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.converters.search import Candidate, RecipeFailed, choose, run_recipes
from edge_sdk.converters.targets.base import ExportResult, ModelFacts, Recipe, When
from edge_sdk.converters.validate import SpeedComparison
from edge_sdk.manifest import Validation
from edge_sdk.types import Precision, SpeedVerdict

CONV_NET = ModelFacts(op_counts={"Conv": 10}, weight_params={"Conv": 1000})
INT8 = Precision.INT8


def _recipe(name: str, **options) -> Recipe:
    return Recipe(name, INT8, f"recipe {name}", **options)


def _candidate(recipe: Recipe, *, drop: float = 0.0, ratio: float | None = 0.5, size: int = 100, reason: str | None = None,
               width: float = 0.02) -> Candidate:
    speed = None if ratio is None else SpeedComparison(1.0, ratio, ratio, ratio - width, ratio + width, 50)
    verdict = None if speed is None else speed.verdict(1.0)
    return Candidate(recipe, ExportResult(files=[Path("x")], inputs=[], outputs=[], nodes_quantized=5),
                     Validation(samples=8, max_abs_error=0.1, top1_agreement=1 - drop / 100), size, speed, verdict,
                     reason, inaccurate=reason is not None and "dropped" in reason)


def test_failures_are_one_line_each_and_the_next_recipe_is_tried():
    first, workaround, other = _recipe("a"), _recipe("a-workaround", only_after_failure_of="a"), _recipe("b")

    def attempt(recipe):
        if recipe is first:
            raise RecipeFailed("a: export failed: ValueError in onnxruntime (qdq_quantizer.py, _adjust)")
        return _candidate(recipe)

    search = run_recipes([first, workaround, other], attempt, facts=CONV_NET, has_calibration=True)
    assert [(a.recipe, a.outcome) for a in search.attempts] == [("a", "failed"), ("a-workaround", "chosen"), ("b", "accepted")]
    assert search.lines == ["a: export failed: ValueError in onnxruntime (qdq_quantizer.py, _adjust)"]
    assert search.chosen.recipe is workaround  # as fast and as small as b: the earlier recipe wins the tie


def test_the_reason_line_names_a_shared_cause_once_for_every_recipe_that_met_it():
    recipes = [_recipe(name) for name in ("a", "b", "c")]

    def attempt(recipe):
        if recipe.name == "b":
            return _candidate(recipe, reason="top1 dropped 3.00 points vs FP32 (> max_accuracy_drop 1)")
        raise RecipeFailed(f"{recipe.name}: nothing was quantized (the file is still FP32)")

    search = run_recipes(recipes, attempt, facts=CONV_NET, has_calibration=True)
    assert search.chosen is None and len(search.lines) == 3
    assert search.summary() == ("a, c: nothing was quantized (the file is still FP32); "
                                "b: top1 dropped 3.00 points vs FP32 (> max_accuracy_drop 1)")

    # A target's plain recipe (named after its precision) is unnamed alone, and named beside another.
    plain, fallback = _recipe("int8"), _recipe("int8-dynamic-range", when=When.FALLBACK)

    def both_fail(recipe):
        raise RecipeFailed(recipe.says("export failed: no TFLite kernel for Erf"))

    search = run_recipes([plain, fallback], both_fail, facts=CONV_NET, has_calibration=True)
    assert search.summary() == "int8, int8-dynamic-range: export failed: no TFLite kernel for Erf"
    search = run_recipes([plain], both_fail, facts=CONV_NET, has_calibration=True)
    assert search.summary() == "export failed: no TFLite kernel for Erf"


def test_several_accuracy_misses_share_one_clause_with_each_recipes_figure():
    recipes = [_recipe(name) for name in ("int8", "int8-kl", "int8-keep-ends", "int8-broken")]

    def attempt(recipe):
        if recipe.name == "int8-broken":
            raise RecipeFailed("int8-broken: export failed: pnnx crashed")
        drop = {"int8": 3.0, "int8-kl": 2.5, "int8-keep-ends": 1.5}[recipe.name]
        return _candidate(recipe, drop=drop, reason=f"top-1 agreement dropped {drop:.2f} points vs FP32 (> max_accuracy_drop 1)")

    search = run_recipes(recipes, attempt, facts=CONV_NET, has_calibration=True, max_drop=1.0)
    assert search.summary() == ("top-1 agreement dropped more than max_accuracy_drop 1 vs FP32: int8 3.00, "
                                "int8-kl 2.50, int8-keep-ends 1.50 points; int8-broken: export failed: pnnx crashed")


def test_fallbacks_run_only_while_nothing_is_accepted_and_skips_say_why():
    tried = []
    recipes = [_recipe("static", needs_calibration=True), _recipe("per-tensor", when=When.FALLBACK),
               _recipe("dynamic-matmul", applies=lambda facts: None if facts.matmul_heavy else "conv net"),
               _recipe("keep-sensitive", when=When.FALLBACK, keeps_sensitive_nodes=True)]

    def attempt(recipe):
        tried.append(recipe.name)
        return _candidate(recipe)

    search = run_recipes(recipes, attempt, facts=CONV_NET, has_calibration=False)
    assert tried == ["per-tensor"]
    reasons = {a.recipe: a.reason for a in search.attempts if a.outcome == "skipped"}
    assert reasons == {"static": "needs calibration data", "dynamic-matmul": "conv net",
                       "keep-sensitive": "a fallback, and an earlier recipe was accepted"}


def test_an_accepted_candidate_near_the_budget_does_not_stop_the_fallbacks():
    """A drop over half the budget on the small validation sample may be over it on unseen data:
    the fallback that quantizes less is measured too, and at a speed and size tie it wins."""
    static, conv_matmul = _recipe("qdq-per-channel"), _recipe("qdq-conv-matmul", when=When.FALLBACK)
    drops = {"qdq-per-channel": 0.66, "qdq-conv-matmul": 0.0}
    thin = run_recipes([static, conv_matmul], lambda r: _candidate(r, drop=drops[r.name]), facts=CONV_NET,
                       has_calibration=True, max_drop=1.0)
    assert [a.outcome for a in thin.attempts] == ["accepted", "chosen"]
    drops["qdq-per-channel"] = 0.4  # a clear margin: the fallback is not needed
    clear = run_recipes([static, conv_matmul], lambda r: _candidate(r, drop=drops[r.name]), facts=CONV_NET,
                        has_calibration=True, max_drop=1.0)
    assert [(a.outcome, a.reason) for a in clear.attempts] == [
        ("chosen", None), ("skipped", "a fallback, and an earlier recipe was accepted within 0.5 points")]


def test_keeping_nodes_in_fp32_is_tried_only_after_an_accuracy_miss():
    plain, keep = _recipe("fp16"), _recipe("fp16-keep-sensitive", when=When.FALLBACK, keeps_sensitive_nodes=True)
    slow = run_recipes([plain, keep], lambda r: _candidate(r, ratio=3.0, reason="slower than FP32"), facts=CONV_NET,
                       has_calibration=True)
    assert [a.outcome for a in slow.attempts] == ["rejected", "skipped"] and slow.chosen is None
    inaccurate = run_recipes([plain, keep], lambda r: _candidate(r, drop=5, reason="top-1 agreement dropped 5.00 points")
                             if r is plain else _candidate(r), facts=CONV_NET, has_calibration=True)
    assert inaccurate.chosen.recipe is keep
    ends = _recipe("int8-keep-ends", when=When.FALLBACK, recovers_accuracy=True)
    slow = run_recipes([plain, ends], lambda r: _candidate(r, ratio=3.0, reason="slower than FP32"), facts=CONV_NET,
                       has_calibration=True)
    assert [a.reason for a in slow.attempts][1] == "no earlier candidate missed the accuracy budget"


def test_clearly_faster_wins_then_clearly_smaller_and_inconclusive_only_as_a_last_resort():
    a, b, c = _recipe("a"), _recipe("b"), _recipe("c")
    assert choose([_candidate(a, ratio=0.50), _candidate(b, ratio=0.40)]).recipe is b  # intervals apart
    assert choose([_candidate(a, ratio=0.50), _candidate(b, ratio=0.49)]).recipe is a  # within noise: order decides
    assert choose([_candidate(a, ratio=0.50, size=100), _candidate(b, ratio=0.49, size=80)]).recipe is b
    assert choose([_candidate(a, ratio=0.50, size=100), _candidate(b, ratio=0.49, size=95)]).recipe is a
    straddling = _candidate(a, ratio=1.0, width=0.1)
    assert straddling.verdict == SpeedVerdict.INCONCLUSIVE
    assert choose([straddling, _candidate(b, ratio=0.9, width=0.05)]).recipe is b
    assert choose([straddling]) is straddling
    assert choose([_candidate(c, reason="slower than FP32")]) is None


def test_at_a_speed_and_size_tie_the_more_accurate_wins():
    """Recipes that differ only in calibration (ncnn's range methods) make files of one size and speed."""
    a, b, c = _recipe("minmax"), _recipe("percentile"), _recipe("kl")
    assert choose([_candidate(a, drop=0.5), _candidate(b, drop=0.0), _candidate(c, drop=0.8)]).recipe is b
    assert choose([_candidate(a, drop=0.5), _candidate(b, drop=0.5)]).recipe is a  # a true tie: order decides
    assert choose([_candidate(a, drop=0.5, size=80), _candidate(b, drop=0.0, size=100)]).recipe is a  # smaller first
    assert choose([_candidate(a, drop=0.5, ratio=0.4), _candidate(b, drop=0.0, ratio=0.6)]).recipe is a  # faster first


@pytest.mark.parametrize("heavy, expected", [({"MatMul": 900, "Conv": 100}, True), ({"Conv": 900, "Gemm": 100}, False)])
def test_matmul_heavy_is_where_the_weights_are(heavy, expected):
    assert ModelFacts(op_counts={}, weight_params=heavy).matmul_heavy is expected
