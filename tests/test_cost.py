"""FLOPs per instance: the analytic count agrees with FlopCounterMode over real runner batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from conftest import TINY_BACKBONES, backbone_cfg, make_batch, make_tiny_model
from ee_lightning.evaluation.cost import flop_counter, flops_per_instance, flops_per_row, full_model_flops, measure_flops
from ee_lightning.inference.runner import EarlyExitRunner
from ee_lightning.exits.rules import ExitRule, build_rule

TARGETS = [1, 4, 2, 3, 2, 4, 1, 3]  # exit layers for the 8 test sentences


@dataclass(frozen=True)
class Scheduled(ExitRule):
    """Test rule: row i exits at TARGETS[i] (the state carries the targets, so it follows the rows)."""

    name: ClassVar[str] = "scheduled"
    needs: ClassVar[tuple[str, ...]] = ("prediction",)

    def init_state(self, batch_size, device=None):
        return {"target": torch.tensor(TARGETS[:batch_size], device=device)}

    def decide(self, layer, signals, state, labels=None, is_regression=False):
        return state["target"] <= layer, state


@dataclass(frozen=True)
class ScheduledWithPolicy(Scheduled):
    needs: ClassVar[tuple[str, ...]] = ("prediction", "exit_prob")  # makes the runner evaluate the policy nets


# Families with a per-batch (not per-row) part in every layer: the per-instance count is their batch-1 cost.
PER_BATCH_COST = {"tiny_deberta_v2": "DeBERTa projects its relative position embeddings once per batch in every "
                                     "layer (tests/test_encoder_families.py checks the gap)"}


def counted(fn) -> float:
    with flop_counter() as counter:
        fn()
    return float(counter.get_total_flops())


@pytest.fixture(scope="module", params=TINY_BACKBONES)
def tiny(request):
    model, tokenizer = make_tiny_model(request.param, output_size=3, with_policy=True)  # cls pooling
    return request.param, model, tokenizer, equal_length_batch()


def equal_length_batch(rows: int = 8, width: int = 12) -> dict:
    """Rows without padding: the runner trims padding columns as rows leave, so only a batch of
    equal lengths costs exactly rows x the per-instance count at its width."""
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, 2000, (rows, width), generator=generator),
            "attention_mask": torch.ones(rows, width, dtype=torch.long),
            "token_type_ids": torch.zeros(rows, width, dtype=torch.long)}


@pytest.mark.parametrize("rule", [build_rule("full"), build_rule("static", k=2), Scheduled(), ScheduledWithPolicy()],
                         ids=["full", "static2", "mixed", "mixed+policy"])
def test_count_agrees_with_flop_counter_over_a_runner_batch(tiny, rule):
    name, model, _, batch = tiny
    if name in PER_BATCH_COST:
        pytest.skip(PER_BATCH_COST[name])
    seq_len = batch["input_ids"].shape[1]
    runner = EarlyExitRunner(model)
    out = {}
    measured = counted(lambda: out.update(result=runner.run(batch, rule)))
    exit_layers = out["result"][1]
    if isinstance(rule, Scheduled):
        assert exit_layers.tolist() == TARGETS
    predicted = flops_per_instance(model, seq_len, exit_layers, with_policy=rule.needs_policy) * len(exit_layers)
    assert measured > 0
    assert predicted == pytest.approx(measured, rel=0.02), name


def test_count_agrees_for_mean_pooling():
    model, tokenizer = make_tiny_model("tiny_bert", output_size=3, with_policy=True, pooling="mean")
    batch = equal_length_batch()
    out = {}
    measured = counted(lambda: out.update(result=EarlyExitRunner(model).run(batch, Scheduled())))
    predicted = flops_per_row(model, batch["input_ids"].shape[1], out["result"][1]).sum().item()
    assert predicted == pytest.approx(measured, rel=0.02)
    assert measure_flops(model, 16).pool == 0  # mean pooling is elementwise: not counted


def test_cost_falls_with_exit_layer_at_batch_one(tiny):
    """At batch 1, stopping early is the whole saving: measured FLOPs grow strictly with k."""
    _, model, tokenizer, _ = tiny
    row = make_batch(tokenizer, ["a gripping, beautifully acted film"])
    seq_len = row["input_ids"].shape[1]
    runner = EarlyExitRunner(model)
    measured = [counted(lambda: runner.run(row, build_rule("static", k=k))) for k in range(1, 5)]
    assert measured == sorted(measured) and len(set(measured)) == 4
    predicted = [flops_per_instance(model, seq_len, torch.tensor([k])) for k in range(1, 5)]
    assert predicted == pytest.approx(measured, rel=0.02)


def test_runner_trims_padding_as_rows_leave(tiny):
    """A padded batch costs at most the padded-width count: columns no running row needs are dropped."""
    _, model, tokenizer, _ = tiny
    batch = make_batch(tokenizer)
    runner = EarlyExitRunner(model)
    out = {}
    measured = counted(lambda: out.update(result=runner.run(batch, Scheduled())))
    padded = flops_per_instance(model, batch["input_ids"].shape[1], out["result"][1]) * len(out["result"][1])
    assert 0 < measured < padded


def test_flops_increase_with_exit_layer(tiny):
    _, model, _, _ = tiny
    per_row = flops_per_row(model, 16, torch.tensor([1, 2, 3, 4]))
    assert torch.all(per_row[1:] > per_row[:-1])
    with_policy = flops_per_row(model, 16, torch.tensor([1, 2, 3, 4]), with_policy=True)
    assert torch.all(with_policy[:-1] > per_row[:-1])
    assert with_policy[-1] - per_row[-1] == with_policy[-2] - per_row[-2]  # no policy net at the forced last layer
    # exiting at L costs the plain model plus the pooler and heads of the layers below
    assert full_model_flops(model, 16) < per_row[-1].item()
    assert flops_per_instance(model, 16, torch.tensor([1, 4])) == pytest.approx(per_row[[0, 3]].mean().item())


def test_bert_matches_the_textbook_formula():
    model, _ = make_tiny_model("tiny_bert", output_size=3, with_policy=True)
    arch = backbone_cfg("tiny_bert").architecture
    H, I, S, C = arch.hidden_size, arch.intermediate_size, 16, 3
    parts = measure_flops(model, S)
    # Q, K, V, output projections + FFN (2 FLOPs per multiply-add) + attention scores and values
    assert parts.layers == (2 * S * (4 * H * H + 2 * H * I) + 4 * S * S * H,) * 4
    assert parts.embeddings == 0  # lookups only
    assert parts.pool == 2 * H * H  # BERT's pooler on the [CLS] vector
    assert parts.heads == (2 * H * C,) * 4
    assert parts.policy == (2 * (H * 32 + 32),) * 4  # Linear(H, 32) -> GELU -> Linear(32, 1)
    assert measure_flops(model, S) is parts  # cached
    assert measure_flops(model, 2 * S).layers[0] - 2 * parts.layers[0] == 4 * S * S * H * 2  # attention is quadratic


def test_embedding_projections_count():
    for name in ("tiny_albert", "tiny_electra"):
        model, _ = make_tiny_model(name, output_size=3)
        arch = backbone_cfg(name).architecture
        assert measure_flops(model, 16).embeddings == 2 * 16 * arch.embedding_size * arch.hidden_size, name


def test_cost_errors():
    model, _ = make_tiny_model("tiny_bert", output_size=3, with_policy=False)
    with pytest.raises(ValueError, match=r"1\.\.4"):
        flops_per_instance(model, 16, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"1\.\.4"):
        flops_per_instance(model, 16, torch.tensor([5]))
    with pytest.raises(ValueError, match="no policy"):
        flops_per_instance(model, 16, torch.tensor([2]), with_policy=True)
    with pytest.raises(ValueError, match="seq_len"):
        measure_flops(model, 0)
