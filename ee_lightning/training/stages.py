"""The stages of a run, each a LightningModule fitted by its own Trainer.

`method=finetune` runs stage 1. `method=consistentee` runs stage 1 (or starts from
`init_from`), the memorized layers, policy training, optionally the joint stage, then
evaluates the policy against the other exit rules on the test split. A ledger in the run
directory (`stages.json`) records finished stages and their checkpoints, so rerunning into
the same directory (`hydra.run.dir=<run dir>`) resumes from the stage that was interrupted.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ee_lightning.exits import hardness as hardness_lib
from ee_lightning.app.evaluate import run_report
from ee_lightning.files import atomic_torch_save, atomic_write_text
from ee_lightning.evaluation.rule_points import evaluate_methods
from ee_lightning.inference.layer_cache import CachedLayerDataset, collect_layer_outputs
from ee_lightning.training.systems.base import EarlyExitSystem, read_checkpoint
from ee_lightning.training.systems.finetune import FinetuneSystem
from ee_lightning.training.systems.joint import JointSystem
from ee_lightning.training.systems.policy import PolicySystem
from ee_lightning.training.trainers import best_or_last, finish_loggers, make_trainer

log = logging.getLogger(__name__)


class StageLedger:
    """stages.json: which stages of this run finished, and the checkpoint each left."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "stages.json"
        self.stages = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def done(self, stage: str) -> bool:
        return stage in self.stages

    def checkpoint(self, stage: str) -> str | None:
        return self.stages.get(stage, {}).get("checkpoint")

    def mark(self, stage: str, checkpoint: str | None, **info) -> None:
        self.stages[stage] = {"checkpoint": checkpoint, **info}
        atomic_write_text(self.path, json.dumps(self.stages, indent=2))


def is_global_zero() -> bool:
    return not torch.distributed.is_available() or not torch.distributed.is_initialized() or \
        torch.distributed.get_rank() == 0


def interrupted_checkpoint(run_dir: Path, stage: str) -> str | None:
    """The last checkpoint a stage wrote before the run stopped, to resume its fit."""
    last = Path(run_dir) / "checkpoints" / stage / "last.ckpt"
    return str(last) if last.is_file() else None


def load_checkpoint_weights(system: EarlyExitSystem, checkpoint: str) -> None:
    """Load a checkpoint of any stage into `system`, refusing one of another backbone or task."""
    state = read_checkpoint(checkpoint, key="init_from")
    check_compatible(system, state["hyper_parameters"], checkpoint)
    system.load_state_dict(state["state_dict"])


def check_compatible(system: EarlyExitSystem, hparams: dict, checkpoint: str) -> None:
    theirs_cfg, theirs_task = hparams["cfg"], hparams["task"]
    mine = (system.cfg.backbone.get("name"), system.task.name, system.task.output_size)
    theirs = (theirs_cfg["backbone"].get("name"), theirs_task["name"], 1 if theirs_task["kind"] == "regression"
              else theirs_task["num_labels"])
    if mine != theirs:
        raise ValueError(
            f"{checkpoint} was trained with backbone={theirs[0]} on task {theirs[1]} ({theirs[2]} outputs), "
            f"but this run has backbone={mine[0]} on task {mine[1]} ({mine[2]} outputs); "
            "pass the matching backbone=/data= overrides or another checkpoint"
        )


def fit_stage(cfg, system, stage: str, run_dir: Path, ledger: StageLedger, datamodule=None, **fit_kwargs):
    """Fit one stage (resuming its interrupted fit if any) and record its checkpoint."""
    started = time.perf_counter()
    trainer = make_trainer(cfg, stage, run_dir, **stage_trainer_overrides(cfg, stage))
    trainer.fit(system, datamodule=datamodule, ckpt_path=interrupted_checkpoint(run_dir, stage), **fit_kwargs)
    checkpoint = best_or_last(trainer)
    ledger.mark(stage, checkpoint, seconds=round(time.perf_counter() - started, 1))
    finish_loggers(trainer)
    return trainer, checkpoint


def stage_trainer_overrides(cfg, stage: str) -> dict:
    """Each fitted stage's epochs come from its own knob, method.<stage>.epochs (the trainer config has none)."""
    return {"max_epochs": cfg.method[stage].epochs}


def test_layers(cfg, system, stage: str, run_dir: Path, datamodule) -> list[float]:
    trainer = make_trainer(cfg, f"{stage}-test", run_dir)
    trainer.test(system, datamodule=datamodule, verbose=False)
    finish_loggers(trainer)
    return system.layer_results("test")


def base_results(cfg, system: EarlyExitSystem, test: list[float]) -> dict:
    return {
        "task": system.task.name,
        "metric_name": system.task.metric,
        "num_layers": system.num_layers,
        "layer_metrics": test,
        "full": test[-1],
        "backbone": cfg.backbone.name,
        "data": cfg.data.name,
        "seed": cfg.seed,
    }


def run_finetune(cfg: DictConfig, datamodule, run_dir: Path) -> tuple[FinetuneSystem, dict]:
    """Stage 1: fit backbone + heads, then test every layer."""
    ledger = StageLedger(run_dir)
    system = FinetuneSystem(cfg, datamodule.task)
    trainer, checkpoint = fit_stage(cfg, system, "finetune", run_dir, ledger, datamodule=datamodule)
    val = system.layer_results("val") if any(k.startswith("val/") for k in trainer.callback_metrics) else None
    results = base_results(cfg, system, test_layers(cfg, system, "finetune", run_dir, datamodule))
    results.update(val_layer_metrics=val, checkpoints={"finetune": checkpoint},
                   seconds={"finetune": ledger.stages["finetune"]["seconds"]})
    return system, results


def stage_one(cfg, datamodule, run_dir: Path, ledger: StageLedger) -> tuple[dict | None, str | None]:
    """The stage-1 checkpoint (init_from, this run's finished stage 1, or a new fit), and the fitted
    weights when the fit happened now (fast_dev_run writes no checkpoint)."""
    if cfg.get("init_from"):
        checkpoint = str(cfg.init_from)
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"init_from={checkpoint} does not exist; give the path of a stage-1 .ckpt file")
        return None, checkpoint
    if ledger.done("finetune") and ledger.checkpoint("finetune"):
        return None, ledger.checkpoint("finetune")
    system = FinetuneSystem(cfg, datamodule.task)
    _, checkpoint = fit_stage(cfg, system, "finetune", run_dir, ledger, datamodule=datamodule)
    return system.state_dict(), checkpoint


def training_set_outputs(cfg, system: PolicySystem, datamodule, checkpoint: str | None):
    """All-layer outputs (pooled states, head logits) and memorized layers of the training set under
    the stage-1 weights. Both are saved beside the stage-1 checkpoint, so every run that starts from
    it (`init_from`, e.g. a sweep over policy knobs) skips the backbone pass and only trains the policy."""
    split_size = datamodule.split_size("train")
    meta = None
    if checkpoint:
        meta = hardness_lib.hardness_meta(checkpoint, system.num_layers, system.task, split_size,
                                          cfg.method.hardness.tolerance, hash_contents=False, data=cfg.data.name,
                                          max_train_samples=cfg.data.get("max_train_samples"),
                                          pooling=cfg.head.pooling)
    outputs_path = Path(checkpoint).with_suffix(".train_outputs.pt") if checkpoint else None
    cache = load_artefact(outputs_path, meta) if outputs_path else None
    if cache is None:
        train_loader = datamodule.dataloader("train", shuffle=False, by_length=True)
        cache = collect_layer_outputs(system.model, train_loader, keep_pooled=True)
        if outputs_path and cfg.method.hardness.cache_train_outputs and is_global_zero():
            save_artefact(outputs_path, cache, meta)
    else:
        rank_zero_info(f"training-set layer outputs reused from {outputs_path}")
    return cache, memorized_layers(cfg, system, cache, checkpoint, meta, split_size)


def load_artefact(path: Path, meta: dict) -> dict | None:
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=False)
    return saved["tensors"] if json.loads(json.dumps(saved.get("meta"))) == json.loads(json.dumps(meta)) else None


def save_artefact(path: Path, tensors: dict, meta: dict) -> None:
    atomic_torch_save({"meta": meta, "tensors": tensors}, path)


def memorized_layers(cfg, system: PolicySystem, cache: dict, checkpoint: str | None, meta: dict | None,
                     split_size: int) -> torch.Tensor:
    """The memorized layer of every training row (a table indexed by row idx), saved beside the
    stage-1 checkpoint and reused."""
    artefact = Path(checkpoint).with_suffix(".hardness.pt") if checkpoint else None
    table = hardness_lib.load_hardness(artefact, meta) if artefact else None
    if table is not None and bool((table[cache["idx"]] > 0).all()):
        rank_zero_info(f"memorized layers reused from {artefact}")
        return table
    correct = hardness_lib.correct_table(system.task, cache["logits"], cache["labels"], cfg.method.hardness.tolerance)
    memorized = hardness_lib.memorized_layer(correct)
    if artefact and is_global_zero():
        hardness_lib.save_hardness(artefact, memorized, cache["idx"], meta)
        rank_zero_info(f"memorized layers saved to {artefact}")
    table = torch.zeros(max(split_size, int(cache["idx"].max()) + 1), dtype=torch.long)
    table[cache["idx"]] = memorized
    return table


def run_consistentee(cfg: DictConfig, datamodule, run_dir: Path) -> tuple[EarlyExitSystem, dict]:
    ledger = StageLedger(run_dir)
    task = datamodule.task
    seconds = {}

    started = time.perf_counter()
    fitted, stage1_checkpoint = stage_one(cfg, datamodule, run_dir, ledger)
    seconds["finetune"] = ledger.stages.get("finetune", {}).get("seconds", round(time.perf_counter() - started, 1))

    # Hardness and the policy's training data come from one all-layers pass over the training set.
    system = PolicySystem(cfg, task)
    if fitted is not None:
        system.load_state_dict(fitted)
    else:
        load_checkpoint_weights(system, stage1_checkpoint)
    started = time.perf_counter()
    cache, table = training_set_outputs(cfg, system, datamodule, stage1_checkpoint)
    memorized = table[cache["idx"]]
    seconds["hardness"] = round(time.perf_counter() - started, 1)
    hardness_hist = hardness_lib.histogram(memorized, system.num_layers).tolist()
    rank_zero_info(f"memorized-layer histogram (layers 1..{system.num_layers}): {hardness_hist}")

    if ledger.done("policy"):
        load_checkpoint_weights(system, ledger.checkpoint("policy"))
    else:
        policy_loader = DataLoader(CachedLayerDataset(cache, memorized), batch_size=cfg.method.policy.batch_size,
                                   shuffle=True)
        fit_stage(cfg, system, "policy", run_dir, ledger, train_dataloaders=policy_loader,
                  val_dataloaders=datamodule.val_dataloader())
    seconds["policy"] = ledger.stages["policy"].get("seconds")
    del cache

    if cfg.method.joint.enabled:
        joint = JointSystem(cfg, task)
        joint.load_state_dict(system.state_dict())
        joint.set_memorized(table)
        if ledger.done("joint"):
            load_checkpoint_weights(joint, ledger.checkpoint("joint"))
        else:
            fit_stage(cfg, joint, "joint", run_dir, ledger, datamodule=datamodule)
        seconds["joint"] = ledger.stages["joint"].get("seconds")
        system = joint

    started = time.perf_counter()
    results = base_results(cfg, system, test_layers(cfg, system, "consistentee", run_dir, datamodule))
    test_cache = collect_layer_outputs(system.model, datamodule.dataloader("test", by_length=True))
    results.update(evaluate_methods(test_cache, task, tau=cfg.method.tau))
    seconds["evaluate"] = round(time.perf_counter() - started, 1)
    if cfg.get("report") and is_global_zero():
        started = time.perf_counter()
        title = f"{cfg.backbone.name} on {task.name} (test)"
        report = run_report(system, test_cache, datamodule, "test", run_dir, cfg.report, tau=cfg.method.tau,
                            title=title)
        results["pareto"] = {"files": report["files"], "summary_within_1pt": report["summary_within_1pt"]}
        latency = next((p for p in report["points"] if "latency_b1_ms" in p), None)
        if latency:
            results["methods"]["consistentee"]["wallclock"] = {
                k: latency[k] for k in latency if k.startswith(("latency_", "plain_", "wallclock_"))}
        seconds["report"] = round(time.perf_counter() - started, 1)
    results.update(
        hardness_histogram=hardness_hist,
        checkpoints={stage: info.get("checkpoint") for stage, info in ledger.stages.items()},
        seconds=seconds,
    )
    if stage1_checkpoint:
        results["checkpoints"].setdefault("finetune", stage1_checkpoint)
    results["objective"] = results["methods"]["consistentee"]["metric"]
    return system, results


METHODS = {"finetune": run_finetune, "consistentee": run_consistentee}
