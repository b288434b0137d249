"""Early-exit generation: equals `generate` when nothing exits; equals a cache-free recomputation
from propagated states when tokens exit; batched, left-padded, EOS-aware; sampling reproducible."""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

from tiny_decoders import PAD, VOCAB, left_padded_prompts, tiny_lm
from ee_lightning.exits import rules as r
from ee_lightning.exits.signals import LOGIT_SIGNALS
from ee_lightning.inference.generate import PlainExits, generate_with_exits
from ee_lightning.modeling.lm_exits import LMExitHeads

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
    out = generate_with_exits(decoder, PlainExits(decoder.num_layers), r.FullRule(), ids, mask, NEW, eos_token_id=eos, pad_token_id=PAD)
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
    for rule in (r.StaticRule(2), r.PolicyRule(0.5)):
        out = generate_with_exits(decoder, exits, rule, ids, mask, 6, policy=HiddenPolicy())
        ref = reference_from_propagated_states(decoder, exits, ids, mask, out.exit_layers, 6)
        assert torch.equal(out.sequences, ref), rule
        if isinstance(rule, r.PolicyRule):  # the mixed case: rows leave at different layers in one step
            assert len(set(out.exit_layers.flatten().tolist())) >= 3
            assert any(len(set(col.tolist())) > 1 for col in out.exit_layers.T)
        else:
            assert bool((out.exit_layers == 2).all()) and bool((out.kv_fills == 2).all())


def test_rows_are_never_dropped_from_the_cache():
    _, decoder = tiny_lm("llama")
    ids, mask = left_padded_prompts()
    out = generate_with_exits(decoder, PlainExits(4), r.PolicyRule(0.5), ids, mask, 5, policy=HiddenPolicy())
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
    out = generate_with_exits(decoder, PlainExits(4), r.FullRule(), ids, mask, NEW, do_sample=True, logits_processor=warpers)
    assert torch.equal(out.sequences, ref)
    runs = [generate_with_exits(decoder, PlainExits(4), r.StaticRule(2), ids, mask, NEW, do_sample=True, logits_processor=warpers,
                                generator=torch.Generator().manual_seed(5)).sequences for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = generate_with_exits(decoder, PlainExits(4), r.StaticRule(2), ids, mask, NEW, do_sample=True, logits_processor=warpers,
                                generator=torch.Generator().manual_seed(6)).sequences
    assert not torch.equal(runs[0], other)


def test_counts_per_rule():
    _, decoder = tiny_lm("llama")
    ids, mask = left_padded_prompts()
    exits = PlainExits(4, exit_every=2)  # exits at layers 2 and 4
    assert exits.exit_layers == [2, 4]
    static = generate_with_exits(decoder, exits, r.StaticRule(1), ids, mask, 3)
    assert bool((static.exit_layers == 2).all()) and bool((static.lm_head_calls == 1).all()) and bool((static.kv_fills == 2).all())
    never = generate_with_exits(decoder, exits, r.SoftmaxMarginRule(1.0), ids, mask, 3)  # a margin never reaches 1
    assert bool((never.exit_layers == 4).all()) and bool((never.lm_head_calls == 2).all())  # layer 2's softmax + the exit
    sat = generate_with_exits(decoder, exits, r.SaturationRule(-1.0), ids, mask, 3)  # any cosine exits at the first exit
    assert bool((sat.exit_layers == 2).all()) and bool((sat.lm_head_calls == 1).all())
    pol = generate_with_exits(decoder, exits, r.PolicyRule(1.0), ids, mask, 3, policy=HiddenPolicy())
    assert bool((pol.policy_calls == 1).all()) and bool((pol.exit_layers == 4).all())  # no policy call at the last layer
    with pytest.raises(ValueError, match="policy="):
        generate_with_exits(decoder, exits, r.PolicyRule(0.5), ids, mask, 3)
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate_with_exits(decoder, exits, r.FullRule(), ids.flip(1), mask.flip(1), 3)


def test_oracle_exits_where_the_exit_token_first_equals_the_full_models():
    model, decoder = tiny_lm("llama")
    ids, mask = left_padded_prompts()
    exits = PlainExits(4)
    full = generate_with_exits(decoder, exits, r.FullRule(), ids, mask, 1)
    oracle = generate_with_exits(decoder, exits, r.OracleRule(), ids, mask, 1)
    assert torch.equal(full.sequences, oracle.sequences)  # the first token: same cache, so the same token
    with torch.no_grad():
        states = decoder(ids, mask)
    tokens = torch.stack([exits.logits(layer, states[layer - 1][:, -1], decoder).argmax(-1) for layer in (1, 2, 3, 4)])
    first = (tokens == tokens[-1]).float().argmax(0) + 1
    assert torch.equal(oracle.exit_layers[:, 0], first)


def test_teacher_forcing_and_the_real_deeper_states_reference():
    _, decoder = tiny_lm("mistral")
    ids, mask = left_padded_prompts()
    exits = PlainExits(4)
    full = generate_with_exits(decoder, exits, r.FullRule(), ids, mask, 5, output_logits=True)
    assert torch.equal(full.logits.argmax(-1), full.new_tokens)
    forced = full.new_tokens.flip(0)
    static = generate_with_exits(decoder, exits, r.StaticRule(2), ids, mask, 5, force_tokens=forced, output_logits=True)
    assert torch.equal(static.new_tokens, forced) and static.logits.shape == (3, 5, decoder.vocab_size)
    # Exited tokens that keep running for their K/V leave exactly the full model's cache behind.
    real = generate_with_exits(decoder, exits, r.StaticRule(2), ids, mask, 5, force_tokens=forced, propagate_kv=False)
    reference = generate_with_exits(decoder, exits, r.FullRule(), ids, mask, 5, force_tokens=forced)
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
    for rule in (r.FullRule(), r.StaticRule(2), r.OracleRule()):
        plain = generate_with_exits(decoder, PlainExits(4), rule, ids, mask, 5)
        reused = generate_with_exits(decoder, PlainExits(4), rule, ids, mask, 5, prompt_cache=shared)
        assert torch.equal(plain.sequences, reused.sequences) and torch.equal(plain.exit_layers, reused.exit_layers)
    assert torch.equal(shared.layers[2].keys, before) and shared.get_seq_length() == ids.shape[1] - 1


def _first_token_exit_predictions(decoder, exits, ids, mask):
    """Every exit's greedy token for the first new token [E, B]: the prompt's cache is the same for
    every rule, so a no-cache pass over the prompts gives the signals the driver sees at step 0."""
    with torch.no_grad():
        states = decoder(ids, mask)
    return torch.stack([exits.logits(layer, states[layer - 1][:, -1], decoder).argmax(-1) for layer in exits.exit_layers])


def test_a_stateful_rule_follows_the_running_tokens_as_in_the_runner():
    """Patience keeps a per-token state; tokens leave at different exits in one step, so the state is
    subset as rows leave. The first step's exits equal `replay` over the exits' greedy tokens."""
    _, decoder = tiny_lm("llama")
    ids, mask = left_padded_prompts(lengths=(7, 4, 6, 5, 3, 7))
    exits = PlainExits(4)
    rule = r.PatienceRule(patience=1)
    out = generate_with_exits(decoder, exits, rule, ids, mask, 1)
    expected = r.replay(rule, {"prediction": _first_token_exit_predictions(decoder, exits, ids, mask)})
    assert torch.equal(out.exit_layers[:, 0], expected)
    assert len(set(expected.tolist())) >= 3  # rows left at 2, 3 and 4: the state was subset mid-step
    assert torch.equal(out.lm_head_calls[:, 0], expected)  # reading the token costs an LM-head call per exit tried
    # exits every 2nd layer: the first decision (layer 2) has no predecessor, so nothing leaves before 4
    sparse = generate_with_exits(decoder, PlainExits(4, exit_every=2), rule, ids, mask, 1)
    assert bool((sparse.exit_layers == 4).all())


@pytest.mark.parametrize("name", list(r.RULES))
def test_every_rule_runs_in_generation_and_pays_only_for_what_it_reads(name):
    _, decoder = tiny_lm("qwen2")
    ids, mask = left_padded_prompts()
    # exits at layers 2 and 4, untrained (the zero adapters: PlainExits), with every head row as confidence tokens
    exits = LMExitHeads(4, decoder.hidden_size, exit_every=2, rank=1)
    exits.set_confidence_tokens(torch.arange(VOCAB))
    rule = r.build_rule(name)
    out = generate_with_exits(decoder, exits, rule, ids, mask, 3, policy=HiddenPolicy(), classifier=HiddenPolicy())
    mask_tokens = out.token_mask
    assert set(out.exit_layers[mask_tokens].tolist()) <= {2, 4}
    exit_index = out.exit_layers // 2  # 1 at layer 2, 2 at layer 4
    reads_softmax = any(signal in LOGIT_SIGNALS for signal in rule.needs)
    expected_lm = exit_index if reads_softmax else torch.ones_like(exit_index)
    assert torch.equal(out.lm_head_calls[mask_tokens], expected_lm[mask_tokens]), name
    # every token was decided on once (at layer 2; layer 4 is forced): one policy / classifier call if read
    for calls, signal in ((out.policy_calls, "exit_prob"), (out.classifier_calls, "classifier_prob")):
        assert bool((calls[mask_tokens] == int(signal in rule.needs)).all()), (name, signal)
    # the frequent rows' margin: read at most once (gated: only where the policy proposed), never if not needed
    reads = out.confidence_reads[mask_tokens]
    assert bool((reads <= 1).all()) if "frequent_margin" in rule.needs else bool((reads == 0).all()), name


def test_missing_modules_and_unknown_signals_are_named():
    _, decoder = tiny_lm("llama")
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="'classifier' reads CALM's exit classifier: pass classifier="):
        generate_with_exits(decoder, PlainExits(4), r.ClassifierRule(0.5), ids, mask, 2)

    class Foreign(r.ExitRule):
        name = "foreign"
        needs = ("attention_entropy",)

    with pytest.raises(ValueError, match=r"'foreign' reads the signal\(s\) \['attention_entropy'\], not computed by "
                                         r"generation; rules that run there: entropy"):
        generate_with_exits(decoder, PlainExits(4), Foreign(), ids, mask, 2)
    with pytest.raises(ValueError, match=r"k=5 is outside 1\.\.4"):
        generate_with_exits(decoder, PlainExits(4), r.StaticRule(5), ids, mask, 2)
