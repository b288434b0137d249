"""Operating points chosen on validation, the interpolation every comparison at matched saving uses,
and the policy's frontier over seeds: hand-computed numbers."""
from __future__ import annotations

import math

import pytest
import torch

from ee_lightning.evaluation.frontier import (best_within, choose_on_split, choose_points, choose_setting, frontier,
                                              seed_settings, target_text, value_at_saving)
from ee_lightning.evaluation.generation_eval import comparison_rows

CURVE = [{"layer_saving": 0.0, "metric": 0.90}, {"layer_saving": 0.5, "metric": 0.80},
         {"layer_saving": 0.25, "metric": 0.88}]


def test_value_at_saving_interpolates_between_the_two_nearest_points():
    assert value_at_saving(CURVE, 0.125) == pytest.approx(0.89)
    assert value_at_saving(CURVE, 0.375) == pytest.approx(0.84)


def test_value_at_saving_at_the_ends_is_the_end_point_and_beyond_them_none():
    assert value_at_saving(CURVE, 0.0) == pytest.approx(0.90)
    assert value_at_saving(CURVE, 0.5) == pytest.approx(0.80)
    assert value_at_saving(CURVE, 0.5 + 1e-12) == pytest.approx(0.80)  # float noise is the same saving
    assert value_at_saving(CURVE, 0.51) is None  # no knob reaches it: the rule gets no credit
    assert value_at_saving(CURVE, -0.01) is None
    assert value_at_saving([], 0.1) is None
    assert value_at_saving([{"layer_saving": 0.3, "metric": 0.7}], 0.3) == pytest.approx(0.7)


def test_value_at_saving_takes_the_best_of_points_at_one_saving():
    curve = [{"layer_saving": 0.2, "metric": 0.7}, {"layer_saving": 0.2, "metric": 0.8},
             {"layer_saving": 0.4, "metric": 0.6}]
    assert value_at_saving(curve, 0.2) == pytest.approx(0.8)
    assert value_at_saving(curve, 0.3) == pytest.approx(0.7)  # halfway from 0.8 to 0.6
    assert value_at_saving(curve, 0.3, key="metric") == pytest.approx(0.7)


def test_generation_comparison_uses_the_same_interpolation():
    """The decoder report's rules at the policy's saving: interpolated, '-' (None) beyond their knobs."""
    points = [{"rule": "policy", "value": 0.5, "layer_saving": 0.3, "metric": 0.5, "rougeL_vs_full": 0.6,
               "avg_exit_layer": 7.0, "speedup_vs_full": 1.1},
              {"rule": "saturation", "value": 0.9, "layer_saving": 0.2, "metric": 0.4, "rougeL_vs_full": 0.5},
              {"rule": "saturation", "value": 0.8, "layer_saving": 0.4, "metric": 0.2, "rougeL_vs_full": 0.3},
              {"rule": "static", "value": 9, "layer_saving": 0.1, "metric": 0.3, "rougeL_vs_full": 0.3}]
    row = comparison_rows(points)[0]
    assert row["saturation_rougeL"] == pytest.approx(0.3) and row["saturation_rougeL_vs_full"] == pytest.approx(0.4)
    assert row["static_rougeL"] is None and row["classifier_rougeL"] is None


def test_best_within_takes_the_most_saving_inside_the_tolerance():
    points = [{"metric": 0.834, "layer_saving": 0.3}, {"metric": 0.830, "layer_saving": 0.5},
              {"metric": 0.828, "layer_saving": 0.6}, {"metric": 0.829, "layer_saving": 0.55}]
    assert best_within(points, 0.834, 0.005)["layer_saving"] == 0.55  # 0.829 is within 0.5 points; 0.828 is not
    assert best_within(points, 0.834, 0.0)["layer_saving"] == 0.3
    assert best_within(points, 0.9, 0.005) is None


def test_choose_points_picks_on_one_split_and_reports_the_other():
    val = [{"rule": "entropy", "knob": "threshold", "value": "0.1", "metric": 0.85, "layer_saving": 0.2},
           {"rule": "entropy", "knob": "threshold", "value": "0.3", "metric": 0.846, "layer_saving": 0.4},
           {"rule": "entropy", "knob": "threshold", "value": "0.5", "metric": 0.80, "layer_saving": 0.6},
           {"rule": "full", "knob": "", "value": "", "metric": 0.85, "layer_saving": 0.0}]
    test = [{**p, "metric": p["metric"] - 0.01, "layer_saving": p["layer_saving"] + 0.01, "avg_exit_layer": 1.0,
             "speedup": 1.0} for p in val]
    test[2]["metric"] = 0.9  # the best test point must not be what is chosen
    rows = choose_points(val, test, full_metric=0.85, tolerance=0.005)
    assert [r["rule"] for r in rows] == ["entropy"]
    row = rows[0]
    assert row["value"] == "0.3" and row["metric"] == pytest.approx(0.836) and row["layer_saving"] == pytest.approx(0.41)
    assert row["chosen_on"] == "validation" and row["chosen_metric"] == 0.846 and row["target"] == target_text(0.005)
    assert "0.5 points" in row["target"]
    # a knob set by a larger choice (the policy's tau, chosen over RL seeds) is reported as set, not re-chosen
    (fixed,) = choose_points(val, test, full_metric=0.85, tolerance=0.005, set_knobs={"entropy": "0.1"})
    assert (fixed["value"], fixed["chosen_metric"], fixed["set"]) == ("0.1", 0.85, True) and "set" not in row
    with pytest.raises(ValueError, match="'0.7' was chosen but is not on the choosing split's grid"):
        choose_points(val, test, full_metric=0.85, tolerance=0.005, set_knobs={"entropy": "0.7"})


def _member(alpha, tau, seed, val, test):
    return {"setting": (alpha, tau), "seed": seed, "validation": {"metric": val[0], "layer_saving": val[1]},
            "test": {"metric": test[0], "layer_saving": test[1]}}


def test_seed_settings_give_mean_and_sample_sd_over_seeds():
    members = [_member(0.1, 0.5, 0, (0.80, 0.40), (0.81, 0.50)), _member(0.1, 0.5, 1, (0.82, 0.44), (0.83, 0.54))]
    (row,) = seed_settings(members)
    assert row["setting"] == (0.1, 0.5) and row["seeds"] == [0, 1]
    assert row["test"]["metric"] == pytest.approx(0.82) and row["test"]["layer_saving"] == pytest.approx(0.52)
    assert row["test"]["metric_sd"] == pytest.approx(0.02 / 2 ** 0.5)
    assert row["validation"]["layer_saving_sd"] == pytest.approx(0.04 / 2 ** 0.5)


def test_frontier_is_chosen_on_validation_not_on_test():
    members = [_member(0.1, 0.5, 0, (0.85, 0.30), (0.80, 0.30)),   # on the validation frontier
               _member(0.1, 0.3, 0, (0.80, 0.20), (0.95, 0.40)),   # dominated on validation, best on test
               _member(0.2, 0.5, 0, (0.78, 0.60), (0.75, 0.60)),
               _member(0.2, 0.3, 0, (0.78, 0.60), (0.70, 0.60))]  # ties (0.2, 0.5) on validation
    kept = frontier(seed_settings(members))
    assert [r["setting"] for r in kept] == [(0.1, 0.5), (0.2, 0.5)]  # ordered by saving, one of a tie


def test_choose_on_split_flags_a_target_no_point_reaches():
    points = [{"metric": 0.80, "layer_saving": 0.5}, {"metric": 0.82, "layer_saving": 0.3},
              {"metric": 0.82, "layer_saving": 0.4}]
    assert choose_on_split(points, 0.82, 0.005) == ({"metric": 0.82, "layer_saving": 0.4}, True)
    # nothing within 0.5 points of 0.9: the best metric (ties: more saving), flagged
    assert choose_on_split(points, 0.90, 0.005) == ({"metric": 0.82, "layer_saving": 0.4}, False)


# One stage 1's grid, two RL seeds, full model 0.850 on validation, target within 0.5 points (>= 0.845):
GRID = [_member(0.05, 0.9, 0, (0.848, 0.30), (0.840, 0.31)),
        _member(0.05, 0.9, 1, (0.846, 0.32), (0.842, 0.33)),   # mean 0.847 at 0.31: within the target
        _member(0.10, 0.9, 0, (0.850, 0.45), (0.830, 0.46)),
        _member(0.10, 0.9, 1, (0.842, 0.47), (0.836, 0.48)),   # mean 0.846 at 0.46: the most saving within it
        _member(0.10, 0.5, 0, (0.846, 0.60), (0.990, 0.61)),   # seed 0 alone would take this one ...
        _member(0.10, 0.5, 1, (0.830, 0.62), (0.820, 0.63)),   # ... but the mean, 0.838, is outside the target
        _member(0.10, 0.95, 0, (0.849, 0.40), (0.845, 0.41)),
        _member(0.10, 0.95, 1, (0.845, 0.455), (0.839, 0.465))]  # seed 1's saving nearest the chosen mean's 0.46


def test_choose_setting_takes_alpha_and_saving_from_the_seeds_mean_and_matches_each_seeds_tau_to_that_saving():
    choice = choose_setting(GRID, 0.850, 0.005)
    assert (choice["setting"], choice["within_target"]) == ((0.10, 0.9), True)
    assert choice["validation"] == {"metric": pytest.approx(0.846), "layer_saving": pytest.approx(0.46)}
    # seed 0 saves 0.45 at tau 0.9 (0.40 at 0.95); seed 1 saves 0.455 at tau 0.95, nearer 0.46 than its 0.47 at 0.9
    assert [(r["seed"], r["setting"]) for r in choice["seeds"]] == [(0, (0.10, 0.9)), (1, (0.10, 0.95))]
    assert choice["seeds"][1]["test"] == {"metric": 0.839, "layer_saving": 0.465}  # read on test only after the choice
    summary = choice["test"]
    assert summary["metric"] == pytest.approx(0.8345) and summary["metric_spread"] == pytest.approx(0.009)
    assert summary["layer_saving"] == pytest.approx(0.4625) and summary["layer_saving_spread"] == pytest.approx(0.005)
    missed = choose_setting(GRID, 0.900, 0.005)  # no mean within 0.5 points of 0.9: the best mean validation metric
    assert (missed["setting"], missed["within_target"]) == ((0.10, 0.95), False)  # 0.847 either way: more saving
    with pytest.raises(ValueError, match="method.frontier.alphas"):
        choose_setting([], 0.85, 0.005)


def test_a_tie_in_saving_goes_to_the_tau_nearest_the_chosen_one():
    grid = [_member(0.1, 0.9, 0, (0.85, 0.40), (0.85, 0.40)), _member(0.1, 0.9, 1, (0.85, 0.40), (0.85, 0.40)),
            _member(0.1, 0.8, 0, (0.85, 0.50), (0.85, 0.50)), _member(0.1, 0.8, 1, (0.85, 0.40), (0.85, 0.41)),
            _member(0.1, 0.5, 0, (0.85, 0.55), (0.85, 0.55)), _member(0.1, 0.5, 1, (0.85, 0.50), (0.85, 0.50))]
    choice = choose_setting(grid, 0.85, 0.005)  # the mean at tau 0.5: 0.525 saving
    assert choice["setting"] == (0.1, 0.5)
    # seed 0: 0.50 (tau 0.8) and 0.55 (tau 0.5) are equally near 0.525, so tau 0.5; seed 1: 0.50 at tau 0.5
    assert [r["setting"] for r in choice["seeds"]] == [(0.1, 0.5), (0.1, 0.5)]


def test_choose_in_grid_records_alpha_tau_the_runs_seed_and_the_split_that_chose_them():
    from ee_lightning.training.policy_grid import choose_in_grid

    choice = choose_in_grid(GRID, 0.850, 0.005)
    chosen = choice["chosen"]
    assert (chosen["alpha"], chosen["seed"], chosen["tau"], chosen["within_target"]) == (0.10, 0, 0.9, True)
    assert chosen["chosen_on"] == "validation" and chosen["target"] == target_text(0.005)
    assert chosen["validation"] == {"metric": 0.850, "layer_saving": 0.45}  # the run's own policy: seed 0's
    assert chosen["test"] == {"metric": 0.830, "layer_saving": 0.46}
    assert chosen["mean"]["validation"]["metric"] == pytest.approx(0.846) and chosen["mean"]["tau"] == 0.9
    per_seed = choice["per_seed"]
    assert [(r["seed"], r["alpha"], r["tau"]) for r in per_seed["seeds"]] == [(0, 0.10, 0.9), (1, 0.10, 0.95)]
    assert per_seed["chosen_on"] == "validation" and per_seed["test"]["layer_saving_spread"] == pytest.approx(0.005)
    seed_one = choose_in_grid(GRID, 0.850, 0.005, run_seed=1)["chosen"]
    assert (seed_one["tau"], seed_one["test"]) == (0.95, {"metric": 0.839, "layer_saving": 0.465})
    with pytest.raises(ValueError, match="no RL seed 7"):
        choose_in_grid(GRID, 0.850, 0.005, run_seed=7)


def test_the_report_and_the_summary_name_the_chosen_policy_and_its_spread_over_seeds():
    from ee_lightning.app.train import policy_text, seed_spread_text
    from ee_lightning.evaluation.pareto import chosen_policy_text
    from ee_lightning.results import MethodResult
    from ee_lightning.training.policy_grid import choose_in_grid

    choice = choose_in_grid(GRID, 0.850, 0.005)
    text = chosen_policy_text(choice, "acc")
    assert "Chosen: alpha 0.1 at 46.0% validation layer saving (the seeds' mean at tau 0.9: 0.8460)" in text
    assert "RL seed 0, tau 0.9: test acc 0.8300 at 46.0% layer saving (validation 0.8500 at 45.0%)" in text
    assert "| 1 | 0.95 | 0.8390 | 46.5% | 0.8450 | 45.5% |" in text
    assert "| 0.8345 (0.90 points) | 46.2% (0.5 points) |" in text and "No setting reached" not in text
    assert "No setting reached" in chosen_policy_text(choose_in_grid(GRID, 0.9, 0.005), "acc")
    line = seed_spread_text("acc", choice["per_seed"])
    assert line == ("consistentee per RL seed at alpha 0.1, each at its tau nearest 46.0% validation layer saving "
                    "(chosen on validation over the seeds' mean): seed 0 (tau 0.9) -> 0.8300 at 46.0%, seed 1 (tau 0.95) "
                    "-> 0.8390 at 46.5%; acc mean 0.8345 (spread 0.90 points), layer saving mean 46.2% (spread 0.5 points)")
    assert ", outside the target)" in seed_spread_text("acc", choose_in_grid(GRID, 0.9, 0.005)["per_seed"])
    method = MethodResult(metric=0.83, avg_exit_layer=3.0, layer_saving=0.5, speedup=2.0, tau=0.9, alpha=0.1, seed=0,
                          chosen_on="validation", chosen_point={"within_target": False})
    assert policy_text(method) == "; alpha 0.1, RL seed 0, tau 0.9, chosen on validation, outside the target"


def test_the_grids_policies_are_kept_and_read_back_by_alpha_and_seed(tmp_path):
    from ee_lightning.modeling.exit_policy import ExitPolicy
    from ee_lightning.training.policy_grid import fresh_policy, load_policy, save_policies

    template = ExitPolicy(3, 8, 2, hidden=4)
    policies = {(alpha, seed): fresh_policy(template, seed + int(100 * alpha)) for alpha in (0.05, 0.1) for seed in (0, 1)}
    path = save_policies(tmp_path / "frontier" / "policies.pt", policies)
    restored = ExitPolicy(3, 8, 2, hidden=4)
    restored.load_state_dict(load_policy(path, 0.1, 1))
    for name, value in restored.state_dict().items():
        assert torch.equal(value, policies[(0.1, 1)].state_dict()[name])
    assert not torch.equal(restored.nets[0][0].weight, policies[(0.05, 1)].nets[0][0].weight)
    with pytest.raises(KeyError, match=r"no policy at alpha=0.2, seed=1.*\(0.05, 0\)"):
        load_policy(path, 0.2, 1)


def test_policy_grid_trains_replays_and_chooses_on_validation():
    """Tiny cached outputs: the grid trains a policy per (alpha, seed); its tau is chosen on validation, so
    another test split (here: other rows) moves the test point but not the chosen tau."""
    from ee_lightning.exits.hardness import memorized_layer
    from ee_lightning.inference.layer_cache import CachedLayerDataset
    from ee_lightning.modeling.exit_policy import ExitPolicy
    from ee_lightning.tasks import TaskSpec
    from ee_lightning.training.policy_grid import grid_members, policy_frontier

    torch.manual_seed(0)
    task = TaskSpec("toy")

    def states(n):
        labels = torch.randint(0, 2, (n,))
        logits = torch.randn(3, n, 2) + torch.stack([torch.nn.functional.one_hot(labels, 2).float() * s
                                                     for s in (0.5, 1.5, 3.0)])
        return {"pooled": torch.randn(3, n, 8) + logits[..., :1], "logits": logits, "labels": labels,
                "idx": torch.arange(n), "lengths": torch.full((n,), 5)}

    train, val, test = states(128), states(64), states(64)
    correct = train["logits"].argmax(-1) == train["labels"]
    dataset = CachedLayerDataset(train, memorized_layer(correct))
    template = ExitPolicy(3, 8, 2, hidden=4)
    rl = {"k": 4, "alpha": 0.1, "task_term": "correct", "depth_term": "hardness", "sampler": "bernoulli",
          "eps_start": 0.3, "eps_end": 0.0, "eps_decay_steps": 200, "normalize_advantages": False,
          "entropy_bonus": 0.0, "estimator": "reinforce"}
    taus = [0.9, 0.5, 0.1]
    members, policies = grid_members(template, dataset, {"validation": val, "test": test}, task, rl,
                                     alphas=[0.05, 0.2], seeds=[0, 1], taus=taus, lr=1e-2, epochs=2, batch_size=32,
                                     tolerance=0.5)
    assert set(policies) == {(a, s) for a in (0.05, 0.2) for s in (0, 1)}
    assert len(members) == 2 * 2 * 3 and {m["setting"] for m in members} == {(a, t) for a in (0.05, 0.2) for t in taus}
    again, _ = grid_members(template, dataset, {"validation": val, "test": test}, task, rl, alphas=[0.05, 0.2],
                            seeds=[0, 1], taus=taus, lr=1e-2, epochs=2, batch_size=32, tolerance=0.5)
    assert again == members  # a seed fixes the policy
    result = policy_frontier(members)
    assert result["frontier"] and all(row["seeds"] == [0, 1] for row in result["settings"])

    shuffled = {**test, "labels": test["labels"][torch.randperm(64)]}
    moved, _ = grid_members(template, dataset, {"validation": val, "test": shuffled}, task, rl, alphas=[0.05, 0.2],
                            seeds=[0, 1], taus=taus, lr=1e-2, epochs=2, batch_size=32, tolerance=0.5)
    assert [m["validation"] for m in moved] == [m["validation"] for m in members]
    assert [m["test"] for m in moved] != [m["test"] for m in members]


def test_the_policy_grids_cosine_schedule_decays_to_zero_by_the_last_step():
    from ee_lightning.training.policy_grid import lr_scheduler

    def rates(schedule, steps=4):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler, seen = lr_scheduler(optimizer, schedule, steps), []
        for _ in range(steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen + [optimizer.param_groups[0]["lr"]]

    assert rates("constant") == [1.0] * 5
    assert rates("cosine") == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                             (1 + math.cos(3 * math.pi / 4)) / 2, 0.0])
    with pytest.raises(ValueError, match="'constant' or 'cosine'"):
        rates("linear")


@pytest.mark.slow
def test_the_runs_operating_points_are_chosen_on_validation(tmp_path, capsys):
    """Another test split (the same rows with their labels flipped) moves every test number of a run, but not
    one chosen knob: the policy's tau, each rule's threshold and the frontier's settings come from validation."""
    import json

    from ee_lightning.app.train import train
    from tests.conftest import compose_train, write_sentiment_files
    from tests.test_consistentee import TINY_RUN

    overrides = [*TINY_RUN, "method.frontier.alphas=[0.05,0.3]", "method.frontier.seeds=2"]
    runs = []
    for name, flip in (("same", False), ("flipped", True)):
        folder = write_sentiment_files(tmp_path / name / "SST-2")
        if flip:
            lines = (folder / "test.tsv").read_text().splitlines()
            flipped = [lines[0]] + [f"{text}\t{1 - int(label)}" for text, label in (row.split("\t") for row in lines[1:])]
            (folder / "test.tsv").write_text("\n".join(flipped) + "\n")
        data = ["data=glue", "data.task=sst2", f"data.data_dir={folder}"]
        init = [f"init_from={runs[0][1]}"] if runs else []
        results = train(compose_train([*overrides, *data, *init], tmp_path / name / "run"))
        stage_one = json.loads((tmp_path / name / "run" / "stages.json").read_text()).get("finetune", {}).get("checkpoint")
        runs.append((results, stage_one or runs[0][1]))
    (same, _), (flipped, _) = runs
    assert flipped.layer_metrics != same.layer_metrics  # the test split did change
    policy = same.methods["consistentee"]
    assert policy.chosen_on == "validation" and "0.5 points" in policy.target
    assert flipped.methods["consistentee"].tau == policy.tau
    assert flipped.methods["consistentee"].chosen_point == policy.chosen_point
    # the policy itself is chosen on validation from the whole frontier: its alpha and RL seed do not move either
    chosen = same.policy_frontier["chosen"]
    assert (policy.alpha, policy.seed, policy.tau) == (chosen["alpha"], chosen["seed"], chosen["tau"])
    assert chosen["alpha"] in (0.05, 0.3) and chosen["seed"] == 42 and chosen["chosen_on"] == "validation"
    assert (flipped.methods["consistentee"].alpha, flipped.methods["consistentee"].seed) == (policy.alpha, policy.seed)
    assert flipped.policy_frontier["chosen"]["validation"] == chosen["validation"]
    assert flipped.policy_frontier["chosen"]["test"] != chosen["test"]  # ... while its test point moved
    per_seed = [(r["seed"], r["alpha"], r["tau"], r["validation"]) for r in same.policy_frontier["per_seed"]["seeds"]]
    assert [r[0] for r in per_seed] == [42, 43]
    summary = capsys.readouterr().out
    assert f"alpha {chosen['alpha']:g}, RL seed {chosen['seed']}, tau {chosen['tau']:g}, chosen on validation" in summary
    assert f"consistentee per RL seed at alpha {chosen['alpha']:g}, each at its tau nearest " in summary
    assert f"seed 42 (tau {chosen['tau']:g}) -> " in summary
    report = (tmp_path / "same" / "run" / "pareto.md").read_text()
    assert f"Chosen: alpha {chosen['alpha']:g} at " in report and f"RL seed 42, tau {chosen['tau']:g}: test acc" in report
    assert per_seed == [(r["seed"], r["alpha"], r["tau"], r["validation"])
                        for r in flipped.policy_frontier["per_seed"]["seeds"]]
    assert [(r["rule"], r["value"]) for r in flipped.chosen_points] == [(r["rule"], r["value"]) for r in same.chosen_points]
    assert same.chosen_points and all(r["chosen_on"] == "validation" for r in same.chosen_points)
    frontier = [(r["setting"], r["validation"]) for r in same.policy_frontier["frontier"]]
    assert frontier == [(r["setting"], r["validation"]) for r in flipped.policy_frontier["frontier"]]
    assert same.policy_frontier["seeds"] == [42, 43]
    # the policy at set savings: its alpha and every seed's tau are set on validation too
    from ee_lightning.training.policy_grid import SET_SAVINGS
    at_savings = [(r["saving"], r["alpha"], [(s["seed"], s["tau"]) for s in r["seeds"]], r["validation"])
                  for r in same.policy_frontier["at_savings"]]
    assert [row[0] for row in at_savings] == SET_SAVINGS and all(len(row[2]) == 2 for row in at_savings)
    assert at_savings == [(r["saving"], r["alpha"], [(s["seed"], s["tau"]) for s in r["seeds"]], r["validation"])
                          for r in flipped.policy_frontier["at_savings"]]
    assert "## The policy at set savings" in report and "| 10% | " in report


def test_tau_for_saving_by_hand():
    from ee_lightning.exits.rules import exit_summary, policy_exits, tau_for_saving

    # 3 layers, 2 rows: A's p = 0.2, 0.7; B's p = 0.6, 0.4 (the last layer's never matters). Running maxima below the
    # last layer: A 0.2, 0.7; B 0.6, 0.6. Mean exit layer = 1 + (running maxima <= tau) / 2.
    probs = torch.tensor([[0.2, 0.6], [0.7, 0.4], [0.1, 0.1]])
    # tau sits in the middle of the gap between two running maxima
    assert tau_for_saving(probs, 0.5) == pytest.approx(0.4)         # 1 of them: A exits at 2, B at 1: 1.5 of 3
    assert tau_for_saving(probs, 2 / 3) == pytest.approx(0.1)       # none: both exit at layer 1
    assert tau_for_saving(probs, 0.0) == pytest.approx(0.85)        # all 4: both run to layer 3
    # 1/3 wants 2 of them; the tie at 0.6 allows 1 (saving 1/2) or 3 (1/6), equally near: the less saving
    assert tau_for_saving(probs, 1 / 3) == pytest.approx(0.65)
    saturated = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # probabilities at 1: tau 1 keeps every row to the end
    assert tau_for_saving(saturated, 0.0) == 1.0 and tau_for_saving(saturated, 0.5) == 0.5
    for saving in (0.0, 1 / 6, 0.5, 2 / 3):
        assert exit_summary(policy_exits(probs, tau_for_saving(probs, saving)), 3)["layer_saving"] == pytest.approx(saving)


def test_saving_matcher_sets_each_seeds_tau_for_the_chosen_validation_saving():
    from ee_lightning.exits.rules import exit_summary, policy_exits
    from ee_lightning.inference.layer_cache import signals_from_states
    from ee_lightning.modeling.exit_policy import ExitPolicy
    from ee_lightning.tasks import TaskSpec
    from ee_lightning.training.policy_grid import fresh_policy, saving_matcher

    torch.manual_seed(0)
    task = TaskSpec("toy")

    def states(n):
        labels = torch.randint(0, 2, (n,))
        return {"pooled": torch.randn(4, n, 8), "logits": torch.randn(4, n, 2), "labels": labels,
                "idx": torch.arange(n), "lengths": torch.full((n,), 5)}

    template = ExitPolicy(4, 8, 2, hidden=4)
    policies = {(0.05, seed): fresh_policy(template, seed).eval() for seed in (0, 1)}
    splits = {"validation": states(200), "test": states(100)}
    match = saving_matcher(policies, splits, task)
    for seed in (0, 1):
        row = match(seed, (0.05, 0.9), 0.4)
        alpha, tau = row["setting"]
        probs = signals_from_states(splits["validation"], False, policies[(0.05, seed)])["exit_prob"]
        saving = exit_summary(policy_exits(probs, tau), 4)["layer_saving"]
        assert alpha == 0.05 and row["validation"]["layer_saving"] == pytest.approx(saving)
        assert abs(saving - 0.4) <= 1 / (4 * 200) + 1e-9  # as near as 200 rows of 4 layers allow (no ties here)
        assert set(row["test"]) == {"metric", "layer_saving", "avg_exit_layer"}


def test_the_frontier_at_set_savings_takes_the_alpha_best_on_validation_at_each_saving():
    from ee_lightning.training.policy_grid import frontier_at_savings

    # Each (alpha, seed)'s point at a saving, as saving_matcher would return it: (validation metric, test metric).
    table = {(0.03, 0, 0.2): (0.84, 0.83), (0.03, 1, 0.2): (0.82, 0.85), (0.05, 0, 0.2): (0.83, 0.90),
             (0.05, 1, 0.2): (0.83, 0.91), (0.03, 0, 0.5): (0.70, 0.72), (0.03, 1, 0.5): (0.74, 0.70),
             (0.05, 0, 0.5): (0.81, 0.79), (0.05, 1, 0.5): (0.79, 0.77)}
    calls = []

    def match(seed, setting, saving):
        calls.append((setting[0], seed, saving))
        val, test = table[(setting[0], seed, saving)]
        tau = 0.9 - saving + seed / 100  # each seed its own tau
        return {"setting": (setting[0], tau), "validation": {"metric": val, "layer_saving": saving + seed / 1000},
                "test": {"metric": test, "layer_saving": saving + 0.01}}

    rows = frontier_at_savings(match, [0.03, 0.05], [0, 1], [0.2, 0.5])
    low, high = rows
    # at 0.2 both alphas' seeds average 0.83 on validation: the tie goes to the earlier alpha (0.03), though 0.05
    # reads better on test: test never decides
    assert low["alpha"] == 0.03 and low["test"]["metric"] == pytest.approx(0.84)
    assert low["validation"] == {"metric": pytest.approx(0.83), "layer_saving": pytest.approx(0.2005)}
    assert [(s["seed"], s["tau"]) for s in low["seeds"]] == [(0, pytest.approx(0.7)), (1, pytest.approx(0.71))]
    # at 0.5: 0.80 against 0.72 on validation
    assert high["alpha"] == 0.05 and high["test"] == {"metric": pytest.approx(0.78), "layer_saving": pytest.approx(0.51)}
    assert high["seeds"][1]["test"]["metric"] == 0.77
    assert len(calls) == 8  # every alpha's every seed at every saving


def test_exit_probabilities_keep_the_rows_a_policy_is_sure_of_apart_so_that_a_tau_can_split_them():
    from ee_lightning.exits.rules import exit_summary, policy_exits, tau_for_saving
    from ee_lightning.modeling.exit_policy import exit_probability

    logits = torch.tensor([[18.0, 20.0], [0.0, 0.0]])  # layer 1: two rows the policy is sure of (layer 2 is forced)
    assert torch.sigmoid(logits[0]).unique().numel() == 1  # in float32 both read 1: no tau between them
    probs = exit_probability(logits)
    assert probs[0, 0] < probs[0, 1] < 1.0
    # the signals every replay and the runner read keep them apart too
    from ee_lightning.exits.signals import all_layer_signals
    probs = all_layer_signals(torch.zeros(2, 2, 3), probs)["exit_prob"]
    assert probs[0, 0] < probs[0, 1] < 1.0
    tau = tau_for_saving(probs, 0.25)  # one row leaves at layer 1, the other runs both layers
    assert probs[0, 0] < tau < probs[0, 1]
    assert exit_summary(policy_exits(probs, tau), 2)["layer_saving"] == pytest.approx(0.25)


def test_the_report_sets_the_policy_at_each_saving_beside_the_confidence_rules():
    from ee_lightning.evaluation.pareto import at_savings_table

    # entropy falls from 0.90 at no saving to 0.80 at half; max-prob is flat at 0.85; no PCEE or patience points
    points = [{"rule": "entropy", "metric": 0.90, "layer_saving": 0.0}, {"rule": "entropy", "metric": 0.80, "layer_saving": 0.5},
              {"rule": "maxprob", "metric": 0.85, "layer_saving": 0.0}, {"rule": "maxprob", "metric": 0.85, "layer_saving": 0.5},
              {"rule": "policy", "metric": 0.99, "layer_saving": 0.2}]
    seeds = [{"seed": 0, "tau": 0.9, "test": {"metric": 0.87, "layer_saving": 0.2}},
             {"seed": 1, "tau": 0.8, "test": {"metric": 0.85, "layer_saving": 0.3}}]
    row = {"saving": 0.25, "alpha": 0.05, "seeds": seeds, "test": {"metric": 0.86, "layer_saving": 0.25}}
    table = at_savings_table([row], points, "acc")
    assert "| set saving | alpha | acc | layer saving | entropy | maxprob | policy - entropy |" in table
    # entropy 0.85 at the mean 25%; the gaps: 0.87 - 0.86 at 20%, 0.85 - 0.84 at 30%: +1.00 points
    assert "| 25% | 0.05 | 0.8600 ± 0.0141 | 25.0% | 0.8500 | 0.8500 | +1.00 pt |" in table
    # without entropy's points there is no gap to read
    assert "| 25% | 0.05 | 0.8600 ± 0.0141 | 25.0% | 0.8500 | - |" in at_savings_table([row], points[2:], "acc")

