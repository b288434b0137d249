"""ConsistentEE as a whole: the policy learns instance-dependent exits; stages resume; init_from."""
from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from ee_lightning.training import trainers
from ee_lightning.inference.layer_cache import CachedLayerDataset
from ee_lightning.exits.rules import policy_exits
from ee_lightning.tasks import TaskSpec
from ee_lightning.training.systems.joint import joint_model_loss
from ee_lightning.training.systems.policy import PolicySystem
from tests.conftest import make_tiny_model
from ee_lightning.app.train import train
from ee_lightning.app.validate import ConfigError
from tests.conftest import compose_train, data_overrides

FAST = ["logger=csv", "trainer.enable_progress_bar=false", "report.latency.enabled=false"]
TINY_RUN = ["backbone=tiny_bert", "method=consistentee", "method.finetune.epochs=1", "method.policy.epochs=2",
            "data.batch_size=8", *FAST]


def separable_cache(n: int = 256, layers: int = 4, hidden: int = 32, hard_from: int = 3, seed: int = 0):
    """Generated per-layer outputs: easy rows are right at every head, hard rows only from
    layer `hard_from` on; the pooled state says which is which (feature 0 = +/-2)."""
    g = torch.Generator().manual_seed(seed)
    easy = torch.arange(n) % 2 == 0
    labels = torch.randint(0, 2, (n,), generator=g)
    pooled = torch.randn(layers, n, hidden, generator=g) * 0.5
    pooled[:, :, 0] = torch.where(easy, 2.0, -2.0)
    right = torch.nn.functional.one_hot(labels, 2).float() * 4 - 2  # logits favouring the label
    logits = torch.empty(layers, n, 2)
    for layer in range(layers):
        correct_here = easy | torch.tensor(layer + 1 >= hard_from)
        logits[layer] = torch.where(correct_here[:, None], right, -right)
    memorized = torch.where(easy, 1, hard_from)
    cache = {"pooled": pooled, "logits": logits, "labels": labels, "idx": torch.arange(n)}
    return cache, memorized, easy


def test_policy_learns_to_exit_easy_instances_early_and_keeps_accuracy(tmp_path):
    L.seed_everything(0)
    cfg = compose_train(["method=consistentee", "method.policy.alpha=0.1", "method.policy.lr=1e-2",
                         "method.policy.k=8", "method.policy.task_term=correct", "method.policy.depth_term=hardness"],
                        tmp_path / "run")
    cache, memorized, easy = separable_cache()
    model, _ = make_tiny_model("tiny_bert", output_size=2, with_policy=True)
    task = TaskSpec("generated", "classification", 2, "acc")
    system = PolicySystem(model, task, {}, rl=dict(cfg.method.policy), lr=cfg.method.policy.lr, tau=0.5, tolerance=0.5)
    loader = DataLoader(CachedLayerDataset(cache, memorized), batch_size=64, shuffle=True)
    trainer = L.Trainer(max_epochs=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(system, train_dataloaders=loader)

    with torch.no_grad():
        policy = system.model.policy
        probs = torch.stack([policy(layer, cache["pooled"][layer], cache["logits"][layer]) for layer in range(4)])
    exits = policy_exits(probs, 0.5)
    at_exit = cache["logits"][exits - 1, torch.arange(len(exits))].argmax(-1)
    accuracy = (at_exit == cache["labels"]).float().mean()
    full_accuracy = (cache["logits"][-1].argmax(-1) == cache["labels"]).float().mean()
    assert exits[easy].float().mean() < 1.5, exits[easy].float().mean()
    assert exits[~easy].float().mean() >= 2.9, exits[~easy].float().mean()
    assert accuracy >= full_accuracy - 0.02


@pytest.mark.slow
def test_consistentee_runs_all_stages_and_writes_methods(tmp_path):
    run = tmp_path / "run"
    cfg = compose_train([*TINY_RUN, *data_overrides("glue", tmp_path), "method.joint.enabled=true",
                         "method.joint.layer_loss_weight=0.5", "report.latency.enabled=true",
                         "report.latency.num_examples=8", "report.latency.repeats=1", "report.latency.warmup=1"], run)
    results = train(cfg)
    written = json.loads((run / "results.json").read_text())
    assert set(written["methods"]) >= {"consistentee", "full"}
    for method in written["methods"].values():
        assert {"metric", "avg_exit_layer", "layer_saving", "speedup"} <= set(method)
        assert method["layer_saving"] == pytest.approx(1 - method["avg_exit_layer"] / 4)
        assert method["speedup"] == pytest.approx(4 / method["avg_exit_layer"])
    assert set(json.loads((run / "stages.json").read_text())) == {"finetune", "policy", "joint"}
    assert results.methods["full"].metric == pytest.approx(written["full"], abs=1e-6)
    assert "wallclock_speedup_b1" in written["methods"]["consistentee"]["wallclock"]
    for name in ("pareto.csv", "pareto.md", "pareto.png"):
        assert (run / name).is_file()
    assert sum(written["hardness_histogram"]) == 48


def test_the_joint_loss_is_the_loss_at_the_sampled_exits_plus_the_weighted_stage_one_loss():
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # [L=3, B=2]
    exits = torch.tensor([[1, 3], [2, 2]])                          # [K=2, B]: layers 1..L
    # the exits' losses 1, 6, 3, 4 -> 3.5; the layers' batch means 1.5, 3.5, 5.5
    assert [v.item() for v in joint_model_loss(losses, exits)] == [pytest.approx(3.5), pytest.approx(3.5)]
    assert [v.item() for v in joint_model_loss(losses, exits, 0.5)] == [pytest.approx(3.5), pytest.approx(3.5 + 0.5 * 3.5)]
    weighted = joint_model_loss(losses, exits, 1.0, torch.tensor([1.0, 2.0, 3.0]))
    assert [v.item() for v in weighted] == [pytest.approx(3.5), pytest.approx(3.5 + 25 / 6)]


@pytest.mark.parametrize("epochs, every, validated", [(4, 2, [1, 3]), (2, 4, [1])])
def test_the_policy_stage_validates_every_n_epochs_and_at_least_once(tmp_path, epochs, every, validated):
    run = tmp_path / "run"
    cfg = compose_train([*TINY_RUN, *data_overrides("glue", tmp_path), f"method.policy.epochs={epochs}",
                         f"method.policy.validate_every={every}", "method.frontier.alphas=[]"], run)
    train(cfg)
    records = [json.loads(line) for line in (run / "exit_histograms.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["stage"] == "policy" and r["split"] == "val"] == validated
    assert [r["epoch"] for r in records if r["stage"] == "policy" and r["split"] == "train"] == list(range(epochs))


class FailOnSecondPolicyEpoch(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated interruption")


@pytest.mark.slow
def test_interrupted_run_resumes_from_the_stage_it_was_in(tmp_path, monkeypatch):
    run = tmp_path / "run"
    overrides = [*TINY_RUN, *data_overrides("glue", tmp_path)]
    original = trainers.build_callbacks

    def with_failure(cfg, stage, run_dir):
        callbacks = original(cfg, stage, run_dir)
        return callbacks + [FailOnSecondPolicyEpoch()] if stage == "policy" else callbacks

    monkeypatch.setattr(trainers, "build_callbacks", with_failure)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        train(compose_train(overrides, run))
    ledger = json.loads((run / "stages.json").read_text())
    assert set(ledger) == {"finetune"}
    stage_one = ledger["finetune"]["checkpoint"]
    stamp = (run / "checkpoints" / "policy" / "last.ckpt").stat().st_mtime_ns
    assert torch.load(run / "checkpoints" / "policy" / "last.ckpt", weights_only=False)["epoch"] == 0

    monkeypatch.setattr(trainers, "build_callbacks", original)
    train(compose_train(overrides, run))
    ledger = json.loads((run / "stages.json").read_text())
    assert ledger["finetune"]["checkpoint"] == stage_one  # stage 1 was not run again
    assert set(ledger) == {"finetune", "policy"}
    resumed = torch.load(run / "checkpoints" / "policy" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == 1 and (run / "checkpoints" / "policy" / "last.ckpt").stat().st_mtime_ns != stamp
    assert (run / "results.json").is_file()


@pytest.mark.slow
def test_init_from_skips_stage_one_and_reuses_hardness(tmp_path):
    first = tmp_path / "first"
    train(compose_train([*TINY_RUN, *data_overrides("glue", tmp_path)], first))
    stage_one = json.loads((first / "stages.json").read_text())["finetune"]["checkpoint"]
    artefact = stage_one.replace(".ckpt", ".hardness.pt")
    outputs = stage_one.replace(".ckpt", ".train_outputs.pt")
    stamp, outputs_stamp = os.stat(artefact).st_mtime_ns, os.stat(outputs).st_mtime_ns

    second = tmp_path / "second"
    results = train(compose_train([*TINY_RUN, *data_overrides("glue", tmp_path), f"init_from={stage_one}",
                                   "method.policy.alpha=0.2"], second))
    assert set(json.loads((second / "stages.json").read_text())) == {"policy"}
    assert os.stat(artefact).st_mtime_ns == stamp  # reused, not rewritten
    assert os.stat(outputs).st_mtime_ns == outputs_stamp
    assert results.checkpoints["finetune"] == stage_one


@pytest.mark.slow
def test_init_from_of_another_backbone_is_refused(tmp_path):
    first = tmp_path / "first"
    train(compose_train(["backbone=tiny_distilbert", "method=finetune", "method.finetune.epochs=1",
                         *data_overrides("glue", tmp_path), *FAST], first))
    stage_one = json.loads((first / "stages.json").read_text())["finetune"]["checkpoint"]
    with pytest.raises(ValueError, match="tiny_distilbert.*tiny_bert|backbone="):
        train(compose_train([*TINY_RUN, *data_overrides("glue", tmp_path), f"init_from={stage_one}"], tmp_path / "x"))


def test_init_from_missing_file_is_named(tmp_path):
    cfg = compose_train([*TINY_RUN, *data_overrides("glue", tmp_path), "init_from=/nowhere/stage1.ckpt"],
                        tmp_path / "run")
    with pytest.raises(ConfigError, match="init_from=/nowhere/stage1.ckpt: the file does not exist"):
        train(cfg)


def test_the_normalised_policy_reads_the_state_on_one_scale_and_older_specs_read_it_raw():
    from ee_lightning.modeling.exit_policy import ExitPolicy
    from ee_lightning.modeling.saved import assemble
    from tests.conftest import backbone_cfg
    from ee_lightning.modeling.backbones import build_backbone

    torch.manual_seed(0)
    state, logits = torch.randn(5, 8), torch.randn(5, 2)
    normalised = ExitPolicy(3, 8, 2, hidden=4, normalize_state=True)
    raw = ExitPolicy(3, 8, 2, hidden=4)
    raw.load_state_dict(normalised.state_dict())  # the same weights: only the reading differs
    for layer in range(3):
        # standardised over the features: a state's scale and offset do not reach the net
        assert torch.allclose(normalised.logit(layer, 4.0 * state + 2.0, logits), normalised.logit(layer, state, logits),
                              atol=1e-5)
        assert not torch.allclose(raw.logit(layer, 4.0 * state + 2.0, logits), raw.logit(layer, state, logits))
        standard = (state - state.mean(-1, keepdim=True)) / state.var(-1, unbiased=False, keepdim=True).add(1e-5).sqrt()
        assert torch.allclose(normalised.logit(layer, state, logits), raw.logit(layer, standard, logits), atol=1e-5)
    # a run saved before the option existed has no key in its spec: its policy reads the state raw, as it was trained
    backbone, _ = build_backbone(backbone_cfg())
    policy = {"hidden": 4, "use_confidence": False, "detach_state": True}
    assert assemble(backbone, {"dropout": 0.0, "pooling": "cls"}, policy, TaskSpec("toy")).policy.normalize_state is False
    policy["normalize_state"] = True
    assert assemble(backbone, {"dropout": 0.0, "pooling": "cls"}, policy, TaskSpec("toy")).policy.normalize_state is True
