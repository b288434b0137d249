"""One pass with all layers over a split, cached, so any exit rule can be replayed for free.

Two caches come from the same pass:
- signals (`collect_signals`): the compact per-layer signals the exit rules read ([L, N] each,
  see `ee_lightning.exits.signals`): what evaluation replays;
- states (`collect_states`): pooled states and head logits ([L, N, H], [L, N, C]): what the
  policy trains on with backbone and heads frozen.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ee_lightning.exits.signals import SIGNALS, all_layer_signals
from ee_lightning.modeling.exit_policy import exit_probability
from ee_lightning.modeling.model import EarlyExitModel, LayerOutputs
from ee_lightning.progress import progress


@torch.inference_mode()
def _cache_pass(model: EarlyExitModel, dataloader, keep, desc: str) -> dict[str, torch.Tensor]:
    """Run every layer, head and policy net over `dataloader` in eval mode; `keep(outputs)` -> the
    per-batch tensors to keep (layer-first, [L, B, ...]). Adds labels, idx and lengths ([N])."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks: dict[str, list] = {}
    try:
        for batch in progress(dataloader, desc):
            batch = {name: value.to(device) for name, value in batch.items()}
            kept = {key: value.cpu() for key, value in keep(model(batch)).items()}
            kept.update(labels=batch["labels"].cpu(), idx=batch["idx"].cpu(),
                        lengths=batch["attention_mask"].sum(-1).cpu())
            for key, value in kept.items():
                chunks.setdefault(key, []).append(value)
    finally:
        model.train(was_training)
    per_row = ("labels", "idx", "lengths")
    return {key: torch.cat(values, dim=0 if key in per_row else 1) for key, values in chunks.items()}


def collect_signals(model: EarlyExitModel, dataloader, is_regression: bool) -> dict[str, torch.Tensor]:
    """Every layer's signals {name: [L, N]} (exit_prob when the model has a policy), plus labels,
    idx and lengths [N], in the dataloader's order."""
    def keep(outputs: LayerOutputs) -> dict:
        return all_layer_signals(outputs.logits, outputs.exit_probs, is_regression)

    return _cache_pass(model, dataloader, keep, "all-layers pass (signals)")


def collect_states(model: EarlyExitModel, dataloader) -> dict[str, torch.Tensor]:
    """Every layer's pooled states [L, N, H] and head logits [L, N, C], plus labels, idx, lengths [N]."""
    return _cache_pass(model, dataloader, lambda outputs: {"pooled": outputs.pooled, "logits": outputs.logits},
                       "all-layers pass (states)")


@torch.inference_mode()
def signals_from_states(states: dict[str, torch.Tensor], is_regression: bool, policy=None) -> dict[str, torch.Tensor]:
    """A `collect_signals` cache computed from a `collect_states` one, with `policy`'s exit probabilities
    when given: any number of policies replay on one backbone pass."""
    exit_probs = None
    if policy is not None:
        was_training = policy.training
        policy.eval()
        exit_probs = torch.stack([exit_probability(policy.logit(layer, pooled, logits))
                                  for layer, (pooled, logits) in enumerate(zip(states["pooled"], states["logits"]))])
        policy.train(was_training)
    cache = all_layer_signals(states["logits"], exit_probs, is_regression)
    cache.update({key: states[key] for key in ("labels", "idx", "lengths")})
    return cache


def signal_part(cache: dict) -> dict[str, torch.Tensor]:
    """The signals of a `collect_signals` cache (without labels, idx and lengths)."""
    return {name: value for name, value in cache.items() if name in SIGNALS}


class CachedLayerDataset(Dataset):
    """Instances of a `collect_states` cache, for training the policy on frozen states."""

    def __init__(self, cache: dict[str, torch.Tensor], memorized: torch.Tensor):
        self.pooled = cache["pooled"]
        self.logits = cache["logits"]
        self.labels = cache["labels"]
        self.idx = cache["idx"]  # row ids, so a numerical fault can name the rows of its batch
        self.memorized = memorized

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"pooled": self.pooled[:, i], "logits": self.logits[:, i], "labels": self.labels[i],
                "memorized": self.memorized[i], "idx": self.idx[i]}

    def rows(self, i: torch.Tensor) -> dict:
        """The batch of rows `i` as a DataLoader would collate it (row first), in one indexing."""
        return {"pooled": self.pooled[:, i].transpose(0, 1), "logits": self.logits[:, i].transpose(0, 1),
                "labels": self.labels[i], "memorized": self.memorized[i], "idx": self.idx[i]}
