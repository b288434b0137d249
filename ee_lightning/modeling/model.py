"""The early-exit model: a layer-wise backbone, an exit head per layer, optionally a policy per layer.

`step` is the one per-layer step every driver runs: training and the all-layers cache pass
(`forward`), the batched runner (which drops exited rows between steps) and FLOP counting
(which meters each part through `observe`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ee_lightning.modeling.backbones import LayerwiseBackbone
from ee_lightning.modeling.exit_policy import ExitPolicy, exit_probability
from ee_lightning.modeling.heads import ExitHeads


@dataclass
class LayerStep:
    """What one layer produced for the rows that ran it."""

    hidden: torch.Tensor  # [B, S, H], the input of the next layer
    pooled: torch.Tensor  # [B, H]
    logits: torch.Tensor  # [B, C]
    exit_logit: torch.Tensor | None = None  # [B], when the policy was asked for


@dataclass
class LayerOutputs:
    """Everything one all-layers pass produces, stacked over layers (dim 0 = layer)."""

    pooled: torch.Tensor  # [L, B, H]
    logits: torch.Tensor  # [L, B, C]
    exit_logits: torch.Tensor | None = None  # [L, B], when the model has a policy

    @property
    def exit_probs(self) -> torch.Tensor | None:
        return exit_probability(self.exit_logits) if self.exit_logits is not None else None


class EarlyExitModel(nn.Module):
    def __init__(self, backbone: LayerwiseBackbone, heads: ExitHeads, policy: ExitPolicy | None = None):
        super().__init__()
        if len(heads) != backbone.num_layers:
            raise ValueError(f"{len(heads)} exit heads for a backbone of {backbone.num_layers} layers")
        self.backbone = backbone
        self.heads = heads
        self.policy = policy

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    def start(self, batch: dict):
        """Embed a batch: (hidden states, step context) ready for layer 0."""
        return self.backbone.start(batch)

    def step(self, index: int, hidden: torch.Tensor, ctx, with_policy: bool = False,
             observe: Callable[[str], None] | None = None) -> LayerStep:
        """Layer `index` (0-based), its exit head and, with_policy, its policy net.
        `observe(part)` is called after each part ("layer", "pool", "head", "policy"): FLOP counting
        meters them."""
        hidden = self.backbone.step(index, hidden, ctx)
        if observe:
            observe("layer")
        pooled = self.heads.pool(hidden, ctx.attention_mask)
        if observe:
            observe("pool")
        logits = self.heads(index, pooled)
        if observe:
            observe("head")
        exit_logit = None
        if with_policy:
            exit_logit = self.policy.logit(index, pooled, logits)
            if observe:
                observe("policy")
        return LayerStep(hidden, pooled, logits, exit_logit)

    def forward(self, batch: dict) -> LayerOutputs:
        """Run every layer and every head (and every policy net, if any)."""
        hidden, ctx = self.start(batch)
        steps = []
        for index in range(self.num_layers):
            step = self.step(index, hidden, ctx, with_policy=self.policy is not None)
            hidden = step.hidden
            steps.append(step)
        return LayerOutputs(
            pooled=torch.stack([s.pooled for s in steps]),
            logits=torch.stack([s.logits for s in steps]),
            exit_logits=torch.stack([s.exit_logit for s in steps]) if self.policy is not None else None,
        )
