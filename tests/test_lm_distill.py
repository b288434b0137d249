"""Distilled decoder exits: top-k targets, the loss, the all-positions cache, the block adapter, the stage."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from ee_lightning.exits.distill import distill_loss, restricted_vocabulary, teacher_topk, to_restricted
from ee_lightning.inference.lm_cache import collect_exit_states, response_only
from ee_lightning.modeling.lm_exits import BlockAdapter, LMExitHeads, head_logits
from ee_lightning.training.lm_distill import distill_exits
from ee_lightning.training.systems.exit_distill import ExitDistillSystem
from tests.lm_fixtures import LlamaLayers, tiny_llama
from tests.test_lm_training import jsonl_datamodule


def quiet_trainer(max_epochs=1):
    return L.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu")


# --------------------------------------------------------------------------- pure functions


def test_teacher_topk_keeps_log_probs_normalised_over_the_whole_vocabulary():
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)]]) + 3.0
    ids, logp = teacher_topk(logits, 2)
    assert ids.tolist() == [[0, 1]]
    assert logp.exp()[0].tolist() == pytest.approx([0.5, 0.25])  # not renormalised to the two kept
    with pytest.raises(ValueError, match="top_k=5"):
        teacher_topk(logits, 5)


def test_distill_loss_hand_computed():
    target_logp = torch.tensor([[math.log(0.5), math.log(0.25)]])  # q = [2/3, 1/3] over the kept tokens
    # a uniform student over 4 tokens: -(2/3 + 1/3) log(1/4) = log 4
    assert distill_loss(torch.zeros(1, 4), torch.tensor([[0, 1]]), target_logp).item() == pytest.approx(math.log(4))
    # p = [1, 2, 1, 1] / 5; targets ids [1, 0]: -(2/3 log 2/5 + 1/3 log 1/5) = 1.14739
    student = torch.tensor([[0.0, math.log(2.0), 0.0, 0.0]])
    assert distill_loss(student, torch.tensor([[1, 0]]), target_logp).item() == pytest.approx(
        -(2 / 3 * math.log(0.4) + 1 / 3 * math.log(0.2)))
    with pytest.raises(ValueError, match="must share N"):
        distill_loss(torch.zeros(2, 4), torch.tensor([[1, 0]]), target_logp)


def test_restricted_vocabulary_maps_ids_to_positions_and_refuses_outsiders():
    top = torch.tensor([[5, 2], [2, 9]])
    vocab = restricted_vocabulary(top)
    assert vocab.tolist() == [2, 5, 9]
    assert to_restricted(top, vocab).tolist() == [[1, 0], [0, 2]]
    with pytest.raises(ValueError, match="outside the restricted vocabulary"):
        to_restricted(torch.tensor([[3]]), vocab)
    with pytest.raises(ValueError, match="outside the restricted vocabulary"):
        to_restricted(torch.tensor([[10]]), vocab)


# --------------------------------------------------------------------------- the cache of every position


def test_all_positions_cache_holds_the_response_cache_and_the_teachers_top_k(tmp_path):
    dm = jsonl_datamodule(tmp_path)
    dm.setup()
    decoder = LlamaLayers(tiny_llama(num_layers=4, hidden=16, vocab=len(dm.tokenizer), init_std=0.5))
    loader = dm.dataloader("train", "train", batch_size=3)
    everything = collect_exit_states(decoder, loader, [2, 4], progress=False, positions="all", top_k=3)
    responses = collect_exit_states(decoder, loader, [2, 4], progress=False)
    split = dm.dataset("train")
    lengths = [len(p) + len(r) for p, r in zip(split.prompt_ids, split.response_ids)]
    assert len(everything["targets"]) == sum(n - 1 for n in lengths)  # every position but each row's last
    assert int(everything["response"].sum()) == len(responses["targets"])
    cut = response_only(everything)
    for key in ("states", "targets", "full_tokens", "rows", "positions"):
        assert torch.equal(cut[key], responses[key]), key
    # the first row, position 0: the teacher's top 3 from the model's own logits
    batch = next(iter(loader))
    logits = decoder.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, 0]
    want = logits.log_softmax(-1).topk(3)
    assert everything["top_ids"][0].tolist() == want.indices.tolist()
    assert torch.allclose(everything["top_logp"][0], want.values, atol=1e-5)
    assert everything["top_ids"][:, 0].tolist() == everything["full_tokens"].tolist()
    assert everything["targets"][0] == batch["input_ids"][0, 1] and everything["positions"][0] == 0
    with pytest.raises(ValueError, match="cache positions 'prompt'"):
        collect_exit_states(decoder, loader, [2, 4], positions="prompt")


# --------------------------------------------------------------------------- exits


def test_block_adapter_copies_the_next_layer_and_starts_as_the_zero_map():
    model = tiny_llama(num_layers=4, hidden=16, vocab=30)
    layers = model.model.layers
    exits = LMExitHeads(4, 16, exit_every=2, adapter="block", layers=layers)
    adapter = exits.adapters["2"]
    assert isinstance(adapter, BlockAdapter) and list(exits.adapters) == ["2"]
    assert torch.equal(adapter.mlp.gate_proj.weight, layers[2].mlp.gate_proj.weight)  # layer 3: the first skipped
    assert adapter.mlp.gate_proj.weight.data_ptr() != layers[2].mlp.gate_proj.weight.data_ptr()  # a copy
    assert not adapter.mlp.down_proj.weight.any()
    hidden = torch.randn(5, 16)
    assert torch.equal(exits.adapt(2, hidden), hidden)
    assert all(p.requires_grad for p in adapter.parameters())
    with pytest.raises(ValueError, match="pass layers="):
        LMExitHeads(4, 16, adapter="block")
    with pytest.raises(ValueError, match="adapter 'deep'"):
        LMExitHeads(4, 16, adapter="deep")


def test_head_logits_are_the_full_heads_columns():
    decoder = LlamaLayers(tiny_llama(num_layers=2, hidden=16, vocab=30))
    hidden = torch.randn(3, 16)
    vocab = torch.tensor([1, 4, 7, 20])
    assert torch.allclose(head_logits(decoder, hidden, vocab), decoder.lm_head(hidden)[:, vocab], atol=1e-6)
    exits = LMExitHeads(2, 16)
    assert torch.allclose(exits.logits(1, hidden, decoder, vocab), exits.logits(1, hidden, decoder)[:, vocab], atol=1e-6)


@pytest.mark.parametrize("adapter,vocabulary", [("lowrank", "restricted"), ("block", "full")])
def test_distillation_lowers_every_exits_loss_to_the_teacher(tmp_path, adapter, vocabulary):
    dm = jsonl_datamodule(tmp_path, n=24)
    dm.setup()
    model = tiny_llama(num_layers=4, hidden=16, vocab=len(dm.tokenizer), init_std=0.5)
    decoder = LlamaLayers(model)
    cache = collect_exit_states(decoder, dm.dataloader("train", "train", batch_size=4), [1, 2, 3, 4], progress=False,
                                positions="all", top_k=4)
    torch.manual_seed(0)
    exits = LMExitHeads(4, 16, exit_every=1, rank=8, adapter=adapter, layers=model.model.layers)
    batch = {"states": cache["states"].float(), "top_ids": cache["top_ids"], "top_logp": cache["top_logp"]}
    before = ExitDistillSystem(exits, decoder).losses(batch).detach()
    info = distill_exits(exits, decoder, cache, quiet_trainer(max_epochs=15), vocabulary=vocabulary, lr=1e-2,
                         batch_size=32)
    after = ExitDistillSystem(exits, decoder).losses(batch).detach()  # scored over the whole vocabulary
    assert (after < before).all(), (before, after)
    assert info["positions"] == len(cache["targets"]) and info["top_k"] == 4
    if vocabulary == "restricted":
        assert info["vocabulary_size"] == len(torch.unique(cache["top_ids"]))
    else:
        assert info["vocabulary_size"] == len(dm.tokenizer)
    with pytest.raises(ValueError, match="no teacher targets"):
        distill_exits(exits, decoder, {k: v for k, v in cache.items() if k not in ("top_ids", "top_logp")},
                      quiet_trainer())


# --------------------------------------------------------------------------- in the stages


def test_train_lm_exits_distills_then_trains_the_policy_on_the_response_tokens(tmp_path):
    from omegaconf import OmegaConf

    from ee_lightning.app.validate import ConfigError, lm_exits_config
    from ee_lightning.modeling.backbones.decoders import wrap_decoder
    from ee_lightning.training.lm_pipeline import train_lm_exits
    from tests.conftest import CONF_DIR
    from tests.test_lm_training import quiet_stages

    L.seed_everything(0)
    dm = jsonl_datamodule(tmp_path)
    decoder = wrap_decoder(tiny_llama(num_layers=4, hidden=16, vocab=len(dm.tokenizer), init_std=0.5))
    cfg = OmegaConf.load(CONF_DIR / "lm_exits" / "default.yaml")
    cfg.exit_every, cfg.adapter = 2, "block"
    cfg.adapters.update(objective="distill", top_k=3, vocabulary="full", epochs=2)
    cfg.policy.update(epochs=1, k=4, task_target="full")
    cfg.classifier.epochs = 0
    run = train_lm_exits(decoder, dm, lm_exits_config(cfg), quiet_stages(tmp_path / "out"))
    split = dm.dataset("train")
    distilled = run.summary["distillation"]
    assert distilled["positions"] == sum(len(p) + len(r) - 1 for p, r in zip(split.prompt_ids, split.response_ids))
    assert distilled["top_k"] == 3 and distilled["vocabulary_size"] == len(dm.tokenizer)
    # the policy and the summaries read the response tokens only
    assert run.summary["train"]["tokens"] == len(run.cache["targets"]) == sum(len(r) for r in split.response_ids)
    assert "response" not in run.cache and run.policy is not None
    assert any(p.abs().sum() > 0 for p in run.exits.adapters["2"].mlp.down_proj.parameters())  # it trained
    with pytest.raises(ConfigError, match="adapters.objective"):
        lm_exits_config(OmegaConf.merge(cfg, {"adapters": {"objective": "kl"}}))
