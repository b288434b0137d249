"""Rule confirmed_policy: ConsistentEE's token policy proposes an exit, the exit's softmax margin over the head's
rows of the most frequent tokens confirms it, and that margin is read only where the policy proposes."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ee_lightning.evaluation.generation_cost import measure_generation_flops
from ee_lightning.exits import rules as r
from ee_lightning.exits.signals import margin
from ee_lightning.inference.deferred import generate_deferred_each
from ee_lightning.inference.generate import exit_signals, generate_with_exits
from ee_lightning.modeling.lm_exits import LMExitHeads, TokenExitPolicy
from tiny_decoders import PAD, VOCAB, left_padded_prompts, tiny_lm


def test_a_token_leaves_where_the_policy_proposes_and_the_margin_confirms_by_hand():
    rule = r.build_rule("confirmed_policy", tau=0.5, margin=0.3)
    signals = {"exit_prob": torch.tensor([0.9, 0.9, 0.2, 0.6]),
               "frequent_margin": torch.tensor([0.4, 0.1, float("nan"), 0.3])}
    assert rule.candidates(signals).tolist() == [True, True, False, True]
    assert rule.decide(3, signals, {})[0].tolist() == [True, False, False, True]  # the margin at m leaves (>=)
    assert r.rule_from_grid("confirmed_policy", [0.05, 0.35]) == r.ConfirmedPolicyRule(tau=0.05, margin=0.35)
    assert r.GRID_KNOBS["confirmed_policy"] == ("tau", "margin") and "confirmed_policy" not in r.ENCODER_RULES
    with pytest.raises(ValueError, match="margin=1.5 must be <= 1"):
        r.ConfirmedPolicyRule(tau=0.1, margin=1.5)
    with pytest.raises(ValueError, match="does not match its knobs"):
        r.rule_from_grid("confirmed_policy", 0.05)


class HeadDecoder(nn.Module):
    """A decoder stand-in: no final norm, a 4-row LM head."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.lm_head = nn.Linear(2, 4, bias=False)
        self.model.get_output_embeddings = lambda: self.model.lm_head
        with torch.no_grad():
            self.model.lm_head.weight.copy_(torch.tensor([[1.0, 0.0], [5.0, 5.0], [0.0, 1.0], [9.0, 0.0]]))

    def final_norm(self, hidden):
        return hidden


def test_the_exits_margin_over_their_confidence_tokens_by_hand():
    exits = LMExitHeads(4, 2, exit_every=2, rank=1)  # zero-initialised adapters: the exit reads the state itself
    decoder = HeadDecoder()
    with pytest.raises(ValueError, match="no confidence tokens"):
        exits.frequent_logits(2, torch.zeros(1, 2), decoder)
    exits.set_confidence_tokens(torch.tensor([0, 2]))  # rows 1 and 3 would win over the whole vocabulary
    # logits (ln 9, 0) over the two rows: softmax (0.9, 0.1), margin 0.8
    logits = exits.frequent_logits(2, torch.tensor([[math.log(9), 0.0]]), decoder)
    torch.testing.assert_close(logits, torch.tensor([[math.log(9), 0.0]]))
    torch.testing.assert_close(margin(logits), torch.tensor([0.8]))
    with torch.no_grad():  # the head changes (a new weight tensor): the rows are sliced again
        decoder.model.lm_head.weight = nn.Parameter(torch.tensor([[0.0, 1.0], [5.0, 5.0], [1.0, 0.0], [9.0, 0.0]]))
    torch.testing.assert_close(exits.frequent_logits(2, torch.tensor([[math.log(9), 0.0]]), decoder),
                               torch.tensor([[0.0, math.log(9)]]))
    for bad in ([3, 1], [2], [1, 1, 2]):
        with pytest.raises(ValueError, match="sorted, distinct"):
            exits.set_confidence_tokens(torch.tensor(bad))


class CountingExits:
    """Exits whose logits over two rows are (x, -x), x the state's first feature: softmax margin tanh(x). They
    record the rows they were asked about."""

    confidence_tokens = torch.arange(4)

    def __init__(self):
        self.asked = []

    def frequent_logits(self, layer, hidden, decoder):
        self.asked.append(hidden.shape[0])
        return torch.stack([hidden[:, 0], -hidden[:, 0]], dim=-1)


class SecondFeaturePolicy:
    def logit(self, layer, hidden):
        return hidden[:, 1]


def test_the_margin_is_read_only_on_the_rows_the_policy_proposes():
    # rows: (atanh(margin), policy logit); the policy proposes where sigmoid(logit) > 0.5: a positive second feature
    hidden = torch.tensor([[math.atanh(0.6), 1.0], [math.atanh(0.1), 1.0], [math.atanh(0.6), -1.0], [0.1, -1.0]])
    exits, rule = CountingExits(), r.ConfirmedPolicyRule(tau=0.5, margin=0.3)
    signals, logits, calls = exit_signals(rule, 3, hidden, hidden, exits, None, policy=SecondFeaturePolicy())
    assert exits.asked == [2] and logits is None
    assert calls["confidence"].tolist() == [1, 1, 0, 0] and calls["policy"] == 1 and calls["lm"] == 0
    assert signals["frequent_margin"][:2].tolist() == pytest.approx([0.6, 0.1])
    assert bool(signals["frequent_margin"][2:].isnan().all())
    assert rule.decide(3, signals, {})[0].tolist() == [True, False, False, False]
    nothing = CountingExits()
    exit_signals(rule, 3, hidden[2:], hidden[2:], nothing, None, policy=SecondFeaturePolicy())
    assert nothing.asked == []  # no proposal, no read


def tiny_parts(layers: int = 6):
    _, decoder = tiny_lm("llama", layers=layers)
    torch.manual_seed(3)
    exits = LMExitHeads(decoder.num_layers, decoder.hidden_size, exit_every=2, rank=4)
    policy = TokenExitPolicy(decoder.num_layers, decoder.hidden_size, hidden=8, exit_layers=exits.exit_layers)
    for module in (exits, policy):
        for parameter in module.parameters():
            nn.init.normal_(parameter, 0, 0.5)
    return decoder, exits.eval(), policy.eval()


def test_in_generation_it_is_the_policy_at_margin_0_and_the_softmax_margin_when_the_policy_proposes_everywhere():
    decoder, exits, policy = tiny_parts()
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="confidence_tokens"):
        generate_with_exits(decoder, exits, r.ConfirmedPolicyRule(0.5, 0.0), ids, mask, 4, policy=policy)
    exits.set_confidence_tokens(torch.arange(VOCAB))  # every row: the margin is the whole head's
    options = dict(pad_token_id=PAD, policy=policy, propagate_kv=False)
    alone = generate_with_exits(decoder, exits, r.PolicyRule(tau=0.5), ids, mask, 8, **options)
    confirmed = generate_with_exits(decoder, exits, r.ConfirmedPolicyRule(tau=0.5, margin=0.0), ids, mask, 8, **options)
    assert confirmed.new_tokens.tolist() == alone.new_tokens.tolist()
    assert confirmed.exit_layers.tolist() == alone.exit_layers.tolist()
    assert len(set(alone.exit_layers[alone.token_mask].tolist())) > 1
    # one read per proposal: every token that left before the last layer read once, where it left
    early = confirmed.token_mask & (confirmed.exit_layers < decoder.num_layers)
    assert confirmed.confidence_reads[early].tolist() == [1] * int(early.sum())
    threshold = 0.0005  # tiny random exits' margins lie near it: tokens leave at different exits
    margin = generate_with_exits(decoder, exits, r.SoftmaxMarginRule(threshold), ids, mask, 8, **options)
    everywhere = generate_with_exits(decoder, exits, r.ConfirmedPolicyRule(tau=0.0, margin=threshold), ids, mask, 8,
                                     **options)
    assert everywhere.new_tokens.tolist() == margin.new_tokens.tolist()
    assert everywhere.exit_layers.tolist() == margin.exit_layers.tolist()
    assert len(set(margin.exit_layers[margin.token_mask].tolist())) > 1
    # the same reads, without the LM-head calls: one per token, where it leaves
    assert everywhere.confidence_reads.tolist() == (margin.lm_head_calls - (margin.exit_layers == decoder.num_layers)
                                                    .long()).masked_fill(~margin.token_mask, 0).tolist()
    assert bool((everywhere.lm_head_calls[everywhere.token_mask] == 1).all())


def test_deferred_generation_counts_the_reads_the_batched_pass_counts_and_flops_charge_them():
    decoder, exits, policy = tiny_parts()
    exits.set_confidence_tokens(torch.arange(0, VOCAB, 2))
    ids, mask = left_padded_prompts()
    rule = r.ConfirmedPolicyRule(tau=0.3, margin=0.0005)
    batched = generate_with_exits(decoder, exits, rule, ids, mask, 6, pad_token_id=PAD, policy=policy,
                                  propagate_kv=False)
    deferred = generate_deferred_each(decoder, exits, rule, ids, mask, 6, pad_token_id=PAD, policy=policy)
    assert deferred.new_tokens.tolist() == batched.new_tokens.tolist()
    assert deferred.confidence_reads.tolist() == batched.confidence_reads.tolist()
    assert int(batched.confidence_reads.sum()) > 0
    flops = measure_generation_flops(decoder, exits, policy)
    assert 0 < flops.confidence_read < flops.exit_head  # half the rows of the head
    without = type(batched)(**{**batched.__dict__, "confidence_reads": None})
    extra = flops.per_token(batched, mask) - flops.per_token(without, mask)
    torch.testing.assert_close(extra, batched.confidence_reads.double() * flops.confidence_read)
