"""The verify benchmark's bookkeeping: how it names a run, summarises timings, finds where an output
leaves full depth's (and whether that is a float tie), and which drafting points it may run once."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.conftest import ROOT
from tiny_decoders import left_padded_prompts, tiny_lm
from ee_lightning.inference.generate import PlainExits
from ee_lightning.inference.verify import generate_verified
from ee_lightning.modeling.draft_policy import DraftStopPolicy


def benchmark():
    spec = importlib.util.spec_from_file_location("verify_benchmark", ROOT / "experiments" / "verify_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_run_is_named_relative_to_the_repository_or_by_its_folder(tmp_path):
    bench = benchmark()
    assert bench.shown(ROOT / "experiments" / "results" / "verify_trained") == "experiments/results/verify_trained"
    assert bench.shown(tmp_path / "runs" / "A") == "A"  # no temporary or machine path in the report
    assert bench.shown(None) is None


def test_timings_are_summarised_by_median_and_quartiles():
    bench = benchmark()
    assert bench.median_spread([5.0, 1.0, 4.0, 2.0, 3.0]) == {"median": 3.0, "q1": 2.0, "q3": 4.0, "n": 5}
    assert bench.median_spread([1.0, 2.0, 3.0, 100.0]) == {"median": 2.5, "q1": 1.75, "q3": 27.25, "n": 4}
    assert bench.median_spread([7.0]) == {"median": 7.0, "q1": 7.0, "q3": 7.0, "n": 1}
    with pytest.raises(ValueError, match="no timing samples"):
        bench.median_spread([])


def test_the_first_difference_and_the_full_models_top2_gap_there():
    bench = benchmark()
    logits = torch.tensor([[0.0, 9.0, 1.0], [4.0, 1.0, 3.5], [2.0, 2.0, 0.0]])
    reference = [1, 0, 0]
    assert bench.difference([1, 0, 0], reference, logits) is None
    assert bench.difference([1, 2, 2], reference, logits) == (1, pytest.approx(0.5))  # 4.0 - 3.5
    assert bench.difference([1, 0, 1], reference, logits) == (2, pytest.approx(0.0))  # a tie: 2.0 - 2.0
    assert bench.difference([1, 0, 0, 5], reference, logits) == (3, None)  # past the reference's end: no logits
    assert bench.difference([1, 0], reference, logits) == (2, pytest.approx(0.0))  # stopped early


def test_only_points_that_make_the_same_computation_share_a_run():
    bench = benchmark()
    one = {"draft_layer": 3, "draft_length": 1, "draft_head": "full", "min_confidence": None, "stop_tau": None}
    assert bench.same_run(one, {**one, "min_confidence": 0.3})
    assert bench.same_run(one, {**one, "stop_tau": 0.5})
    assert not bench.same_run(one, {**one, "draft_layer": 2})
    assert not bench.same_run(one, {**one, "draft_head": "frequent"})
    two = {**one, "draft_length": 2}
    assert not bench.same_run(one, two)
    assert not bench.same_run(two, {**two, "min_confidence": 0.3})  # a stop can end a round after its first draft


def test_with_one_draft_per_round_a_stop_rule_changes_nothing():
    """What lets the benchmark reuse one run for points that differ only in their stop rule."""
    _, decoder = tiny_lm("llama")
    ids, mask = left_padded_prompts()
    ids, mask = ids[:1, mask[0].bool()], mask[:1, mask[0].bool()]
    exits = PlainExits(4)
    torch.manual_seed(0)
    stop = DraftStopPolicy(decoder.hidden_size, 2, 4, tau=0.1)  # random: stops after most drafts
    plain = generate_verified(decoder, exits, ids, mask, 10, draft_layer=2, draft_length=1)
    for options in ({"min_confidence": 0.999}, {"stop": stop}):
        other = generate_verified(decoder, exits, ids, mask, 10, draft_layer=2, draft_length=1, **options)
        assert torch.equal(other.sequences, plain.sequences)
        assert (other.drafted, other.verified, other.accepted) == (plain.drafted, plain.verified, plain.accepted)
