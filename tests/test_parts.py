"""Checkpoints load by part: a stage-1 checkpoint serves every policy setting, a mismatched part is
refused naming the part and both shapes, and ee-eval needs only the checkpoint."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from ee_lightning.app.train import train
from ee_lightning.modeling.saved import load_parts
from tests.conftest import ROOT, compose_train, data_overrides, make_tiny_model
from tests.test_sweeps import ee_train, tiny_args

FAST = ["logger=csv", "trainer.enable_progress_bar=false", "report.latency.enabled=false"]
TINY_RUN = ["backbone=tiny_bert", "method=consistentee", "method.finetune.epochs=1", "method.policy.epochs=1",
            "data.batch_size=8", *FAST]


def policy_state(checkpoint: str) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {key: value for key, value in state.items() if key.startswith("model.policy.")}


def test_a_part_of_another_shape_is_refused_naming_part_and_shapes():
    source, _ = make_tiny_model(with_policy=True)
    target, _ = make_tiny_model(with_policy=True, use_confidence=True)  # policy reads H + C + 1 inputs
    state = {f"model.{key}": value for key, value in source.state_dict().items()}
    load_parts(target, state, ("backbone", "heads"), "stage1.ckpt")  # what a new policy needs: fine
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(target.backbone.state_dict()[key], value)
    with pytest.raises(ValueError, match=r"stage1.ckpt.*the policy does not match.*nets\.0\.0\.weight.*"
                                         r"\[32, 32\] in the checkpoint but \[32, 35\] here"):
        load_parts(target, state, ("policy",), "stage1.ckpt")


@pytest.mark.slow
def test_a_stage_one_checkpoint_serves_a_sweep_over_the_policy_net_shape(tmp_path):
    """`ee-train -m init_from=<stage 1> policy.hidden=8,16 policy.use_confidence=false,true`: all four
    jobs finish, each with a policy of the shape it asked for."""
    first = tmp_path / "first"
    ee_train([*tiny_args(tmp_path), "method=consistentee", f"hydra.run.dir={first}", "logger=csv"], tmp_path)
    stage_one = json.loads((first / "stages.json").read_text())["finetune"]["checkpoint"]

    sweep = tmp_path / "sweep"
    ee_train(["-m", *tiny_args(tmp_path), "method=consistentee", f"init_from={stage_one}", "logger=csv",
              "policy.hidden=8,16", "policy.use_confidence=false,true", f"hydra.sweep.dir={sweep}"], tmp_path,
             timeout=600)
    rows = list(csv.DictReader(open(sweep / "sweep.csv", newline="")))
    assert [r["status"] for r in rows] == ["done"] * 4, rows
    hidden_size, classes = 32, 2
    for job in range(4):
        overrides = (sweep / str(job) / ".hydra" / "overrides.yaml").read_text()
        hidden = 8 if "policy.hidden=8" in overrides else 16
        inputs = hidden_size + (classes + 1 if "use_confidence=true" in overrides.lower() else 0)
        ledger = json.loads((sweep / str(job) / "stages.json").read_text())
        assert set(ledger) == {"policy"}  # stage 1 came from init_from
        weights = policy_state(ledger["policy"]["checkpoint"])
        assert tuple(weights["model.policy.nets.0.0.weight"].shape) == (hidden, inputs), (job, overrides)


@pytest.mark.slow
def test_resuming_a_finished_policy_stage_with_another_policy_shape_is_refused(tmp_path):
    run = tmp_path / "run"
    overrides = [*TINY_RUN, *data_overrides("glue", tmp_path)]
    train(compose_train(overrides, run))
    with pytest.raises(ValueError, match=r"stages.json policy=.*the policy does not match.*nets\.0\.0\.bias has "
                                         r"shape \[32\] in the checkpoint but \[8\] here"):
        train(compose_train([*overrides, "policy.hidden=8"], run))


@pytest.mark.slow
def test_ee_eval_runs_from_the_checkpoint_alone(tmp_path):
    """The pretrained folder the run started from is moved away: the checkpoint carries the backbone's
    architecture, the heads, the policy, the task and the tokenizer."""
    pretrained = tmp_path / "pretrained"
    model, tokenizer = make_tiny_model("tiny_bert")
    model.backbone.model.save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)
    run = tmp_path / "run"
    train(compose_train([*TINY_RUN, *data_overrides("glue", tmp_path), f"backbone.pretrained_path={pretrained}"], run))
    checkpoint = json.loads((run / "stages.json").read_text())["policy"]["checkpoint"]
    shutil.move(pretrained, tmp_path / "moved-away")

    out_dir = tmp_path / "eval"
    ee_train_eval = [f"ckpt_path={checkpoint}", f"hydra.run.dir={out_dir}", "report.latency.enabled=false"]
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", "from ee_lightning.app.cli import eval_main; eval_main()",
                          *ee_train_eval], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(open(out_dir / "pareto.csv", newline="")))
    assert {"policy", "entropy", "full"} <= {row["rule"] for row in rows}
    full = next(row for row in rows if row["rule"] == "full")
    results = json.loads((run / "results.json").read_text())
    assert float(full["metric"]) == pytest.approx(results["full"])  # the same weights, the same test split
