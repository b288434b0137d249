"""What the tracking callbacks share: the stage they serve, their run directory, wandb loggers."""
from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Callback, Trainer


class StageCallback(Callback):
    """A callback that knows its stage and run directory (trainers.build_callbacks binds both).

    Unbound (a Trainer built by hand), the stage is the Trainer's state and the run directory
    its default_root_dir.
    """

    stage: str | None = None
    run_dir: Path | None = None

    def bind_stage(self, stage: str, run_dir: Path) -> None:
        self.stage, self.run_dir = stage, Path(run_dir)

    def stage_name(self, trainer: Trainer) -> str:
        return self.stage or str(trainer.state.fn.value if trainer.state.fn else "run")

    def out_dir(self, trainer: Trainer) -> Path:
        return Path(self.run_dir or trainer.default_root_dir)


def wandb_loggers(trainer: Trainer) -> list:
    """The trainer's WandbLoggers (none under logger=csv/none, WANDB_MODE=disabled or fast_dev_run)."""
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_to_wandb(trainer: Trainer, values: dict) -> None:
    """Log wandb objects (histograms, charts, images) at the trainer's step; rank zero only."""
    if not values or not trainer.is_global_zero:
        return
    for logger in wandb_loggers(trainer):
        logger.log_metrics(values, step=trainer.global_step)


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def layer_names(num_layers: int) -> list[str]:
    return [f"L{layer}" for layer in range(1, num_layers + 1)]
