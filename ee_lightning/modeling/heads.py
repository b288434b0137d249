"""Classification exit heads: pool a layer's states, then one classifier (or regressor) per layer.

Pooling belongs here, not to the backbone: a decoder's exits read single tokens, an encoder's
exits read a summary of the sequence. `cls` pooling goes through the backbone's own pooler when
it has one (its pretrained weights stay the backbone's); `mean` is the masked mean of the tokens.
A pre-norm family (ModernBERT) normalises only its last layer's output, so its `output_norm` is
applied to every exit's states first: each exit reads states as the model's own output would be.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

POOLINGS = ("cls", "mean")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class ExitHeads(nn.Module):
    def __init__(self, num_layers: int, hidden_size: int, output_size: int, dropout: float = 0.1,
                 pooling: str = "cls", first_token_pooler: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 output_norm: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}: use one of {POOLINGS}")
        self.pooling = pooling
        # Plain attributes, not submodules: their weights are saved once, with the backbone.
        self.first_token_pooler = first_token_pooler
        self.output_norm = output_norm
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, output_size)) for _ in range(num_layers)
        )

    def __len__(self) -> int:
        return len(self.heads)

    @property
    def output_size(self) -> int:
        """Classes, or 1 for a regression head."""
        return self.heads[0][-1].out_features

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, S, H] states -> [B, H]."""
        if self.output_norm is not None:
            hidden = self.output_norm(hidden)
        if self.pooling == "mean":
            return mean_pool(hidden, attention_mask)
        first = hidden[:, 0]
        return self.first_token_pooler(first) if self.first_token_pooler is not None else first

    def forward(self, index: int, pooled: torch.Tensor) -> torch.Tensor:
        """Head `index` (0-based) on pooled states [B, H]: logits [B, C]."""
        return self.heads[index](pooled)
