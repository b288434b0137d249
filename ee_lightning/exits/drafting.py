"""The arithmetic of verify mode (self-speculation), as pure functions.

One round: the layers up to the draft exit E draft k tokens one at a time (the last one also
runs layers 1..E, without a draft); the layers above E then check all k + 1 inputs in one pass.
The verifier's prediction after each input is the full model's token there, so the round keeps
the drafts up to the first disagreement and the verifier's own token after them: a + 1 tokens
for a accepted drafts (greedy output is the full model's). A round with k = 0 is a plain step.

Cost is counted in sequential passes over a layer's weights: at batch 1 a decoding step reads
every weight it uses once, whatever the number of tokens it carries, so a pass that verifies k
tokens counts once. The LM head counts in layer units (`head_cost`: its weights over one
layer's; about 8 in SmolLM2-135M, whose tied head is 576 x 49,152).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def accepted_length(drafts: torch.Tensor, verified: torch.Tensor) -> int:
    """How many leading drafts equal the verifier's tokens: [k] and [k] -> 0..k."""
    if drafts.shape != verified.shape or drafts.dim() != 1:
        raise ValueError(f"drafts {tuple(drafts.shape)} and verified {tuple(verified.shape)} must be two [k] vectors")
    disagree = (drafts != verified).nonzero()
    return int(disagree[0]) if disagree.numel() else int(drafts.numel())


def round_tokens(drafts: torch.Tensor, verified: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tokens a round emits, and how many drafts it accepted.

    drafts [k]; verified [k + 1] (the verifier's token after the input and after each draft), or
    [k] when the last draft is not verified (it was EOS, or the token budget ends there). The
    accepted drafts equal the verifier's tokens, so the round emits the verifier's tokens up to
    and including the first one that corrects a draft (or its bonus token after the last)."""
    k = drafts.numel()
    if verified.dim() != 1 or verified.numel() not in (k, k + 1) or verified.numel() == 0:
        raise ValueError(f"verified {tuple(verified.shape)} must hold k + 1 (or k >= 1) tokens for k = {k} drafts")
    accepted = accepted_length(drafts, verified[:k])
    return verified[: min(accepted + 1, verified.numel())], accepted


def round_layer_passes(draft_layer: int, num_layers: int, drafted: int, head_cost: float,
                       draft_head_cost: float | None = None, verified: int | None = None) -> float:
    """Sequential layer passes of one round: each of the `verified` inputs (default drafted + 1)
    runs layers 1..E alone, each of the `drafted` tokens costs a draft head, and one pass of layers
    E+1..L and the LM head verifies them all."""
    if not 1 <= draft_layer < num_layers:
        raise ValueError(f"draft_layer={draft_layer} must lie in 1..{num_layers - 1} (a layer below the last)")
    verified = drafted + 1 if verified is None else verified
    if drafted < 0 or verified not in (drafted, drafted + 1) or verified < 1:
        raise ValueError(f"a round verifies drafted + 1 inputs (or drafted >= 1), got drafted={drafted}, verified={verified}")
    draft_head = head_cost if draft_head_cost is None else draft_head_cost
    return verified * draft_layer + drafted * draft_head + (num_layers - draft_layer) + head_cost


def simulate_rounds(agree: Sequence[bool], draft_length: int, confident: Sequence[bool] | None = None
                    ) -> tuple[list[int], list[int]]:
    """The rounds greedy verify mode makes over N tokens, from teacher-forced facts alone: agree[p]
    says whether the exit's greedy token at new position p, given the full model's tokens before
    it, is the full model's. That is exactly the draft there while every earlier draft of the
    round was accepted, since accepted drafts are the full model's tokens (and layers 1..E's K/V
    theirs). With `confident`, drafting stops after a draft whose confidence is below threshold;
    after a rejected draft the later drafts' confidence is unknown, and drafting is taken to go on
    (an upper bound on their cost). Returns (drafted, accepted) per round; EOS is not modelled."""
    if draft_length < 0:
        raise ValueError(f"draft_length={draft_length} must be >= 0")
    n, position, drafted, accepted = len(agree), 0, [], []
    while position < n:
        k = min(draft_length, n - position - 1)
        a = 0
        while a < k and agree[position + a]:
            a += 1
        if confident is not None:
            low = next((j for j in range(min(a + 1, k)) if not confident[position + j]), None)
            if low is not None:
                k, a = low + 1, min(a, low + 1)
        drafted.append(k)
        accepted.append(a)
        position += a + 1
    return drafted, accepted


def expected_tokens_per_round(acceptance: float, draft_length: int) -> float:
    """Tokens a round emits when each draft is right with probability `acceptance`, independently:
    1 + a + a^2 + ... + a^k (the verifier's token, plus each draft while every one before it was
    right). The textbook model of speculative decoding; measured rounds are in `simulate_rounds`."""
    if not 0.0 <= acceptance <= 1.0 or draft_length < 0:
        raise ValueError(f"acceptance={acceptance} must lie in [0, 1] and draft_length={draft_length} be >= 0")
    return sum(acceptance ** i for i in range(draft_length + 1))


def break_even_acceptance(draft_layer: int, num_layers: int, draft_length: int, head_cost: float,
                          draft_head_cost: float, speedup: float = 1.0, tolerance: float = 1e-6) -> float | None:
    """The smallest per-draft acceptance at which rounds of `draft_length` drafts at `draft_layer`
    need `speedup` times fewer layer passes per token than full depth; None if even 1.0 does not."""
    target = full_depth_passes(num_layers, head_cost) / speedup
    cost = round_layer_passes(draft_layer, num_layers, draft_length, head_cost, draft_head_cost)

    def passes(acceptance):
        return cost / expected_tokens_per_round(acceptance, draft_length)

    if passes(1.0) > target:
        return None
    low, high = 0.0, 1.0
    while high - low > tolerance:  # passes per token falls as acceptance rises
        middle = (low + high) / 2
        low, high = (middle, high) if passes(middle) > target else (low, middle)
    return high


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


def round_costs(draft_layer: int, num_layers: int, max_drafts: int, head_cost: float,
                draft_head_cost: float | None = None) -> torch.Tensor:
    """[max_drafts] layer passes of a round of d = 1..max_drafts drafts (`round_layer_passes`)."""
    if max_drafts < 1:
        raise ValueError(f"max_drafts={max_drafts} must be >= 1")
    return torch.tensor([round_layer_passes(draft_layer, num_layers, d, head_cost, draft_head_cost)
                         for d in range(1, max_drafts + 1)])


def draft_windows(rows: torch.Tensor, max_drafts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every round start of teacher-forced responses and the positions its drafts would take.

    rows [N]: the response each cached token belongs to, its tokens consecutive and in order (the
    exit-state cache's layout). A round starting at a response's token p may draft up to max_drafts
    tokens but not the response's last one, which is the verifier's (as `simulate_rounds` counts a
    budget of the response's length). Returns starts [S] (token indices with at least one draft
    allowed), index [S, max_drafts] (the tokens its drafts would take: start + j, repeated past the
    last allowed one) and allowed [S] (1..max_drafts)."""
    if rows.dim() != 1 or max_drafts < 1:
        raise ValueError(f"rows must be [N] and max_drafts >= 1, got {tuple(rows.shape)} and {max_drafts}")
    if rows.numel() and bool((rows[1:] != rows[:-1]).long().sum() != torch.unique(rows).numel() - 1):
        raise ValueError("rows must keep each response's tokens together (the exit-state cache's order)")
    _, counts = torch.unique_consecutive(rows, return_counts=True)
    ends = torch.repeat_interleave(counts.cumsum(0), counts)  # one past each token's response's last token
    token = torch.arange(rows.numel())
    allowed = torch.clamp(ends - token - 1, max=max_drafts)
    starts = (allowed >= 1).nonzero().squeeze(1)
    allowed = allowed[starts]
    steps = torch.arange(max_drafts).unsqueeze(0)
    index = starts.unsqueeze(1) + torch.minimum(steps, (allowed - 1).unsqueeze(1))
    return starts, index, allowed
