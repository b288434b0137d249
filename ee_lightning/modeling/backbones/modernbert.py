"""ModernBERT: pre-norm layers with rotary positions that alternate global attention and local
(sliding-window) attention. Once per forward the model builds one mask per attention kind and
the rotary cos/sin tables per kind; each layer takes the pair of its kind. No token types.

The layer-wise states are the residual stream after each layer; the library's output adds a
final LayerNorm (`output_norm`), which the exit heads apply to every exit's states before pooling. Only the
padded attention paths (sdpa, eager) are supported: flash attention unpads the batch."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

from ee_lightning.modeling.backbones.layerwise import EncoderContext, LayerwiseBackbone

MASK_BUILDERS = {"full_attention": create_bidirectional_mask,
                 "sliding_attention": create_bidirectional_sliding_window_mask}
PADDED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class ModernBertContext(EncoderContext):
    # per attention kind: the [B, 1, S, S] mask (None: attend everywhere), and rotary (cos, sin), each [1, S, D]
    masks: dict = field(default_factory=dict)
    rotary: dict = field(default_factory=dict)

    def select(self, rows: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, "ModernBertContext"]:
        hidden, ctx = super().select(rows, hidden)
        width = hidden.shape[1]
        masks = {kind: None if mask is None else mask.index_select(0, rows)[:, :, :width, :width]
                 for kind, mask in self.masks.items()}
        rotary = {kind: (cos[:, :width], sin[:, :width]) for kind, (cos, sin) in self.rotary.items()}
        return hidden, replace(ctx, masks=masks, rotary=rotary)


class ModernBertBackbone(LayerwiseBackbone):
    family = "modernbert"
    uses_token_types = False

    def __init__(self, model):
        super().__init__(model)
        attn = model.config._attn_implementation
        if attn not in PADDED_ATTENTION:
            raise ValueError(f"ModernBERT with attn_implementation={attn!r} is not supported layer by layer: use "
                             f"one of {PADDED_ATTENTION} (backbone.attn_implementation)")

    def start(self, batch: dict) -> tuple[torch.Tensor, ModernBertContext]:
        mask = batch["attention_mask"]
        hidden = self.model.embeddings(input_ids=batch["input_ids"])
        kinds = sorted(set(self.config.layer_types))
        masks = {kind: MASK_BUILDERS[kind](config=self.config, inputs_embeds=hidden, attention_mask=mask)
                 for kind in kinds}
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = {kind: self.model.rotary_emb(hidden, positions, kind) for kind in kinds}
        return hidden, ModernBertContext(mask, None, masks=masks, rotary=rotary)

    def step(self, index: int, hidden: torch.Tensor, ctx: ModernBertContext) -> torch.Tensor:
        layer = self.layer_module(index)
        kind = layer.attention_type
        return layer(hidden, attention_mask=ctx.masks[kind], position_embeddings=ctx.rotary[kind])

    def layer_module(self, index: int):
        return self.model.layers[index]

    def output_norm(self):
        return self.model.final_norm

    def first_token_pooler(self):
        return None  # no pooler; the heads apply output_norm before pooling
