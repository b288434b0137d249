"""One pass with all layers over a split, cached, so any exit rule can be replayed for free."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ee_lightning.modeling.model import EarlyExitModel


@torch.inference_mode()
def collect_layer_outputs(model: EarlyExitModel, dataloader, keep_pooled: bool = False) -> dict[str, torch.Tensor]:
    """Run every layer, head and policy net over `dataloader` in eval mode.

    Returns layer-first tensors: logits [L, N, C], exit_probs [L, N], pooled [L, N, H]
    (when keep_pooled), and labels [N], idx [N], lengths [N] (tokens) in the dataloader's order.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    keys = ["logits", "exit_probs"] + (["pooled"] if keep_pooled else [])
    chunks: dict[str, list] = {key: [] for key in keys + ["labels", "idx", "lengths"]}
    for batch in dataloader:
        batch = {name: value.to(device) for name, value in batch.items()}
        outputs = model(batch)
        for key in keys:
            chunks[key].append(getattr(outputs, key).cpu())
        chunks["labels"].append(batch["labels"].cpu())
        chunks["idx"].append(batch["idx"].cpu())
        chunks["lengths"].append(batch["attention_mask"].sum(-1).cpu())
    model.train(was_training)
    return {key: torch.cat(values, dim=1 if key in keys else 0) for key, values in chunks.items()}


class CachedLayerDataset(Dataset):
    """Instances of a `collect_layer_outputs` cache, for training the policy on frozen states."""

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
