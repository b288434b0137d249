"""experiments/frontier_study.py: make train's choice over groups of RL seeds, the set-savings gaps, the joint study."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, experiment_fixture
from tests.test_frontier import _member


study = experiment_fixture("frontier_study")


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


def two_seed_point() -> dict:
    """One set saving (20%) of the policy frontier, two RL seeds: their taus met it on validation, not on test."""
    return {"saving": 0.2, "alpha": 0.05, "validation": {"metric": 0.87, "layer_saving": 0.2},
            "test": {"metric": 0.855, "layer_saving": 0.25},
            "seeds": [{"seed": 0, "tau": 0.7, "validation": {"metric": 0.87, "layer_saving": 0.2},
                       "test": {"metric": 0.86, "layer_saving": 0.2}},
                      {"seed": 1, "tau": 0.6, "validation": {"metric": 0.87, "layer_saving": 0.2},
                       "test": {"metric": 0.85, "layer_saving": 0.3}}]}


def falling_curves(rules, splits) -> dict:
    """Every rule's curve on every split: 0.90 at no saving, falling linearly to 0.80 at 50%."""
    return {split: {rule: [{"metric": 0.90, "layer_saving": 0.0}, {"metric": 0.80, "layer_saving": 0.5}]
                    for rule in rules} for split in splits}


def test_the_set_savings_gap_reads_entropy_at_each_seeds_own_saving(study):
    curves = falling_curves(study.COMPARED, ("validation", "test"))
    point = two_seed_point()
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


def test_the_joint_study_reads_entropy_on_each_seeds_own_heads_at_its_own_saving(study):
    stage1 = falling_curves(study.COMPARED, study.HELD_OUT)
    # seed 0's own heads: entropy flat at 0.84; seed 1's: 0.88 falling to 0.78 at 50%
    own = {0: {split: {"entropy": [{"metric": 0.84, "layer_saving": 0.0}, {"metric": 0.84, "layer_saving": 0.5}]}
               for split in study.HELD_OUT},
           1: {split: {"entropy": [{"metric": 0.88, "layer_saving": 0.0}, {"metric": 0.78, "layer_saving": 0.5}]}
               for split in study.HELD_OUT}}
    point = two_seed_point()
    (row,) = study.with_own_heads_entropy(study.savings_rows([point], stage1), [point], own)
    assert row["test"]["entropy_same_heads"] == [pytest.approx(0.84), pytest.approx(0.82)]
    assert row["test"]["gap"] == [pytest.approx(0.0), pytest.approx(0.01)]  # against stage 1's entropy
    report = {"metric": "accuracy", "full": {"validation": 0.9, "test": 0.9}, "full_joint": {"validation": [0.9, 0.9],
              "test": [0.9, 0.89]}, "at_savings": [point] * len(study.SAVINGS), "at_savings_rows": [row] * len(study.SAVINGS)}
    table = study.joint_markdown("rotten_tomatoes", report, 0.05, 1.0, 60.0, "the command")
    # policy 0.86 / 0.85 against 0.84 / 0.82 on their own heads: +2 and +3 points
    assert ("| 20% | 0.8550 ± 0.0636 | 25.0% | 0.8500 | +1.00 ± 0.00 pt | +0.50 ± 6.35 pt | 0.8300 | "
            "+2.50 ± 6.35 pt |") in table
    assert "0.9000, 0.8900 test" in table and "`the command`" in table


def test_the_joint_study_on_sst2_needs_its_rows_even_from_a_stage_one_checkpoint(tmp_path):
    done = subprocess.run([sys.executable, "experiments/frontier_study.py", "sst2", "--stage1", str(tmp_path / "x.ckpt"),
                           "--joint", "0.05", "--glue-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "sst2 needs GLUE's SST-2 folder" in done.stderr


def test_the_joint_study_takes_one_stage_one_and_no_variants():
    done = subprocess.run([sys.executable, "experiments/frontier_study.py", "rotten_tomatoes", "--joint", "0.05",
                           "--seeds", "1", "2"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "--joint runs stage 4 from one stage 1" in done.stderr
