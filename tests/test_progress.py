"""Progress bars on the passes outside a Trainer's own bar: the latency measurement and the generation
evaluation (per rule and knob, with tokens/s). Silent when stderr is not a terminal (as in tests)."""
from __future__ import annotations

import pytest

from ee_lightning import progress as progress_module
from ee_lightning.data.generation import chat_prompt_ids, collate_generate
from ee_lightning.evaluation.generation_eval import rule_points_grid
from ee_lightning.evaluation.pareto import measure_latency
from ee_lightning.exits.rules import build_rule
from ee_lightning.inference.generate import PlainExits
from ee_lightning.modeling.backbones.decoder_build import build_decoder
from ee_lightning.training.systems.generation import GenerationEvalSystem
from tests.conftest import SENTENCES, backbone_cfg, make_batch, make_tiny_model


@pytest.fixture(params=[True, False], ids=["terminal", "not-a-terminal"])
def terminal(request, monkeypatch):
    monkeypatch.setattr(progress_module, "progress_enabled", lambda: request.param)
    return request.param


def test_the_latency_measurement_shows_its_progress_on_a_terminal_only(terminal, capsys):
    model, tokenizer = make_tiny_model(with_policy=True)
    batch = {k: v for k, v in make_batch(tokenizer).items()}
    measure_latency(model, build_rule("policy", tau=0.5), lambda size: [batch], batch_sizes=(len(SENTENCES),),
                    num_examples=len(SENTENCES), repeats=2, warmup=0)
    err = capsys.readouterr().err
    assert ("latency, batch 8: early-exit runner" in err and "latency, batch 8: plain model" in err) == terminal
    assert terminal or err == ""


def test_the_generation_evaluation_shows_each_rule_and_its_tokens_per_second(terminal, capsys):
    decoder, tokenizer = build_decoder(backbone_cfg("tiny_llama"))
    exits = PlainExits(decoder.num_layers)
    rules = rule_points_grid({"static": [2], "softmax_margin": [0.5]}, exits.exit_layers, False, False,
                             decoder.vocab_size)
    system = GenerationEvalSystem(decoder, tokenizer, exits, rules, max_new_tokens=3)
    rows = [{"prompt_ids": chat_prompt_ids(tokenizer, p), "reference": "r", "prompt": p, "idx": i}
            for i, p in enumerate(["Say hi.", "Count to two."])]
    system.test_step(collate_generate(rows, tokenizer.pad_token_id), 0)
    err = capsys.readouterr().err
    shown = "generation, prompt batch 1" in err and "tokens/s" in err and "static 2" in err
    assert shown == terminal
    assert terminal or err == ""
