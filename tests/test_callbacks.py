"""Tracking callbacks: exit histograms (overall and by memorized-layer bucket), reward curve,
per-layer metric curves; with logger=csv and logger=none; state for resume; trainers' wandb naming."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from ee_lightning.training.callbacks import ExitHistogram, LayerMetricCurves
from ee_lightning.training.callbacks.job_report import finish_open_wandb_run
from ee_lightning.training.systems.base import bucket_exit_counts
from ee_lightning.app.train import train
from tests.conftest import compose_train, write_sentiment_files


def test_bucket_exit_counts_by_hand():
    exits = torch.tensor([[1, 2, 4], [1, 4, 4]])  # K=2 rollouts of B=3 rows
    buckets = torch.tensor([0, 2, 2])  # easy, hard, hard
    counts = bucket_exit_counts(exits, buckets.view(1, -1), 4)
    assert counts.tolist() == [[2, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 3]]
    assert counts.sum() == exits.numel()


def test_callback_state_round_trips():
    histogram = ExitHistogram()
    histogram._train_total, histogram._train_buckets, histogram._train_epoch = (
        torch.tensor([3, 1]), torch.tensor([[1, 0], [0, 0], [2, 1]]), 4)
    restored = ExitHistogram()
    restored.load_state_dict(json.loads(json.dumps(histogram.state_dict())))
    assert restored._train_total.tolist() == [3, 1] and restored._train_buckets.tolist() == [[1, 0], [0, 0], [2, 1]]
    assert restored._train_epoch == 4
    curves = LayerMetricCurves()
    curves.history.append({"epoch": 0, "step": 3, "values": [0.5, 0.7]})
    again = LayerMetricCurves()
    again.load_state_dict(curves.state_dict())
    assert again.history == curves.history


def test_unbucketed_evaluation_counts_give_the_overall_histogram_only(tmp_path):
    """A system whose evaluated rows have no memorized layer (generated tokens) keeps one row of counts."""
    import lightning as L

    class Unbucketed(L.LightningModule):
        evaluates_policy, exit_buckets, num_exits, exit_layers = True, False, 3, [2, 4, 6]

        def __init__(self):
            super().__init__()
            self.exit_counts = {}

        def test_step(self, batch, batch_idx):
            counts = torch.bincount(batch - 1, minlength=3)
            self.exit_counts["test"] = counts + self.exit_counts["test"] if "test" in self.exit_counts else counts

    histogram = ExitHistogram(wandb_charts=False)
    histogram.bind_stage("lm_generation", tmp_path)
    trainer = L.Trainer(logger=False, callbacks=[histogram], enable_progress_bar=False, enable_model_summary=False)
    batches = [torch.tensor([1, 1, 3]), torch.tensor([2, 1])]  # exit indices 1..3
    metrics = trainer.test(Unbucketed(), dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))[0]
    (line,) = [json.loads(text) for text in (tmp_path / "exit_histograms.jsonl").read_text().splitlines()]
    assert line["stage"] == "lm_generation" and line["split"] == "test" and line["counts"] == [3, 1, 1]
    assert line["buckets"] == {} and line["exit_layers"] == [2, 4, 6] and line["num_exits"] == 3
    assert metrics["test/exit/frac_L1"] == pytest.approx(0.6)


def test_finish_open_wandb_run_marks_a_failed_job(tmp_path):
    import wandb

    wandb.init(mode="offline", dir=str(tmp_path), project="ee-lightning-test")
    assert wandb.run is not None
    finish_open_wandb_run(failed=True)
    assert wandb.run is None


def test_wandb_mode_disabled_leaves_only_the_csv_logger(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    from ee_lightning.training.trainers import build_loggers, run_name

    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_train(["logger=many", "backbone=tiny_bert", "paths.cache_dir=/some/path", "init_from=/a/b.ckpt", "seed=3"], tmp_path / "run")
    loggers = build_loggers(cfg, "policy")
    assert [type(logger) for logger in loggers] == [CSVLogger]
    assert run_name(cfg) == "rt_consistentee,logger=many,backbone=tiny_bert,seed=3"  # no path-valued overrides


def tiny_consistentee(tmp_path, logger: str) -> list[str]:
    folder = write_sentiment_files(tmp_path / "SST-2", n_train=40, n_eval=16)
    return ["method=consistentee", "backbone=tiny_bert", "data=glue", "data.task=sst2", f"data.data_dir={folder}",
            "method.finetune.epochs=1", "method.policy.epochs=2", "method.policy.validate_every=1",
            "method.policy.batch_size=16", "method.policy.k=8", "report.latency.enabled=false", f"logger={logger}",
            "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["csv", "none"])
def test_tracking_files_with_csv_and_without_logger(logger, tmp_path):
    run = tmp_path / "run"
    train(compose_train(tiny_consistentee(tmp_path, logger), run))

    # exit histograms: every validation and training epoch of the policy stage, and the test
    records = read_jsonl(run / "exit_histograms.jsonl")
    seen = [(r["stage"], r["split"]) for r in records]
    assert seen.count(("policy", "val")) == 2 and seen.count(("policy", "train")) == 2
    assert seen.count(("consistentee-test", "test")) == 1
    assert not any(stage == "finetune" for stage, _ in seen)
    for record in records:
        assert len(record["counts"]) == record["num_exits"] == 4
        if record["split"] != "train":
            assert sum(record["counts"]) == 16  # every evaluation row exits once
        assert set(record["buckets"]) == {"easy", "medium", "hard"}
        assert [sum(c) for c in zip(*record["buckets"].values())] == record["counts"]
    train_records = [r for r in records if r["split"] == "train"]
    assert all(sum(r["counts"]) == 40 * 8 for r in train_records)  # K=8 rollouts of 40 rows per epoch

    # reward curve: one row per policy step (40 rows / batch 16 = 3 steps per epoch)
    with open(run / "reward_curve.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {r["stage"] for r in rows} == {"policy"}
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("reward", "task_term", "depth_cost", "advantage_std", "loss", "entropy", "p_exit_L1", "p_exit_L4"):
        assert all(r[key] not in ("", "nan") for r in rows), key

    if logger == "csv":
        policy_rows = list(csv.DictReader(open(run / "csv" / "policy" / "metrics.csv", newline="")))
        columns = set(policy_rows[0])
        assert {f"val/exit/frac_L{layer}" for layer in range(1, 5)} <= columns
        assert {f"train/exit/frac_L{layer}" for layer in range(1, 5)} <= columns
        assert any(c.startswith(("train/exit/easy/", "train/exit/hard/", "train/exit/medium/")) for c in columns)
        assert {"policy/reward", "policy/task_term", "policy/depth_cost", "policy/advantage_std", "policy/loss",
                "policy/entropy", "policy/p_exit_L1"} <= columns
        val = [r for r in policy_rows if r["val/exit/frac_L1"]]
        assert len(val) == 2
        assert sum(float(val[-1][f"val/exit/frac_L{layer}"]) for layer in range(1, 5)) == pytest.approx(1.0)
        test_columns = open(run / "csv" / "consistentee-test" / "metrics.csv").readline()
        assert "test/exit/frac_L1" in test_columns
    else:
        assert not (run / "csv").exists() and not (run / "wandb").exists()


@pytest.mark.slow
def test_exit_histograms_under_ddp_count_every_row_once(tmp_path):
    """trainer=ddp with 2 CPU processes: counts are summed over processes (21 rows: unequal shards)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    data = write_sentiment_files(tmp_path / "SST-2", n_train=40, n_eval=21)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "EE_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "ee_lightning.app.cli", "method=consistentee", "backbone=tiny_bert", "data=glue",
               "data.task=sst2", f"data.data_dir={data}", "data.batch_size=4", "data.eval_batch_size=4",
               "method.policy.epochs=1", "method.policy.batch_size=8", "method.policy.k=8", "report.latency.enabled=false", "trainer=ddp",
               "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv", "trainer.enable_progress_bar=false",
               f"hydra.run.dir={run}"]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = {(r["stage"], r["split"]): r for r in read_jsonl(run / "exit_histograms.jsonl")}
    assert sorted(records) == [("consistentee-test", "test"), ("policy", "train"), ("policy", "val")]
    assert sum(records["policy", "val"]["counts"]) == 21 == sum(records["consistentee-test", "test"]["counts"])
    assert sum(records["policy", "train"]["counts"]) == 40 * 8
    val = [r for r in csv.DictReader(open(run / "csv" / "policy" / "metrics.csv")) if r.get("val/exit/frac_L1")]
    assert len(val) == 1
    # Rank 0 alone replays the rules at the end; its metrics must not wait for the other process.
    assert (run / "pareto.csv").is_file() and json.loads((run / "results.json").read_text())["methods"]
