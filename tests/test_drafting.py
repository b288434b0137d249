"""The arithmetic of verify mode and the restricted draft head, on hand-computed numbers."""
from __future__ import annotations

import pytest
import torch

from ee_lightning.exits import drafting as d
from ee_lightning.modeling.draft_head import RestrictedHead, frequent_tokens


def t(*values):
    return torch.tensor(values)


def test_accepted_length_and_round_tokens():
    assert d.accepted_length(t(4, 5, 6), t(4, 5, 6)) == 3
    assert d.accepted_length(t(4, 5, 6), t(4, 9, 6)) == 1   # a later agreement does not count
    assert d.accepted_length(t(4, 5, 6), t(1, 5, 6)) == 0
    tokens, accepted = d.round_tokens(t(4, 5, 6), t(4, 9, 7, 2))
    assert tokens.tolist() == [4, 9] and accepted == 1      # the verifier's token replaces the first wrong draft
    tokens, accepted = d.round_tokens(t(4, 5, 6), t(4, 5, 6, 2))
    assert tokens.tolist() == [4, 5, 6, 2] and accepted == 3  # all accepted, and the verifier's bonus token
    tokens, accepted = d.round_tokens(t(4, 5, 6), t(4, 5, 6))
    assert tokens.tolist() == [4, 5, 6] and accepted == 3   # the last draft not verified (EOS): no bonus
    tokens, accepted = d.round_tokens(t(), t(3))
    assert tokens.tolist() == [3] and accepted == 0          # no drafts: a plain step
    with pytest.raises(ValueError, match="two \\[k\\] vectors"):
        d.accepted_length(t(1, 2), t(1, 2, 3))
    with pytest.raises(ValueError, match="k \\+ 1"):
        d.round_tokens(t(1, 2), t(1, 2, 3, 4))


def test_layer_passes_and_projection():
    # 3 drafts at layer 10 of 30, head 8: 4 inputs x 10 layers + 3 draft heads + 20 layers + head
    assert d.round_layer_passes(10, 30, 3, head_cost=8.0) == pytest.approx(40 + 24 + 20 + 8)
    assert d.round_layer_passes(10, 30, 3, head_cost=8.0, draft_head_cost=0.5) == pytest.approx(40 + 1.5 + 28)
    assert d.round_layer_passes(10, 30, 3, head_cost=8.0, verified=3) == pytest.approx(30 + 24 + 28)  # EOS drafted last
    assert d.round_layer_passes(10, 30, 0, head_cost=8.0) == pytest.approx(d.full_depth_passes(30, 8.0)) == 38.0
    assert d.head_cost_in_layers(49152, 576, 3_538_944) == pytest.approx(8.0)
    assert d.projected_speedup(38.0, 19.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="below the last"):
        d.round_layer_passes(30, 30, 1, head_cost=8.0)
    with pytest.raises(ValueError, match="verifies drafted \\+ 1"):
        d.round_layer_passes(10, 30, 2, head_cost=8.0, verified=5)


def test_expected_tokens_and_break_even_acceptance():
    assert d.expected_tokens_per_round(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert d.expected_tokens_per_round(0.0, 4) == pytest.approx(1.0)
    assert d.expected_tokens_per_round(1.0, 4) == pytest.approx(5.0)
    # L=4, head 1 (full depth 5 passes); E=2, k=1, draft head 1: a round costs 2*2 + 1 + 2 + 1 = 8
    # passes for 1 + a tokens, so 5 per token needs a = 0.6, and 10/8 (1.25 per-token speed-up) is out of reach
    assert d.break_even_acceptance(2, 4, 1, head_cost=1.0, draft_head_cost=1.0) == pytest.approx(0.6, abs=1e-5)
    assert d.break_even_acceptance(2, 4, 1, head_cost=1.0, draft_head_cost=1.0, speedup=1.25) == pytest.approx(1.0, abs=1e-5)
    assert d.break_even_acceptance(2, 4, 1, head_cost=1.0, draft_head_cost=1.0, speedup=1.3) is None


def test_simulated_rounds_by_hand():
    agree = [True, True, False, True, True, True, True]
    # k=2: [0,1 drafted and right, bonus 2] [3,4 right, bonus 5] [budget 1 left: a plain step for 6]
    assert d.simulate_rounds(agree, 2) == ([2, 2, 0], [2, 2, 0])
    # k=4: [0,1 right, 2 wrong (3 drafted too), the verifier's 2] [3..6: 3 drafts fit the budget, bonus 6]
    assert d.simulate_rounds(agree, 4) == ([4, 3], [2, 3])
    # a confidence stop after the draft at 1: [0, 1 drafted, bonus 2] ...
    confident = [True, False, True, True, True, True, True]
    assert d.simulate_rounds(agree, 4, confident) == ([2, 3], [2, 3])
    assert d.simulate_rounds(agree, 0) == ([0] * 7, [0] * 7)  # no drafts: plain decoding


def test_frequent_tokens_and_the_restricted_head():
    ids = frequent_tokens([[5, 5, 7, 9], [7, 5, 2, 9], [2]], size=2, always=[0])
    assert ids.tolist() == [0, 2, 5]  # 5 three times; 2, 7 and 9 twice each (the tie goes to the smaller id); 0 always
    head = torch.nn.Linear(4, 10)
    restricted = RestrictedHead(head, torch.tensor([1, 3, 8]))
    hidden = torch.randn(2, 4)
    full = head(hidden)
    torch.testing.assert_close(restricted(hidden), full[:, [1, 3, 8]])
    assert restricted.ids(restricted(hidden).argmax(-1)).tolist() == [
        [1, 3, 8][i] for i in full[:, [1, 3, 8]].argmax(-1).tolist()]
    assert restricted.rows == 3
    with pytest.raises(ValueError, match="0..9"):
        RestrictedHead(head, torch.tensor([3, 10]))
