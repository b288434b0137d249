"""experiments/frontier_study.py's check of make train's choice over groups of RL seeds."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_frontier import _member


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        yield importlib.import_module("frontier_study")
    finally:
        sys.path.remove(str(ROOT / "experiments"))


# Four RL seeds at one alpha, full model 0.850 on validation (target: >= 0.845). Seeds 0-1 and 2-3 are two groups.
MEMBERS = [_member(0.1, 0.9, 0, (0.850, 0.40), (0.84, 0.41)), _member(0.1, 0.9, 1, (0.846, 0.50), (0.83, 0.52)),
           _member(0.1, 0.8, 0, (0.846, 0.46), (0.83, 0.47)), _member(0.1, 0.8, 1, (0.830, 0.60), (0.82, 0.61)),
           _member(0.1, 0.9, 2, (0.848, 0.44), (0.85, 0.45)), _member(0.1, 0.9, 3, (0.848, 0.46), (0.84, 0.45)),
           _member(0.1, 0.8, 2, (0.840, 0.50), (0.84, 0.50)), _member(0.1, 0.8, 3, (0.840, 0.55), (0.83, 0.56))]


def test_each_group_of_seeds_makes_make_trains_choice_alone(study):
    rows = study.seed_group_choices(MEMBERS, 0.850, [[0, 1], [2, 3]])
    first, second = rows
    # seeds 0-1: tau 0.9 means 0.848 at 0.45 (tau 0.8: 0.838, outside); seed 0 is nearest 0.45 at tau 0.8 (0.46),
    # seed 1 at tau 0.9 (0.50)
    assert first["seeds"] == [0, 1] and first["choice"]["setting"] == (0.1, 0.9)
    assert [r["setting"] for r in first["choice"]["seeds"]] == [(0.1, 0.8), (0.1, 0.9)]
    assert first["choice"]["test"]["layer_saving_spread"] == pytest.approx(0.05)
    assert first["one_tau"] == {"metric": pytest.approx(0.01), "layer_saving": pytest.approx(0.11)}
    # seeds 2-3: tau 0.9 (0.848 at 0.45); both seeds run there
    assert [r["setting"] for r in second["choice"]["seeds"]] == [(0.1, 0.9), (0.1, 0.9)]
    table = study.seed_groups_markdown("16 epochs", rows)
    assert "| 0, 1 | 0.1, 0.8/0.9 | 45.0% | 0.8300 | 49.5% | 0.00 | 5.0 | 1.00, 11.0 |" in table


def test_seed_groups_need_a_variants_comparison():
    done = subprocess.run([sys.executable, "experiments/frontier_study.py", "rotten_tomatoes", "--seed-groups", "3"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "--seed-groups K makes make train's choice" in done.stderr


def test_the_set_savings_gap_reads_entropy_at_each_seeds_own_saving(study):
    curves = {split: {rule: [{"metric": 0.90, "layer_saving": 0.0}, {"metric": 0.80, "layer_saving": 0.5}]
                      for rule in study.COMPARED} for split in ("validation", "test")}
    point = {"saving": 0.2, "alpha": 0.05, "validation": {"metric": 0.87, "layer_saving": 0.2},
             "test": {"metric": 0.855, "layer_saving": 0.25},
             "seeds": [{"seed": 0, "tau": 0.7, "validation": {"metric": 0.87, "layer_saving": 0.2},
                        "test": {"metric": 0.86, "layer_saving": 0.2}},
                       {"seed": 1, "tau": 0.6, "validation": {"metric": 0.87, "layer_saving": 0.2},
                        "test": {"metric": 0.85, "layer_saving": 0.3}}]}
    (row,) = study.savings_rows([point], curves)
    # entropy's line falls 0.02 per 10 points of saving: 0.86 at 20%, 0.84 at 30%, 0.85 at the mean 25%
    assert row["test"]["gap"] == [pytest.approx(0.0), pytest.approx(0.01)]
    assert row["test"]["entropy"] == pytest.approx(0.85) and row["test"]["policy"] == [0.86, 0.85]
    assert row["validation"]["gap"] == [pytest.approx(0.01), pytest.approx(0.01)]
    results = {42: {"at_savings": [point] * len(study.SAVINGS), "at_savings_rows": [row] * len(study.SAVINGS)}}
    table = "\n".join(study.savings_markdown(results, "accuracy"))
    assert ("| 20% | 0.05 | 0.8550 ± 0.0636 | 25.0% | 0.8500 | 0.8500 | 0.8500 | 0.8500 | +1.00 ± 0.00 pt | "
            "+0.50 ± 6.35 pt |") in table
    # a seed whose saving lies outside entropy's curve has no gap: not credited either way
    point["seeds"][1]["test"]["layer_saving"] = 0.6
    assert study.savings_rows([point], curves)[0]["test"]["gap"] is None
