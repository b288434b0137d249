"""experiments/token_policy_variants.py: the decoder's token policy retrained on a finished run's caches and
scored teacher-forced on its held-out responses; and the scoring it uses (`lm_pipeline.policy_points`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ee_lightning.modeling.lm_exits import TokenExitPolicy
from ee_lightning.training.lm_pipeline import policy_points
from tests.conftest import ROOT
from tests.test_saved_model import save_tiny_llama, write_prompt_files

CONFIDENCE = "confidence of the frequent rows as input"  # the study's variant of that name


def test_the_confidence_policy_reads_the_state_on_one_scale_and_the_confidence_as_given():
    sys.path.insert(0, str(ROOT / "experiments"))
    from token_policy_variants import ConfidencePolicy, with_confidence

    torch.manual_seed(0)
    states, confidence = torch.randn(5, 3, 8), torch.rand(3, 5, 2)  # [N, E, H], [E, N, 2]
    joined = with_confidence(states, confidence)
    assert joined.shape == (5, 3, 10) and torch.equal(joined[2, 1, 8:], confidence[1, 2])
    policy = ConfidencePolicy(6, 8, hidden=4, exit_layers=[2, 4, 6])
    assert set(policy.heads) == {"2", "4"}
    scaled = with_confidence(100 * states, confidence)
    assert torch.allclose(policy.logit(2, scaled[:, 0]), policy.logit(2, joined[:, 0]), atol=1e-4)
    other = with_confidence(states, 1 - confidence)
    assert not torch.allclose(policy.logit(2, other[:, 0]), policy.logit(2, joined[:, 0]))
    assert torch.equal(policy.logit(6, joined[:, 2]), TokenExitPolicy(6, 8, exit_layers=[2, 4, 6]).logit(6, joined[:, 2]))


def fixed_policy(exit_logits: dict[int, float]) -> TokenExitPolicy:
    """A policy over exits 1, 2, 3 of 3 layers whose logit at each exit below the last is a constant."""
    policy = TokenExitPolicy(3, 4, hidden=2)
    with torch.no_grad():
        for layer, logit in exit_logits.items():
            last = policy.heads[str(layer)][-1]
            last.weight.zero_()
            last.bias.fill_(logit)
    return policy


def test_policy_points_count_saving_agreement_and_exits_by_hand():
    # 4 tokens; exit 1 keeps the full token on tokens 0 and 1, exit 2 on tokens 0, 1 and 2, exit 3 always
    cache = {"states": torch.randn(4, 3, 4), "full_tokens": torch.tensor([5, 6, 7, 8])}
    tables = {"tokens": torch.tensor([[5, 6, 0, 0], [5, 6, 7, 0], [5, 6, 7, 8]])}
    policy = fixed_policy({1: -2.0, 2: 0.0})  # p = 0.12 at exit 1, 0.5 at exit 2
    low, mid, high = policy_points(policy, cache, tables, [0.1, 0.3, 0.6], num_layers=3)
    assert low["exits"] == [4, 0, 0] and low["layer_saving"] == pytest.approx(2 / 3)
    assert low["agreement_with_full"] == pytest.approx(0.5)
    assert mid["exits"] == [0, 4, 0] and mid["layer_saving"] == pytest.approx(1 / 3)
    assert mid["agreement_with_full"] == pytest.approx(0.75)
    assert high["exits"] == [0, 0, 4] and high["layer_saving"] == 0 and high["agreement_with_full"] == 1


def test_most_saving_keeps_the_level_or_reports_none():
    sys.path.insert(0, str(ROOT / "experiments"))
    from token_policy_variants import most_saving

    points = [{"tau": 0.1, "layer_saving": 0.3, "agreement_with_full": 0.9},
              {"tau": 0.5, "layer_saving": 0.2, "agreement_with_full": 0.97},
              {"tau": 0.9, "layer_saving": 0.1, "agreement_with_full": 0.99}]
    assert most_saving(points, 0.95)["tau"] == 0.5
    assert most_saving(points, 0.9)["tau"] == 0.1
    assert most_saving(points, 0.995) is None


def test_margin_points_by_hand_over_the_whole_vocabulary_and_the_frequent_rows():
    sys.path.insert(0, str(ROOT / "experiments"))
    from types import SimpleNamespace

    from ee_lightning.modeling.lm_exits import LMExitHeads
    from tests.test_lm_cross_fit import IdentityHead
    from token_policy_variants import margin_points

    # two exits (layers 1, 2 of 2) whose logits are the cached states themselves (an untrained exit adds nothing,
    # the head is the identity); a vocabulary of 3
    decoder = IdentityHead(3)
    decoder.num_layers, decoder.vocab_size = 2, 3
    exits = LMExitHeads(2, 3, exit_every=1, rank=1)
    model = SimpleNamespace(parts=SimpleNamespace(exits=exits), decoder=decoder)
    last = torch.tensor([0.1, 0.2, 0.7]).log()
    states = torch.stack([torch.stack([torch.tensor([0.9, 0.05, 0.05]).log(), last]),   # margin 0.85 at exit 1
                          torch.stack([torch.tensor([0.5, 0.3, 0.2]).log(), last])])    # margin 0.2
    held_out = {"states": states, "full_tokens": torch.tensor([0, 2]), "targets": torch.tensor([0, 2]),
                "exit_layers": [1, 2]}
    parts = {"model": model, "held_out": held_out, "train": {"full_tokens": torch.tensor([1, 1, 2, 2, 2, 0])},
             "held_out_tables": {"tokens": torch.tensor([[0, 0], [2, 2]])},
             "cfg": SimpleNamespace(adapters=SimpleNamespace(batch_size=64))}
    whole, frequent = margin_points(parts, frequent=2).values()
    by_tau = {p["tau"]: p for p in whole}
    # token 0 leaves at exit 1 (its token is the full model's) while the threshold is below 0.85; token 1 never
    assert by_tau[0.8]["exits"] == [1, 1] and by_tau[0.8]["layer_saving"] == pytest.approx(0.25)
    assert by_tau[0.8]["agreement_with_full"] == 1
    assert by_tau[0.9]["exits"] == [0, 2] and by_tau[0.9]["layer_saving"] == 0
    assert by_tau[0.9]["agreement_with_full"] == 0.5  # exit 2's token 2 is not token 0's full token
    # over tokens 2 and 1 (the most frequent) token 0's margin is 0.05 - 0.05 = 0, token 1's 0.6 - 0.4: both stay
    assert all(p["exits"] == [0, 2] for p in frequent)


@pytest.mark.slow
def test_the_study_retrains_the_runs_policy_and_scores_every_tau_on_the_held_out_cache(tmp_path):
    pretrained = save_tiny_llama(tmp_path / "pretrained")
    files = write_prompt_files(tmp_path / "data")
    run = tmp_path / "run"
    subprocess.run([
        sys.executable, "-m", "ee_lightning.app.cli", "experiment=aclsum_consistentee", "backbone=tiny_llama",
        f"backbone.pretrained_path={pretrained}", "logger=csv", "data=jsonl_generation",
        f"data.train_file={files['train']}", f"data.validation_file={files['validation']}",
        f"data.test_file={files['test']}", "data.max_eval_samples=null", "data.max_prompt_length=64",
        "method.lm_exits.exit_every=1", "method.lm_exits.policy.epochs=2", "method.generation.max_prompts=2",
        "method.generation.batch_size=2", "method.generation.max_new_tokens=3", "method.generation.rules.static=null",
        "method.generation.rules.policy=[0.5]", "method.generation.rules.softmax_margin=null",
        "method.generation.rules.saturation=null", "method.generation.rules.classifier=null",
        "method.generation.calibration.split=null", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"],
        cwd=ROOT, check=True, capture_output=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})

    out = tmp_path / "study"
    command = [sys.executable, "experiments/token_policy_variants.py", "--run-dir", str(run), "--alphas", "0.1", "0.3",
               "--variants", "run's settings", "exact expected reward", CONFIDENCE, "--frequent", "8", "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)
    report = json.loads((out / "token_policy_variants.json").read_text())
    assert report["split"] == "validation"
    summary = json.loads((run / "results.json").read_text())["training_summary"]["evaluation"]
    for name in ("run's settings", "exact expected reward", CONFIDENCE):
        members = report["variants"][name]
        assert [(m["alpha"], m["seed"]) for m in members] == [(0.1, 42), (0.3, 42)]
        for member in members:
            assert [p["tau"] for p in member["points"]] == report["taus"]
            for point in member["points"]:
                assert sum(point["exits"]) == summary["tokens"]  # every held-out response token, once
                assert 0 <= point["layer_saving"] < 1 and 0 <= point["agreement_with_full"] <= 1
    assert "| exact expected reward | 0.3 | 42 |" in (out / "token_policy_variants.md").read_text()
    # the run's CALM classifier as a reference rule on the same held-out tokens
    assert [p["tau"] for p in report["classifier"]] == [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99]
    assert all(sum(p["exits"]) == summary["tokens"] for p in report["classifier"])
    assert "| the run's CALM classifier (threshold as tau) | - | - |" in (out / "token_policy_variants.md").read_text()
    # and CALM's softmax margin, over the whole vocabulary and over the most frequent training tokens
    assert len(report["margins"]) == 2
    for points in report["margins"].values():
        assert [p["tau"] for p in points] == [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99]
        assert all(sum(p["exits"]) == summary["tokens"] for p in points)
    assert "| softmax margin (threshold as tau) | - | - |" in (out / "token_policy_variants.md").read_text()

    # the same member twice: a seed fixes the policy
    again = tmp_path / "again"
    subprocess.run(command[:5] + ["0.3", "--variants", "exact expected reward", "--out", str(again)], cwd=ROOT,
                   check=True, capture_output=True, timeout=600)
    assert (json.loads((again / "token_policy_variants.json").read_text())["variants"]["exact expected reward"][0]
            ["points"] == report["variants"]["exact expected reward"][1]["points"])

    # cross-fitted: every training token scored by exits that did not train on its response
    sys.path.insert(0, str(ROOT / "experiments"))
    from ee_lightning.exits.lm_targets import token_memorized_exit
    from token_policy_variants import cross_fitted_scores, run_parts

    parts = run_parts(run)
    scores = cross_fitted_scores(parts, 2, seed=42)
    for key in ("tokens", "ce", "ce_full"):
        assert scores[key].shape == parts["scores"][key].shape
    assert not torch.equal(scores["ce_full"], parts["scores"]["ce_full"])  # not the run's exits' own scores
    # the experiment's memorized exit is against the full model's token
    assert torch.equal(scores["memorized"], token_memorized_exit(scores["tokens"], parts["train"]["full_tokens"]))
    crossed = tmp_path / "crossed"
    subprocess.run(command[:5] + ["0.3", "--cross-fit", "2", "--variants", "run's settings", CONFIDENCE, "--frequent",
                                  "8", "--out", str(crossed)], cwd=ROOT, check=True, capture_output=True, timeout=600)
    report = json.loads((crossed / "token_policy_variants.json").read_text())
    assert report["cross_fit"] == 2 and [m["alpha"] for m in report["variants"]["run's settings"]] == [0.3]
    assert all(sum(p["exits"]) == summary["tokens"] for p in report["variants"][CONFIDENCE][0]["points"])
    assert "out-of-fold exit scores (2 folds" in (crossed / "token_policy_variants.md").read_text()

    failed = subprocess.run([*command[:2], "--run-dir", str(tmp_path / "nowhere"), "--alphas", "0.1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and "must be an ee-train run directory" in failed.stderr
