"""Verify mode: an early exit drafts, the remaining layers check, the output is the full model's.

Self-speculation over the decoder's own layers (LayerSkip's scheme, on the step interface):

1. Draft. The last emitted token x runs layers 1..E and the exit at E proposes the next token;
   that token runs layers 1..E in turn, and so on, up to `draft_length` drafts d_1..d_k (fewer
   when a draft is EOS, when the drafter's confidence falls below `min_confidence`, when a learned
   stop rule (`DraftStopPolicy`) says stop, or when the token budget ends). The last draft runs
   layers 1..E as well, without a draft after it. Layers
   1..E cache the K/V of x, d_1..d_k as they go; the layer-E state of each is kept.
2. Verify. Those k + 1 layer-E states run layers E+1..L together, in one pass over those layers'
   weights, and one LM-head call gives the full model's token after each: v_1..v_{k+1}. Layers
   1..E are never run again for these tokens: their K/V from drafting are the full model's (the
   same layers on the same inputs).
3. Accept. With a the number of leading drafts equal to the verifier's tokens, the round keeps
   v_1..v_{a+1}: the accepted drafts, then the verifier's correction (or, when every draft was
   accepted, its bonus token). Every layer's cache is cropped to the tokens kept; the next round
   starts from the last of them, which is not in the cache yet.

Every emitted token is the full model's greedy token given the tokens before it, so the text
equals greedy full-depth decoding (up to float ties: verifying k tokens in one matrix product
may round differently from one token at a time, which can flip an argmax whose top two logits
are equal within float error).

Batch 1 only. Rows of a batch accept different numbers of drafts, so after a round their caches
would end at different lengths; a rectangular cache would need each row realigned (re-padded)
every round, and at large batch a step is no longer bound by its weight reads, which is where
verifying several tokens per pass pays. Run prompts one at a time.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ee_lightning.exits.drafting import head_cost_in_layers, round_layer_passes, round_tokens
from ee_lightning.inference.generate import _as_list, prefill, unpadded_prompts
from ee_lightning.modeling.draft_head import RestrictedHead
from ee_lightning.modeling.draft_policy import DraftStopPolicy


class ExitDrafter:
    """Greedy drafts from the exit at `layer`: the exit's own logits, or with `head` (a
    `RestrictedHead`) the exit's adapted state through the final norm and that head."""

    def __init__(self, exits, layer: int, head: RestrictedHead | None = None):
        if head is not None and not hasattr(exits, "adapt"):
            raise ValueError(f"a draft head needs exits with adapt(layer, hidden) (PlainExits, LMExitHeads); "
                             f"{type(exits).__name__} has none")
        self.exits, self.layer, self.head = exits, int(layer), head

    def __call__(self, hidden: torch.Tensor, decoder) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, H] layer-`layer` states -> (draft tokens [B], logits the token was chosen from)."""
        if self.head is None:
            logits = self.exits.logits(self.layer, hidden, decoder)
            return logits.argmax(-1), logits
        logits = self.head(decoder.final_norm(self.exits.adapt(self.layer, hidden)))
        return self.head.ids(logits.argmax(-1)), logits


@dataclass
class VerifyResult:
    """sequences [1, P + N]. Per round: tokens drafted, inputs verified (drafted + 1, or drafted
    when the last draft was EOS) and drafts accepted; draft-head calls in all. Each verified input
    ran layers 1..E alone; each round ran layers E+1..L and the LM head once. With a stop policy,
    stop_probs holds per round its stop probability after each draft."""

    sequences: torch.Tensor
    prompt_length: int
    draft_layer: int
    num_layers: int
    drafted: list[int] = field(default_factory=list)
    verified: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    draft_head_calls: int = 0
    stop_probs: list[list[float]] = field(default_factory=list)
    cache: object = None

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]

    @property
    def rounds(self) -> int:
        return len(self.drafted)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over drafted tokens."""
        return sum(self.accepted) / max(sum(self.drafted), 1)

    @property
    def mean_accepted(self) -> float:
        """Drafts accepted per round."""
        return sum(self.accepted) / max(self.rounds, 1)

    @property
    def tokens_per_round(self) -> float:
        return self.new_tokens.shape[1] / max(self.rounds, 1)

    def layer_passes(self, head_cost: float, draft_head_cost: float | None = None) -> float:
        """Sequential layer passes of the whole generation, LM-head calls in layer units."""
        return sum(round_layer_passes(self.draft_layer, self.num_layers, k, head_cost, draft_head_cost, m)
                   for k, m in zip(self.drafted, self.verified))


def layer_parameters(decoder) -> int:
    """One decoder layer's weights (the unit of layer passes)."""
    return sum(p.numel() for p in decoder.layers()[0].parameters())


def head_cost(decoder, rows: int | None = None) -> float:
    """The LM head (or one of `rows` tokens, e.g. a `RestrictedHead`) in units of one layer's weights."""
    return head_cost_in_layers(rows or decoder.vocab_size, decoder.hidden_size, layer_parameters(decoder))


def draft_cost(decoder, exits, layer: int) -> float:
    """One draft of the exit at `layer` past its E layers, in layer units: its adapter (where `exits` have
    one) and the LM head."""
    adapters = getattr(exits, "adapters", {})
    adapter = adapters[str(layer)] if str(layer) in adapters else None
    weights = 0 if adapter is None else sum(p.numel() for p in adapter.parameters())
    return head_cost(decoder) + weights / layer_parameters(decoder)


def _check(decoder, exits, input_ids, attention_mask, draft_layer, draft_length, min_confidence, stop):
    L = decoder.num_layers
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"verify mode runs one prompt at a time (batch 1), got input_ids {tuple(input_ids.shape)}: rows "
                         "accept different numbers of drafts, so call it once per prompt")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0 or not bool(attention_mask[:, -1].all()):
        raise ValueError("the prompt must be non-empty and end with a real token (left padding only)")
    if not 1 <= draft_layer < L:
        raise ValueError(f"draft_layer={draft_layer} must lie in 1..{L - 1}: a layer below the last ({L}) drafts")
    exit_layers = getattr(exits, "exit_layers", None)
    if exit_layers is not None and draft_layer not in exit_layers:
        raise ValueError(f"draft_layer={draft_layer} has no exit; the exits are at layers {list(exit_layers)}")
    if draft_length < 1:
        raise ValueError(f"draft_length={draft_length} must be >= 1 (drafts per round at most)")
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence={min_confidence} must lie in [0, 1] (a softmax probability)")
    if stop is not None and stop.draft_layer != draft_layer:
        raise ValueError(f"the stop policy was trained on the drafts of layer {stop.draft_layer}, not "
                         f"draft_layer={draft_layer}: draft at its layer, or leave stop out")


def _extend(mask: torch.Tensor, columns: int) -> torch.Tensor:
    """The attention mask with `columns` more real tokens."""
    return torch.cat([mask, mask.new_ones(mask.shape[0], columns)], dim=1) if columns else mask


def _crop(cache, length: int) -> None:
    """Every layer's cache to its first `length` tokens."""
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)


@torch.no_grad()
def generate_verified(decoder, exits, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
                      draft_layer: int, draft_length: int, eos_token_id=None, draft_head: RestrictedHead | None = None,
                      min_confidence: float | None = None, stop: DraftStopPolicy | None = None,
                      prompt_cache=None) -> VerifyResult:
    """Greedy generation of up to `max_new_tokens` for ONE prompt [1, P], drafted at `draft_layer`
    (1-based, below the last) by `exits` (`PlainExits` or trained `LMExitHeads`), `draft_length`
    drafts per round at most, verified by the layers above. Stops after the first EOS (an id or a
    list), as greedy `generate` does.

    draft_head: a `RestrictedHead` that drafts in place of the full LM head.
    min_confidence: end a round's drafting after a draft whose softmax probability (over the
        draft head's vocabulary) is below this (Kangaroo's early stop); None drafts `draft_length`.
    stop: a trained `DraftStopPolicy` of `draft_layer`: end a round's drafting after a draft whose stop
        probability (read from the layer-E state the draft was made from) exceeds its tau.
    prompt_cache: `prefill(decoder, input_ids, attention_mask)` computed once (copied, never changed).
    """
    _check(decoder, exits, input_ids, attention_mask, draft_layer, draft_length, min_confidence, stop)
    E, L = int(draft_layer), decoder.num_layers
    drafter = ExitDrafter(exits, E, draft_head)
    eos = torch.tensor(_as_list(eos_token_id), dtype=torch.long, device=input_ids.device)
    cache = copy.deepcopy(prompt_cache) if prompt_cache is not None else prefill(decoder, input_ids, attention_mask)
    result = VerifyResult(input_ids, input_ids.shape[1], E, L)
    sequence, mask = input_ids, attention_mask.long()
    while sequence.shape[1] - result.prompt_length < max_new_tokens:
        budget = max_new_tokens - (sequence.shape[1] - result.prompt_length)
        # 1. draft: the last emitted token, then each draft, runs layers 1..E; the exit drafts
        #    after each but the last input (k drafts, k + 1 inputs; the verifier's token after
        #    the last is the round's bonus). A drafted EOS is not run on: nothing follows it.
        token, states, drafts, stop_probs = sequence[:, -1:], [], [], []
        limit = min(draft_length, budget - 1)
        for step in range(limit + 1):
            hidden, ctx = decoder.start(token, _extend(mask, step), cache)
            for index in range(E):
                hidden = decoder.step(index, hidden, ctx)
            states.append(hidden)
            if step == limit:
                break
            draft, logits = drafter(hidden[:, -1], decoder)
            result.draft_head_calls += 1
            drafts.append(draft)
            token = draft[:, None]
            stopping = min_confidence is not None and float(torch.softmax(logits.float(), -1).max()) < min_confidence
            if stop is not None:
                stop_probs.append(float(stop.prob(hidden[:, -1])))
                stopping = stopping or stop_probs[-1] > stop.tau
            if bool(torch.isin(draft, eos).any()):
                break
            if stopping:
                limit = step + 1  # one more input: this draft, through layers 1..E for the bonus token
        drafts = torch.cat(drafts) if drafts else sequence.new_zeros(0)
        # 2. verify every input in one pass over layers E+1..L, from their layer-E states
        inputs = torch.cat([sequence[:, -1:], drafts[None]], dim=1)[:, : len(states)]
        _, ctx = decoder.start(inputs, _extend(mask, inputs.shape[1] - 1), cache, mask_layer=E)
        hidden = torch.cat(states, dim=1)
        for index in range(E, L):
            hidden = decoder.step(index, hidden, ctx)
        verified = decoder.lm_head(decoder.final_norm(hidden[0])).argmax(-1)
        # 3. keep the agreeing drafts and the verifier's token after them; stop at EOS
        kept, accepted = round_tokens(drafts, verified)
        if eos.numel():
            stops = torch.isin(kept, eos).nonzero()
            if stops.numel():
                kept = kept[: int(stops[0]) + 1]
        result.drafted.append(int(drafts.numel()))
        result.verified.append(len(states))
        result.accepted.append(accepted)
        if stop is not None:
            result.stop_probs.append(stop_probs)
        sequence = torch.cat([sequence, kept[None]], dim=1)
        mask = _extend(mask, kept.numel())
        _crop(cache, sequence.shape[1] - 1)  # the last kept token enters the cache in the next round
        if eos.numel() and bool(torch.isin(kept[-1:], eos).any()):
            break
    result.sequences, result.cache = sequence, cache
    return result


def generate_verified_each(decoder, exits, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                           **options) -> list[VerifyResult]:
    """`generate_verified` on each row of a LEFT-padded batch [B, P], one prompt at a time (the
    padding is dropped, so each row's output is its batch-1 greedy output). `options` as there
    (draft_layer, draft_length, eos_token_id, draft_head, min_confidence, stop)."""
    return [generate_verified(decoder, exits, prompt, torch.ones_like(prompt), max_new_tokens, **options)
            for prompt in unpadded_prompts(input_ids, attention_mask)]
