"""Verify mode: drafts from an exit, checked by the layers above, give transformers' greedy output
token for token; rejections land where the drafts were wrong; EOS inside a draft stops generation
as `generate` does; the cache after a rejection is plain full-depth decoding's."""
from __future__ import annotations

import pytest
import torch

from tiny_decoders import PAD, VOCAB, left_padded_prompts, tiny_lm
from ee_lightning.exits.drafting import simulate_rounds
from ee_lightning.inference.generate import PlainExits
from ee_lightning.inference.verify import generate_verified, generate_verified_each
from ee_lightning.modeling.draft_head import RestrictedHead

FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]
NEW = 12


def one_prompt(row: int = 0):
    ids, mask = left_padded_prompts()
    keep = mask[row].bool()
    return ids[row, keep][None], mask[row, keep][None]


def greedy(model, ids, mask, new=NEW, eos=None):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eos,
                          pad_token_id=PAD)


class ScriptedExits:
    """A drafter that knows the full model's continuation `reference` [1, S]: it recognises the
    position of a layer-`layer` state among the reference's own states and drafts the reference's
    next token, except at the new-token positions in `wrong_at`, where it drafts another one.
    A state it cannot place (after a wrong draft) gets a wrong token too."""

    def __init__(self, decoder, layer, reference, prompt_length, wrong_at=()):
        with torch.no_grad():
            self.states = decoder(reference, torch.ones_like(reference))[layer - 1][0]  # [S, H]
        self.next = reference[0, 1:]
        self.prompt_length, self.wrong_at = prompt_length, set(wrong_at)
        self.exit_layers = list(range(1, decoder.num_layers + 1))
        self.vocab = decoder.vocab_size

    def _wrong(self, token):
        return next(t for t in range(6, self.vocab) if t != token)  # never EOS (5) nor padding

    def logits(self, layer, hidden, decoder):
        out = torch.zeros(hidden.shape[0], self.vocab)
        for row, state in enumerate(hidden):
            gaps = (self.states - state).norm(dim=-1)
            position = int(gaps.argmin())
            matched = float(gaps[position]) < 1e-4 * float(state.norm()) and position < self.next.numel()
            token = int(self.next[position]) if matched else -1
            if not matched or position + 1 - self.prompt_length in self.wrong_at:
                token = self._wrong(token)
            out[row, token] = 10.0
        return out


def rejected_positions(result):
    """New-token positions whose draft the verifier replaced."""
    positions, start = [], 0
    for drafted, accepted in zip(result.drafted, result.accepted):
        if accepted < drafted:
            positions.append(start + accepted)
        start += accepted + 1  # the accepted drafts and the verifier's token after them
    return positions


@pytest.mark.parametrize("family", FAMILIES)
def test_random_exits_draft_and_the_output_is_transformers_greedy_output(family):
    model, decoder = tiny_lm(family)
    ids, mask = one_prompt()
    ref = greedy(model, ids, mask)
    rejected = accepted = 0
    for layer in (1, 2, 3):
        for length in (1, 3, 5):
            out = generate_verified(decoder, PlainExits(4), ids, mask, NEW, draft_layer=layer, draft_length=length)
            assert torch.equal(out.sequences, ref), (layer, length)
            rejected += sum(a < d for a, d in zip(out.accepted, out.drafted))
            accepted += sum(out.accepted)
    assert rejected > 0 and accepted > 0  # the untrained exits are sometimes right, sometimes wrong


@pytest.mark.parametrize("family", FAMILIES)
def test_rejections_land_exactly_where_the_drafts_were_wrong(family):
    model, decoder = tiny_lm(family)
    ids, mask = one_prompt(1)
    ref = greedy(model, ids, mask)
    wrong = {0, 4, 5, 9}  # the first token, two in a row, and one late
    seen = set()
    for layer, length in ((2, 3), (1, 4), (3, 2), (2, 1)):
        exits = ScriptedExits(decoder, layer, ref, ids.shape[1], wrong)
        out = generate_verified(decoder, exits, ids, mask, NEW, draft_layer=layer, draft_length=length)
        assert torch.equal(out.sequences, ref), (layer, length)
        # a wrong draft is rejected where it is drafted; a position that is a round's bonus token
        # (the verifier's, after every draft was accepted) is never drafted
        rejected = rejected_positions(out)
        assert set(rejected) <= wrong and len(rejected) >= 2
        assert (out.drafted, out.accepted) == simulate_rounds([p not in wrong for p in range(NEW)], length)
        assert sum(out.accepted) + out.rounds == NEW and out.verified == [d + 1 for d in out.drafted]
        seen |= set(rejected)
    assert seen == wrong


@pytest.mark.parametrize("family", FAMILIES)
def test_eos_inside_a_draft_stops_generation_as_generate_does(family):
    model, decoder = tiny_lm(family)
    ids, mask = one_prompt()
    free = greedy(model, ids, mask)
    P = ids.shape[1]
    # a token id stands in for EOS: the latest one the full model emits for the first time (tiny GPT-2 repeats itself)
    position = [p for p in range(1, NEW - 2) if int(free[0, P + p]) not in free[0, P:P + p].tolist()][-1]
    eos = int(free[0, P + position])
    ref = greedy(model, ids, mask, eos=eos)
    assert ref.shape[1] == P + position + 1 and int(ref[0, -1]) == eos
    for wrong in ((), (position,), (position - 1,)):  # EOS drafted, EOS the verifier's correction, EOS after one
        exits = ScriptedExits(decoder, 2, free, P, wrong)
        for length in (3, 4, 8):
            out = generate_verified(decoder, exits, ids, mask, NEW, draft_layer=2, draft_length=length, eos_token_id=eos)
            assert torch.equal(out.sequences, ref), (wrong, length)
            if not wrong:  # rounds of length + 1 tokens: EOS is a draft unless it falls on a round's bonus token
                eos_drafted = (position + 1) % (length + 1) != 0
                assert (out.verified[-1] == out.drafted[-1]) == eos_drafted  # nothing ran on past a drafted EOS


def cache_of_plain_decoding(model, sequence):
    """The K/V of every token of `sequence` but the last, from transformers' own forward pass."""
    with torch.no_grad():
        out = model(input_ids=sequence[:, :-1], attention_mask=torch.ones_like(sequence[:, :-1]), use_cache=True)
    return out.cache


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cache_after_a_rejection_is_plain_full_depth_decodings(family):
    model, decoder = tiny_lm(family)
    ids, mask = one_prompt(2)
    ref = greedy(model, ids, mask)
    exits = ScriptedExits(decoder, 2, ref, ids.shape[1], wrong_at={2, 5})
    for new in (3, 6, 8, 11):  # generation ends right after the rejection at 2 or 5, or mid-way
        out = generate_verified(decoder, exits, ids, mask, new, draft_layer=2, draft_length=3)
        assert torch.equal(out.sequences, ref[:, : ids.shape[1] + new])
        plain = cache_of_plain_decoding(model, out.sequences)
        assert len(out.cache.layers) == len(plain.layers) == decoder.num_layers
        for mine, theirs in zip(out.cache.layers, plain.layers):
            assert mine.keys.shape == theirs.keys.shape == (1, mine.keys.shape[1], out.sequences.shape[1] - 1, mine.keys.shape[3])
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(mine.values, theirs.values, rtol=1e-4, atol=1e-5)
    assert rejected_positions(generate_verified(decoder, exits, ids, mask, 8, draft_layer=2, draft_length=3)) == [2, 5]


def test_a_restricted_draft_head_and_a_confidence_stop_keep_the_output():
    model, decoder = tiny_lm("llama")
    ids, mask = one_prompt()
    ref = greedy(model, ids, mask)
    exits = PlainExits(4)
    common = RestrictedHead(model.lm_head, torch.arange(0, VOCAB, 2))  # even ids only: odd tokens are always rejected
    out = generate_verified(decoder, exits, ids, mask, NEW, draft_layer=3, draft_length=4, draft_head=common)
    assert torch.equal(out.sequences, ref)
    full = generate_verified(decoder, exits, ids, mask, NEW, draft_layer=3, draft_length=4)
    assert out.drafted != full.drafted or out.accepted != full.accepted
    stopped = generate_verified(decoder, exits, ids, mask, NEW, draft_layer=3, draft_length=4, min_confidence=0.999)
    assert torch.equal(stopped.sequences, ref)
    assert set(stopped.drafted) <= {0, 1} and 1 in stopped.drafted  # random logits are never that confident


def test_counts_and_layer_passes():
    model, decoder = tiny_lm("gpt2")
    ids, mask = one_prompt()
    ref = greedy(model, ids, mask)
    exits = ScriptedExits(decoder, 3, ref, ids.shape[1], wrong_at={2})
    out = generate_verified(decoder, exits, ids, mask, 6, draft_layer=3, draft_length=4)
    # round 1 drafts 4 (accepts 2, the verifier corrects position 2); round 2 drafts the 2 the
    # budget leaves room for, both accepted, plus the verifier's bonus token
    assert out.drafted == [4, 2] and out.verified == [5, 3] and out.accepted == [2, 2] and out.draft_head_calls == 6
    assert out.acceptance_rate == pytest.approx(4 / 6) and out.mean_accepted == pytest.approx(2.0)
    assert out.tokens_per_round == pytest.approx(3.0)
    # inputs x 3 layers + drafts x head 2 + (1 verifying layer + head 2) per round
    assert out.layer_passes(head_cost=2.0) == pytest.approx((5 * 3 + 4 * 2 + 3) + (3 * 3 + 2 * 2 + 3))
    assert out.layer_passes(head_cost=2.0, draft_head_cost=0.5) == pytest.approx((15 + 2 + 3) + (9 + 1 + 3))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_teacher_forced_agreement_predicts_every_round(family):
    """simulate_rounds, from the exit's teacher-forced agreement with the full model alone, gives
    the rounds the driver makes: the benchmark's selection on validation prompts rests on this."""
    model, decoder = tiny_lm(family)
    ids, mask = one_prompt()
    ref = greedy(model, ids, mask)
    P, exits = ids.shape[1], PlainExits(4)
    with torch.no_grad():
        states = decoder(ref, torch.ones_like(ref))
    for layer in (1, 2, 3):
        logits = exits.logits(layer, states[layer - 1][0, P - 1:-1], decoder).detach()
        agree = (logits.argmax(-1) == ref[0, P:]).tolist()
        confidence = torch.softmax(logits, -1).max(-1).values
        middle = confidence.sort().values[NEW // 2 - 1: NEW // 2 + 1]
        threshold = float(middle.mean())  # between two confidences: float noise cannot flip a comparison
        confident = (confidence >= threshold).tolist()
        for length in (1, 2, 4):
            out = generate_verified(decoder, exits, ids, mask, NEW, draft_layer=layer, draft_length=length)
            assert simulate_rounds(agree, length) == (out.drafted, out.accepted), (layer, length)
        assert not all(confident) and any(confident)
        stop = generate_verified(decoder, exits, ids, mask, NEW, draft_layer=layer, draft_length=4, min_confidence=threshold)
        drafted, accepted = simulate_rounds(agree, 4, confident)
        assert accepted == stop.accepted and all(d >= s for d, s in zip(drafted, stop.drafted))


def test_a_padded_batch_runs_prompt_by_prompt_and_each_row_is_its_greedy_output():
    model, decoder = tiny_lm("qwen2")
    ids, mask = left_padded_prompts()
    results = generate_verified_each(decoder, PlainExits(4), ids, mask, NEW, draft_layer=2, draft_length=3)
    assert len(results) == ids.shape[0]
    for row, result in enumerate(results):
        prompt, prompt_mask = one_prompt(row)
        assert torch.equal(result.sequences, greedy(model, prompt, prompt_mask))
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate_verified_each(decoder, PlainExits(4), ids.flip(1), mask.flip(1), 3, draft_layer=2, draft_length=2)


def test_bad_arguments_are_refused_with_the_fix():
    _, decoder = tiny_lm("llama")
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="batch 1"):
        generate_verified(decoder, PlainExits(4), ids, mask, 3, draft_layer=2, draft_length=2)
    one, one_mask = one_prompt()
    with pytest.raises(ValueError, match="below the last"):
        generate_verified(decoder, PlainExits(4), one, one_mask, 3, draft_layer=4, draft_length=2)
    with pytest.raises(ValueError, match="has no exit"):
        generate_verified(decoder, PlainExits(4, exit_every=2), one, one_mask, 3, draft_layer=1, draft_length=2)
    with pytest.raises(ValueError, match="draft_length"):
        generate_verified(decoder, PlainExits(4), one, one_mask, 3, draft_layer=2, draft_length=0)
