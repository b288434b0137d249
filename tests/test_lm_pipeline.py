"""method=consistentee_lm end to end on a tiny decoder, and the experiment configs compose."""
from __future__ import annotations

import json

import pytest

from conftest import compose_train


def test_cpu_and_gpu_experiments_compose(tmp_path):
    cfg = compose_train(["experiment=aclsum_consistentee"], tmp_path / "cpu")
    assert cfg.method.name == "consistentee_lm" and cfg.backbone.name == "smollm2_135m" and cfg.backbone.kind == "decoder"
    assert cfg.data.name == "aclsum" and cfg.method.lm_exits.exit_every == 3
    assert cfg.method.generation.max_new_tokens <= 32 and cfg.method.generation.rules.policy
    gpu = compose_train(["experiment=llama_consistentee_gpu", "backbone.pretrained_path=/models/llama"], tmp_path / "gpu")
    assert gpu.backbone.name == "llama_3_8b" and gpu.backbone.pretrained_path == "/models/llama"
    assert gpu.trainer.accelerator == "gpu" and gpu.backbone.dtype == "bfloat16" and gpu.method.lm_exits.exit_every == 4
    assert gpu.method.lm_exits.lora.enabled and not cfg.method.lm_exits.lora.enabled  # LoRA on the GPU run only


def test_the_lm_method_refuses_an_encoder_backbone(tmp_path):
    from ee_lightning.app.train import train

    cfg = compose_train(["experiment=aclsum_consistentee", "backbone=tiny_bert"], tmp_path)
    with pytest.raises(ValueError, match="backbone.*decoder backbone"):
        train(cfg)


def test_generation_rule_points_come_from_the_one_rule_set():
    from ee_lightning.evaluation.generation_eval import RULE_ORDER, policy_at, rule_points_grid
    from ee_lightning.exits.rules import RULES, ConfirmedPolicyRule, PatienceRule, StaticRule

    assert set(RULE_ORDER) == set(RULES)
    grids = {"oracle": True, "static": None, "patience": True, "policy": [0.5], "classifier": [0.5],
             "softmax_margin": [0.2, 0.8], "saturation": None, "entropy": []}  # null and [] leave a rule out
    points = rule_points_grid(grids, [3, 6, 9, 12], has_policy=True, has_classifier=False)
    assert [(name, value) for name, value, _ in points] == [
        ("full", None), ("policy", 0.5), ("softmax_margin", 0.2), ("softmax_margin", 0.8),
        ("patience", 3), ("patience", 2), ("patience", 1),  # true: the default grid, counting exits (4: 3..1)
        ("static", 3), ("static", 6), ("static", 9), ("oracle", None)]  # no classifier trained: left out
    assert [v for _, v, _ in rule_points_grid({"static": [], "oracle": False}, [3, 6], True, True)] == [None]
    assert points[-2][2] == StaticRule(k=9) and points[4][2] == PatienceRule(patience=3)
    # the trained tau is always one of the policy's points: the exit-histogram callback receives its exits
    with_tau = rule_points_grid({"policy": [0.3, 0.5]}, [3, 6], has_policy=True, has_classifier=False, tau=0.6)
    assert [value for _, value, _ in with_tau] == [None, 0.3, 0.5, 0.6] and policy_at(with_tau, 0.6) == 3
    assert policy_at(with_tau, 0.7) is None
    # confirmed_policy: (tau, margin) pairs, left out without a trained policy
    pairs = rule_points_grid({"confirmed_policy": [[0.05, 0.35]]}, [3, 6], has_policy=True, has_classifier=False)
    assert [rule for _, _, rule in pairs][1:] == [ConfirmedPolicyRule(tau=0.05, margin=0.35)]
    assert len(rule_points_grid({"confirmed_policy": [[0.05, 0.35]]}, [3, 6], False, False)) == 1
    with pytest.raises(ValueError, match=r"unknown rule\(s\) \['margin'\]; rules: full, policy, confirmed_policy, "
                                         r"softmax_margin"):
        rule_points_grid({"margin": [0.5]}, [3, 6], has_policy=True, has_classifier=True)
    with pytest.raises(ValueError, match=r"method.generation.rules.static=\[7\]: rule 'static': k=7 is outside 1\.\.6"):
        rule_points_grid({"static": [7]}, [3, 6], has_policy=True, has_classifier=True)


@pytest.mark.slow
def test_tiny_decoder_runs_every_stage_and_reports_every_rule(tmp_path):
    from ee_lightning.app.train import train

    run_dir = tmp_path / "run"
    cfg = compose_train(["experiment=aclsum_consistentee", "backbone=tiny_llama", "logger=many",  # wandb offline
                         "data.max_train_samples=8", "data.max_eval_samples=4", "data.max_prompt_length=64",
                         "method.lm_exits.exit_every=1", "method.lm_exits.policy.epochs=1",
                         "method.lm_exits.policy.propagated.epochs=1", "method.lm_exits.policy.propagated.batch_size=4",
                         "method.generation.max_prompts=4", "method.generation.max_new_tokens=4",
                         "method.generation.rules.static=null", "method.generation.rules.policy=[0.3,0.4,0.5]",
                         "method.generation.rules.softmax_margin=[0.5]", "method.generation.rules.saturation=[0.9]",
                         "method.generation.rules.classifier=[0.5]",
                         "method.lm_exits.confidence_tokens=6",
                         "method.generation.rules.confirmed_policy=[[0.3,0.0],[0.3,0.5]]",
                         "method.generation.kv=propagate"], run_dir)  # deferral: tests/test_deferred.py
    results = train(cfg)
    saved = json.loads((run_dir / "results.json").read_text())
    rules = [p["rule"] for p in saved["points"]]
    assert rules == ["full", "policy", "policy", "policy", "confirmed_policy", "confirmed_policy", "softmax_margin",
                     "saturation", "classifier", "static", "static", "static", "oracle"]
    # the exits kept the rows of the tokens the model wrote most often (and EOS), and saved them with the model
    frequent = saved["training_summary"]["confidence_tokens"]
    assert 2 <= frequent <= 7
    assert json.loads((run_dir / "model" / "config.json").read_text())["exits"]["confidence_tokens"] == frequent
    # confirmed at margin 0 is the policy at its tau: every proposal confirmed
    points = {(p["rule"], str(p["value"])): p for p in saved["points"]}
    assert points[("confirmed_policy", "[0.3, 0.0]")]["exit_histogram"] == points[("policy", "0.3")]["exit_histogram"]
    full = saved["points"][0]
    assert full["rougeL_vs_full"] == 1.0 and full["token_agreement"] == 1.0 and full["avg_exit_layer"] == 4.0
    assert all(sum(p["exit_histogram"]) == p["tokens"] for p in saved["points"])
    assert [p["value"] for p in saved["points"] if p["rule"] == "static"] == [1, 2, 3]
    assert all(p["flops_saving"] > 0 for p in saved["points"] if p["rule"] == "static")
    assert saved["transformers_generate"]["tokens_per_s"] > 0 and results.prompts == 4
    # the one results schema: the sweep summary and the job report read a decoder run too
    from ee_lightning.results import LMRunResults, RunResults

    read = RunResults.read(run_dir)
    assert isinstance(read, LMRunResults) and read.full == full["metric"]
    # ConsistentEE is the policy at the tau calibrated on validation prompts (else its trained tau, 0.5),
    # never the grid's middle point; the validation generation's own report chose it
    calibration = saved["calibration"]
    assert calibration["split"] == "validation" and calibration["prompts"] == 4 and calibration["level"] == 0.6
    validation = json.loads((run_dir / "checkpoints" / "lm_calibration" / "report.json").read_text())["points"]
    from ee_lightning.evaluation.calibration import calibrate

    assert calibration["chosen"] == {rule: {"value": p["value"], "validation": p["rougeL_vs_full"],
                                            "validation_layer_saving": p["layer_saving"]}
                                     for rule, p in calibrate(validation, 0.6).items()}
    tau = calibration["chosen"].get("policy", {"value": 0.5})["value"]
    assert read.methods["consistentee"].tau == tau == saved["policy_tau"] and read.methods["full"].layer_saving == 0.0
    assert [(p["rule"], p["value"]) for p in saved["points"] if p["calibrated"] is not None] == [
        (rule, c["value"]) for rule, c in calibration["chosen"].items()]
    for name in ("pareto.csv", "pareto.md", "pareto.png", "reward_curve.csv", "stages.json",
                 "checkpoints/lm_adapters/last.ckpt", "checkpoints/lm_policy/last.ckpt",
                 "checkpoints/lm_classifier/last.ckpt", "checkpoints/lm_generation/report.json"):
        assert (run_dir / name).is_file(), name
    # the encoders' run layout: every stage in the ledger
    # the experiment's caches are on the model's own responses, generated first
    assert saved["training_summary"]["responses"] == "model"
    assert list(json.loads((run_dir / "stages.json").read_text())) == [
        "lm_responses_train", "lm_responses_validation", "lm_cache_train", "lm_adapters", "lm_scores", "lm_policy", "lm_policy_propagated", "lm_classifier",
        "lm_cache_validation", "lm_calibration", "lm_generation"]
    # the rollouts under propagation trained the policy further (their own reward-curve rows), and the
    # summary says what the held-out policy agrees on under propagation
    curve = (run_dir / "reward_curve.csv").read_text()
    assert "lm_policy_propagated" in curve
    propagated = saved["training_summary"]["evaluation"]["under_propagation"]
    assert propagated["tokens"] > 0 and 0.0 <= propagated["policy_agreement_with_full"] <= 1.0
    assert 1.0 <= propagated["policy_mean_exit"] <= 4.0
    assert "ConsistentEE beside CALM" in (run_dir / "pareto.md").read_text()
    assert "Calibrated on validation (CALM-style)" in (run_dir / "pareto.md").read_text()
    # each prompt's tokens and exit layers under every rule point, in prompt order; the points count them
    generations = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert [(g["rule"], g["value"], g["prompt"]) for g in generations] == [
        (p["rule"], p["value"], i) for p in saved["points"] for i in range(4)]
    for point in saved["points"]:
        rows = [g for g in generations if (g["rule"], g["value"]) == (point["rule"], point["value"])]
        layers = [layer for g in rows for layer in g["exit_layers"]]
        assert len(layers) == point["tokens"] and [layers.count(l) for l in (1, 2, 3, 4)] == point["exit_histogram"]
        assert all(len(g["exit_layers"]) - len(g["tokens"]) in (0, 1) for g in rows)  # the EOS has an exit, no token
    assert {g["knob"] for g in generations if g["rule"] == "policy"} == {"tau"}
    assert saved["report"]["generations"] == str(run_dir / "generations.jsonl")
    # the generation's policy exits at the trained tau went through the exit-histogram callback
    lines = [json.loads(line) for line in (run_dir / "exit_histograms.jsonl").read_text().splitlines()]
    (generated,) = [line for line in lines if line["stage"] == "lm_generation"]
    (policy,) = [p for p in saved["points"] if p["rule"] == "policy" and p["value"] == 0.5]  # lm_exits.policy.tau
    assert generated["split"] == "test" and generated["buckets"] == {} and generated["exit_layers"] == [1, 2, 3, 4]
    assert sum(generated["counts"]) == policy["tokens"] > 0 and generated["counts"] == policy["exit_histogram"]
    assert any(line["stage"] == "lm_policy" and line["split"] == "train" for line in lines)  # sampled exits
    header = (run_dir / "csv" / "lm_generation" / "metrics.csv").read_text().splitlines()[0]
    assert "test/exit/frac_L1" in header
    # each stage its own wandb run; the generation's has the histogram
    ids = json.loads((run_dir / "wandb_ids.json").read_text())
    assert set(ids) == {"lm_adapters", "lm_policy", "lm_policy_propagated", "lm_classifier", "lm_calibration",
                        "lm_generation"}
    runs = {path.name.rsplit("-", 1)[1]: path for path in (run_dir / "wandb").glob("offline-run-*")}
    assert set(runs) == set(ids.values())
    assert b"test/exit/hist" in (runs[ids["lm_generation"]] / f"run-{ids['lm_generation']}.wandb").read_bytes()


@pytest.mark.slow
def test_a_decoder_build_that_draws_random_numbers_leaves_the_stages_unchanged(tmp_path, monkeypatch):
    # Converting the packaged GGUF builds a random model once (a first run draws, later ones load):
    # the stages must draw the same numbers either way.
    import torch

    from ee_lightning.app.train import train
    from ee_lightning.training import lm_pipeline

    def run(name: str) -> dict:
        cfg = compose_train(["experiment=aclsum_consistentee", "backbone=tiny_llama", "logger=csv",
                             "data.max_train_samples=8", "data.max_eval_samples=2", "data.max_prompt_length=64",
                             "method.lm_exits.exit_every=1", "method.lm_exits.policy.epochs=1",
                             "method.lm_exits.classifier.epochs=0", "method.generation.max_prompts=2",
                             "method.generation.max_new_tokens=2", "method.generation.rules.static=null",
                             "method.generation.rules.policy=[0.5]", "method.generation.rules.softmax_margin=null",
                             "method.generation.rules.saturation=null", "method.generation.rules.classifier=null"],
                            tmp_path / name)
        train(cfg)
        return {stage: torch.load(tmp_path / name / "checkpoints" / stage / "last.ckpt", weights_only=False)["state_dict"]
                for stage in ("lm_adapters", "lm_policy")}

    plain = run("plain")
    build = lm_pipeline.build_decoder
    monkeypatch.setattr(lm_pipeline, "build_decoder", lambda *a, **k: (build(*a, **k), torch.rand(1000))[0])
    drawing = run("drawing")
    for file, weights in plain.items():
        assert weights.keys() == drawing[file].keys()
        assert all(torch.equal(weights[key], drawing[file][key]) for key in weights), file


def test_a_static_layer_past_the_model_fails_before_any_training(tmp_path, monkeypatch):
    # The depth of a `pretrained_path` decoder is known only once it is built: the grid is checked
    # then, before the stages train (validation before loading covers configs that state the depth).
    from ee_lightning.training import lm_pipeline

    def must_not_train(*args, **kwargs):
        raise AssertionError("training started")

    from ee_lightning.app.train import train

    monkeypatch.setattr(lm_pipeline, "train_lm_exits", must_not_train)
    cfg = compose_train(["experiment=aclsum_consistentee", "backbone=tiny_llama", "logger=csv",
                         "method.generation.rules.static=[3,9]"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"method.generation.rules.static=\[3, 9\]: rule 'static': k=9 is outside 1..4"):
        train(cfg)


def test_the_gpu_experiment_shards_the_lora_stage_with_fsdp_and_replicates_the_rest(tmp_path):
    # Composed, validated and built here; never run on a GPU by these tests.
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from ee_lightning.app.validate import validate_config
    from ee_lightning.training.trainers import is_sharded

    cfg = compose_train(["experiment=llama_consistentee_gpu", "backbone.pretrained_path=/models/llama"], tmp_path)
    validate_config(cfg)
    assert cfg.trainer.precision == "bf16-true" and cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == -1
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and is_sharded(dict(cfg.trainer.strategy))
    assert strategy.kwargs["use_orig_params"] is True
    assert LlamaDecoderLayer in strategy.kwargs["auto_wrap_policy"]._module_classes  # each layer its own FSDP unit
    assert LlamaDecoderLayer in strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes
    assert not is_sharded("ddp") and not is_sharded(None) and is_sharded("deepspeed_stage_3")
