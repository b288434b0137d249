"""method.lm_exits.responses=model: the caches are teacher-forced on the full model's own greedy responses."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from ee_lightning.app.validate import ConfigError, lm_exits_config
from ee_lightning.data.generation import DataError
from ee_lightning.modeling.backbones.decoders import wrap_decoder
from ee_lightning.training import lm_responses
from ee_lightning.training.lm_pipeline import train_lm_exits
from ee_lightning.training.lm_responses import greedy_responses
from tests.conftest import CONF_DIR
from tests.lm_fixtures import tiny_llama
from tests.test_lm_training import jsonl_datamodule, quiet_stages
from tiny_decoders import PAD, left_padded_prompts, tiny_lm


def library_responses(model, ids, mask, new, eos):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eos,
                         pad_token_id=PAD)[:, ids.shape[1]:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in out]


def test_greedy_responses_are_transformers_greedy_tokens_up_to_and_with_the_first_eos():
    model, decoder = tiny_lm("llama")
    ids, mask = left_padded_prompts()
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    free = greedy_responses(decoder, batches, 6, eos_token_id=96, pad_token_id=PAD, progress=False)
    assert free == library_responses(model, ids, mask, 6, 96)
    assert all(len(r) == 6 for r in free)  # no EOS drawn: cut at the length, without one
    eos = free[0][2]  # a token the model draws third in row 0, made its EOS: that row stops there, with it
    ended = greedy_responses(decoder, batches, 6, eos_token_id=eos, pad_token_id=PAD, progress=False)
    assert ended == library_responses(model, ids, mask, 6, eos)
    assert ended[0][-1] == eos and len(ended[0]) == free[0].index(eos) + 1


def test_the_caches_are_built_on_the_models_own_text_and_read_back(tmp_path, monkeypatch):
    L.seed_everything(0)
    dm = jsonl_datamodule(tmp_path)
    decoder = wrap_decoder(tiny_llama(num_layers=4, hidden=16, vocab=len(dm.tokenizer), init_std=0.5))
    cfg = OmegaConf.load(CONF_DIR / "lm_exits" / "default.yaml")
    cfg.exit_every, cfg.rank, cfg.responses = 2, 4, "model"
    cfg.adapters.epochs = cfg.classifier.epochs = 0
    cfg.policy.epochs, cfg.policy.k = 1, 4
    references = {split: list(dm.dataset(split).references) for split in ("train", "validation")}
    reference_ids = [list(r) for r in dm.dataset("train").response_ids]
    run = train_lm_exits(decoder, dm, lm_exits_config(cfg), quiet_stages(tmp_path / "out"))
    loader = dm.dataloader("train", "generate", batch_size=4)
    mine = greedy_responses(decoder, loader, dm.max_response_length, dm.tokenizer.eos_token_id, dm.pad_id,
                            progress=False)
    assert dm.dataset("train").response_ids == mine != reference_ids
    assert {split: dm.dataset(split).references for split in references} == references  # what generation is scored on
    # teacher-forced on its own greedy text, the full model's token at every position is the text's next token
    assert torch.equal(run.cache["full_tokens"], run.cache["targets"])
    assert run.summary["responses"] == "model"
    assert run.summary["evaluation"]["tokens"] == sum(len(r) for r in dm.dataset("validation").response_ids)
    ledger = quiet_stages(tmp_path / "out").ledger
    assert ledger.done("lm_responses_train") and ledger.done("lm_responses_validation")

    fresh = jsonl_datamodule(tmp_path)  # a rerun reads the responses back instead of generating them again
    monkeypatch.setattr(lm_responses, "greedy_responses", lambda *a, **k: pytest.fail("generated again"))
    train_lm_exits(decoder, fresh, lm_exits_config(cfg), quiet_stages(tmp_path / "out"))
    assert fresh.dataset("train").response_ids == mine


def test_a_split_takes_one_response_per_item_and_an_unknown_source_is_refused(tmp_path):
    dm = jsonl_datamodule(tmp_path)
    with pytest.raises(DataError, match="3 responses for the .* items of the train split"):
        dm.use_responses("train", [[1], [2], [3]])
    node = OmegaConf.load(CONF_DIR / "lm_exits" / "default.yaml")
    with pytest.raises(ConfigError, match=r"lm_exits.responses=greedy: must be one of reference \| model"):
        lm_exits_config(OmegaConf.merge(node, {"responses": "greedy"}))
