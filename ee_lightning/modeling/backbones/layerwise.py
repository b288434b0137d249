"""A transformers encoder whose layers can be run one at a time.

Every stage (fine-tuning, policy rollouts, batched early-exit inference) talks to the
backbone through three calls: `embed` a batch, run `layer(l)` on a state, `pool` a state.
The adapters below wrap the library's own modules; nothing is copied from a modeling file.
"""
from __future__ import annotations

import torch
from torch import nn


def additive_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] 0/1 mask -> [B, 1, 1, S] additive float mask, as eager and sdpa attention expect."""
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


class LayerwiseBackbone(nn.Module):
    """Base adapter. Subclasses say where the embeddings, layers and pooler live."""

    family: str = ""
    uses_token_types: bool = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers if hasattr(self.config, "num_hidden_layers") else self.config.n_layers)

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.config, "hidden_size", None) or self.config.dim)

    @property
    def has_pooler(self) -> bool:
        return getattr(self.model, "pooler", None) is not None

    # --- the three calls -------------------------------------------------------------
    @property
    def takes_token_types(self) -> bool:
        """Whether segment ids reach the embeddings. A model with a single token type (RoBERTa:
        type_vocab_size=1) has nothing to look up for segment 1, so a text-pair batch from a
        BERT-style tokenizer would index past its table; its segment ids are dropped (all 0)."""
        return self.uses_token_types and int(getattr(self.config, "type_vocab_size", 2)) > 1

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids}
        if token_type_ids is not None and self.takes_token_types:
            kwargs["token_type_ids"] = token_type_ids
        return self.model.embeddings(**kwargs)

    def layer(self, index: int, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        """Run layer `index` (0-based) on `hidden`; `attention_bias` from `attention_bias()`."""
        return self.layer_module(index)(hidden, attention_bias)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "cls") -> torch.Tensor:
        if mode == "cls":
            first = hidden[:, 0]
            return self.apply_pooler(first) if self.has_pooler else first
        if mode == "mean":
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        raise ValueError(f"unknown pooling {mode!r}: use 'cls' or 'mean'")

    # --- helpers ---------------------------------------------------------------------
    def attention_bias(self, attention_mask: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The additive mask for `layer`; None when no row has padding, as the library's own forward
        does (attention without a mask takes a faster kernel, with the same result)."""
        if bool(attention_mask.all()):
            return None
        return additive_attention_mask(attention_mask, dtype or self.model.dtype)

    def layer_module(self, index: int) -> nn.Module:
        return self.model.encoder.layer[index]

    def apply_pooler(self, first_token: torch.Tensor) -> torch.Tensor:
        # BertPooler and friends take the whole sequence and read token 0 themselves.
        return self.model.pooler(first_token.unsqueeze(1))

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> list[torch.Tensor]:
        """All hidden states after each layer (L tensors of [B, S, H])."""
        hidden = self.embed(input_ids, token_type_ids)
        bias = self.attention_bias(attention_mask, hidden.dtype)
        states = []
        for index in range(self.num_layers):
            hidden = self.layer(index, hidden, bias)
            states.append(hidden)
        return states


class BertBackbone(LayerwiseBackbone):
    family = "bert"


class RobertaBackbone(LayerwiseBackbone):
    family = "roberta"


class ElectraBackbone(LayerwiseBackbone):
    family = "electra"

    def embed(self, input_ids, token_type_ids=None):
        hidden = super().embed(input_ids, token_type_ids)
        project = getattr(self.model, "embeddings_project", None)
        return project(hidden) if project is not None else hidden


class AlbertBackbone(LayerwiseBackbone):
    """ALBERT shares weights: layer l runs the group that the library's own loop assigns to l."""

    family = "albert"

    def embed(self, input_ids, token_type_ids=None):
        hidden = super().embed(input_ids, token_type_ids)
        return self.model.encoder.embedding_hidden_mapping_in(hidden)

    def layer_module(self, index: int) -> nn.Module:
        groups = self.config.num_hidden_groups
        group = int(index / (self.config.num_hidden_layers / groups))
        return self.model.encoder.albert_layer_groups[group]

    def apply_pooler(self, first_token):
        return self.model.pooler_activation(self.model.pooler(first_token))


class DistilBertBackbone(LayerwiseBackbone):
    family = "distilbert"
    uses_token_types = False

    def layer_module(self, index: int) -> nn.Module:
        return self.model.transformer.layer[index]


ADAPTERS: dict[str, type[LayerwiseBackbone]] = {
    cls.family: cls
    for cls in (BertBackbone, RobertaBackbone, ElectraBackbone, AlbertBackbone, DistilBertBackbone)
}
