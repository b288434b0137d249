"""Distilling a decoder's exits from the full model over a cache of every position of the text.

`distill_exits` trains `ExitDistillSystem` on a cache built with
`collect_exit_states(positions="all", top_k=k)` (the prompt's positions give many more tokens than
the responses alone: every ACLSum abstract, not only its one-sentence summaries). The vocabulary
is the full one, or the union of the teacher's top-k ids over this cache ("restricted").
"""
from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader, Dataset

from ee_lightning.exits.distill import VOCABULARIES, restricted_vocabulary, to_restricted
from ee_lightning.modeling.lm_exits import LMExitHeads
from ee_lightning.training.systems.exit_distill import ExitDistillSystem

log = logging.getLogger(__name__)


class DistillDataset(Dataset):
    """Item i: states [E, H] float32, top_ids [k], top_logp [k] of cached position i."""

    def __init__(self, states: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor):
        if not len(states) == len(top_ids) == len(top_logp):
            raise ValueError(f"{len(states)} states, {len(top_ids)} target ids and {len(top_logp)} target log-probs")
        self.states, self.top_ids, self.top_logp = states, top_ids, top_logp

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i: int) -> dict:
        return {"states": self.states[i].float(), "top_ids": self.top_ids[i], "top_logp": self.top_logp[i]}


def distillation(exits: LMExitHeads, decoder, cache: dict, vocabulary: str = "restricted", lr: float = 1e-3,
                 weights: str = "layer") -> tuple[ExitDistillSystem, DistillDataset, dict]:
    """The stage's module and data over a cache with teacher targets, and what it trains on:
    {"positions", "top_k", "vocabulary", "vocabulary_size"}."""
    if "top_ids" not in cache:
        raise ValueError("the cache has no teacher targets: build it with collect_exit_states(..., top_k=k)")
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"distillation vocabulary {vocabulary!r}: use one of {VOCABULARIES}")
    top_ids = cache["top_ids"]
    if vocabulary == "restricted":
        vocab = restricted_vocabulary(top_ids)
        targets = to_restricted(top_ids, vocab)
    else:
        vocab, targets = None, top_ids
    device = next(decoder.parameters()).device
    system = ExitDistillSystem(exits, decoder, None if vocab is None else vocab.to(device), lr=lr, weights=weights)
    info = {"positions": len(top_ids), "top_k": int(top_ids.shape[1]), "vocabulary": vocabulary,
            "vocabulary_size": int(decoder.vocab_size if vocab is None else len(vocab))}
    return system, DistillDataset(cache["states"], targets, cache["top_logp"]), info


def distill_exits(exits: LMExitHeads, decoder, cache: dict, trainer, vocabulary: str = "restricted",
                  lr: float = 1e-3, batch_size: int = 256, weights: str = "layer", shuffle: bool = True) -> dict:
    """Fit `exits`' adapters to the cached top-k targets with `trainer` (a Lightning Trainer), outside a
    run's stages (a study); returns `distillation`'s info."""
    system, dataset, info = distillation(exits, decoder, cache, vocabulary, lr, weights)
    trainer.fit(system, train_dataloaders=DataLoader(dataset, batch_size=batch_size, shuffle=shuffle))
    log.info("exits distilled: %s", info)
    return info
