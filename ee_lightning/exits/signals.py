"""Compact per-layer signals: what exit rules decide on.

A rule never sees a head's full output. Each exit's output is reduced once, for the rows (or
generated tokens) still running, to a few numbers per row; the replay cache stores these [L, N]
signals (not [L, N, C] logits), and the batched runner and the generation driver compute only
those their rule asks for (`ExitRule.needs`).

=================== ============================================================ =============
signal              meaning (per row, at one exit)                               computed by
=================== ============================================================ =============
prediction          class id or greedy token (int64), or the regression value    every driver
                    (float32)
max_prob            max softmax probability                                      every driver
entropy             entropy of the softmax, nats                                 every driver
entropy_normalized  entropy / ln C, in [0, 1] (PCEE-BERT's units)                every driver
margin              top-1 minus top-2 softmax probability (CALM's softmax        every driver
                    measure)
exit_prob           the policy net's exit probability sigmoid(g_l)               every driver
saturation          cosine of this exit's hidden state with the previous         generation
                    exit's (CALM's hidden-state saturation)
classifier_prob     CALM's trained classifier: P(this exit's token equals the    generation
                    last exit's)
frequent_margin     margin of the exit's softmax over the head's rows of the     generation
                    most frequent training tokens only (`LMExitHeads.
                    frequent_logits`: about a layer's cost, the full head eight)
=================== ============================================================ =============

The first five come from an exit's logits (`layer_signals`): for a decoder that is an LM-head
call, which is why the generation driver computes them only for a rule that reads them.
"""
from __future__ import annotations

import math

import torch

from ee_lightning.tasks import prediction  # a head's prediction is the task's: tasks.py

CLASS_SIGNALS = ("max_prob", "entropy", "entropy_normalized", "margin")
LOGIT_SIGNALS = ("prediction", *CLASS_SIGNALS)  # computed from an exit's logits
SIGNALS = (*LOGIT_SIGNALS, "exit_prob")  # what an encoder's exits give (runner, replay cache)
GENERATION_SIGNALS = (*SIGNALS, "saturation", "classifier_prob", "frequent_margin")  # what the generation driver gives


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last dim, computed in float32: [..., C] -> [...]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """max softmax(logits) over the last dim, in float32: [..., C] -> [...]."""
    return logits.float().softmax(-1).amax(-1)


def margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 of softmax(logits) over the last dim (C >= 2), in float32: [..., C] -> [...]."""
    top = logits.float().softmax(-1).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def saturation(hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two hidden states, in float32: [..., H], [..., H] -> [...]."""
    return torch.nn.functional.cosine_similarity(hidden.float(), previous.float(), dim=-1)


def layer_signals(logits: torch.Tensor, exit_prob: torch.Tensor | None = None, is_regression: bool = False,
                  needs=SIGNALS) -> dict[str, torch.Tensor]:
    """The signals named in `needs` for one layer: logits [B, C], exit_prob [B] -> {name: [B]}."""
    unknown = set(needs) - set(SIGNALS)
    if unknown:
        raise ValueError(f"unknown signal(s) {sorted(unknown)}; signals: {', '.join(SIGNALS)}")
    out = {}
    if "prediction" in needs:
        out["prediction"] = prediction(logits, is_regression)
    if not is_regression:
        if "max_prob" in needs:
            out["max_prob"] = max_prob(logits)
        if "margin" in needs:
            out["margin"] = margin(logits)
        if "entropy" in needs or "entropy_normalized" in needs:
            ent = entropy(logits)
            if "entropy" in needs:
                out["entropy"] = ent
            if "entropy_normalized" in needs:
                out["entropy_normalized"] = ent / math.log(max(logits.shape[-1], 2))
    if "exit_prob" in needs and exit_prob is not None:
        out["exit_prob"] = exit_prob  # as given: the encoders' come in float64 (modeling.exit_policy.exit_probability)
    return out


def all_layer_signals(logits: torch.Tensor, exit_probs: torch.Tensor | None = None,
                      is_regression: bool = False) -> dict[str, torch.Tensor]:
    """Every signal of every layer: logits [L, B, C], exit_probs [L, B] -> {name: [L, B]}."""
    per_layer = [layer_signals(logits[i], exit_probs[i] if exit_probs is not None else None, is_regression)
                 for i in range(logits.shape[0])]
    return {name: torch.stack([layer[name] for layer in per_layer]) for name in per_layer[0]}
