"""The full model's own greedy responses to a split's prompts, as the text the exit caches are teacher-forced on.

An exit decides, in generation, from the states of the model's own text: under deferred skipped layers
(`inference.deferred`) exactly the full model's states on the prefix it generated. Teacher-forced on the
reference summaries instead, every cached stage (adapters, memorized exits, policy, classifier) trains on
a prefix generation never shows it. `method.lm_exits.responses=model` generates each training (and
held-out) prompt's response once at full depth, greedily, up to `data.max_response_length` tokens, and the
caches are then built on it; the references still score the generations.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ee_lightning.exits.rules import FullRule
from ee_lightning.files import load_or_build
from ee_lightning.inference.generate import PlainExits, generate_with_exits
from ee_lightning.inference.lm_cache import source_meta
from ee_lightning.progress import progress_enabled
from ee_lightning.training.processes import is_global_zero

RESPONSE_SOURCES = ("reference", "model")  # method.lm_exits.responses


@torch.no_grad()
def greedy_responses(decoder, loader, max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                     progress: bool | None = None) -> list[list[int]]:
    """Per prompt of `loader` (left-padded prompt batches, `collate_generate`), in order: the full model's
    greedy new tokens up to and including its first EOS, at most `max_new_tokens` (a cut response has no
    EOS, as a cut reference has none)."""
    device = next(decoder.parameters()).device
    exits, rule = PlainExits(decoder.num_layers, exit_every=decoder.num_layers), FullRule()
    responses = []
    batches = tqdm(loader, desc="model responses", unit="batch", dynamic_ncols=True,
                   disable=not progress_enabled() if progress is None else not progress)
    for batch in batches:
        out = generate_with_exits(decoder, exits, rule, batch["input_ids"].to(device),
                                  batch["attention_mask"].to(device), max_new_tokens, eos_token_id=eos_token_id,
                                  pad_token_id=pad_token_id)
        for tokens, mask in zip(out.new_tokens.cpu(), out.token_mask.cpu()):
            responses.append(tokens[mask].tolist())
    return responses


def model_responses(decoder, datamodule, split: str, stages, identity: dict | None, batch_size: int) -> list[list[int]]:
    """Stage lm_responses_<split>: `greedy_responses` on the split's prompts, saved and reused while the model,
    the split's rows and the length hold."""
    stage, max_new_tokens = f"lm_responses_{split}", int(datamodule.max_response_length)
    eos = datamodule.tokenizer.eos_token_id
    if eos is None:
        raise ValueError("method.lm_exits.responses=model needs a tokenizer with an EOS token: a response must end")
    meta = {**source_meta(decoder, datamodule, split, identity), "responses": "model greedy, full depth",
            "max_new_tokens": max_new_tokens}

    def build() -> dict:
        loader = datamodule.dataloader(split, "generate", batch_size=batch_size)
        responses = greedy_responses(decoder, loader, max_new_tokens, eos, datamodule.pad_id)
        return {"ids": torch.tensor([t for r in responses for t in r], dtype=torch.long),
                "lengths": torch.tensor([len(r) for r in responses], dtype=torch.long)}

    saved = load_or_build(stages.folder(stage) / f"responses_{split}.pt", meta, build, save=is_global_zero())
    if not stages.ledger.done(stage):
        stages.ledger.mark(stage, None, tokens=int(saved["lengths"].sum()))
    return [part.tolist() for part in torch.split(saved["ids"], saved["lengths"].tolist())]
