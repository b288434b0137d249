"""A transformers encoder whose layers can be run one at a time: the step interface.

Every driver (training forward, the all-layers cache pass, the batched runner, FLOP counting)
talks to a backbone through the same two calls:

    hidden, ctx = backbone.start(batch)        # embeddings, and what every layer needs beside them
    hidden = backbone.step(index, hidden, ctx) # layer `index` (0-based)
    hidden, ctx = ctx.select(rows, hidden)     # keep the rows still running (the runner)

The context carries what a family needs beside the hidden state; for these encoders that is the
attention mask and its additive bias. The adapters wrap the library's own modules; nothing is
copied from a modeling file. Pooling is not the backbone's business: the classification exit
heads pool (see `ee_lightning.modeling.heads`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


def additive_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] 0/1 mask -> [B, 1, 1, S] additive float mask, as eager and sdpa attention expect."""
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive mask for a layer call; None when no row has padding, as the library's own forward
    does (attention without a mask takes a faster kernel, with the same result)."""
    if bool(attention_mask.all()):
        return None
    return additive_attention_mask(attention_mask, dtype)


@dataclass(frozen=True)
class EncoderContext:
    """What an encoder layer needs beside the hidden states, for the rows still running."""

    attention_mask: torch.Tensor  # [B, S], 1 = token (right padding)
    attention_bias: torch.Tensor | None  # [B, 1, 1, S] additive, or None when no row is padded

    def select(self, rows: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, "EncoderContext"]:
        """Keep `rows` (positions in the current batch), and drop the columns that are padding for
        every row kept: a batch of short survivors runs at their length, not the longest row's."""
        mask = self.attention_mask.index_select(0, rows)
        width = int(mask.any(0).nonzero().max()) + 1 if mask.numel() else 0
        mask = mask[:, :width]
        hidden = hidden.index_select(0, rows)[:, :width]
        return hidden, replace(self, attention_mask=mask, attention_bias=attention_bias(mask, hidden.dtype))


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
    def takes_token_types(self) -> bool:
        """Whether segment ids reach the embeddings. A model with a single token type (RoBERTa:
        type_vocab_size=1) has nothing to look up for segment 1, so a text-pair batch from a
        BERT-style tokenizer would index past its table; its segment ids are dropped (all 0)."""
        return self.uses_token_types and int(getattr(self.config, "type_vocab_size", 2)) > 1

    # --- the step interface --------------------------------------------------------------
    def start(self, batch: dict) -> tuple[torch.Tensor, EncoderContext]:
        """Embed a batch (input_ids, attention_mask, optional token_type_ids)."""
        hidden = self.embed(batch["input_ids"], batch.get("token_type_ids"))
        mask = batch["attention_mask"]
        return hidden, EncoderContext(mask, attention_bias(mask, hidden.dtype))

    def step(self, index: int, hidden: torch.Tensor, ctx: EncoderContext) -> torch.Tensor:
        """Run layer `index` (0-based) on `hidden`."""
        return self.layer_module(index)(hidden, ctx.attention_bias)

    # --- where a family keeps its parts ------------------------------------------------
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids}
        if token_type_ids is not None and self.takes_token_types:
            kwargs["token_type_ids"] = token_type_ids
        return self.model.embeddings(**kwargs)

    def layer_module(self, index: int) -> nn.Module:
        return self.model.encoder.layer[index]

    def output_norm(self):
        """The model's own normalisation of a layer's output ([..., H] -> [..., H]) for pre-norm families
        (ModernBERT's final LayerNorm), or None when a layer's output already is the model's output."""
        return None

    def first_token_pooler(self):
        """The model's own pooler over the first token ([B, H] -> [B, H]), or None if it has none.
        The classification heads call it for `cls` pooling; its weights stay the backbone's."""
        if getattr(self.model, "pooler", None) is None:
            return None
        # BertPooler and friends take the whole sequence and read token 0 themselves.
        return lambda first: self.model.pooler(first.unsqueeze(1))


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

    def first_token_pooler(self):
        return lambda first: self.model.pooler_activation(self.model.pooler(first))


class DistilBertBackbone(LayerwiseBackbone):
    family = "distilbert"
    uses_token_types = False

    def layer_module(self, index: int) -> nn.Module:
        return self.model.transformer.layer[index]

