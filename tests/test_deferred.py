"""Generation whose skipped layers run later: the tokens and exits of exits over the full model's own
states (real deeper states, computed at once), and the full model's greedy output when nothing exits."""
from __future__ import annotations

import math

import pytest
import torch

from test_generate import HiddenPolicy
from tiny_decoders import PAD, left_padded_prompts, tiny_lm
from ee_lightning.evaluation.generation_cost import measure_generation_flops
from ee_lightning.exits import rules as r
from ee_lightning.evaluation.generation_eval import decoding_rates, generate_batch, merge_runs
from ee_lightning.inference.deferred import (deferred_layers_after_exit, generate_deferred, generate_deferred_each,
                                             prefill_each)
from ee_lightning.inference.generate import PlainExits, generate_with_exits

NEW = 8


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gpt2"])
def test_layers_after_exit_give_the_tokens_of_real_deeper_states(family):
    _, decoder = tiny_lm(family, layers=6)
    exits = PlainExits(decoder.num_layers, exit_every=2)
    ids, mask = left_padded_prompts()
    for rule in (r.PolicyRule(0.5), r.StaticRule(2), r.SoftmaxMarginRule(0.0003), r.SaturationRule(0.5)):
        ours = generate_deferred_each(decoder, exits, rule, ids, mask, NEW, pad_token_id=PAD, policy=HiddenPolicy())
        for row in range(ids.shape[0]):  # batch 1 each: the reference keeps exited rows running for their K/V
            prompt = ids[row][mask[row].bool()][None]
            real = generate_with_exits(decoder, exits, rule, prompt, torch.ones_like(prompt), NEW,
                                       policy=HiddenPolicy(), propagate_kv=False)
            assert ours.new_tokens[row].tolist() == real.new_tokens[0].tolist(), (rule, row)
            assert ours.exit_layers[row].tolist() == real.exit_layers[0].tolist(), (rule, row)
        if rule.name in ("policy", "softmax_margin"):  # tokens left at different exits: deferral was exercised
            layers = ours.exit_layers
            assert len(set(layers[layers > 0].tolist())) > 1, rule


def test_with_exits_the_skipped_layers_catch_up_and_every_cached_kv_is_the_full_models():
    _, decoder = tiny_lm("llama", layers=6)
    exits = PlainExits(6, exit_every=2)
    ids, mask = left_padded_prompts(lengths=(7,))
    out = generate_deferred(decoder, exits, r.PolicyRule(0.5), ids, None, NEW, policy=HiddenPolicy())
    layers = out.exit_layers[0]
    assert bool((layers < 6).any()) and bool((layers == 6).any())  # some tokens exited, some went all the way
    assert bool((out.kv_fills == 0).all())
    # a token's depth in the end: its exit plus the layers later tokens ran for it; every token followed by
    # a full-depth one got all 6
    depth = layers + out.layers_after_exit[0]
    last_full = int((layers == 6).nonzero().max())
    assert bool((depth[:last_full + 1] == 6).all()) and bool((depth <= 6).all())
    # the cache holds the full model's own K/V for the tokens emitted: a full-depth pass over them agrees
    forced = out.sequences
    reference = generate_with_exits(decoder, exits, r.FullRule(), forced[:, :-1], torch.ones_like(forced[:, :-1]), 1)
    for index in range(6):
        cached = out.cache.layers[index].keys
        n = cached.shape[-2]
        torch.testing.assert_close(cached, reference.cache.layers[index].keys[..., :n, :], rtol=0, atol=1e-5)
    # FLOPs count every layer a token ran, deferred ones included (no K/V fill)
    flops = measure_generation_flops(decoder, exits)
    per_token = flops.per_token(out, torch.ones_like(ids))
    context = flops.context(out, torch.ones_like(ids))
    expected = flops.layers_up_to(context, depth) + out.lm_head_calls * flops.exit_head
    torch.testing.assert_close(per_token, expected.masked_fill(~out.token_mask, 0.0))


def test_never_exiting_is_greedy_generate_and_eos_stops_the_row():
    model, decoder = tiny_lm("qwen2")
    ids, mask = left_padded_prompts()
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                         pad_token_id=PAD)
    eos = int(ref[0, ids.shape[1] + 2])
    ours = generate_deferred_each(decoder, PlainExits(4), r.FullRule(), ids, mask, NEW, eos_token_id=eos, pad_token_id=PAD)
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                              pad_token_id=PAD)
    assert torch.equal(ours.sequences, expected)
    assert bool((ours.exit_layers[0, 3:] == 0).all()) and int(ours.exit_layers[0, 2]) == 4  # nothing after EOS


def test_the_prompts_own_passes_given_apart_leave_the_tokens_unchanged():
    _, decoder = tiny_lm("llama", layers=6)
    exits = PlainExits(6, exit_every=2)
    ids, mask = left_padded_prompts()
    rule = r.PolicyRule(0.5)
    alone = generate_deferred_each(decoder, exits, rule, ids, mask, NEW, pad_token_id=PAD, policy=HiddenPolicy())
    caches = prefill_each(decoder, ids, mask)
    given = generate_deferred_each(decoder, exits, rule, ids, mask, NEW, pad_token_id=PAD, policy=HiddenPolicy(),
                                   prompt_caches=caches)
    assert torch.equal(given.sequences, alone.sequences) and torch.equal(given.exit_layers, alone.exit_layers)
    again = generate_deferred_each(decoder, exits, rule, ids, mask, NEW, pad_token_id=PAD, policy=HiddenPolicy(),
                                   prompt_caches=caches)
    assert torch.equal(again.sequences, alone.sequences)  # the caches were copied, not consumed
    with pytest.raises(ValueError, match="2 prompt caches for a batch of 3 prompts"):
        generate_deferred_each(decoder, exits, rule, ids, mask, NEW, prompt_caches=caches[:2], policy=HiddenPolicy())


def test_a_token_runs_later_up_to_the_deepest_exit_after_it():
    exit_layers = torch.tensor([[2, 6, 2, 4, 2, 0], [3, 1, 2, 0, 0, 0]])
    assert deferred_layers_after_exit(exit_layers).tolist() == [[4, 0, 2, 0, 0, 0], [0, 1, 0, 0, 0, 0]]
    _, decoder = tiny_lm("llama", layers=6)
    ids, mask = left_padded_prompts()
    out = generate_deferred_each(decoder, PlainExits(6, exit_every=2), r.PolicyRule(0.5), ids, mask, NEW,
                                 pad_token_id=PAD, policy=HiddenPolicy())
    assert torch.equal(deferred_layers_after_exit(out.exit_layers), out.layers_after_exit)


def test_a_timed_subset_keeps_every_prompts_deferred_tokens_and_times_only_its_own():
    _, decoder = tiny_lm("llama", layers=6)
    exits = PlainExits(6, exit_every=2)
    ids, mask = left_padded_prompts()
    batch = {"input_ids": ids, "attention_mask": mask}
    flops = measure_generation_flops(decoder, exits, HiddenPolicy())
    for rule in (r.PolicyRule(0.5), r.StaticRule(2)):
        every = generate_batch(decoder, exits, rule, batch, NEW, None, PAD, policy=HiddenPolicy(), kv="defer",
                               flops=flops)
        subset = generate_batch(decoder, exits, rule, batch, NEW, None, PAD, policy=HiddenPolicy(), kv="defer",
                                timed_rows=1, flops=flops)
        assert subset["tokens"] == every["tokens"] and subset["exit_layers"] == every["exit_layers"]
        torch.testing.assert_close(subset["flops"], every["flops"])  # charged the layers deferral runs
        timing = subset["timed"]
        assert timing["generated"] == len(every["exit_layers"][0]) and timing["seconds"] > 0
        assert timing["prompt_seconds"] > 0 and "timed" not in every
    oracle = generate_batch(decoder, exits, r.OracleRule(), batch, NEW, None, PAD, kv="defer", timed_rows=1)
    assert "timed" not in oracle  # a bound: never timed
    runs = [{"tokens": [[1]], "exit_layers": [[2]], "seconds": 1.0, "generated": 1,
             "timed": {"seconds": s, "generated": g, "prompt_seconds": 0.5}} for s, g in ((2.0, 4), (1.0, 2))]
    assert merge_runs(runs)["timed"] == {"seconds": 3.0, "generated": 6, "prompt_seconds": 1.0}
    # the rates: decoding alone, and with the prompts' pass; a run without a timed subset among timed ones is not timed
    assert decoding_rates({"timed": {"seconds": 2.0, "generated": 8, "prompt_seconds": 2.0}}, 9.0, True) == (4.0, 2.0)
    assert decoding_rates({"seconds": 2.0, "generated": 8}, 2.0, False) == (4.0, 2.0)
    assert all(math.isnan(v) for v in decoding_rates({"seconds": 2.0, "generated": 8}, 2.0, True))


def test_deferred_generation_refuses_what_it_cannot_do():
    _, decoder = tiny_lm("llama")
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="one prompt at a time"):
        generate_deferred(decoder, PlainExits(4), r.FullRule(), ids, None, 2)
    with pytest.raises(ValueError, match="full model's token"):
        generate_deferred(decoder, PlainExits(4), r.OracleRule(), ids[:1], None, 2)
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate_deferred_each(decoder, PlainExits(4), r.FullRule(), ids.flip(1), mask.flip(1), 2)
    with pytest.raises(ValueError, match="policy="):
        generate_deferred(decoder, PlainExits(4), r.PolicyRule(0.5), ids[:1, -3:], None, 2)


def test_a_saved_decoder_generates_with_deferred_layers_the_tokens_of_real_deeper_states(tmp_path):
    import ee_lightning
    from ee_lightning.data.generation import chat_prompt_ids, collate_generate
    from ee_lightning.evaluation.text_metrics import trim_generation
    from test_saved_model import tiny_decoder_folder

    decoder, tokenizer, exits, policy, classifier = tiny_decoder_folder(tmp_path / "model")
    loaded = ee_lightning.load(tmp_path / "model")
    prompts = ["Say hello.", "What is an early exit in a transformer?", "Count to three."]
    rows = [{"prompt_ids": chat_prompt_ids(tokenizer, p), "reference": "", "prompt": p, "idx": i}
            for i, p in enumerate(prompts)]
    batch = collate_generate(rows, tokenizer.pad_token_id)
    got = loaded.generate(prompts, kv="defer", batch_size=3)  # the policy at its saved tau
    real = generate_with_exits(decoder, exits, r.PolicyRule(0.5), batch["input_ids"], batch["attention_mask"], 5,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               policy=policy, propagate_kv=False)
    assert got.tokens == [trim_generation(row.tolist(), tokenizer.eos_token_id) for row in real.new_tokens]
    assert got.exit_layers == [row[row > 0].tolist() for row in real.exit_layers]
    with pytest.raises(ValueError, match="kv='later'"):
        loaded.generate(prompts, kv="later")


@pytest.mark.slow
def test_a_decoder_run_with_deferred_layers_reports_layer_saving_without_flops_saving(tmp_path, monkeypatch):
    import json

    from conftest import compose_train
    from ee_lightning.app.train import train
    from ee_lightning.evaluation import generation_eval

    deferred_calls = []
    original = generation_eval.generate_deferred_each
    monkeypatch.setattr(generation_eval, "generate_deferred_each",
                        lambda *a, **k: deferred_calls.append(a[2].name) or original(*a, **k))

    run_dir = tmp_path / "run"
    cfg = compose_train(["experiment=aclsum_consistentee", "backbone=tiny_llama", "logger=csv",
                         "data.max_train_samples=4", "data.max_eval_samples=2", "data.max_prompt_length=48",
                         "method.lm_exits.exit_every=2", "method.lm_exits.policy.epochs=1",
                         "method.lm_exits.classifier.epochs=0", "method.generation.kv=defer",
                         "method.generation.max_prompts=2", "method.generation.max_new_tokens=4",
                         "method.generation.rules.static=[2]", "method.generation.rules.policy=[0.5]",
                         "method.generation.rules.softmax_margin=null", "method.generation.rules.saturation=null",
                         "method.generation.rules.classifier=null", "method.generation.timed_per_batch=1"], run_dir)
    train(cfg)
    points = {p["rule"]: p for p in json.loads((run_dir / "results.json").read_text())["points"]}
    # the text from the batched pass, the clock from one prompt per batch run deferred; the oracle is not timed
    assert all(p["tokens_per_s"] > 0 for rule, p in points.items() if rule != "oracle")
    assert math.isnan(points["oracle"]["tokens_per_s"])
    assert "first 1 prompt(s) of each batch decoded one at a time" in (run_dir / "pareto.md").read_text()
    # one deferred clock per timed rule on the one test batch; the calibration, which reads only the text, ran none
    assert sorted(deferred_calls) == ["full", "policy", "static"]
    static = points["static"]
    assert static["avg_exit_layer"] == 2.0 and static["layer_saving"] == 0.5
    # every layer still runs for the K/V, except the skipped layers of each prompt's last step, which no
    # later token needs (1 token in 4 here): far less saved than the layers' half
    assert static["flops_saving"] < static["layer_saving"] / 2
    assert points["oracle"]["rougeL_vs_full"] == 1.0  # real deeper states: the oracle's text is the full model's
    saved = json.loads((run_dir / "model" / "config.json").read_text())
    assert saved["generation"]["kv"] == "defer"
