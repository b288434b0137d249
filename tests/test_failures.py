"""Failures that lose nothing: an unwritable or full output directory is named before training or at
the failing write (never a truncated file); wandb failing to start does not stop training; a failed
sweep job's error is listed in the sweep summary."""
from __future__ import annotations

import csv
import errno
import json
import logging
import os
import time

import pytest
import torch
from omegaconf import open_dict

from ee_lightning.app.sweep import write_summary
from ee_lightning.app.train import train
from ee_lightning.files import atomic_write_text
from tests.conftest import compose_train, data_overrides

FAST = ["backbone=tiny_bert", "method=finetune", "data.batch_size=8", "trainer.enable_progress_bar=false",
        "report.latency.enabled=false", "callbacks.step_checkpoint.every_n_train_steps=2"]


def test_unwritable_run_directory_fails_at_once_naming_it(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the run directory's parent should be")
    cfg = compose_train([*FAST, *data_overrides("glue", tmp_path), "logger=csv"], tmp_path / "run")
    with open_dict(cfg):
        cfg.paths.output_dir = str(blocker / "run")
    started = time.perf_counter()
    with pytest.raises(OSError, match=f"output directory {blocker / 'run'} is not writable.*hydra.run.dir"):
        train(cfg)
    assert time.perf_counter() - started < 5  # before any data or model work


def full_disk_from_call(monkeypatch, n: int) -> None:
    """os.fsync (every atomic write calls it) fails with ENOSPC from its n-th call on."""
    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] >= n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_names_the_file_and_keeps_its_earlier_version(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_text(path, '{"full": 0.9}')
    full_disk_from_call(monkeypatch, 1)
    with pytest.raises(OSError, match=f"No space left on device: could not write {path}"):
        atomic_write_text(path, '{"full": 0.1, "much": "more"}')
    assert path.read_text() == '{"full": 0.9}'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_disk_full_at_a_checkpoint_stops_training_naming_it_and_keeps_the_last_one(tmp_path, monkeypatch):
    from ee_lightning.training import resume

    run = tmp_path / "run"
    cfg = compose_train([*FAST, *data_overrides("glue", tmp_path), "logger=csv"], run)
    saves = {"n": 0}
    real_save = resume.atomic_torch_save

    def save(obj, path):  # the disk fills up just before the second checkpoint
        saves["n"] += 1
        if saves["n"] == 2:
            full_disk_from_call(monkeypatch, 1)
        return real_save(obj, path)

    monkeypatch.setattr(resume, "atomic_torch_save", save)
    with pytest.raises(OSError, match=f"could not write {run / 'checkpoints' / 'finetune'}"):
        train(cfg)
    monkeypatch.undo()
    last = torch.load(run / "checkpoints" / "finetune" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2  # the first checkpoint, whole
    assert not list((run / "checkpoints" / "finetune").glob(".*.tmp"))


def test_wandb_failing_to_start_does_not_stop_training(tmp_path, monkeypatch, caplog):
    import wandb

    def broken_init(*args, **kwargs):
        raise wandb.errors.CommError("wandb service unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    run = tmp_path / "run"
    cfg = compose_train([*FAST, *data_overrides("glue", tmp_path), "logger=many", "method.finetune.epochs=1"], run)
    with caplog.at_level(logging.WARNING, logger="ee_lightning.training.trainers"):
        results = train(cfg)
    assert results.layer_metrics and (run / "results.json").is_file()
    assert (run / "csv" / "finetune" / "metrics.csv").is_file()  # the other logger logged
    assert "wandb did not start for stage finetune (CommError: wandb service unreachable); training continues " \
           "with the other loggers (csv)" in caplog.text


def test_a_failed_job_records_its_error_and_the_summary_lists_it(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from ee_lightning.training.callbacks.job_report import JobReport

    sweep = tmp_path / "sweep"
    for num, alpha in ((0, "0.01"), (1, "0.05")):
        job_dir = sweep / str(num)
        (job_dir / ".hydra").mkdir(parents=True)
        (job_dir / ".hydra" / "overrides.yaml").write_text(f"- method.policy.alpha={alpha}\n")
    (sweep / "1" / "results.json").write_text(json.dumps({
        "task": "sst2", "metric_name": "acc", "num_layers": 1, "layer_metrics": [0.8], "full": 0.8,
        "backbone": "tiny_bert", "data": "glue", "seed": 42}))
    try:
        raise ValueError("method.policy.sampler='nope': use bernoulli or epsilon_greedy")
    except ValueError as error:
        failure = JobReturn(status=JobStatus.FAILED, _return_value=error)
    config = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(sweep / "0")}}, "logger": None})
    JobReport().on_job_end(config, failure)
    assert (sweep / "0" / "error.txt").read_text().startswith(
        "ValueError: method.policy.sampler='nope': use bernoulli or epsilon_greedy\n\nTraceback")

    write_summary(sweep, plot=False)
    rows = list(csv.DictReader(open(sweep / "sweep.csv", newline="")))
    assert [(r["job"], r["status"], r["error"]) for r in rows] == [
        ("0", "failed", "ValueError: method.policy.sampler='nope': use bernoulli or epsilon_greedy"), ("1", "done", "")]
    assert "job 0 (method.policy.alpha=0.01): `ValueError: method.policy.sampler='nope'" in \
        (sweep / "sweep.md").read_text()

    # The same job rerun successfully drops its old error.
    JobReport(wandb_report=False).on_job_end(config, JobReturn(status=JobStatus.COMPLETED, _return_value=0.5))
    assert not (sweep / "0" / "error.txt").exists()
