"""LoRA on the decoder backbone (method.lm_exits.lora): trained with the exits from live passes, only
LoRA and exit adapters move, merged into plain weights, saved and reused, the caches rebuilt."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from ee_lightning.config.schema import LoRAStage
from ee_lightning.exits.rules import FullRule
from ee_lightning.inference.generate import PlainExits, generate_with_exits
from ee_lightning.modeling.backbones.decoders import wrap_decoder
from ee_lightning.modeling.lm_exits import LMExitHeads
from ee_lightning.training.systems.lm import LoraExitSystem
from ee_lightning.training.lm_lora import (ARTEFACT, LoraError, attach_lora, merge_lora,
                                           projection_names, require_peft)
from ee_lightning.app.validate import lm_exits_config
from ee_lightning.training.lm_pipeline import train_lm_exits
from tests.conftest import CONF_DIR, compose_train
from tests.lm_fixtures import tiny_llama
from tests.test_lm_training import jsonl_datamodule, quiet_stages, quiet_trainer
from tiny_decoders import tiny_lm


def lora_settings(**changes) -> LoRAStage:
    """conf/lm_exits/default.yaml's lora node (its values live there only), with `changes`."""
    node = OmegaConf.load(CONF_DIR / "lm_exits" / "default.yaml").lora
    return replace(LoRAStage(**OmegaConf.to_container(node)), **changes)


SETTINGS = lora_settings(enabled=True, rank=4, alpha=8, target_modules=["q_proj", "v_proj"], epochs=1, lr=1e-2,
                         batch_size=4)


def tiny_decoder(dm, seed=0):
    return wrap_decoder(tiny_llama(num_layers=4, hidden=16, vocab=len(dm.tokenizer), seed=seed, init_std=0.2))


def weighted_loss(system, loader) -> float:
    system.decoder.eval()
    with torch.no_grad():
        return sum(float((system.weights * system.exit_losses(b)).sum()) for b in loader) / len(loader)


def test_lora_trains_with_the_exits_only_lora_and_adapters_move_and_the_merge_leaves_a_plain_model(tmp_path):
    L.seed_everything(0)
    dm = jsonl_datamodule(tmp_path, n=8)
    dm.setup()
    decoder = tiny_decoder(dm)
    model = decoder.model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    exits = LMExitHeads(4, 16, exit_every=2, rank=4)
    peft_model = attach_lora(decoder, SETTINGS)
    lora = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert {n.split(".")[-4] for n in lora} == {"q_proj", "v_proj"}
    system = LoraExitSystem(exits, decoder, lora, lr=1e-2, exits_lr=1e-2)
    checkpoint = {"state_dict": system.state_dict()}
    system.on_save_checkpoint(checkpoint)  # the frozen backbone is not in the stage's checkpoint: LoRA and exits only
    kept, exit_keys = set(checkpoint["state_dict"]), {f"exits.{k}" for k in exits.state_dict()}
    assert exit_keys <= kept and len(kept - exit_keys) == len(lora) and all(".lora_" in k for k in kept - exit_keys)
    loader = dm.dataloader("train", "train", batch_size=4)
    before = weighted_loss(system, loader)
    quiet_trainer(max_epochs=15).fit(system, train_dataloaders=dm.dataloader("train", "train", shuffle=True,
                                                                             batch_size=4))
    after = weighted_loss(system, loader)
    assert after < before - 0.5, (before, after)
    assert len(system.epoch_losses) == 15 and system.epoch_losses[-1] < system.epoch_losses[0]
    assert all(bool(exits.adapters[k].up.weight.abs().sum() > 0) for k in exits.adapters)  # the exits learned too
    # base weights untouched by training (peft keeps them under base_layer)
    trained = {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
               for k, v in peft_model.state_dict().items() if "lora_" not in k}
    assert trained.keys() == base.keys() and all(torch.equal(trained[k], base[k]) for k in base)
    ids = torch.randint(4, len(dm.tokenizer), (3, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0  # left padding
    with torch.no_grad():
        lora_logits = [exits.logits(layer, decoder(ids, mask)[layer - 1], decoder) for layer in exits.exit_layers]

    merge_lora(decoder, peft_model)
    assert decoder.model is model and not decoder.training
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    merged = model.state_dict()
    assert merged.keys() == base.keys() and not any(p.requires_grad for p in model.parameters())
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    targeted = {k for k in base if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert changed == targeted and len(targeted) == 2 * 4
    with torch.no_grad():  # the merged weights compute what the LoRA layers computed
        for layer, expected in zip(exits.exit_layers, lora_logits):
            got = exits.logits(layer, decoder(ids, mask)[layer - 1], decoder)
            assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-4)
    # never-exit early-exit generation of the merged model is transformers' greedy generate of it
    eos = dm.tokenizer.eos_token_id
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             eos_token_id=eos, pad_token_id=dm.pad_id)
        out = generate_with_exits(decoder, PlainExits(4), FullRule(), ids, mask, 8, eos_token_id=eos,
                                  pad_token_id=dm.pad_id)
    assert torch.equal(out.sequences, ref)
    assert bool((out.kv_fills == 0).all())


def test_target_modules_that_name_no_layer_projection_are_refused_with_the_names():
    _, decoder = tiny_lm("llama")
    assert projection_names(decoder) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    with pytest.raises(LoraError, match=r"names no Linear module.*\['qproj'\].*down_proj, gate_proj, k_proj, o_proj, "
                                        r"q_proj, up_proj, v_proj"):
        attach_lora(decoder, lora_settings(target_modules=["q_proj", "qproj"]))
    with pytest.raises(LoraError, match="lm_head"):  # the LM head is not one of the layers' projections
        attach_lora(decoder, lora_settings(target_modules=["lm_head"]))
    with pytest.raises(LoraError, match="is empty"):
        attach_lora(decoder, lora_settings(target_modules=[]))
    _, gpt2 = tiny_lm("gpt2")  # GPT-2's projections are transformers' Conv1D
    assert projection_names(gpt2) == ["c_attn", "c_fc", "c_proj"]
    attach_lora(gpt2, lora_settings(target_modules=["c_attn"]))
    assert any("lora_A" in n for n, _ in gpt2.named_parameters())


def test_missing_peft_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(LoraError, match=r"pip install peft==0\.21\.2"):
        require_peft()


def lm_exits_cfg(lora: bool):
    cfg = OmegaConf.load(CONF_DIR / "lm_exits" / "default.yaml")
    cfg.exit_every, cfg.rank, cfg.evaluate_split = 2, 4, None
    cfg.adapters.epochs, cfg.policy.epochs, cfg.classifier.epochs = 1, 0, 0
    cfg.lora = {**asdict(SETTINGS), "enabled": lora, "epochs": 2}
    return cfg


def test_lora_stage_is_saved_reused_and_the_cache_follows_the_adapted_backbone(tmp_path):
    L.seed_everything(0)
    dm = jsonl_datamodule(tmp_path, n=8)
    out = tmp_path / "out"
    cache_file = out / "checkpoints" / "lm_cache_train" / "exit_states_train.pt"
    artefact = out / "checkpoints" / "lm_lora" / ARTEFACT

    def train(decoder, cfg):
        return train_lm_exits(decoder, dm, lm_exits_config(cfg), quiet_stages(out))

    plain = train(tiny_decoder(dm), lm_exits_cfg(False))
    assert "untrained" in plain.summary and not artefact.exists()
    plain_mtime = cache_file.stat().st_mtime_ns

    decoder = tiny_decoder(dm)
    run = train(decoder, lm_exits_cfg(True))
    lora = run.summary["lora"]
    assert not lora["reused"] and len(lora["epoch_losses"]) == 2 and lora["trainable_parameters"] > 0
    assert "after_lora" in run.summary and artefact.is_file()
    assert cache_file.stat().st_mtime_ns != plain_mtime  # the un-adapted backbone's cache was not reused
    assert not torch.equal(run.cache["states"], plain.cache["states"])
    with torch.no_grad():  # the cache holds the adapted (merged) backbone's states
        batch = next(iter(dm.dataloader("train", "train", batch_size=8)))
        states = decoder(batch["input_ids"], batch["attention_mask"])
        keep = batch["labels"][:, 1:] != -100
    assert torch.allclose(run.cache["states"][:, 1], states[3][:, :-1][keep], atol=1e-5)
    weights = {k: v.clone() for k, v in decoder.model.state_dict().items()}
    lora_mtime, cache_mtime = artefact.stat().st_mtime_ns, cache_file.stat().st_mtime_ns

    again_decoder = tiny_decoder(dm)
    cfg = lm_exits_cfg(True)
    cfg.adapters.epochs = 0
    again = train(again_decoder, cfg)
    assert again.summary["lora"]["reused"] and again.summary["lora"]["digest"] == lora["digest"]
    assert again.summary["lora"]["epoch_losses"] == lora["epoch_losses"]
    assert artefact.stat().st_mtime_ns == lora_mtime and cache_file.stat().st_mtime_ns == cache_mtime
    assert all(torch.equal(v, weights[k]) for k, v in again_decoder.model.state_dict().items())

    cfg.lora.rank = 2  # other settings: trained again, not the saved weights
    third = train(tiny_decoder(dm), cfg)
    assert not third.summary["lora"]["reused"] and third.summary["lora"]["digest"] != lora["digest"]


def test_lora_settings_are_validated_before_anything_loads(tmp_path):
    from ee_lightning.app.validate import ConfigError, validate_config

    cfg = compose_train(["experiment=aclsum_consistentee", "backbone=tiny_llama", "method.lm_exits.lora.enabled=true",
                         "method.lm_exits.lora.rank=0", "method.lm_exits.lora.epochs=0",
                         "method.lm_exits.lora.target_modules=[]"], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    text = str(err.value)
    assert "method.lm_exits.lora.rank=0: must be >= 1" in text
    assert "method.lm_exits.lora.epochs=0: must be >= 1; set enabled=false to skip LoRA" in text
    assert "method.lm_exits.lora.target_modules=[]: must be a non-empty list" in text
    ok = compose_train(["experiment=aclsum_consistentee", "backbone=tiny_llama", "method.lm_exits.lora.enabled=true",
                        "method.generation.rules.static=null"], tmp_path / "ok")  # 4 layers: not SmolLM2's 9..27
    validate_config(ok)


@pytest.mark.slow
def test_consistentee_lm_with_lora_runs_every_stage_on_a_tiny_decoder(tmp_path):
    from ee_lightning.app.train import train

    run_dir = tmp_path / "run"
    cfg = compose_train(["experiment=aclsum_consistentee", "backbone=tiny_llama", "logger=csv",
                         "data.max_train_samples=8", "data.max_eval_samples=4", "data.max_prompt_length=64",
                         "method.lm_exits.exit_every=2", "method.lm_exits.policy.epochs=1",
                         "method.lm_exits.lora.enabled=true", "method.lm_exits.lora.epochs=2",
                         "method.lm_exits.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
                         "method.generation.max_prompts=4", "method.generation.max_new_tokens=4",
                         "method.generation.rules.static=null", "method.generation.rules.policy=[0.5]",
                         "method.generation.rules.softmax_margin=null",
                         "method.generation.rules.saturation=null", "method.generation.rules.classifier=[0.5]"],
                        run_dir)
    results = train(cfg)
    lora = results.training_summary["lora"]
    assert not lora["reused"] and len(lora["epoch_losses"]) == 2
    assert lora["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    saved = json.loads((run_dir / "results.json").read_text())
    full = saved["points"][0]
    assert full["rule"] == "full" and full["token_agreement"] == 1.0 and full["avg_exit_layer"] == 4.0
    for name in ("checkpoints/lm_lora/lora_backbone.pt", "checkpoints/lm_adapters/last.ckpt",
                 "checkpoints/lm_policy/last.ckpt", "checkpoints/lm_classifier/last.ckpt", "pareto.md",
                 "csv/lm_lora/metrics.csv"):
        assert (run_dir / name).is_file(), name
    logged = (run_dir / "csv" / "lm_lora" / "metrics.csv").read_text().splitlines()[0]
    assert "lora/loss_epoch" in logged and "lora/ce_L4" in logged  # the configured loggers saw the LoRA stage
