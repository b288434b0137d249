"""trainer=ddp: stage 1 with 2 CPU processes; metrics cover the whole validation set, once."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, write_sentiment_files


@pytest.mark.slow
def test_ddp_two_cpu_processes_sync_metrics_over_the_whole_split(tmp_path):
    data = write_sentiment_files(tmp_path / "SST-2", n_train=40, n_eval=21)  # odd: shards are unequal
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "EE_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "ee_lightning.app.cli", "method=finetune", "backbone=tiny_bert", "data=glue",
               "data.task=sst2", f"data.data_dir={data}", "data.batch_size=4", "data.eval_batch_size=4",
               "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv",
               "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results.layer_metrics) == 4
    rows = list(csv.DictReader(open(run_dir / "csv" / "finetune" / "metrics.csv")))
    val_counts = [float(r["val/num_examples"]) for r in rows if r.get("val/num_examples")]
    assert val_counts and all(count == 21 for count in val_counts), val_counts
    test_rows = list(csv.DictReader(open(run_dir / "csv" / "finetune-test" / "metrics.csv")))
    assert [float(r["test/num_examples"]) for r in test_rows if r.get("test/num_examples")] == [21]
