"""The same seed gives the same results.json metrics; another seed gives others."""
from __future__ import annotations

import json

import pytest

from ee_lightning.app.train import train
from tests.conftest import compose_train, data_overrides


def run_metrics(tmp_path, name: str, seed: int) -> dict:
    run = tmp_path / name
    cfg = compose_train(["backbone=tiny_bert", *data_overrides("glue", tmp_path), "method=consistentee",
                         f"seed={seed}", "data.batch_size=8", "method.finetune.epochs=1", "method.policy.epochs=1",
                         "method.policy.batch_size=8", "trainer.enable_progress_bar=false", "logger=csv",
                         "report.latency.enabled=false"], run)
    train(cfg)
    results = json.loads((run / "results.json").read_text())
    # Everything but wall-clock times and file paths (which name the run directory).
    return {k: v for k, v in results.items() if k not in ("seconds", "checkpoints", "pareto")}


@pytest.mark.slow
def test_one_seed_gives_identical_metrics_and_another_seed_differs(tmp_path):
    first, again, other = (run_metrics(tmp_path, "a", 7), run_metrics(tmp_path, "b", 7),
                           run_metrics(tmp_path, "c", 8))
    assert first == again
    assert first["methods"] and first["layer_metrics"]
    different = {k for k in first if k != "seed" and first[k] != other[k]}
    assert different, "seed=8 reproduced seed=7's numbers: the seed does not reach training"
