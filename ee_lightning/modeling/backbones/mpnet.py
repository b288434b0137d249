"""MPNet: BERT-like layers plus a relative position bias that the encoder computes once per forward
and hands to every layer (T5-style buckets of the signed distance between two positions)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ee_lightning.modeling.backbones.layerwise import EncoderContext, LayerwiseBackbone, attention_bias


@dataclass(frozen=True)
class MPNetContext(EncoderContext):
    position_bias: torch.Tensor | None = None  # [1, heads, S, S]: depends on positions only, shared by all rows

    def select(self, rows: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, "MPNetContext"]:
        hidden, ctx = super().select(rows, hidden)
        width = hidden.shape[1]
        return hidden, replace(ctx, position_bias=self.position_bias[:, :, :width, :width])


class MPNetBackbone(LayerwiseBackbone):
    """MPNetModel: no token types; each layer takes (hidden, mask, position_bias)."""

    family = "mpnet"
    uses_token_types = False

    def start(self, batch: dict) -> tuple[torch.Tensor, MPNetContext]:
        hidden = self.embed(batch["input_ids"])
        mask = batch["attention_mask"]
        # The library computes the bias for the whole batch (expanded per row); one row of it is the
        # same numbers and broadcasts in the layers' `scores += position_bias`.
        bias = self.model.encoder.compute_position_bias(hidden[:1])
        return hidden, MPNetContext(mask, attention_bias(mask, hidden.dtype), position_bias=bias)

    def step(self, index: int, hidden: torch.Tensor, ctx: MPNetContext) -> torch.Tensor:
        return self.layer_module(index)(hidden, ctx.attention_bias, ctx.position_bias)[0]
