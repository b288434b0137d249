"""CALM-style calibration: each rule's knob with the most saving whose validation consistency holds."""
from __future__ import annotations

from ee_lightning.evaluation.calibration import calibrate


def test_calibrate_keeps_the_most_saving_knob_above_the_level():
    points = [
        {"rule": "full", "value": None, "rougeL_vs_full": 1.0, "layer_saving": 0.0},
        {"rule": "policy", "value": 0.3, "rougeL_vs_full": 0.55, "layer_saving": 0.30},
        {"rule": "policy", "value": 0.5, "rougeL_vs_full": 0.70, "layer_saving": 0.20},
        {"rule": "policy", "value": 0.7, "rougeL_vs_full": 0.90, "layer_saving": 0.10},
        {"rule": "static", "value": 24, "rougeL_vs_full": 0.40, "layer_saving": 0.20},
        {"rule": "saturation", "value": 0.97, "rougeL_vs_full": 0.60, "layer_saving": 0.05},
        {"rule": "saturation", "value": 0.98, "rougeL_vs_full": 0.80, "layer_saving": 0.05},
        {"rule": "oracle", "value": None, "rougeL_vs_full": 1.0, "layer_saving": 0.5},
    ]
    chosen = calibrate(points, 0.6)
    assert {rule: p["value"] for rule, p in chosen.items()} == {"policy": 0.5, "saturation": 0.98}  # tie: higher
    assert calibrate(points, 0.5)["policy"]["value"] == 0.3
    assert calibrate(points, 0.95) == {}
    assert calibrate(points, 0.3, key="layer_saving")["policy"]["value"] == 0.3


def test_the_knobs_chosen_on_validation_mark_the_test_points_and_ignore_the_test_numbers():
    from ee_lightning.evaluation.calibration import calibrated_on

    validation = [
        {"rule": "full", "value": None, "rougeL_vs_full": 1.0, "layer_saving": 0.0},
        {"rule": "policy", "value": 0.3, "rougeL_vs_full": 0.50, "layer_saving": 0.30},
        {"rule": "policy", "value": 0.5, "rougeL_vs_full": 0.65, "layer_saving": 0.20},
        {"rule": "static", "value": 2, "rougeL_vs_full": 0.20, "layer_saving": 0.50},
    ]
    # on test the 0.3 knob would pass the level and 0.5 would not: the marks follow validation only
    test = [
        {"rule": "full", "value": None, "rougeL_vs_full": 1.0, "layer_saving": 0.0},
        {"rule": "policy", "value": 0.3, "rougeL_vs_full": 0.90, "layer_saving": 0.31},
        {"rule": "policy", "value": 0.5, "rougeL_vs_full": 0.10, "layer_saving": 0.19},
        {"rule": "static", "value": 2, "rougeL_vs_full": 0.95, "layer_saving": 0.50},
    ]
    chosen = calibrated_on(test, validation, 0.6)
    assert chosen == {"policy": {"value": 0.5, "validation": 0.65, "validation_layer_saving": 0.20}}
    assert [p["calibrated"] for p in test] == [None, None, 0.65, None]
