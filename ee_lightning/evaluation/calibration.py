"""CALM-style calibration of every exit rule's knob on validation prompts.

CALM (Schuster et al. 2022) picks a confidence threshold on held-out data so that the early-exit
output stays consistent with the full model's within a stated tolerance. Here the consistency
measure is any column of a rule point (`generation_eval.score_points`), by default ROUGE-L
against the full model's own output; each rule keeps, among its knobs whose validation
consistency is at least `level`, the one that saves the most layers. Choose on validation,
report on test: the chosen knob never sees the test prompts.
"""
from __future__ import annotations


def calibrate(points: list[dict], level: float, key: str = "rougeL_vs_full",
              saving: str = "layer_saving") -> dict[str, dict]:
    """{rule: its chosen point} over `points` of one split: the point with the largest `saving` among
    those with `key` >= `level` (ties: the higher `key`). A rule with no point that reaches `level`
    is left out; `full` and the oracle (a bound) are never calibrated."""
    chosen: dict[str, dict] = {}
    for point in points:
        if point["rule"] in ("full", "oracle") or point[key] < level:
            continue
        best = chosen.get(point["rule"])
        if best is None or (point[saving], point[key]) > (best[saving], best[key]):
            chosen[point["rule"]] = point
    return chosen


def calibrated_on(test_points: list[dict], validation_points: list[dict], level: float,
                  key: str = "rougeL_vs_full") -> dict[str, dict]:
    """Calibrates on `validation_points` and marks each test point with `calibrated`: its knob's
    validation `key` if that knob is its rule's choice, else None. Returns {rule: {value, validation,
    validation_layer_saving}} for the rules that reach `level`; the test points only receive marks."""
    chosen = calibrate(validation_points, level, key)
    for point in test_points:
        pick = chosen.get(point["rule"])
        point["calibrated"] = pick[key] if pick is not None and pick["value"] == point["value"] else None
    return {rule: {"value": p["value"], "validation": p[key], "validation_layer_saving": p["layer_saving"]}
            for rule, p in chosen.items()}
