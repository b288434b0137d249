"""Exits for decoder LMs: where a token may leave the network, and what decides that it does.

* `LMExitHeads`: the exit at layer l predicts the next token with the model's own final norm and
  (tied) LM head applied to h_l + adapter_l(h_l). The adapters are low-rank and zero-initialised,
  so an untrained exit is the plain "final norm + LM head on an intermediate state"; the last
  layer has none (its exit is the model itself). `adapter="block"` puts a stronger adapter there
  instead (`BlockAdapter`: the backbone's own norm and MLP, copied from the next layer, output zeroed).
  An exit may also carry `confidence_tokens`, the head's rows of the tokens the model writes most often:
  its logits over those rows (`frequent_logits`, whose softmax margin is the `frequent_margin` signal) cost
  about a layer to read, the full head about eight.
* `TokenExitPolicy`: ConsistentEE's policy, p_l = sigmoid(g_l(h_l)) per token, read from the hidden
  state: the LM head (a [H, V] matmul) runs only where a token actually exits.
* `ExitClassifier`: CALM's trained confidence measure, P(the exit's token equals the final token),
  a linear probe of the hidden state per exit layer.

Layers are 1-based. The decoder is anything with `final_norm(h)` and `lm_head(h)` (`ExitDecoder`).
"""
from __future__ import annotations

from typing import Protocol

import copy

import torch
from torch import nn
from torch.nn import functional as F

FORCED_LOGIT = 30.0  # sigmoid ~ 1: at the last layer every token exits, whatever a policy says


class ExitDecoder(Protocol):
    """What the exits need of a decoder: its final norm and its LM head."""

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor: ...


def exit_layer_list(num_layers: int, exit_every: int = 1) -> list[int]:
    """Every `exit_every`-th layer (1-based), always including the last: (5, 2) -> [2, 4, 5]."""
    if num_layers < 1 or exit_every < 1:
        raise ValueError(f"num_layers={num_layers} and exit_every={exit_every} must be >= 1")
    layers = list(range(exit_every, num_layers + 1, exit_every))
    if not layers or layers[-1] != num_layers:
        layers.append(num_layers)
    return layers


def _check_exit(layer: int, exit_layers: list[int]) -> None:
    if layer not in exit_layers:
        raise ValueError(f"layer {layer} has no exit; exits are at layers {exit_layers}")


class LowRankAdapter(nn.Module):
    """h -> up(down(h)), rank r; `up` starts at zero so the adapter starts as the zero map."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(hidden))


class BlockAdapter(nn.Module):
    """h -> mlp(norm(h)), with the backbone's own norm and MLP modules: the feed-forward half of a
    decoder layer (Kangaroo's adapter is a whole layer; its attention half would need a K/V cache of
    its own at every exit, paid by every token that passes the exit, exiting or not). Copied from the
    backbone's layer right after the exit (the layer the exit skips first), with the MLP's output
    projection zeroed, so the adapter starts as the zero map."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        norm = getattr(layer, "post_attention_layernorm", None) or getattr(layer, "ln_2", None)
        if norm is None or not hasattr(layer, "mlp"):
            raise ValueError(f"{type(layer).__name__} has no (post_attention_layernorm | ln_2) and mlp; "
                             "use adapter: lowrank for this backbone")
        self.norm, self.mlp = copy.deepcopy(norm), copy.deepcopy(layer.mlp)
        self.requires_grad_(True)
        self.train()  # copied from a model in eval mode
        output = [m for m in self.mlp.modules() if getattr(m, "weight", None) is not None][-1]
        nn.init.zeros_(output.weight)
        if getattr(output, "bias", None) is not None:
            nn.init.zeros_(output.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(hidden))


ADAPTERS = ("lowrank", "block")


class LMExitHeads(nn.Module):
    """layers: the backbone's decoder layers, needed by `adapter="block"` (it copies them).
    confidence_tokens: how many token ids the `confidence_tokens` buffer holds (0: none; the pipeline sets
    them with `set_confidence_tokens`, a saved model loads them with its weights)."""

    def __init__(self, num_layers: int, hidden_size: int, exit_every: int = 1, rank: int = 32,
                 adapter: str = "lowrank", layers: nn.ModuleList | None = None, confidence_tokens: int = 0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"adapter rank={rank} must be >= 1")
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter {adapter!r}: use one of {ADAPTERS}")
        if adapter == "block" and (layers is None or len(layers) != num_layers):
            raise ValueError("adapter='block' copies the backbone's layers: pass layers=decoder.layers()")
        self.num_layers = int(num_layers)
        self.adapter_kind = adapter
        self.exit_layers = exit_layer_list(self.num_layers, int(exit_every))

        def make(layer: int) -> nn.Module:  # layer l's exit skips layer l + 1 (index l) first
            return LowRankAdapter(hidden_size, rank) if adapter == "lowrank" else BlockAdapter(layers[layer])

        self.adapters = nn.ModuleDict({str(layer): make(layer) for layer in self.exit_layers
                                       if layer != self.num_layers})
        # kept in the weights only when there are some, so a model saved before they existed still loads
        self.register_buffer("confidence_tokens", torch.zeros(int(confidence_tokens), dtype=torch.long),
                             persistent=confidence_tokens > 0)
        self._confidence_head = None  # (the head weight's storage it was sliced from, its rows' weight, bias)

    def set_confidence_tokens(self, token_ids: torch.Tensor) -> None:
        """The head rows `frequent_logits` reads: sorted, distinct vocabulary ids (`draft_head.frequent_tokens`)."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if token_ids.numel() < 2 or not bool((token_ids[1:] > token_ids[:-1]).all()) or int(token_ids.min()) < 0:
            raise ValueError("confidence tokens must be at least two sorted, distinct, non-negative token ids")
        device = self.confidence_tokens.device
        del self.confidence_tokens
        self.register_buffer("confidence_tokens", token_ids.to(device))
        self._confidence_head = None

    def frequent_logits(self, layer: int, hidden: torch.Tensor, decoder: ExitDecoder) -> torch.Tensor:
        """The exit's logits over the `confidence_tokens` rows of the LM head only, from its hidden states
        [R, H] -> [R, V']: what CALM's softmax measure reads, at V'/V of the head's cost."""
        if self.confidence_tokens.numel() < 2:
            raise ValueError("these exits have no confidence tokens: set method.lm_exits.confidence_tokens (e.g. "
                             "4096) and train again, or call exits.set_confidence_tokens(ids)")
        head = decoder.model.get_output_embeddings()
        # sliced once (gathering thousands of rows at every read would cost as much as the read itself), again
        # where the head's weight moved or was replaced
        source = (head.weight.data_ptr(), head.weight.device, head.weight.dtype)
        if self._confidence_head is None or self._confidence_head[0] != source:
            rows = self.confidence_tokens.to(head.weight.device)
            bias = getattr(head, "bias", None)
            self._confidence_head = (source, head.weight.detach()[rows].clone(),
                                     None if bias is None else bias.detach()[rows].clone())
        _, weight, bias = self._confidence_head
        return F.linear(decoder.final_norm(self.adapt(layer, hidden)), weight, bias)

    def adapt(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """h + adapter_l(h) (h itself at the last layer)."""
        _check_exit(layer, self.exit_layers)
        if layer == self.num_layers:
            return hidden
        adapter = self.adapters[str(layer)]
        dtype = next(adapter.parameters()).dtype
        return hidden + adapter(hidden.to(dtype)).to(hidden.dtype)

    def logits(self, layer: int, hidden: torch.Tensor, decoder: ExitDecoder,
               vocabulary: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits [..., V] of the exit at `layer` from its hidden state [..., H]; with a
        `vocabulary` (sorted token ids [V']) only those tokens' logits [..., V'] (`head_logits`)."""
        normed = decoder.final_norm(self.adapt(layer, hidden))
        return decoder.lm_head(normed) if vocabulary is None else head_logits(decoder, normed, vocabulary)


def head_logits(decoder, normed: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
    """The LM head's logits of the tokens in `vocabulary` only: [..., H] -> [..., V'] (a V'-row slice
    of its weight: the head costs V'/V of the full one)."""
    head = decoder.model.get_output_embeddings()
    bias = None if getattr(head, "bias", None) is None else head.bias[vocabulary]
    return F.linear(normed, head.weight[vocabulary], bias)


class _PerExitHeads(nn.Module):
    """One small net per exit layer below the last; the last layer's exit is forced."""

    def __init__(self, num_layers: int, exit_layers: list[int] | None, make_head):
        super().__init__()
        self.num_layers = int(num_layers)
        self.exit_layers = list(exit_layers) if exit_layers is not None else list(range(1, self.num_layers + 1))
        if not self.exit_layers or self.exit_layers[-1] != self.num_layers or \
                any(not 1 <= a < b for a, b in zip(self.exit_layers, self.exit_layers[1:])):
            raise ValueError(f"exit_layers={self.exit_layers} must increase and end at num_layers={self.num_layers}")
        self.heads = nn.ModuleDict({str(layer): make_head() for layer in self.exit_layers[:-1]})

    def logit(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [...] logit; FORCED_LOGIT at the last layer."""
        _check_exit(layer, self.exit_layers)
        if layer == self.num_layers:
            return hidden.new_full(hidden.shape[:-1], FORCED_LOGIT, dtype=torch.float32)
        head = self.heads[str(layer)]
        first = next(head.parameters())
        return head(hidden.to(first.dtype)).squeeze(-1).float()

    def prob(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(layer, hidden))


class TokenExitPolicy(_PerExitHeads):
    """p_l = sigmoid(LayerNorm -> Linear(H, hidden) -> GELU -> Linear(hidden, 1) of h_l), per exit layer.

    A decoder's residual stream is not normalised and its norm grows with depth (SmolLM2: about 80
    at layer 3, 800 at layer 30): read raw, it saturates the sigmoid from the first step, and a
    saturated policy gets no REINFORCE gradient (it collapsed to exiting every token at the first
    exit in some seeds). The LayerNorm puts every exit's input on one scale."""

    def __init__(self, num_layers: int, hidden_size: int, hidden: int = 32, exit_layers: list[int] | None = None):
        super().__init__(num_layers, exit_layers, lambda: policy_net(hidden_size, hidden))


def policy_net(hidden_size: int, hidden: int) -> nn.Sequential:
    """A policy's logit from a hidden state: LayerNorm -> Linear(H, hidden) -> GELU -> Linear(hidden, 1)."""
    return nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, hidden), nn.GELU(), nn.Linear(hidden, 1))


class ExitClassifier(_PerExitHeads):
    """CALM's learned measure: sigmoid(Linear(H, 1) of LayerNorm(h_l)) = P(exit token == final token),
    per exit layer (normalised for the policy's reason)."""

    def __init__(self, num_layers: int, hidden_size: int, exit_layers: list[int] | None = None):
        super().__init__(num_layers, exit_layers, lambda: nn.Sequential(nn.LayerNorm(hidden_size),
                                                                        nn.Linear(hidden_size, 1)))
