"""Per-token FLOPs of early-exit generation equal what the counter sees over a real run."""
from __future__ import annotations

import pytest
import torch

from tiny_decoders import tiny_lm
from ee_lightning.evaluation.cost import flop_counter
from ee_lightning.evaluation.generation_cost import measure_generation_flops
from ee_lightning.exits.rules import FullRule, SoftmaxMarginRule, StaticRule
from ee_lightning.inference.generate import PlainExits, generate_with_exits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("rule", [FullRule(), StaticRule(2), SoftmaxMarginRule(1.0)], ids=["full", "static2", "margin"])
def test_per_token_flops_add_up_to_the_counted_run(family, rule):
    _, decoder = tiny_lm(family)
    exits = PlainExits(decoder.num_layers)
    breakdown = measure_generation_flops(decoder, exits)
    ids = torch.randint(6, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad(), flop_counter() as prefill:
        states = decoder(ids[:, :-1], mask[:, :-1])
    assert len(states) == decoder.num_layers
    with flop_counter() as counter:
        out = generate_with_exits(decoder, exits, rule, ids, mask, 5)
    generated = float(counter.get_total_flops()) - float(prefill.get_total_flops())
    per_token = breakdown.per_token(out, mask)
    assert per_token.shape == (1, 5)
    assert float(per_token.sum()) == pytest.approx(generated, rel=1e-9)
    full = breakdown.full_depth_per_token(out, mask)
    if isinstance(rule, FullRule):
        assert torch.allclose(per_token, full)
    elif isinstance(rule, StaticRule):  # half the layers plus two K/V fills: well under full depth
        assert bool((per_token < full).all()) and bool((per_token > 0.4 * full).all())
    else:  # a margin never reaches 1: three extra LM-head calls (layers 1-3) on top of full depth
        assert torch.allclose(per_token, full + 3 * breakdown.exit_head)
