"""ee-eval: every rule, three files, from a checkpoint; bad input gets clear errors."""
from __future__ import annotations

import csv
import json

import pytest

from ee_lightning.app.evaluate_checkpoint import evaluate
from ee_lightning.evaluation.pareto import ALL_RULES, mark_pareto, rule_grids
from ee_lightning.exits.rules import ENCODER_RULES
from ee_lightning.app.train import train
from tests.conftest import compose_train, data_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def policy_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    run = root / "run"
    train(compose_train(["backbone=tiny_bert", "method=consistentee", "method.finetune.epochs=1",
                         "method.policy.epochs=1", "logger=csv", "trainer.enable_progress_bar=false",
                         "report.latency.enabled=false", *data_overrides("glue", root)], run))
    return json.loads((run / "stages.json").read_text())["policy"]["checkpoint"], root


def test_eval_writes_every_rule_with_latency(policy_checkpoint, tmp_path):
    ckpt, _ = policy_checkpoint
    out = tmp_path / "eval"
    report = evaluate(compose_train([f"ckpt_path={ckpt}", "report.latency.num_examples=8",
                                     "report.latency.repeats=1", "report.latency.warmup=1"], out, "eval"))
    for name in ("pareto.csv", "pareto.md", "pareto.png"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader(open(out / "pareto.csv")))
    assert {row["rule"] for row in rows} == set(ALL_RULES)
    assert {"rule", "knob", "value", "metric", "avg_exit_layer", "layer_saving", "speedup", "flops"} <= set(rows[0])
    full = next(r for r in rows if r["rule"] == "full")
    assert float(full["layer_saving"]) == 0 and float(full["speedup"]) == 1
    timed = [r for r in rows if r.get("latency_b1_ms")]
    assert timed and all(r["rule"] == "policy" for r in timed) and float(timed[0]["wallclock_speedup_b32"]) > 0
    static = sorted((r for r in rows if r["rule"] == "static"), key=lambda r: int(r["value"]))
    assert [float(r["flops"]) for r in static] == sorted(float(r["flops"]) for r in static)
    assert "**yes**" in (out / "pareto.md").read_text()
    assert report["summary_within_1pt"]


def test_unknown_rule_and_empty_grid_are_refused():
    with pytest.raises(ValueError, match="unknown exit rule.*valid rules"):
        rule_grids(["entropy", "fastest"], {}, 4, 2)
    with pytest.raises(ValueError, match=r"exit rule\(s\) \['saturation'\] read signals that only generation computes"):
        rule_grids(["saturation"], {}, 4, 2)
    assert set(ALL_RULES) == set(ENCODER_RULES)  # the report compares every rule an encoder can run
    with pytest.raises(ValueError, match="grids.entropy is empty"):
        rule_grids(["entropy"], {"entropy": []}, 4, 2)


def test_checkpoint_of_another_backbone_or_task_is_refused(policy_checkpoint, tmp_path):
    ckpt, root = policy_checkpoint
    with pytest.raises(ValueError, match="expect.backbone='minilm_l6'"):
        evaluate(compose_train([f"ckpt_path={ckpt}", "+expect.backbone=minilm_l6"], tmp_path / "a", "eval"))
    other = tmp_path / "other.tsv"
    other.write_text("text\tlabel\n" + "".join(f"row {i}\t{i % 3}\n" for i in range(30)))
    with pytest.raises(ValueError, match="trained with task sst2"):
        evaluate(compose_train([f"ckpt_path={ckpt}", "+data._target_=ee_lightning.data.CsvDataModule",
                                f"+data.train_file={other}", "+data.text_column=text", "+data.label_column=label",
                                "+data.name=csv", "report.latency.enabled=false"], tmp_path / "b", "eval"))


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path=/no/such.ckpt"):
        evaluate(compose_train(["ckpt_path=/no/such.ckpt"], tmp_path / "c", "eval"))


def test_pareto_marks_dominated_points_and_never_the_oracle():
    points = [{"rule": "a", "metric": 0.8, "layer_saving": 0.5}, {"rule": "b", "metric": 0.7, "layer_saving": 0.4},
              {"rule": "c", "metric": 0.9, "layer_saving": 0.1}, {"rule": "oracle", "metric": 1.0, "layer_saving": 0.9}]
    mark_pareto(points)
    assert [p["pareto"] for p in points] == [True, False, True, False]
