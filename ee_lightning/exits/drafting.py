"""The arithmetic of verify mode (self-speculation), as pure functions.

One round: the layers up to the draft exit E draft k tokens one at a time; the layers above E
then check all k in one pass. The verifier's prediction at each drafted position is the full
model's token there, so the round keeps the drafts up to the first disagreement and the
verifier's own token at that position (greedy output is the full model's).

Cost is counted in sequential passes over a layer's weights: at batch 1 a decoding step reads
every weight it uses once, whatever the number of tokens it carries, so a pass that verifies k
tokens counts once. The LM head counts in layer units (`head_cost`: its weights over one
layer's; about 8 in SmolLM2-135M, whose tied head is 576 x 49,152).
"""
from __future__ import annotations

import torch


def accepted_length(drafts: torch.Tensor, verified: torch.Tensor) -> int:
    """How many leading drafts equal the verifier's tokens: [k] and [k] -> 0..k."""
    if drafts.shape != verified.shape or drafts.dim() != 1:
        raise ValueError(f"drafts {tuple(drafts.shape)} and verified {tuple(verified.shape)} must be two [k] vectors")
    disagree = (drafts != verified).nonzero()
    return int(disagree[0]) if disagree.numel() else int(drafts.numel())


def round_tokens(drafts: torch.Tensor, verified: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tokens a round emits, and how many drafts it accepted.

    The accepted drafts, then the verifier's token at the first rejected position; when every
    draft is accepted the round ends there (the last draft has not been through the layers, so
    it has no successor yet). A round therefore emits at least one token."""
    accepted = accepted_length(drafts, verified)
    return verified[: min(accepted + 1, verified.numel())], accepted


def round_layer_passes(draft_layer: int, num_layers: int, drafted: int, head_cost: float,
                       draft_head_cost: float | None = None) -> float:
    """Sequential layer passes of one round of `drafted` tokens: each draft runs layers 1..E and a
    draft head; one pass of layers E+1..L and the LM head verifies them all."""
    if not 1 <= draft_layer < num_layers:
        raise ValueError(f"draft_layer={draft_layer} must lie in 1..{num_layers - 1} (a layer below the last)")
    if drafted < 1:
        raise ValueError(f"a round drafts at least one token, got {drafted}")
    draft_head = head_cost if draft_head_cost is None else draft_head_cost
    return drafted * (draft_layer + draft_head) + (num_layers - draft_layer) + head_cost


def full_depth_passes(num_layers: int, head_cost: float) -> float:
    """Layer passes of one plain decoding step: every layer and the LM head, for one token."""
    return num_layers + head_cost


def head_cost_in_layers(vocab_rows: int, hidden_size: int, layer_parameters: int) -> float:
    """An LM head over `vocab_rows` tokens, in units of one layer's weights."""
    if layer_parameters < 1:
        raise ValueError(f"layer_parameters={layer_parameters} must be positive")
    return vocab_rows * hidden_size / layer_parameters


def projected_speedup(full_passes_per_token: float, passes_per_token: float) -> float:
    """Where a pass costs its weight reads (batch 1 on a GPU: memory-bound), time is proportional
    to layer passes, so the speed-up over full depth is the ratio of passes per token. A
    projection from counted passes, not a measurement."""
    if passes_per_token <= 0:
        raise ValueError(f"passes_per_token={passes_per_token} must be positive")
    return full_passes_per_token / passes_per_token
