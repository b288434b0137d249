"""Sweeps: what ee-train returns to a sweeper, the multirun summary, a 2-job multirun with offline
wandb runs per stage and job, and an Optuna search whose study continues across invocations."""
from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ee_lightning.app.sweep import objective_value, sweep_return, write_summary
from tests.conftest import ROOT, compose_train, write_sentiment_files

BASE = {"task": "sst2", "metric_name": "acc", "num_layers": 2, "backbone": "tiny_bert", "data": "glue", "seed": 42}
RESULTS = {**BASE, "full": 0.9, "objective": 0.85, "layer_metrics": [0.6, 0.9],
           "methods": {"consistentee": {"metric": 0.85, "layer_saving": 0.4, "avg_exit_layer": 1.2, "speedup": 1.67}}}


def test_sweep_return_one_or_several_objectives():
    assert sweep_return(RESULTS) == 0.85
    assert sweep_return({"full": 0.7}) == 0.7
    assert sweep_return(RESULTS, "consistentee_layer_saving") == 0.4
    assert sweep_return(RESULTS, ["consistentee_metric"]) == 0.85
    assert sweep_return(RESULTS, ["consistentee_metric", "consistentee_layer_saving"]) == [0.85, 0.4]
    assert objective_value(RESULTS, "methods.consistentee.speedup") == 1.67
    with pytest.raises(KeyError, match="consistentee_metric"):
        sweep_return({"full": 0.7}, ["consistentee_metric", "consistentee_layer_saving"])


def test_optuna_search_composes(tmp_path):
    cfg = compose_train(["hparams_search=consistentee_optuna", "backbone=tiny_bert"], tmp_path / "run")
    assert cfg.method.name == "consistentee"
    assert list(cfg.optimized_metrics) == ["consistentee_metric", "consistentee_layer_saving"]
    sweeper = cfg.hydra.sweeper
    assert list(sweeper.direction) == ["maximize", "maximize"]
    assert sweeper.storage.startswith("sqlite:///") and sweeper.storage.endswith("/optuna.db")
    assert set(sweeper.params) == {"method.policy.alpha", "method.tau", "method.policy.k", "method.policy.lr",
                                   "method.policy.depth_term"}
    assert "SweepSummary" in cfg.hydra.callbacks.sweep_summary._target_


@pytest.mark.parametrize("launcher,target", [("local", "JoblibLauncher"), ("slurm", "SlurmLauncher"),
                                             ("joblib", "JoblibLauncher"), ("submitit_slurm", "SlurmLauncher")])
def test_launchers_compose(launcher, target, tmp_path):
    cfg = compose_train([f"hydra/launcher={launcher}"], tmp_path / "run")
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "local":
        assert cfg.hydra.launcher.n_jobs == 2


def fake_job(sweep: Path, num: int, overrides: list[str], results: dict | None) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))


def test_summary_of_jobs_with_and_without_results(tmp_path):
    sweep = tmp_path / "sweep"
    better = json.loads(json.dumps(RESULTS))
    better["methods"]["consistentee"].update(metric=0.88, layer_saving=0.5)
    fake_job(sweep, 0, ["backbone=tiny_bert", "method.policy.alpha=0.01"], RESULTS)
    fake_job(sweep, 1, ["backbone=tiny_bert", "method.policy.alpha=0.05"], better)
    fake_job(sweep, 2, ["backbone=tiny_bert", "method.policy.alpha=0.1"], None)  # failed job
    fake_job(sweep, 10, ["backbone=tiny_bert", "method.policy.alpha=0.2"],
             {**BASE, "full": 0.8, "layer_metrics": [0.7, 0.8]})
    paths = write_summary(sweep)
    rows = list(csv.DictReader(open(paths["csv"], newline="")))
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]
    assert [r["swept"] for r in rows] == [f"method.policy.alpha={a}" for a in ("0.01", "0.05", "0.1", "0.2")]
    assert [r["status"] for r in rows] == ["done", "done", "no results", "done"]
    assert [r["pareto"] for r in rows] == ["False", "True", "", ""]
    assert rows[1]["consistentee_metric"] == "0.88" and rows[3]["full"] == "0.8"
    text = paths["md"].read_text()
    assert "| 1 | method.policy.alpha=0.05 | 0.8800 | 50.0% | 1.67x | 0.9000 | **yes** | done |" in text
    assert paths["png"].stat().st_size > 0


# --- end to end: ee-train -m in a subprocess -----------------------------------------------------
def wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def offline_runs(job_dir: Path) -> list[dict]:
    runs = []
    for path in sorted(job_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run = {"keys": set(), "exit_code": None, "dir": path.parent}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, group=record.run.run_group, job_type=record.run.job_type,
                           name=record.run.display_name)
            elif kind == "history":
                run["keys"].update(item.key or "/".join(item.nested_key) for item in record.history.item)
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        runs.append(run)
    return runs


def ee_train(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "EE_ROOT": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "ee_lightning.app.cli", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def tiny_args(tmp_path: Path) -> list[str]:
    folder = write_sentiment_files(tmp_path / "SST-2", n_train=40, n_eval=16)
    return ["backbone=tiny_bert", "data=glue", "data.task=sst2", f"data.data_dir={folder}",
            "method.policy.epochs=1", "method.finetune.epochs=1", "method.policy.batch_size=16",
            "report.latency.enabled=false", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


@pytest.mark.slow
def test_multirun_gives_each_job_its_wandb_runs_and_a_summary(tmp_path):
    sweep = tmp_path / "sweep"
    ee_train(["-m", "method=consistentee", *tiny_args(tmp_path), "method.policy.alpha=0.01,0.05", "logger=many",
              f"hydra.sweep.dir={sweep}"], tmp_path)
    ids = set()
    for job in ("0", "1"):
        runs = offline_runs(sweep / job)
        by_type = {run["job_type"]: run for run in runs}
        assert sorted(by_type) == ["consistentee-test", "finetune", "policy", "report"], runs
        assert len(runs) == 4 and all(run["exit_code"] == 0 for run in runs)  # each finished
        assert {run["group"] for run in runs} == {"rt_consistentee-sweep"}
        assert all(run["name"].startswith(f"rt_consistentee#{job},") for run in runs)
        policy = by_type["policy"]["keys"]
        assert {"policy/reward", "policy/task_term", "policy/depth_cost", "policy/entropy", "policy/p_exit_L1"} <= policy
        assert {"val/exit/hist/values", "train/exit/hist/values", "val/exit/frac_L1"} <= policy
        assert any(key.startswith("val/exit/bar") for key in policy)
        assert any(key.startswith("policy/reward_curve") for key in policy)
        assert any(key.startswith("val/acc_per_layer") for key in policy)
        assert "test/exit/hist/values" in by_type["consistentee-test"]["keys"]
        assert any(key.startswith("report/pareto/") for key in by_type["report"]["keys"])
        assert list((by_type["report"]["dir"] / "files" / "media" / "images").rglob("pareto*.png"))
        ids |= {run["id"] for run in runs}
        assert (sweep / job / "exit_histograms.jsonl").is_file() and (sweep / job / "reward_curve.csv").is_file()
    assert len(ids) == 8  # every stage of every job is its own run

    rows = list(csv.DictReader(open(sweep / "sweep.csv", newline="")))
    assert [(r["job"], r["swept"], r["status"]) for r in rows] == [
        ("0", "method.policy.alpha=0.01", "done"), ("1", "method.policy.alpha=0.05", "done")]
    assert all(0 <= float(r["consistentee_layer_saving"]) <= 1 for r in rows)
    assert (sweep / "sweep.md").is_file() and (sweep / "sweep.png").stat().st_size > 0


@pytest.mark.slow
def test_a_failed_job_closes_its_wandb_run_and_the_next_job_gets_its_own(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "EE_ROOT": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "ee_lightning.app.cli", "-m", "method=consistentee", *tiny_args(tmp_path),
                          "+callbacks.fail._target_=tests.conftest.FailInStage", "+callbacks.fail.stage=policy,none",
                          "logger=wandb", f"hydra.sweep.dir={sweep}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "deliberate failure in stage policy" in out.stderr
    failed = {run["job_type"]: run["exit_code"] for run in offline_runs(sweep / "0")}
    assert failed == {"finetune": 0, "policy": 1}  # the policy stage's run is closed, marked failed
    assert sorted(run["job_type"] for run in offline_runs(sweep / "1")) == [
        "consistentee-test", "finetune", "policy", "report"]
    rows = list(csv.DictReader(open(sweep / "sweep.csv", newline="")))  # written after each job
    assert [r["status"] for r in rows] == ["failed", "done"]
    assert "RuntimeError: deliberate failure in stage policy" in rows[0]["error"] and rows[1]["error"] == ""


@pytest.mark.slow
def test_optuna_study_continues_in_its_storage(tmp_path):
    import optuna

    logs = tmp_path / "logs"
    common = ["hparams_search=consistentee_optuna", *tiny_args(tmp_path), "logger=csv", f"paths.log_dir={logs}",
              "hydra.sweeper.study_name=test_study"]
    ee_train([*common, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'first'}"], tmp_path)
    storage = f"sqlite:///{logs}/optuna.db"
    study = optuna.load_study(study_name="test_study", storage=storage)
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" and len(t.values) == 2 for t in study.trials)
    assert {"method.policy.alpha", "method.tau", "method.policy.k", "method.policy.lr"} <= set(study.trials[0].params)
    assert "3 trials in all" in (tmp_path / "first" / "sweep.md").read_text()
    assert (tmp_path / "first" / "optimization_results.yaml").is_file()

    ee_train([*common, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'second'}"], tmp_path)
    study = optuna.load_study(study_name="test_study", storage=storage)
    assert len(study.trials) == 4
    assert "4 trials in all" in (tmp_path / "second" / "sweep.md").read_text()


@pytest.mark.slow
def test_a_multirun_started_anywhere_writes_under_its_launch_directory(tmp_path):
    # No EE_ROOT: the sweep directory is resolved before Hydra sets its runtime config, so the
    # launch-directory root must not depend on `${hydra:runtime.cwd}`.
    env = {key: value for key, value in os.environ.items() if key != "EE_ROOT"}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "ee_lightning.app.cli", "-m", *tiny_args(tmp_path), "debug=fdr",
                          "seed=1,2", "logger=csv"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweeps = list((tmp_path / "outputs").glob("*/multiruns/*"))
    assert len(sweeps) == 1, sweeps
    assert sorted(p.name for p in sweeps[0].iterdir() if p.is_dir()) == ["0", "1"]
    assert (sweeps[0] / "sweep.csv").is_file()
