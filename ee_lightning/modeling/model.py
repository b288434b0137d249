"""The early-exit model: a layer-wise backbone, an exit head per layer, optionally a policy per layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ee_lightning.modeling.backbones import LayerwiseBackbone
from ee_lightning.modeling.heads import ExitHeads
from ee_lightning.modeling.exit_policy import ExitPolicy


@dataclass
class LayerOutputs:
    """Everything one all-layers pass produces, stacked over layers (dim 0 = layer)."""

    pooled: torch.Tensor  # [L, B, H]
    logits: torch.Tensor  # [L, B, C]
    exit_logits: torch.Tensor | None = None  # [L, B], when the model has a policy
    exit_probs: torch.Tensor | None = None  # [L, B], sigmoid of exit_logits


class EarlyExitModel(nn.Module):
    def __init__(self, backbone: LayerwiseBackbone, heads: ExitHeads, pooling: str = "cls",
                 policy: ExitPolicy | None = None):
        super().__init__()
        if len(heads) != backbone.num_layers:
            raise ValueError(f"{len(heads)} exit heads for a backbone of {backbone.num_layers} layers")
        self.backbone = backbone
        self.heads = heads
        self.pooling = pooling
        self.policy = policy

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    def start(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch; returns (hidden states, attention bias) ready for layer 0."""
        hidden = self.backbone.embed(batch["input_ids"], batch.get("token_type_ids"))
        return hidden, self.backbone.attention_bias(batch["attention_mask"], hidden.dtype)

    def step(self, index: int, hidden, bias, attention_mask):
        """Run layer `index`, pool, and apply its head: (new hidden, pooled, logits)."""
        hidden = self.backbone.layer(index, hidden, bias)
        pooled = self.backbone.pool(hidden, attention_mask, self.pooling)
        return hidden, pooled, self.heads(index, pooled)

    def forward(self, batch: dict) -> LayerOutputs:
        """Run every layer and every head (and every policy net, if any)."""
        hidden, bias = self.start(batch)
        pooled, logits, exit_logits = [], [], []
        for index in range(self.num_layers):
            hidden, pooled_l, logits_l = self.step(index, hidden, bias, batch["attention_mask"])
            pooled.append(pooled_l)
            logits.append(logits_l)
            if self.policy is not None:
                exit_logits.append(self.policy.logit(index, pooled_l, logits_l))
        exit_logits = torch.stack(exit_logits) if exit_logits else None
        return LayerOutputs(
            pooled=torch.stack(pooled),
            logits=torch.stack(logits),
            exit_logits=exit_logits,
            exit_probs=torch.sigmoid(exit_logits) if exit_logits is not None else None,
        )
