"""The policy's reward curve at every training step, in `<run dir>/reward_curve.csv`.

The stages that train the policy (policy, joint) log `policy/reward`, `policy/task_term`,
`policy/depth_cost`, `policy/advantage_std`, `policy/loss`, `policy/entropy` and
`policy/p_exit_L<l>` with self.log, which reach the loggers every `trainer.log_every_n_steps`
steps. This callback writes every step to a plain CSV file (one row per step, appended, so a
resumed stage continues it) and, at the end of the fit, draws the whole curve as wandb line
charts (`policy/reward_curve`, `policy/p_exit_curve`).
"""
from __future__ import annotations

import csv

from lightning.pytorch import LightningModule, Trainer

from ee_lightning.exits.rl import step_statistics
from ee_lightning.training.callbacks.protocols import TrainsPolicy
from ee_lightning.training.callbacks._common import StageCallback, layer_names, log_to_wandb, wandb_loggers

PARTS = ("reward", "task_term", "depth_cost", "advantage_std", "loss", "entropy", "exit_layer")


def step_row(step) -> dict[str, float]:
    return {key: float(value) for key, value in step_statistics(step).items()}


class RewardCurve(StageCallback):
    def __init__(self, filename: str = "reward_curve.csv", wandb_charts: bool = True):
        self.filename = filename
        self.wandb_charts = wandb_charts
        self._seen_step = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = pl_module.last_policy_step if isinstance(pl_module, TrainsPolicy) else None
        if step is None or step is self._seen_step or not trainer.is_global_zero:
            return
        self._seen_step = step
        row = {"stage": self.stage_name(trainer), "epoch": trainer.current_epoch, "step": trainer.global_step,
               **step_row(step)}
        path = self.out_dir(trainer) / self.filename
        new = not path.is_file() or path.stat().st_size == 0
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self.wandb_charts and trainer.is_global_zero and wandb_loggers(trainer)):
            return
        rows = read_curve(self.out_dir(trainer) / self.filename, self.stage_name(trainer))
        if rows:
            log_to_wandb(trainer, wandb_reward_charts(rows))


def read_curve(path, stage: str | None = None) -> list[dict]:
    """The rows of reward_curve.csv (of one stage), values as floats."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if stage is None or row["stage"] == stage]
    return [{k: (v if k == "stage" else float(v)) for k, v in row.items()} for row in rows]


def wandb_reward_charts(rows: list[dict]) -> dict:
    import wandb

    steps = [int(row["step"]) for row in rows]
    layers = [key for key in rows[0] if key.startswith("p_exit_L")]
    return {
        "policy/reward_curve": wandb.plot.line_series(
            xs=steps, ys=[[row[part] for row in rows] for part in ("reward", "task_term", "depth_cost")],
            keys=["reward", "task term", "depth cost"], title="policy reward per step", xname="step"),
        "policy/p_exit_curve": wandb.plot.line_series(
            xs=steps, ys=[[row[key] for row in rows] for key in layers], keys=layer_names(len(layers)),
            title="mean exit probability per layer", xname="step"),
    }
