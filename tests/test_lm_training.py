"""Decoder exits trained on cached states: per-token targets, the cache pass, and the three stages."""
from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from ee_lightning.exits.rules import policy_exits
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ee_lightning.data.generation import PromptResponseDataModule
from ee_lightning.exits.lm_targets import (agrees_with_last, exit_correct, exit_loss_weights, hardness_targets,
                                           token_memorized_exit)
from ee_lightning.training.callbacks.reward_curve import RewardCurve, read_curve
from ee_lightning.files import load_or_build
from ee_lightning.inference.lm_cache import collect_exit_states, predicting_positions
from ee_lightning.modeling.lm_exits import ExitClassifier, LMExitHeads, TokenExitPolicy
from ee_lightning.app.validate import lm_exits_config
from ee_lightning.training.lm_pipeline import per_exit_probs, train_lm_exits
from ee_lightning.training.stages import Stages
from ee_lightning.training.systems.lm import ExitAdapterSystem, ExitClassifierSystem, TokenPolicySystem, TokenStateDataset
from tests.conftest import CONF_DIR
from ee_lightning.modeling.backbones.decoders import wrap_decoder
from tests.lm_fixtures import LlamaLayers, tiny_chat_tokenizer, tiny_llama


def quiet_trainer(stage=None, max_epochs=1, log=False, replicate=False, **overrides):
    return L.Trainer(**{"max_epochs": max_epochs, "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu", **overrides})


def quiet_stages(run_dir) -> Stages:
    """A run's stages with bare Trainers (no loggers, no checkpoints): the ledger and caches in run_dir."""
    return Stages(run_dir, quiet_trainer)


# --------------------------------------------------------------------------- pure functions


def test_memorized_exit_per_token_hand_computed():
    # 3 exits, 4 tokens; targets 7, 8, 9, 5
    tokens = torch.tensor([[7, 1, 9, 5],
                           [7, 8, 1, 5],
                           [7, 8, 9, 6]])
    targets = torch.tensor([7, 8, 9, 5])
    assert exit_correct(tokens, targets).tolist() == [[True, False, True, True], [True, True, False, True],
                                                      [True, True, True, False]]
    # all right -> 1; right from exit 2 on -> 2; wrong at exit 2 -> 3; last exit wrong -> 3 (= E)
    assert token_memorized_exit(tokens, targets).tolist() == [1, 2, 3, 3]
    full = torch.tensor([7, 8, 9, 6])  # the model's own tokens (= the last exit's)
    assert token_memorized_exit(tokens, hardness_targets("full", targets, full)).tolist() == [1, 2, 3, 3]
    assert token_memorized_exit(tokens[:, 3:], torch.tensor([6])).tolist() == [3]
    assert agrees_with_last(tokens).tolist() == [[True, False, True, False], [True, True, False, False]]
    with pytest.raises(ValueError, match="hardness target"):
        hardness_targets("gold", targets, full)


def test_policy_exits_over_exits_first_above_tau_else_last():
    probs = torch.tensor([[0.2, 0.9, 0.6], [0.7, 0.1, 0.4], [0.0, 0.0, 0.0]])  # [E=3, N=3]
    assert policy_exits(probs, 0.5).tolist() == [2, 1, 1]
    assert policy_exits(probs, 0.8).tolist() == [3, 1, 3]


def test_exit_loss_weights():
    assert exit_loss_weights([1, 2, 3]).tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert exit_loss_weights([2, 4], "uniform").tolist() == [0.5, 0.5]


# --------------------------------------------------------------------------- the cache pass


def jsonl_datamodule(tmp_path, n=12):
    words = ["alpha", "beta", "gamma", "delta"]
    rows = [{"instruction": f"{words[i % 4]} {words[(i + 1) % 4]}", "output": " ".join(words[: 1 + i % 3])}
            for i in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = tiny_chat_tokenizer(words)
    return PromptResponseDataModule(tokenizer, train_file=str(path), max_prompt_length=32, max_response_length=8,
                                    batch_size=4, eval_batch_size=4, validation_fraction=0.2, test_fraction=0.2)


def test_cache_keeps_each_exit_state_at_the_predicting_position(tmp_path):
    dm = jsonl_datamodule(tmp_path)
    dm.setup()
    decoder = LlamaLayers(tiny_llama(num_layers=4, hidden=16, vocab=len(dm.tokenizer)))
    loader = dm.dataloader("train", "train", batch_size=3)
    cache = collect_exit_states(decoder, loader, [2, 4], progress=False)
    responses = [len(r) for r in dm.dataset("train").response_ids]
    assert len(cache["targets"]) == sum(responses) and cache["states"].shape == (sum(responses), 2, 16)
    batch = next(iter(loader))
    labels = batch["labels"]
    assert predicting_positions(labels)[0].tolist() == (labels[0, 1:] != -100).tolist()
    states = decoder(batch["input_ids"], batch["attention_mask"])
    first = int((labels[0] != -100).nonzero()[0])  # the first response token of row 0
    assert cache["targets"][0] == labels[0, first] and cache["positions"][0] == 0
    assert torch.allclose(cache["states"][0, 0], states[1][0, first - 1])
    assert torch.allclose(cache["states"][0, 1], states[3][0, first - 1])
    full = decoder.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, first - 1].argmax()
    assert cache["full_tokens"][0] == full
    assert cache["rows"][: responses[0]].tolist() == [0] * responses[0]


def test_cache_is_reused_and_rebuilt_when_settings_change(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"targets": torch.arange(3), "exit_layers": torch.tensor([1])}

    path = tmp_path / "c.pt"
    first = load_or_build(path, {"a": 1}, build)
    again = load_or_build(path, {"a": 1}, build)
    assert len(calls) == 1 and torch.equal(first["targets"], again["targets"])
    load_or_build(path, {"a": 2}, build)
    assert len(calls) == 2
    path.write_bytes(b"truncated")
    load_or_build(path, {"a": 2}, build)
    assert len(calls) == 3


# --------------------------------------------------------------------------- stages on generated states


def easy_hard_tables(n=256, exits=4, hidden=16, hard_from=3, seed=0):
    """Tokens: even ones are right at every exit, odd ones only from exit `hard_from`; feature 0 of the
    hidden state says which (+/-2)."""
    g = torch.Generator().manual_seed(seed)
    easy = torch.arange(n) % 2 == 0
    states = torch.randn(n, exits, hidden, generator=g) * 0.5
    states[:, :, 0] = torch.where(easy, 2.0, -2.0)[:, None]
    correct = easy[:, None] | (torch.arange(1, exits + 1) >= hard_from)[None, :]
    ce = torch.where(correct, 0.1, 3.0)
    memorized = torch.where(easy, 1, hard_from)
    return states, correct, ce, memorized, easy


def test_token_policy_learns_to_exit_easy_tokens_early(tmp_path):
    L.seed_everything(0)
    states, correct, ce, memorized, easy = easy_hard_tables()
    policy = TokenExitPolicy(4, 16, hidden=8)
    system = TokenPolicySystem(policy, k=8, alpha=0.1, task_term="correct", depth_term="hardness", lr=1e-2)
    loader = DataLoader(TokenStateDataset(states, ce=ce, correct=correct, memorized=memorized), batch_size=64,
                        shuffle=True)
    curve = RewardCurve()
    curve.bind_stage("lm_policy", tmp_path)
    trainer = L.Trainer(max_epochs=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[curve])
    trainer.fit(system, train_dataloaders=loader)
    assert system.last_policy_step is not None and system.last_policy_step.exits.shape == (8, 64)
    rows = read_curve(tmp_path / "reward_curve.csv", "lm_policy")
    assert len(rows) == 40 * 4 and {"reward", "depth_cost", "p_exit_L1", "exit_layer"} <= set(rows[0])
    assert rows[-1]["reward"] > rows[0]["reward"]
    with torch.no_grad():
        probs = torch.stack([policy.prob(layer, states[:, layer - 1]) for layer in range(1, 5)])
    exits = policy_exits(probs, 0.5)
    assert exits[easy].float().mean() < 1.5, exits[easy].float().mean()
    assert exits[~easy].float().mean() >= 2.9, exits[~easy].float().mean()
    accuracy = correct[torch.arange(len(exits)), exits - 1].float().mean()
    assert accuracy >= correct[:, -1].float().mean() - 0.02


def test_classifier_learns_agreement_with_last_exit():
    L.seed_everything(0)
    states, correct, _, _, easy = easy_hard_tables()
    agree = correct[:, :-1]  # the last exit is always right here, so agreeing = being right
    classifier = ExitClassifier(4, 16)
    loader = DataLoader(TokenStateDataset(states, agree=agree), batch_size=64, shuffle=True)
    quiet_trainer(max_epochs=15).fit(ExitClassifierSystem(classifier, lr=1e-2), train_dataloaders=loader)
    with torch.no_grad():
        predicted = torch.stack([classifier.prob(layer, states[:, layer - 1]) > 0.5 for layer in range(1, 4)]).T
    assert (predicted == agree).float().mean() > 0.95


def test_adapter_stage_lowers_the_exits_loss():
    L.seed_everything(0)
    torch.manual_seed(0)
    decoder = LlamaLayers(tiny_llama(num_layers=3, hidden=16, vocab=20, init_std=1.0))
    exits = LMExitHeads(3, 16, rank=4)
    states = torch.randn(128, 3, 16)
    teacher = LMExitHeads(3, 16, rank=4)  # targets an adapter of this rank can reach exactly
    torch.nn.init.normal_(teacher.adapters["1"].up.weight, std=2.0)
    with torch.no_grad():
        targets = teacher.logits(1, states[:, 0], decoder).argmax(-1)
    data = TokenStateDataset(states, targets=targets)
    system = ExitAdapterSystem(exits, decoder, lr=3e-2)
    assert system.trained == [1, 2]

    def loss():
        with torch.no_grad():
            batch = {"states": states, "targets": targets}
            logits = system.exit_logits(batch["states"], [1])[0]
            return torch.nn.functional.cross_entropy(logits, targets).item(), (logits.argmax(-1) == targets).float().mean()

    before = loss()
    quiet_trainer(max_epochs=20).fit(system, train_dataloaders=DataLoader(data, batch_size=32, shuffle=True))
    after = loss()
    assert after[0] < before[0] - 0.5 and after[1] > before[1] + 0.2, (before, after)
    trainer = quiet_trainer()
    trainer.validate(system, DataLoader(data, batch_size=128), verbose=False)
    assert float(trainer.callback_metrics["val/token_acc_L1"]) == pytest.approx(float(after[1]))
    assert set(trainer.callback_metrics) >= {"val/ce_L2", "val/token_acc_L3"}
    assert not any(p.requires_grad for p in decoder.parameters())
    assert all(k.startswith("exits.") for k in system.state_dict())  # the decoder is not checkpointed


# --------------------------------------------------------------------------- the whole run


def test_train_lm_exits_end_to_end_on_a_tiny_llama(tmp_path):
    L.seed_everything(0)
    dm = jsonl_datamodule(tmp_path)
    decoder = wrap_decoder(tiny_llama(num_layers=4, hidden=16, vocab=len(dm.tokenizer)))  # the layer-wise adapter
    cfg = OmegaConf.load(CONF_DIR / "lm_exits" / "default.yaml")
    cfg.exit_every = 2
    cfg.rank = 4
    for stage in ("adapters", "policy", "classifier"):
        cfg[stage].epochs = 1
    cfg.policy.propagated.epochs, cfg.policy.propagated.batch_size = 1, 2
    cfg.policy.k = 4
    cfg.policy.task_target = "full"
    cfg.adapters.target = "full"
    run = train_lm_exits(decoder, dm, lm_exits_config(cfg), quiet_stages(tmp_path / "out"))
    assert run.exits.exit_layers == [2, 4]
    folder = tmp_path / "out" / "checkpoints"
    for name in ("lm_cache_train/exit_states_train.pt", "lm_scores/scores.pt"):
        assert (folder / name).is_file()
    assert set(json.loads((tmp_path / "out" / "stages.json").read_text())) == {
        "lm_cache_train", "lm_adapters", "lm_scores", "lm_policy", "lm_policy_propagated", "lm_classifier",
        "lm_cache_validation"}
    summary = run.summary
    train = summary["train"]
    assert len(train["token_acc"]) == 2 and sum(summary["memorized_histogram"]) == train["tokens"]
    # the last exit is the model itself: its agreement with the model's own token is 1, trained or not
    assert train["agreement_with_full"][-1] == summary["untrained"]["agreement_with_full"][-1] == 1.0
    assert 1.0 <= train["policy_mean_exit"] <= 2.0
    held_out = summary["evaluation"]
    assert held_out["split"] == "validation" and held_out["tokens"] == sum(
        len(r) for r in dm.dataset("validation").response_ids)
    assert (folder / "lm_cache_validation" / "exit_states_validation.pt").is_file()
    assert len(held_out["classifier_acc"]) == 1 and 0.0 <= held_out["classifier_acc"][0] <= 1.0
    propagated = held_out["under_propagation"]  # the same tokens, replayed under propagated K/V
    assert propagated["tokens"] == held_out["tokens"] and 1.0 <= propagated["policy_mean_exit"] <= 2.0
    assert torch.allclose(per_exit_probs(run.policy, run.cache["states"], chunk=3),
                          per_exit_probs(run.policy, run.cache["states"]))
    mtime = (folder / "lm_cache_train" / "exit_states_train.pt").stat().st_mtime_ns
    cfg.policy.epochs = cfg.classifier.epochs = cfg.adapters.epochs = 0
    again = train_lm_exits(decoder, dm, lm_exits_config(cfg), quiet_stages(tmp_path / "out"))
    assert (folder / "lm_cache_train" / "exit_states_train.pt").stat().st_mtime_ns == mtime  # cache reused
    assert torch.equal(again.cache["states"], run.cache["states"]) and again.policy is None
