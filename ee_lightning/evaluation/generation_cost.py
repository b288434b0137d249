"""FLOPs and speed of early-exit generation, per generated token.

FLOPs follow ee_lightning.evaluation.cost (2 x multiply-adds, measured with torch's
FlopCounterMode plus the CPU fused-attention formula). Per generated token that exits at layer t
with a context of S tokens (its real prompt and the tokens before it):
    sum_{l<=t} layer_l(S)              the layers it ran (attention over S keys)
  + (L - t) * kv_fill                  K/V of every skipped layer (input norm + K/V projections)
                                       under propagation; where the skipped layers really run for
                                       later tokens' K/V (deferred, or at once), layer_l(S) for them
  + lm_calls * exit_head               every LM-head call the rule made (a rule that reads the
                                       exit's softmax, e.g. softmax_margin or the oracle, pays one
                                       per exit evaluated; every rule one at its exit)
  + policy_calls * policy + classifier_calls * classifier
  + confidence_reads * confidence_read    the exit's adapter, final norm and the head's frequent rows only
layer_l(S) is measured for one new token at two context lengths and interpolated: a layer's
FLOPs for one token are exactly affine in S (projections and MLP constant, attention linear).
Embedding lookups, norms and elementwise work are not counted (a few percent at most).
The full model's token: sum_l layer_l(S) + one LM head.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ee_lightning.evaluation.cost import FlopMeter, flop_counter
from ee_lightning.inference.generate import has_confidence_tokens

_PROBE = 33  # the second context length measured


@dataclass(frozen=True)
class GenerationFlops:
    """Measured FLOPs of one generated token's parts."""

    layer_base: tuple[float, ...]   # per layer: FLOPs at context 0 (the affine intercept)
    layer_per_key: tuple[float, ...]  # per layer: FLOPs per context token
    kv_fill: float
    exit_head: float                # one exit's logits (adapter, final norm, LM head)
    policy: float
    classifier: float
    confidence_read: float = 0.0    # one read of the frequent rows' margin (exits without such rows: never read)

    def layers_up_to(self, context: torch.Tensor, exit_layers: torch.Tensor) -> torch.Tensor:
        base = torch.tensor((0.0, *self.layer_base), dtype=torch.float64).cumsum(0)
        per_key = torch.tensor((0.0, *self.layer_per_key), dtype=torch.float64).cumsum(0)
        return base[exit_layers] + per_key[exit_layers] * context

    def per_token(self, result, attention_mask: torch.Tensor) -> torch.Tensor:
        """FLOPs (float64 [B, N]) of every generated token of `result` (0 on padding after EOS)."""
        context = self.context(result, attention_mask)
        depth = result.exit_layers.cpu()
        if result.layers_after_exit is not None:  # the skipped layers ran too (later or at once), not filled
            depth = depth + result.layers_after_exit.cpu()
        flops = (self.layers_up_to(context, depth)
                 + result.kv_fills.cpu() * self.kv_fill + result.lm_head_calls.cpu() * self.exit_head
                 + result.policy_calls.cpu() * self.policy + result.classifier_calls.cpu() * self.classifier)
        if result.confidence_reads is not None:
            flops = flops + result.confidence_reads.cpu() * self.confidence_read
        return flops.masked_fill(~result.token_mask.cpu(), 0.0)

    def full_depth_per_token(self, result, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the same tokens cost at full depth (all layers, one LM head)."""
        context = self.context(result, attention_mask)
        full = torch.full_like(result.exit_layers.cpu(), len(self.layer_base))
        return (self.layers_up_to(context, full) + self.exit_head).masked_fill(~result.token_mask.cpu(), 0.0)

    @staticmethod
    def context(result, attention_mask: torch.Tensor) -> torch.Tensor:
        """Keys each generated token's step attends to: its real prompt length plus its index."""
        prompt = attention_mask.sum(1, keepdim=True).cpu().double()
        steps = torch.arange(result.exit_layers.shape[1], dtype=torch.float64)[None]
        return prompt + steps


def _one_token_layer_flops(decoder, context: int) -> list[float]:
    """FLOPs of every layer for one new token attending to `context` keys."""
    device = next(decoder.parameters()).device
    cache = decoder.new_cache()
    if context > 1:
        ids = torch.full((1, context - 1), 5, dtype=torch.long, device=device)
        hidden, ctx = decoder.start(ids, torch.ones_like(ids), cache)
        for index in range(decoder.num_layers):
            hidden = decoder.step(index, hidden, ctx)
    ids = torch.full((1, 1), 5, dtype=torch.long, device=device)
    hidden, ctx = decoder.start(ids, torch.ones((1, context), dtype=torch.long, device=device), cache)
    flops = []
    with flop_counter() as counter:
        meter = FlopMeter(counter)
        for index in range(decoder.num_layers):
            hidden = decoder.step(index, hidden, ctx)
            flops.append(meter())
    return flops


@torch.no_grad()
def measure_generation_flops(decoder, exits, policy=None, classifier=None) -> GenerationFlops:
    short, long = _one_token_layer_flops(decoder, 1), _one_token_layer_flops(decoder, _PROBE)
    per_key = [(b - a) / (_PROBE - 1) for a, b in zip(short, long)]
    base = [a - k for a, k in zip(short, per_key)]
    device = next(decoder.parameters()).device
    hidden = torch.randn(1, 1, decoder.hidden_size, device=device, dtype=next(decoder.parameters()).dtype)
    ids = torch.full((1, 1), 5, dtype=torch.long, device=device)
    _, ctx = decoder.start(ids, torch.ones_like(ids), cache=None)
    layer = exits.exit_layers[0]
    with flop_counter() as counter:
        meter = FlopMeter(counter)
        decoder.kv(0, hidden, ctx)
        kv = meter()
        exits.logits(layer, hidden[:, -1], decoder)
        head = meter()
        if policy is not None:
            policy.logit(layer, hidden[:, -1])
        pol = meter()
        if classifier is not None:
            classifier.logit(layer, hidden[:, -1])
        cls = meter()
        if has_confidence_tokens(exits):
            exits.frequent_logits(layer, hidden[:, -1], decoder)
        read = meter()
    return GenerationFlops(tuple(base), tuple(per_key), kv, head, pol, cls, read)


def timed(fn, *args, **kwargs):
    """(fn's result, wall seconds)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
