"""Every task kind and headline metric trains end to end through every method.

A regression task once crashed at its first validation (its metric could not be logged) while
loading was tested and training was not: these runs would have caught it."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ee_lightning.app.train import train
from tests.conftest import compose_train

FAST = ["logger=csv", "trainer.enable_progress_bar=false", "report.latency.enabled=false", "backbone=tiny_bert"]

# (name, task kind, number of classes (None: regression), headline metric)
TASK_KINDS = [
    ("binary_acc", "classification", 2, "acc"),
    ("binary_f1", "classification", 2, "f1"),
    ("multiclass_acc", "classification", 4, "acc"),
    ("multiclass_mcc", "classification", 3, "mcc"),
    ("regression", "regression", None, "pearson_spearman"),
]
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def write_task_file(folder: Path, classes: int | None, rows: int = 40) -> Path:
    """A csv whose label follows its words: class = first word's group, or a score in [0, 5]."""
    rng = random.Random(0)
    lines = ["text,label"]
    for i in range(rows):
        words = rng.choices(WORDS, k=rng.randint(2, 6))
        if classes is None:
            label = f"{5 * WORDS.index(words[0]) / (len(WORDS) - 1):.2f}"
        else:
            label = str(WORDS.index(words[0]) % classes)
        lines.append(f"{' '.join(words)},{label}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def task_overrides(tmp_path: Path, kind: str, classes: int | None, metric: str) -> list[str]:
    path = write_task_file(tmp_path / "data", classes)
    return ["data=csv", f"data.train_file={path}", f"data.task_kind={kind}", f"data.metric={metric}",
            "data.validation_fraction=0.25", "data.test_fraction=0.25", "data.batch_size=8"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["finetune", "consistentee"])
@pytest.mark.parametrize("name,kind,classes,metric", TASK_KINDS, ids=[t[0] for t in TASK_KINDS])
def test_every_task_kind_trains_through_every_method(method, name, kind, classes, metric, tmp_path):
    run = tmp_path / "run"
    overrides = [*FAST, *task_overrides(tmp_path, kind, classes, metric), f"method={method}",
                 "method.finetune.epochs=1"]
    if method == "consistentee":
        overrides += ["method.policy.epochs=1", "method.joint.enabled=true", "method.policy.k=2"]
    results = train(compose_train(overrides, run))
    written = json.loads((run / "results.json").read_text())
    assert written["metric_name"] == metric
    assert len(written["layer_metrics"]) == 4
    assert all(isinstance(value, float) for value in written["layer_metrics"])
    if method == "consistentee":
        assert set(written["methods"]) >= {"consistentee", "full"}
        assert "joint" in results.checkpoints
        assert 1.0 <= written["methods"]["consistentee"]["avg_exit_layer"] <= 4.0
