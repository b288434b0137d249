"""Numerical faults: a NaN injected into a logit, a cached input or a reward stops the stage with
the stage, the step and the batch's row ids, and the last checkpoint before it stays good; with
skip_anomalies the faulty step's update is skipped and counted."""
from __future__ import annotations

import math

import pytest
import torch

from ee_lightning.app.train import train
from ee_lightning.training.faults import NumericalFault, non_finite
from ee_lightning.training.systems.finetune import FinetuneSystem
from tests.conftest import compose_train, data_overrides

FAST = ["trainer.enable_progress_bar=false", "logger=csv", "report.latency.enabled=false", "data.batch_size=8",
        "callbacks.step_checkpoint.every_n_train_steps=2", "trainer.log_every_n_steps=1"]


def test_non_finite_names_the_first_bad_tensor():
    assert non_finite({"a": torch.ones(3), "b": torch.tensor([1.0, math.inf]), "c": torch.tensor([math.nan])}) == "b"
    assert non_finite({"ids": torch.tensor([1, 2]), "none": None, "ok": torch.zeros(2)}) is None


def poison_heads_at(monkeypatch, step: int, seen: dict) -> None:
    """From global step `step` on, stage 1's exit heads return NaN logits (as an overflow would)."""
    original = FinetuneSystem.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step != step:
            return original(self, batch, batch_idx)
        seen["rows"] = batch["idx"].tolist()
        handle = self.model.heads.register_forward_hook(lambda module, inputs, output: output * math.nan,
                                                        prepend=True)
        try:
            return original(self, batch, batch_idx)
        finally:
            handle.remove()

    monkeypatch.setattr(FinetuneSystem, "training_step", training_step)


def test_nan_logit_stops_stage_one_with_step_and_rows_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    seen = {}
    poison_heads_at(monkeypatch, 3, seen)
    cfg = compose_train(["backbone=tiny_bert", *data_overrides("glue", tmp_path), "method=finetune", *FAST], run)
    with pytest.raises(NumericalFault) as caught:
        train(cfg)
    message = str(caught.value)
    assert "exit head logits" in message and "stage finetune" in message and "global step 3" in message
    assert f"row ids (idx) {seen['rows']}" in message
    last = run / "checkpoints" / "finetune" / "last.ckpt"
    assert str(last) in message
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == 2  # written before the fault; nothing written after it
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    assert not (run / "results.json").exists()


def test_skip_anomalies_skips_and_counts_the_faulty_step(tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison_heads_at(monkeypatch, 3, {})
    cfg = compose_train(["backbone=tiny_bert", *data_overrides("glue", tmp_path), "method=finetune", *FAST,
                         "callbacks.numerical_guard.skip_anomalies=true"], run)
    results = train(cfg)
    assert all(math.isfinite(value) for value in results.layer_metrics)
    weights = torch.load(run / "checkpoints" / "finetune" / "last.ckpt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in weights["state_dict"].values() if v.is_floating_point())
    assert weights["callbacks"]["NumericalGuard"]["skipped"] == 1
    metrics = (run / "csv" / "finetune" / "metrics.csv").read_text()
    assert "faults/skipped_steps" in metrics.splitlines()[0]


@pytest.mark.slow
def test_nan_in_the_cached_layer_outputs_stops_the_policy_stage_naming_the_row(tmp_path, monkeypatch):
    """Row 5's cached head logits (the policy stage's input) are corrupted: the stage stops at the first
    batch holding it, naming the row."""
    from ee_lightning.inference.layer_cache import CachedLayerDataset

    original = CachedLayerDataset.__getitem__

    def getitem(self, i):
        item = original(self, i)
        if int(item["idx"]) == 5:
            item["logits"] = item["logits"] * math.nan
        return item

    monkeypatch.setattr(CachedLayerDataset, "__getitem__", getitem)
    run = tmp_path / "run"
    cfg = compose_train(["backbone=tiny_bert", *data_overrides("glue", tmp_path), "method=consistentee", *FAST,
                         "method.finetune.epochs=1", "method.policy.epochs=1", "method.policy.batch_size=8"], run)
    with pytest.raises(NumericalFault) as caught:
        train(cfg)
    message = str(caught.value)
    assert "batch['logits']" in message and "stage policy" in message and "non-finite in rows [5]" in message
    assert "global step " in message and "epoch 0" in message


def test_a_nan_reward_stops_the_step_before_its_update(tmp_path):
    """The reward check on its own (a reward of NaN, e.g. from a NaN task loss with task_term=ce)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import SingleDeviceStrategy

    from ee_lightning.training.faults import NumericalGuard

    guard = NumericalGuard()
    guard.bind_stage("policy", tmp_path)
    trainer = SimpleNamespace(global_step=7, current_epoch=1, strategy=SingleDeviceStrategy("cpu"))
    guard.on_train_batch_start(trainer, None, {"idx": torch.tensor([3, 9])}, 2)
    module = SimpleNamespace(last_policy_step=SimpleNamespace(parts=SimpleNamespace(  # a policy stage's members
        reward=torch.tensor([[0.5, math.nan]]))), last_policy_memorized=None, num_exits=2, exit_layers=[1, 2])
    with pytest.raises(NumericalFault, match=r"policy reward: stage policy, global step 7, epoch 1, batch 2, "
                                             r"row ids \(idx\) \[3, 9\]"):
        guard.on_before_backward(trainer, module, torch.tensor(0.3))


def test_a_fault_on_another_process_stops_this_one_too(tmp_path):
    """Under DDP the decision is collective: a process whose own step is finite still stops when another
    process's step is not, instead of waiting for gradients that never come."""
    from types import SimpleNamespace

    from ee_lightning.training.faults import NumericalGuard

    class OtherProcessFaulted:
        def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
            assert all is False  # "any process": the OR of the decisions
            return True

    guard = NumericalGuard()
    guard.bind_stage("finetune", tmp_path)
    trainer = SimpleNamespace(global_step=4, current_epoch=0, strategy=OtherProcessFaulted())
    guard.on_train_batch_start(trainer, None, {"idx": torch.tensor([1, 2])}, 0)
    module = SimpleNamespace(last_policy_step=None)
    with pytest.raises(NumericalFault, match="another process's step: stage finetune, global step 4"):
        guard.on_before_backward(trainer, module, torch.tensor(0.3))
