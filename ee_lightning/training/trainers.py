"""Trainers, loggers and callbacks for one stage of a run, instantiated from the config tree."""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from ee_lightning.files import atomic_write_text
from ee_lightning.training.resume import AtomicCheckpointIO, ResumeState

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig, stage: str) -> list:
    """Each stage logs to its own CSV folder and its own wandb run (job_type = stage)."""
    loggers = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if logger_cfg is None or "_target_" not in logger_cfg:
            continue
        logger_cfg = OmegaConf.create(OmegaConf.to_container(logger_cfg, resolve=True))
        with open_dict(logger_cfg):
            if logger_cfg._target_.endswith("CSVLogger"):
                logger_cfg.version = free_version(Path(logger_cfg.save_dir) / logger_cfg.name, stage)
            if logger_cfg._target_.endswith("WandbLogger"):
                if os.environ.get("WANDB_MODE") == "disabled":
                    continue
                logger_cfg.job_type = stage
                logger_cfg.name = f"{logger_cfg.get('name') or run_name(cfg)}-{stage}"
                logger_cfg.group = run_group(cfg, logger_cfg.get("group"))
                # A rerun into the same run directory continues the stage's wandb run, not a new one.
                logger_cfg.id = stage_run_id(Path(cfg.paths.output_dir), stage)
                logger_cfg.resume = "allow"
                Path(logger_cfg.save_dir).mkdir(parents=True, exist_ok=True)
        if logger_cfg._target_.endswith("WandbLogger"):
            logger = start_wandb(logger_cfg, cfg, stage)
            if logger is None:
                continue
        else:
            logger = instantiate(logger_cfg)
        loggers.append(logger)
    return loggers


def start_wandb(logger_cfg: DictConfig, cfg: DictConfig, stage: str):
    """A started WandbLogger, or None when wandb cannot start: a run never stops for its tracker."""
    try:
        logger = instantiate(logger_cfg)
        # The run's config is the resolved config tree (filterable by e.g. method.policy.alpha); this
        # starts the wandb run, so a failing start shows here.
        logger.log_hyperparams(run_config(cfg, stage))
        return logger
    except Exception as error:  # wandb raises many kinds (network, auth, service); none must end the run
        others = [name for name, c in (cfg.get("logger") or {}).items()
                  if c is not None and not str(c.get("_target_", "")).endswith("WandbLogger")]
        log.warning(f"wandb did not start for stage {stage} ({type(error).__name__}: {error}); training continues "
                    f"with the other loggers ({', '.join(others) or 'none'})")
        return None


def stage_run_id(run_dir: Path, stage: str) -> str:
    """The wandb run id of `stage` in this run directory, made once and kept in wandb_ids.json."""
    path = Path(run_dir) / "wandb_ids.json"
    ids = json.loads(path.read_text()) if path.is_file() else {}
    if stage not in ids:
        ids[stage] = uuid.uuid4().hex[:12]
        atomic_write_text(path, json.dumps(ids, indent=2))
    return ids[stage]


def _hydra_config():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get()
    except ValueError:
        return None


def _is_multirun(hydra_cfg) -> bool:
    from hydra.types import RunMode

    return hydra_cfg is not None and hydra_cfg.get("mode") == RunMode.MULTIRUN


def run_group(cfg: DictConfig, group: str | None) -> str | None:
    """The wandb group: the experiment's (task_name); in a multirun, plus the sweep directory's name."""
    hydra_cfg = _hydra_config()
    if _is_multirun(hydra_cfg) and group == cfg.get("task_name"):
        return f"{group}-{Path(str(hydra_cfg.sweep.dir)).name}"[:128]
    return group


def run_config(cfg: DictConfig, stage: str) -> dict:
    """The resolved config tree (without hydra's node), the job's overrides and the stage."""
    config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    hydra_cfg = _hydra_config()
    overrides = list(hydra_cfg.overrides.task) if hydra_cfg is not None else []
    return {**config, "stage": stage, "overrides": overrides}


def free_version(folder: Path, stage: str) -> str:
    """`stage`, or `stage-resumed-N` when a resumed stage would otherwise overwrite its earlier logs."""
    version, n = stage, 0
    while (folder / version / "metrics.csv").exists():
        n += 1
        version = f"{stage}-resumed-{n}"
    return version


def run_name(cfg: DictConfig) -> str:
    """A readable run name: the experiment's task name (#job in a multirun) plus the command-line
    overrides, less hydra's, paths and other path-valued ones."""
    hydra_cfg = _hydra_config()
    name, overrides = cfg.task_name, []
    if hydra_cfg is not None:
        overrides = [o for o in hydra_cfg.overrides.task
                     if not o.lstrip("+~").startswith(("hydra.", "paths.")) and "/" not in o.partition("=")[2]]
        if _is_multirun(hydra_cfg) and hydra_cfg.job.get("num") is not None:
            name = f"{name}#{hydra_cfg.job.num}"
    return ",".join([name, *overrides])[:120]


def build_callbacks(cfg: DictConfig, stage: str, run_dir: Path) -> list:
    callbacks = []
    for callback_cfg in (cfg.get("callbacks") or {}).values():
        if callback_cfg is None or "_target_" not in callback_cfg:
            continue
        callback = instantiate(callback_cfg)
        if hasattr(callback, "bind_stage"):  # ee_lightning.training.callbacks: they name the stage in what they write
            callback.bind_stage(stage, run_dir)
        if isinstance(callback, ModelCheckpoint):
            callback.dirpath = str(run_dir / "checkpoints" / stage)
            # No '=' in file names: a path with '=' cannot be passed as a Hydra override (init_from=...).
            callback.filename = f"{stage}-epoch{{epoch}}-step{{step}}"
            callback.auto_insert_metric_name = False
        callbacks.append(callback)
    return callbacks


def module_classes(names: list[str]) -> set[type]:
    """The classes named by dotted paths (e.g. a decoder layer class, for FSDP's wrapping policy in
    conf/trainer/fsdp.yaml)."""
    from hydra.utils import get_class

    return {get_class(name) for name in names}


def is_sharded(strategy) -> bool:
    """A strategy that shards the module's weights (FSDP, DeepSpeed), given as a config node or a name."""
    name = strategy.get("_target_", "") if isinstance(strategy, dict) else str(strategy or "")
    return any(kind in name.lower() for kind in ("fsdp", "deepspeed"))


def make_trainer(cfg: DictConfig, stage: str, run_dir: Path, log: bool = True, replicate: bool = False,
                 **overrides) -> L.Trainer:
    """The stage's Trainer from the run's config (`overrides` replace trainer keys). `log=False` leaves
    the loggers out, for a pass that only computes (the decoder's cache passes). `replicate`: a stage
    whose modules are called outside their forward pass (a sharded weight is unusable there) runs under
    DDP on the same devices when the run's strategy shards."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if replicate and is_sharded(trainer_cfg.get("strategy")):
        trainer_cfg["strategy"] = "auto" if trainer_cfg.get("devices") == 1 else "ddp"
        if str(trainer_cfg.get("precision")) == "bf16-true":
            trainer_cfg["precision"] = "bf16-mixed"  # the weights keep their dtypes; autocast computes in bf16
    trainer_cfg.update(overrides)
    trainer_cfg["default_root_dir"] = str(run_dir)
    loggers = build_loggers(cfg, stage) if log else []
    callbacks = build_callbacks(cfg, stage, run_dir) + [ResumeState()]  # random states travel in checkpoints
    if not loggers:  # logger=none: LearningRateMonitor refuses a Trainer without loggers
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    plugins = {} if trainer_cfg.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
    return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, **plugins)


def finish_loggers(trainer: L.Trainer) -> None:
    """Close each stage's wandb run so the next stage (or sweep job) starts its own."""
    for logger in trainer.loggers:
        if hasattr(logger, "experiment") and logger.__class__.__name__ == "WandbLogger":
            logger.experiment.finish()


def best_or_last(trainer: L.Trainer) -> str | None:
    """The checkpoint to evaluate: the best one when monitored, else the last; None without checkpoints."""
    callback = trainer.checkpoint_callback
    if callback is None or trainer.fast_dev_run:
        return None
    return callback.best_model_path or callback.last_model_path or None
