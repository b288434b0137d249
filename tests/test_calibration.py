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
