"""ee-train end to end on tiny backbones: composition of every family x data option, fdr runs,
results.json, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from ee_lightning.app.train import train
from tests.conftest import DATA_OPTIONS, ROOT, TINY_BACKBONES, compose_train, data_overrides

FAST = ["logger=csv", "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
@pytest.mark.parametrize("data", DATA_OPTIONS)
def test_every_family_and_data_option_composes(backbone, data, tmp_path):
    cfg = compose_train([f"backbone={backbone}", *data_overrides(data, tmp_path), "debug=fdr"], tmp_path / "run")
    assert cfg.backbone.name == backbone
    assert cfg.data.name == data
    assert cfg.trainer.fast_dev_run is True
    assert cfg.data._target_.startswith("ee_lightning.data.")


@pytest.mark.slow
@pytest.mark.parametrize("backbone,data", [(b, "glue") for b in TINY_BACKBONES] +
                         [("tiny_bert", d) for d in DATA_OPTIONS if d != "glue"])
def test_fast_dev_run_every_family_and_data_option(backbone, data, tmp_path):
    """`ee-train backbone=<family> data=<option> debug=fdr`: every family once, every data option once."""
    cfg = compose_train([f"backbone={backbone}", *data_overrides(data, tmp_path), "debug=fdr",
                         "method=finetune", *FAST], tmp_path / "run")
    results = train(cfg)
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["num_layers"] == 4 == len(written["layer_metrics"])
    assert written["full"] == written["layer_metrics"][-1] == results.full
    assert written["metric_name"] == "acc" and written["task"]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_fast_dev_run_consistentee_every_family(backbone, tmp_path):
    """`ee-train backbone=<family> method=consistentee method.joint.enabled=true debug=fdr`: every
    ConsistentEE stage (fine-tune, policy, joint) and the exit report on every family."""
    run = tmp_path / "run"
    cfg = compose_train([f"backbone={backbone}", *data_overrides("glue", tmp_path), "debug=fdr", "method=consistentee",
                         "method.joint.enabled=true", "report.latency.enabled=false", *FAST], run)
    results = train(cfg)
    assert set(json.loads((run / "stages.json").read_text())) == {"finetune", "policy", "joint"}
    written = json.loads((run / "results.json").read_text())
    assert written["num_layers"] == 4 and set(written["methods"]) >= {"consistentee", "full"}
    assert 1 <= results.methods["consistentee"].avg_exit_layer <= 4


@pytest.mark.slow
def test_finetune_learns_and_checkpoints(tmp_path):
    """A few real epochs on separable generated text: the last layer learns, checkpoints are written."""
    run = tmp_path / "run"
    cfg = compose_train(["backbone=tiny_bert", *data_overrides("glue", tmp_path), "method=finetune",
                         "method.finetune.epochs=6", "method.finetune.lr=3e-3", "data.batch_size=8", *FAST], run)
    results = train(cfg)
    assert results.full >= 0.9, results
    assert (run / "checkpoints" / "finetune" / "last.ckpt").is_file()
    assert (run / "csv" / "finetune" / "metrics.csv").is_file()
    header = (run / "csv" / "finetune" / "metrics.csv").read_text().splitlines()[0]
    assert "val/acc_L4" in header and "val/acc_L1" in header


def test_exit_heads_learn_at_head_lr_and_the_backbone_at_lr(tmp_path):
    """method.finetune.head_lr gives the freshly initialised heads their own rate; the checkpoint's optimizer
    says so."""
    import torch

    run = tmp_path / "run"
    cfg = compose_train(["backbone=tiny_bert", *data_overrides("glue", tmp_path), "method=finetune",
                         "method.finetune.lr=1e-5", "method.finetune.head_lr=1e-3", "data.batch_size=8", *FAST], run)
    train(cfg)
    checkpoint = torch.load(run / "checkpoints" / "finetune" / "last.ckpt", weights_only=False)
    tensors_at = {}
    for group in checkpoint["optimizer_states"][0]["param_groups"]:
        tensors_at[group["initial_lr"]] = tensors_at.get(group["initial_lr"], 0) + len(group["params"])
    assert tensors_at[1e-3] == 2 * 4  # a weight and a bias for each of tiny_bert's 4 exit heads
    assert set(tensors_at) == {1e-5, 1e-3} and tensors_at[1e-5] > 8


def test_self_distillation_reaches_stage_one(tmp_path):
    """method.finetune.distill_weight and distill_temperature reach the stage-1 system: its checkpoint records
    them."""
    import torch

    run = tmp_path / "run"
    cfg = compose_train(["backbone=tiny_bert", *data_overrides("glue", tmp_path), "method=finetune",
                         "method.finetune.distill_weight=0.5", "method.finetune.distill_temperature=2.0",
                         "data.batch_size=8", *FAST], run)
    train(cfg)
    checkpoint = torch.load(run / "checkpoints" / "finetune" / "last.ckpt", weights_only=False)
    assert checkpoint["hyper_parameters"]["distill_weight"] == 0.5
    assert checkpoint["hyper_parameters"]["distill_temperature"] == 2.0


def test_unknown_backbone_lists_the_options(tmp_path):
    with pytest.raises(MissingConfigException, match="tiny_bert"):
        compose_train(["backbone=not_a_model"], tmp_path / "run")


def test_unknown_data_option_lists_the_options(tmp_path):
    with pytest.raises(MissingConfigException, match="rotten_tomatoes"):
        compose_train(["data=imagenet"], tmp_path / "run")


def test_misspelled_key_is_named(tmp_path):
    with pytest.raises(ConfigCompositionException, match=r"method.polcy is not a known key: did you mean method.policy\?"):
        compose_train(["method=consistentee", "method.polcy.k=3"], tmp_path / "run")


def test_console_script_reports_a_bad_option():
    out = subprocess.run([sys.executable, "-m", "ee_lightning.app.cli", "backbone=nope"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "Could not find 'backbone/nope'" in out.stderr and "minilm_l6" in out.stderr
