"""experiments/confidence_reads.py and confirmed_policy.py: an exit's softmax margin over a restricted head, read
where the token policy sits, so that generation is the library's own; and the study's choice of the confirmed
point (the rule itself: tests/test_confirmed_policy_rule.py)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ee_lightning.exits import rules as r
from ee_lightning.inference.deferred import generate_deferred_each
from ee_lightning.inference.generate import PlainExits
from ee_lightning.modeling.draft_head import RestrictedHead
from tests.conftest import experiment_fixture
from tiny_decoders import PAD, VOCAB, left_padded_prompts, tiny_lm


study = experiment_fixture("confidence_reads")


class ShiftExits:
    """Exits whose adapter adds ln 3 to the first feature."""

    def adapt(self, layer, hidden):
        return hidden + torch.tensor([math.log(3), 0.0])


class NoNorm:
    def final_norm(self, hidden):
        return hidden


def test_the_readers_logit_is_the_logit_of_the_margin_over_its_rows_by_hand(study):
    lm_head = nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.tensor([[1.0, 0.0], [5.0, 5.0], [0.0, 1.0], [9.0, 0.0]]))
    head = RestrictedHead(lm_head, torch.tensor([0, 2]))  # rows 1 and 3 would win over the whole vocabulary
    hidden = torch.tensor([[math.log(3), 0.0]])
    # raw: softmax over the two rows (3/4, 1/4), margin 1/2, logit 0
    raw = study.FrequentMarginReader(ShiftExits(), NoNorm(), head, adapted=False)
    torch.testing.assert_close(raw.logit(3, hidden), torch.tensor([0.0]), atol=1e-6, rtol=0)
    # adapted: logits (ln 9, 0), softmax (0.9, 0.1), margin 0.8, logit ln 4
    adapted = study.FrequentMarginReader(ShiftExits(), NoNorm(), head, first_exit=3)
    torch.testing.assert_close(adapted.logit(3, hidden), torch.tensor([math.log(4)]), atol=1e-5, rtol=0)
    # below its first exit it never lets a token leave, whatever the margin
    assert float(torch.sigmoid(adapted.logit(2, hidden))) == 0.0
    # read by the policy rule, a token leaves where the margin exceeds tau
    rule = r.PolicyRule(tau=0.75)
    for reader, leaves in ((adapted, True), (raw, False)):
        signals = {"exit_prob": torch.sigmoid(reader.logit(3, hidden))}
        assert rule.decide(3, signals, None)[0].tolist() == [leaves]


def test_over_every_row_the_reader_exits_where_the_softmax_margin_rule_does(study):
    _, decoder = tiny_lm("llama", layers=6)
    exits = PlainExits(decoder.num_layers, exit_every=2)
    head = RestrictedHead(decoder.model.get_output_embeddings(), torch.arange(VOCAB))
    ids, mask = left_padded_prompts()
    threshold = 0.0003  # tiny random models' margins lie near it: tokens leave at different exits
    margin = generate_deferred_each(decoder, exits, r.SoftmaxMarginRule(threshold), ids, mask, 8, pad_token_id=PAD)
    reader = study.FrequentMarginReader(exits, decoder, head)
    read = generate_deferred_each(decoder, exits, r.PolicyRule(tau=threshold), ids, mask, 8, pad_token_id=PAD,
                                  policy=reader)
    assert read.new_tokens.tolist() == margin.new_tokens.tolist()
    assert read.exit_layers.tolist() == margin.exit_layers.tolist()
    assert len(set(read.exit_layers[read.exit_layers > 0].tolist())) > 1
    # the reader makes no LM-head call before the exit: one per token, where it leaves
    assert bool((read.lm_head_calls[read.token_mask] == 1).all())
    assert bool((margin.lm_head_calls > 1).any())


confirmed_study = experiment_fixture("confirmed_policy")


def test_the_confirmed_point_chosen_is_the_most_saving_that_keeps_the_level(confirmed_study):
    points = [{"label": "full depth", "layer_saving": 0.0, "rougeL_vs_full": 1.0},
              {"label": "confirmed: policy > 0.05, margin >= 0.3", "layer_saving": 0.21, "rougeL_vs_full": 0.58},
              {"label": "confirmed: policy > 0.05, margin >= 0.35", "layer_saving": 0.18, "rougeL_vs_full": 0.62},
              {"label": "confirmed: policy > 0.1, margin >= 0.4", "layer_saving": 0.17, "rougeL_vs_full": 0.65},
              {"label": "policy alone, tau 0.05", "layer_saving": 0.30, "rougeL_vs_full": 0.70}]  # not a candidate
    assert confirmed_study.choose(points, 0.6) == 2
    assert confirmed_study.choose(points, 0.64) == 3
    assert confirmed_study.choose(points, 0.9) is None
