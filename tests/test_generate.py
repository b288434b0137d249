"""Early-exit generation: equals `generate` when nothing exits; equals a cache-free recomputation
from propagated states when tokens exit; batched, left-padded, EOS-aware; sampling reproducible."""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

from tiny_decoders import PAD, left_padded_prompts, tiny_lm
from ee_lightning.exits import token_rules as tr
from ee_lightning.inference.generate import PlainExits, generate_with_exits

NEW = 10


def _eos_hit_by_row0(model, ids, mask):
    """A token that the full model emits in row 0 mid-way: used as EOS so that row stops early."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    return int(out[0, ids.shape[1] + 3])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "qwen3"])
def test_never_exit_equals_transformers_greedy_generate(family):
    model, decoder = tiny_lm(family)
    ids, mask = left_padded_prompts()
    eos = _eos_hit_by_row0(model, ids, mask)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    out = generate_with_exits(decoder, PlainExits(decoder.num_layers), tr.Full(), ids, mask, NEW, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(out.sequences, ref)
    new = out.new_tokens
    first_eos = int((new[0] == eos).nonzero()[0])
    assert first_eos <= 3 and bool((new[0, first_eos + 1:] == PAD).all())
    assert bool((out.exit_layers[0, first_eos + 1:] == 0).all())          # padding after EOS: no token
    assert bool((out.exit_layers[0, : first_eos + 1] == 4).all())
    assert bool((out.kv_fills == 0).all()) and bool((out.lm_head_calls == out.token_mask.long()).all())


def reference_from_propagated_states(decoder, exits, ids, mask, exit_layers, steps):
    """No cache: every step recomputes the whole sequence, where a token that exited at layer e
    enters every layer deeper than e with its exit state (so those layers' K/V come from it)."""
    sequences, mask = ids, mask.long()
    prompt_last = ids.shape[1] - 1
    with torch.no_grad():
        for step in range(steps):
            hidden, ctx = decoder.start(sequences, mask, cache=None)
            for index in range(decoder.num_layers):
                new = decoder.step(index, hidden, ctx)
                for pos in range(step + 1):  # inputs at prompt_last + pos went through an exit
                    for row in range(ids.shape[0]):
                        if exit_layers[row, pos] <= index:
                            new[row, prompt_last + pos] = hidden[row, prompt_last + pos]
                hidden = new
            logits = torch.stack([exits.logits(int(exit_layers[row, step]), hidden[row, -1], decoder)
                                  for row in range(ids.shape[0])])
            sequences = torch.cat([sequences, logits.argmax(-1)[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return sequences


class HiddenPolicy:
    """A fixed 'policy' reading the hidden state: tokens exit at different layers per row and step."""

    def logit(self, layer, hidden):
        z = hidden[..., 0] * hidden.shape[-1] ** 0.5 / hidden.norm(dim=-1)  # about N(0, 1) per token
        return 3 * z + (layer - 2.5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gpt2"])
def test_forced_exits_equal_cache_free_recomputation_from_propagated_states(family):
    _, decoder = tiny_lm(family)
    ids, mask = left_padded_prompts()
    exits = PlainExits(decoder.num_layers)
    for rule in (tr.Static(2), tr.Policy(0.5)):
        out = generate_with_exits(decoder, exits, rule, ids, mask, 6, policy=HiddenPolicy())
        ref = reference_from_propagated_states(decoder, exits, ids, mask, out.exit_layers, 6)
        assert torch.equal(out.sequences, ref), rule
        if isinstance(rule, tr.Policy):  # the mixed case: rows leave at different layers in one step
            assert len(set(out.exit_layers.flatten().tolist())) >= 3
            assert any(len(set(col.tolist())) > 1 for col in out.exit_layers.T)
        else:
            assert bool((out.exit_layers == 2).all()) and bool((out.kv_fills == 2).all())


def test_rows_are_never_dropped_from_the_cache():
    _, decoder = tiny_lm("llama")
    ids, mask = left_padded_prompts()
    out = generate_with_exits(decoder, PlainExits(4), tr.Policy(0.5), ids, mask, 5, policy=HiddenPolicy())
    length = out.sequences.shape[1] - 1  # the last token is never fed back
    for layer in out.cache.layers:
        assert layer.keys.shape[0] == ids.shape[0] and layer.keys.shape[2] == length
        assert layer.values.shape[0] == ids.shape[0] and layer.values.shape[2] == length


def test_sampling_matches_transformers_sampling_and_a_seeded_generator_reproduces():
    model, decoder = tiny_lm("qwen2")
    ids, mask = left_padded_prompts()
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(20)])
    torch.manual_seed(11)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, temperature=0.7, top_k=20,
                         top_p=1.0, eos_token_id=None, pad_token_id=PAD)
    torch.manual_seed(11)
    out = generate_with_exits(decoder, PlainExits(4), tr.Full(), ids, mask, NEW, do_sample=True, logits_processor=warpers)
    assert torch.equal(out.sequences, ref)
    runs = [generate_with_exits(decoder, PlainExits(4), tr.Static(2), ids, mask, NEW, do_sample=True, logits_processor=warpers,
                                generator=torch.Generator().manual_seed(5)).sequences for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = generate_with_exits(decoder, PlainExits(4), tr.Static(2), ids, mask, NEW, do_sample=True, logits_processor=warpers,
                                generator=torch.Generator().manual_seed(6)).sequences
    assert not torch.equal(runs[0], other)


def test_counts_per_rule():
    _, decoder = tiny_lm("llama")
    ids, mask = left_padded_prompts()
    exits = PlainExits(4, exit_every=2)  # exits at layers 2 and 4
    assert exits.exit_layers == [2, 4]
    static = generate_with_exits(decoder, exits, tr.Static(1), ids, mask, 3)
    assert bool((static.exit_layers == 2).all()) and bool((static.lm_head_calls == 1).all()) and bool((static.kv_fills == 2).all())
    never = generate_with_exits(decoder, exits, tr.SoftmaxMargin(2.0), ids, mask, 3)  # a margin never reaches 2
    assert bool((never.exit_layers == 4).all()) and bool((never.lm_head_calls == 2).all())  # layer 2's softmax + the exit
    sat = generate_with_exits(decoder, exits, tr.Saturation(-2.0), ids, mask, 3)  # any cosine exits at the first exit
    assert bool((sat.exit_layers == 2).all()) and bool((sat.lm_head_calls == 1).all())
    pol = generate_with_exits(decoder, exits, tr.Policy(2.0), ids, mask, 3, policy=HiddenPolicy())
    assert bool((pol.policy_calls == 1).all()) and bool((pol.exit_layers == 4).all())  # no policy call at the last layer
    with pytest.raises(ValueError, match="policy="):
        generate_with_exits(decoder, exits, tr.Policy(0.5), ids, mask, 3)
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate_with_exits(decoder, exits, tr.Full(), ids.flip(1), mask.flip(1), 3)


def test_oracle_exits_where_the_exit_token_first_equals_the_full_models():
    model, decoder = tiny_lm("llama")
    ids, mask = left_padded_prompts()
    exits = PlainExits(4)
    full = generate_with_exits(decoder, exits, tr.Full(), ids, mask, 1)
    oracle = generate_with_exits(decoder, exits, tr.Oracle(), ids, mask, 1)
    assert torch.equal(full.sequences, oracle.sequences)  # the first token: same cache, so the same token
    with torch.no_grad():
        states = decoder(ids, mask)
    tokens = torch.stack([exits.logits(layer, states[layer - 1][:, -1], decoder).argmax(-1) for layer in (1, 2, 3, 4)])
    first = (tokens == tokens[-1]).float().argmax(0) + 1
    assert torch.equal(oracle.exit_layers[:, 0], first)


def test_rule_math_by_hand():
    assert torch.allclose(tr.margin(torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8]])), torch.tensor([0.2, 0.7]))
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(tr.saturation(a, torch.tensor([[2.0, 0.0], [1.0, -1.0]])), torch.tensor([1.0, 0.0]))
    assert tr.Static(3).decide(2, 2, {}).tolist() == [False, False] and tr.Static(3).decide(3, 2, {}).tolist() == [True, True]
    assert tr.SoftmaxMargin(0.5).decide(1, 2, {"margin": torch.tensor([0.4, 0.5])}).tolist() == [False, True]
    assert tr.make_rule("static", 4) == tr.Static(4) and tr.make_rule("policy", 0.5) == tr.Policy(0.5)
    with pytest.raises(ValueError, match="unknown token exit rule 'nope'"):
        tr.make_rule("nope")
    with pytest.raises(ValueError, match="needs a knob"):
        tr.make_rule("saturation")


def test_teacher_forcing_and_the_real_deeper_states_reference():
    _, decoder = tiny_lm("mistral")
    ids, mask = left_padded_prompts()
    exits = PlainExits(4)
    full = generate_with_exits(decoder, exits, tr.Full(), ids, mask, 5, output_logits=True)
    assert torch.equal(full.logits.argmax(-1), full.new_tokens)
    forced = full.new_tokens.flip(0)
    static = generate_with_exits(decoder, exits, tr.Static(2), ids, mask, 5, force_tokens=forced, output_logits=True)
    assert torch.equal(static.new_tokens, forced) and static.logits.shape == (3, 5, decoder.vocab_size)
    # Exited tokens that keep running for their K/V leave exactly the full model's cache behind.
    real = generate_with_exits(decoder, exits, tr.Static(2), ids, mask, 5, force_tokens=forced, propagate_kv=False)
    reference = generate_with_exits(decoder, exits, tr.Full(), ids, mask, 5, force_tokens=forced)
    for layer in range(4):
        torch.testing.assert_close(real.cache.layers[layer].keys, reference.cache.layers[layer].keys, rtol=0, atol=1e-6)
    assert bool((real.kv_fills == 0).all()) and bool((real.exit_layers == 2).all())
    assert not torch.allclose(static.cache.layers[3].keys, reference.cache.layers[3].keys)


def test_a_shared_prompt_cache_gives_the_same_generation_and_stays_unchanged():
    from ee_lightning.inference.generate import prefill

    _, decoder = tiny_lm("qwen2")
    ids, mask = left_padded_prompts()
    shared = prefill(decoder, ids, mask)
    before = shared.layers[2].keys.clone()
    for rule in (tr.Full(), tr.Static(2), tr.Oracle()):
        plain = generate_with_exits(decoder, PlainExits(4), rule, ids, mask, 5)
        reused = generate_with_exits(decoder, PlainExits(4), rule, ids, mask, 5, prompt_cache=shared)
        assert torch.equal(plain.sequences, reused.sequences) and torch.equal(plain.exit_layers, reused.exit_layers)
    assert torch.equal(shared.layers[2].keys, before) and shared.get_seq_length() == ids.shape[1] - 1


def test_policy_rule_is_strict_like_greedy_exit():
    probs = torch.tensor([0.5, 0.51])
    assert tr.Policy(0.5).decide(1, 2, {"policy": probs}).tolist() == [False, True]
