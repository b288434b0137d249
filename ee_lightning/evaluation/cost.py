"""FLOPs per instance for early exit.

Convention: FLOPs = 2 x multiply-adds of the matrix products (linear layers, attention
scores and attention-weighted values), as `torch.utils.flop_counter.FlopCounterMode` counts
them. Counted: the embedding projections where a family has them (ALBERT's
embedding->hidden mapping, ELECTRA's embeddings_project), every executed layer (Q/K/V/output
projections, attention scores, FFN), the pooler on every evaluated layer (with `cls` pooling
when the backbone has one), every evaluated exit head, and every evaluated policy net.
Not counted: embedding lookups (gathers, ~free) and elementwise work (LayerNorm, softmax,
GELU, residual adds, mean pooling), which is O(S*H) against the layers' O(S*H^2 + S^2*H) and
amounts to a few percent at most.

The per-part numbers are measured, not derived by hand, so they hold for every family: one
forward of the embeddings, of each layer, of the pooler, head and policy net at batch 1 on a
dummy input of the given sequence length, under `flop_counter()` (FlopCounterMode plus a
formula for the CPU fused attention kernel, which torch leaves uncounted). They are cached per
model, pooling mode and sequence length. All instances of a padded batch run at the padded
length, so pass the batch's padded length as seq_len to cost a real batch.

Per instance exiting at layer t:
    embeddings + sum_{l<=t} (layer_l + pool + head_l) [+ sum_{l<=min(t, L-1)} policy_l]
The policy term is counted only when the rule reads the policy (`with_policy=True`); the
runner never evaluates the policy at the last layer, where the exit is forced.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Scores (q @ k^T) and weighted values (p @ v), 2 FLOPs per multiply-add."""
    *batch, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    b = 1
    for size in batch:
        b *= size
    return 2 * b * s_q * s_k * d_q + 2 * b * s_q * s_k * d_v


def _extra_formulas() -> dict:
    extra = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(aten, name, None)
        if op is not None:
            extra[op] = _sdpa_flops
    return extra


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode (no display) that also counts the CPU fused attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=_extra_formulas())


@dataclass(frozen=True)
class FlopBreakdown:
    """Measured FLOPs for ONE instance of `seq_len` tokens."""

    seq_len: int
    embeddings: float
    layers: tuple[float, ...]  # per layer (L)
    pool: float  # pooling after one layer (the pooler's dense, with cls pooling)
    heads: tuple[float, ...]  # per exit head (L)
    policy: tuple[float, ...] | None  # per policy net (L), None without a policy

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def per_row(self, exit_layers, with_policy: bool = False) -> torch.Tensor:
        """FLOPs (float64 [B]) of each instance given its exit layer (1..L)."""
        exits = torch.as_tensor(exit_layers).long().reshape(-1).cpu()
        L = self.num_layers
        if exits.numel() and (int(exits.min()) < 1 or int(exits.max()) > L):
            raise ValueError(f"exit layers must lie in 1..{L}, got {int(exits.min())}..{int(exits.max())}")
        step = torch.tensor([lay + self.pool + head for lay, head in zip(self.layers, self.heads)], dtype=torch.float64)
        cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), step.cumsum(0)])
        flops = self.embeddings + cumulative[exits]
        if with_policy:
            if self.policy is None:
                raise ValueError("with_policy=True but the model has no policy")
            policy = torch.tensor(self.policy, dtype=torch.float64)
            policy[-1] = 0.0  # never evaluated at the last layer: the exit is forced there
            flops = flops + torch.cat([torch.zeros(1, dtype=torch.float64), policy.cumsum(0)])[exits]
        return flops

    def full_model(self) -> float:
        """One instance through the plain model: embeddings and every layer, one head at the top (no pooler
        or heads below)."""
        return self.embeddings + sum(self.layers) + self.pool + self.heads[-1]


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


class FlopMeter:
    """FLOPs of successive steps under one counter: each call gives those since the last."""

    def __init__(self, counter: FlopCounterMode):
        self.counter = counter
        self.seen = 0.0

    def __call__(self) -> float:
        total = float(self.counter.get_total_flops())
        step, self.seen = total - self.seen, total
        return step


def measure_flops(model, seq_len: int) -> FlopBreakdown:
    """Per-part FLOPs of one instance of `seq_len` tokens through `model` (an EarlyExitModel); cached."""
    seq_len = int(seq_len)
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    key = (seq_len, model.heads.pooling, model.policy is not None)
    per_model = _CACHE.setdefault(model, {})
    if key in per_model:
        return per_model[key]

    device = next(model.parameters()).device
    vocab = int(getattr(model.backbone.config, "vocab_size", 2))
    batch = {
        "input_ids": torch.full((1, seq_len), min(5, vocab - 1), dtype=torch.long, device=device),
        "attention_mask": torch.ones((1, seq_len), dtype=torch.long, device=device),
        "token_type_ids": torch.zeros((1, seq_len), dtype=torch.long, device=device),
    }
    parts: dict[str, list[float]] = {"layer": [], "pool": [], "head": [], "policy": []}
    was_training = model.training
    model.eval()
    try:
        # no_grad, not inference_mode: a module that reads a parameter as its input (DeBERTa's
        # relative embeddings) cannot run under the counter in inference mode.
        with torch.no_grad(), flop_counter() as counter:
            meter = FlopMeter(counter)
            hidden, ctx = model.start(batch)
            embeddings = meter()
            for index in range(model.num_layers):
                # The model's own step, metered part by part.
                hidden = model.step(index, hidden, ctx, with_policy=model.policy is not None,
                                    observe=lambda part: parts[part].append(meter())).hidden
    finally:
        model.train(was_training)
    breakdown = FlopBreakdown(
        seq_len=seq_len,
        embeddings=embeddings,
        layers=tuple(parts["layer"]),
        pool=parts["pool"][0],
        heads=tuple(parts["head"]),
        policy=tuple(parts["policy"]) if model.policy is not None else None,
    )
    per_model[key] = breakdown
    return breakdown


def flops_per_row(model, seq_len: int, exit_layers, with_policy: bool = False) -> torch.Tensor:
    """FLOPs (float64 [B]) of each instance, given its exit layer (1..L)."""
    return measure_flops(model, seq_len).per_row(exit_layers, with_policy)


def flops_per_instance(model, seq_len: int, exit_layers, with_policy: bool = False) -> float:
    """Mean FLOPs per instance over `exit_layers` (LongTensor [B], 1..L) for inputs of `seq_len`
    tokens. with_policy: the rule evaluates the policy nets (ConsistentEE's `policy` rule)."""
    return float(flops_per_row(model, seq_len, exit_layers, with_policy).mean())


def full_model_flops(model, seq_len: int) -> float:
    """FLOPs of one instance through the plain model (all layers, the last head only)."""
    return measure_flops(model, seq_len).full_model()
