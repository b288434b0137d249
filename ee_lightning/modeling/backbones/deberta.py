"""DeBERTa-v2 (and v3, the same modules): disentangled attention. Once per forward the encoder
builds the relative positions between every pair of tokens and layer-normalises the relative
position embeddings; every layer takes both beside a [B, 1, S, S] pairwise 0/1 mask. Models with
a convolution after the first layer (`conv_kernel_size`, DeBERTa-v2 xlarge) also need the
embeddings there."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ee_lightning.modeling.backbones.layerwise import EncoderContext, LayerwiseBackbone


@dataclass(frozen=True)
class DebertaContext(EncoderContext):
    pair_mask: torch.Tensor | None = None  # [B, 1, S, S]: 1 where query and key are both tokens
    relative_pos: torch.Tensor | None = None  # [1, S, S] bucketed distances (positions only)
    rel_embeddings: torch.Tensor | None = None  # [2 * buckets, H]: no batch or position axis
    embeddings: torch.Tensor | None = None  # [B, S, H], only for the convolution after layer 0

    def select(self, rows: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, "DebertaContext"]:
        hidden, ctx = super().select(rows, hidden)
        width = hidden.shape[1]
        pair_mask = self.pair_mask.index_select(0, rows)[:, :, :width, :width]
        relative_pos = None if self.relative_pos is None else self.relative_pos[:, :width, :width]
        embeddings = None if self.embeddings is None else self.embeddings.index_select(0, rows)[:, :width]
        return hidden, replace(ctx, pair_mask=pair_mask, relative_pos=relative_pos, embeddings=embeddings)


class DebertaV2Backbone(LayerwiseBackbone):
    family = "deberta-v2"

    def __init__(self, model):
        super().__init__(model)
        if getattr(model, "z_steps", 0) > 1:  # the library re-runs the last layer z_steps times
            raise ValueError(f"DeBERTa-v2 with z_steps={model.z_steps} is not supported: its extra passes "
                             "re-run the last layer on its own output")

    def start(self, batch: dict) -> tuple[torch.Tensor, DebertaContext]:
        mask = batch["attention_mask"]
        kwargs = {"input_ids": batch["input_ids"], "mask": mask}
        if batch.get("token_type_ids") is not None and self.takes_token_types:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        hidden = self.model.embeddings(**kwargs)  # zeroes the padding positions, as the library does
        encoder = self.model.encoder
        return hidden, DebertaContext(
            mask, None,
            pair_mask=encoder.get_attention_mask(mask),
            relative_pos=encoder.get_rel_pos(hidden),
            rel_embeddings=self.relative_embeddings(),
            embeddings=hidden if encoder.conv is not None else None,
        )

    def relative_embeddings(self) -> torch.Tensor | None:
        encoder = self.model.encoder
        if torch.is_inference_mode_enabled():
            # The library layer-normalises a parameter itself. Under inference mode torch's module tracker
            # (used by FLOP counting) cannot hook a module whose input is a parameter, so this one call
            # leaves inference mode (without gradients): the same numbers.
            with torch.inference_mode(False), torch.no_grad():
                return encoder.get_rel_embedding()
        return encoder.get_rel_embedding()

    def step(self, index: int, hidden: torch.Tensor, ctx: DebertaContext) -> torch.Tensor:
        out = self.layer_module(index)(hidden, ctx.pair_mask, relative_pos=ctx.relative_pos,
                                       rel_embeddings=ctx.rel_embeddings)[0]
        if index == 0 and self.model.encoder.conv is not None:
            out = self.model.encoder.conv(ctx.embeddings, out, ctx.attention_mask)
        return out
