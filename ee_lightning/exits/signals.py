"""Compact per-layer signals: what exit rules decide on.

A rule never sees a head's full output. Each layer's head output is reduced once, for the rows
still running, to a few numbers per row; the replay cache stores these [L, N] signals (not
[L, N, C] logits), and the batched runner computes only those its rule asks for.

=================== ============================================================
signal              meaning (per row, at one layer)
=================== ============================================================
prediction          class id (int64), or the regression value (float32)
max_prob            max softmax probability
entropy             entropy of the softmax, nats
entropy_normalized  entropy / ln C, in [0, 1] (PCEE-BERT's units)
exit_prob           the policy net's exit probability sigmoid(g_l)
=================== ============================================================
"""
from __future__ import annotations

import math

import torch

CLASS_SIGNALS = ("max_prob", "entropy", "entropy_normalized")
SIGNALS = ("prediction", *CLASS_SIGNALS, "exit_prob")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last dim, computed in float32: [..., C] -> [...]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """max softmax(logits) over the last dim, in float32: [..., C] -> [...]."""
    return logits.float().softmax(-1).amax(-1)


def prediction(logits: torch.Tensor, is_regression: bool) -> torch.Tensor:
    """Head outputs [..., C] -> class ids (int64), or the regression value (float32) of a 1-output head."""
    return logits.float().squeeze(-1) if is_regression else logits.argmax(-1)


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
        if "entropy" in needs or "entropy_normalized" in needs:
            ent = entropy(logits)
            if "entropy" in needs:
                out["entropy"] = ent
            if "entropy_normalized" in needs:
                out["entropy_normalized"] = ent / math.log(max(logits.shape[-1], 2))
    if "exit_prob" in needs and exit_prob is not None:
        out["exit_prob"] = exit_prob.float()
    return out


def all_layer_signals(logits: torch.Tensor, exit_probs: torch.Tensor | None = None,
                      is_regression: bool = False) -> dict[str, torch.Tensor]:
    """Every signal of every layer: logits [L, B, C], exit_probs [L, B] -> {name: [L, B]}."""
    per_layer = [layer_signals(logits[i], exit_probs[i] if exit_probs is not None else None, is_regression)
                 for i in range(logits.shape[0])]
    return {name: torch.stack([layer[name] for layer in per_layer]) for name in per_layer[0]}
