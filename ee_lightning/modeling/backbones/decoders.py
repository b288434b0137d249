"""A transformers decoder-only LM whose layers can be run one at a time, with a KV cache.

Generation with early exit talks to the model through a few calls:
    hidden, ctx = decoder.start(input_ids, attention_mask, cache)  # embeddings of the new tokens
    hidden = decoder.advance(i, hidden, ctx, running)            # layer i on running rows; the
                                                                 # others only write their K/V
    logits = decoder.lm_head(decoder.final_norm(hidden))
The adapters wrap the library's own modules (embeddings, decoder layers, rotary embedding,
mask functions from `transformers.masking_utils`, `DynamicCache`); nothing is copied from a
modeling file. One adapter covers the Llama-style families (Llama, Qwen2, Qwen3, Mistral: pre-norm
layers with rotary keys); GPT-2 (absolute positions, fused QKV projection) has its own.

K/V of a token that left the network early (CALM's state propagation): a token that exits at
layer t still owes keys and values to every deeper layer, or later tokens would attend to
nothing there. They are computed from its exit state h_t through each deeper layer's OWN input
norm and K/V projections (plus the key norm and rotary where the family has them), exactly as
that layer would have computed them had h_t been its input.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

ROTARY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_FAMILIES = (*ROTARY_FAMILIES, "gpt2")
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class DecoderContext:
    """What every layer call of one forward step needs.

    attention_mask: [B, past + T] 0/1 (left padding), over the cached tokens and the new ones.
    position_ids: [B, T] positions of the new tokens (padding-aware, as `generate` counts them).
    position_embeddings: rotary (cos, sin) [B, T, D]; None for GPT-2 (added to the embeddings).
    masks: the library's attention mask per attention kind (full / sliding window); a mask may be
        None where the attention kernel's own causal flag suffices.
    cache: the transformers Cache holding every row (never shrunk by an early exit), or None.
    """

    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    masks: dict
    cache: DynamicCache | None

    def rows(self, rows: torch.Tensor) -> "DecoderContext":
        """The context of a subset of rows (positions, rotary, masks); the cache stays whole."""
        pe = None if self.position_embeddings is None else tuple(t[rows] for t in self.position_embeddings)
        masks = {kind: _select(mask, rows) for kind, mask in self.masks.items()}
        return DecoderContext(self.attention_mask[rows], self.position_ids[rows], pe, masks, self.cache)


def _select(mask, rows):
    if mask is None or not torch.is_tensor(mask) or mask.shape[0] == 1:
        return mask
    return mask[rows]


class _RowsCache:
    """Stands in for the cache while a layer runs on a subset of rows.

    The layer's attention calls `update` with the new K/V of its rows; the exited rows' K/V
    (computed by state propagation) are merged in, the real cache is updated once for every row
    (so no row is ever dropped from it), and the attention gets back its own rows' keys/values.
    """

    def __init__(self, cache, rows: torch.Tensor, other_rows: torch.Tensor, other_kv: tuple[torch.Tensor, torch.Tensor]):
        self.cache, self.rows, self.other_rows, self.other_kv = cache, rows, other_rows, other_kv

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        batch = self.rows.numel() + self.other_rows.numel()
        keys = key_states.new_empty((batch, *key_states.shape[1:]))
        values = value_states.new_empty((batch, *value_states.shape[1:]))
        keys[self.rows], values[self.rows] = key_states, value_states
        keys[self.other_rows], values[self.other_rows] = self.other_kv
        all_keys, all_values = self.cache.update(keys, values, layer_idx, *args, **kwargs)
        return all_keys[self.rows], all_values[self.rows]


class LayerwiseDecoder(nn.Module):
    """Base adapter: subclasses say where the embeddings, layers, norms and projections live."""

    family: str = ""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    # --- what subclasses provide -------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, input_ids, position_ids) -> tuple[torch.Tensor, tuple | None]:
        raise NotImplementedError

    def run_layer(self, index, hidden, ctx, cache) -> torch.Tensor:
        raise NotImplementedError

    def kv(self, index: int, hidden: torch.Tensor, ctx: DecoderContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H_kv, T, D] that layer `index` computes from input `hidden`."""
        raise NotImplementedError

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    def attention_kind(self, index: int) -> str:
        types = getattr(self.config, "layer_types", None)
        if types:
            return types[index]
        return SLIDING if self.family == "mistral" and getattr(self.config, "sliding_window", None) else FULL

    # --- the step interface ------------------------------------------------------------
    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: DynamicCache | None = None,
              mask_layer: int = 0):
        """Embeddings [B, T, H] of the new tokens `input_ids` [B, T] and their context.

        attention_mask [B, past + T] covers the cached tokens and the new ones. Positions count
        only real tokens (left padding gets position 0), as `generate` does.
        mask_layer: the first layer (0-based) the context will run. The masks are sized against the
        cache of the first layer of each attention kind from there on: in verify mode the layers
        above the draft exit hold fewer cached tokens than those below it.
        """
        new = input_ids.shape[1]
        if attention_mask.shape[1] < new:
            raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns for {new} new tokens")
        mask = attention_mask.long()
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -new:]
        hidden, position_embeddings = self.embed(input_ids, position_ids)
        first = {}  # attention kind -> the first layer of that kind the context runs
        for i in range(mask_layer, self.num_layers):
            first.setdefault(self.attention_kind(i), i)
        args = dict(config=self.config, inputs_embeds=hidden, attention_mask=mask.to(torch.bool), cache=cache, position_ids=position_ids)
        masks = {}
        if FULL in first:
            masks[FULL] = create_causal_mask(**args, layer_idx=first[FULL] if mask_layer else None)
        if SLIDING in first:
            masks[SLIDING] = create_sliding_window_causal_mask(**args, layer_idx=first[SLIDING] if mask_layer else None)
        return hidden, DecoderContext(mask, position_ids, position_embeddings, masks, cache)

    def step(self, index: int, hidden: torch.Tensor, ctx: DecoderContext) -> torch.Tensor:
        """Layer `index` (0-based) on every row of `hidden` [B, T, H]; appends its K/V to the cache."""
        return self.run_layer(index, hidden, ctx, ctx.cache)

    def fill_skipped_kv(self, index: int, hidden: torch.Tensor, ctx: DecoderContext) -> None:
        """Every row has exited: append layer `index`'s K/V computed from the exit states `hidden`."""
        if ctx.cache is not None:
            ctx.cache.update(*self.kv(index, hidden, ctx), index)

    def advance(self, index: int, hidden: torch.Tensor, ctx: DecoderContext, running: torch.Tensor) -> torch.Tensor:
        """Layer `index` for a batch where only rows `running` (bool [B]) are still in the network.

        Running rows go through the layer; the other rows keep their (exit) state and only write
        the layer's K/V computed from it (state propagation). Returns the new hidden [B, T, H]."""
        if bool(running.all()):
            return self.step(index, hidden, ctx)
        if not bool(running.any()):
            self.fill_skipped_kv(index, hidden, ctx)
            return hidden
        rows, others = running.nonzero().squeeze(1), (~running).nonzero().squeeze(1)
        other_kv = self.kv(index, hidden[others], ctx.rows(others))
        cache = None if ctx.cache is None else _RowsCache(ctx.cache, rows, others, other_kv)
        out = hidden.clone()
        out[rows] = self.run_layer(index, hidden[rows], ctx.rows(rows), cache)
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states after each layer (L tensors [B, S, H]), without a cache."""
        hidden, ctx = self.start(input_ids, attention_mask, cache=None)
        states = []
        for index in range(self.num_layers):
            hidden = self.step(index, hidden, ctx)
            states.append(hidden)
        return states


class RotaryDecoder(LayerwiseDecoder):
    """Llama, Qwen2, Qwen3, Mistral: `model.model.{embed_tokens, layers, norm, rotary_emb}`."""

    def layers(self):
        return self.model.model.layers

    def embed(self, input_ids, position_ids):
        hidden = self.model.model.embed_tokens(input_ids)
        return hidden, self.model.model.rotary_emb(hidden, position_ids=position_ids)

    def run_layer(self, index, hidden, ctx, cache):
        return self.layers()[index](
            hidden,
            attention_mask=ctx.masks[self.attention_kind(index)],
            position_ids=ctx.position_ids,
            cache=cache,
            use_cache=cache is not None,
            position_embeddings=ctx.position_embeddings,
        )

    def kv(self, index, hidden, ctx):
        layer = self.layers()[index]
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        keys = attn.k_proj(normed).view(shape)
        if hasattr(attn, "k_norm"):  # Qwen3 normalises keys per head before the rotary
            keys = attn.k_norm(keys)
        keys = keys.transpose(1, 2)
        values = attn.v_proj(normed).view(shape).transpose(1, 2)
        # The family's own rotary function (it rotates a query and a key; we only need the key).
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        cos, sin = ctx.position_embeddings
        _, keys = rotate(keys, keys, cos, sin)
        return keys, values

    def final_norm(self, hidden):
        return self.model.model.norm(hidden)


class GPT2Decoder(LayerwiseDecoder):
    """GPT-2: `model.transformer.{wte, wpe, drop, h, ln_f}`; positions are added to the embeddings."""

    family = "gpt2"

    def layers(self):
        return self.model.transformer.h

    def embed(self, input_ids, position_ids):
        t = self.model.transformer
        return t.drop(t.wte(input_ids) + t.wpe(position_ids)), None

    def run_layer(self, index, hidden, ctx, cache):
        return self.layers()[index](hidden, cache, ctx.masks[FULL], use_cache=cache is not None, position_ids=ctx.position_ids)

    def kv(self, index, hidden, ctx):
        block = self.layers()[index]
        attn = block.attn
        _, keys, values = attn.c_attn(block.ln_1(hidden)).split(attn.split_size, dim=2)
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        return keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)

    def final_norm(self, hidden):
        return self.model.transformer.ln_f(hidden)


def _rotary(name: str) -> type[RotaryDecoder]:
    return type(f"{name.capitalize()}Decoder", (RotaryDecoder,), {"family": name})


DECODERS: dict[str, type[LayerwiseDecoder]] = {name: _rotary(name) for name in ROTARY_FAMILIES}
DECODERS["gpt2"] = GPT2Decoder


def wrap_decoder(model: nn.Module) -> LayerwiseDecoder:
    """The layer-wise adapter for a transformers *ForCausalLM of a supported family."""
    family = model.config.model_type
    if family not in DECODERS:
        raise ValueError(f"decoder family {family!r} is not supported; supported families: {', '.join(SUPPORTED_FAMILIES)}")
    return DECODERS[family](model)

