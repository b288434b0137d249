"""The task metric of every exit layer, plotted per layer in wandb.

Systems log `val/<metric>_L<l>` and `test/<metric>_L<l>` (every logger gets them as scalars).
For wandb this callback adds, at the end of a fit, one line chart with a line per layer over the
validations (`val/<metric>_per_layer`), and the metric against the layer at the last validation
(`val/<metric>_by_layer`); at test, `test/<metric>_by_layer`. It keeps the validation history in
its state, so a resumed fit draws the whole curve.
"""
from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer

from ee_lightning.training.callbacks.protocols import HasLayerMetrics
from ee_lightning.training.callbacks._common import StageCallback, layer_names, log_to_wandb, wandb_loggers


class LayerMetricCurves(StageCallback):
    def __init__(self):
        self.history: list[dict] = []  # [{"epoch", "step", "values": [L floats]}]

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        values = _layer_values(trainer, pl_module, "val")
        if values is not None and not trainer.sanity_checking:
            self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "values": values})

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metric = _metric(pl_module)
        if not self.history or metric is None or not (trainer.is_global_zero and wandb_loggers(trainer)):
            return
        import wandb

        num_layers = len(self.history[-1]["values"])
        log_to_wandb(trainer, {
            f"val/{metric}_per_layer": wandb.plot.line_series(
                xs=[entry["epoch"] + 1 for entry in self.history],
                ys=[[entry["values"][layer] for entry in self.history] for layer in range(num_layers)],
                keys=layer_names(num_layers), title=f"validation {metric} of each exit layer", xname="epoch"),
            f"val/{metric}_by_layer": by_layer_chart(self.history[-1]["values"], metric, "validation"),
        })

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metric = _metric(pl_module)
        values = _layer_values(trainer, pl_module, "test")
        if values is not None and trainer.is_global_zero and wandb_loggers(trainer):
            log_to_wandb(trainer, {f"test/{metric}_by_layer": by_layer_chart(values, metric, "test")})

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))


def by_layer_chart(values: list[float], metric: str, split: str):
    import wandb

    table = wandb.Table(columns=["layer", metric], data=[[layer, value] for layer, value in enumerate(values, 1)])
    return wandb.plot.line(table, "layer", metric, title=f"{split} {metric} by exit layer")


def _metric(pl_module: LightningModule) -> str | None:
    return pl_module.task.metric if isinstance(pl_module, HasLayerMetrics) else None


def _layer_values(trainer: Trainer, pl_module: LightningModule, split: str) -> list[float] | None:
    if not isinstance(pl_module, HasLayerMetrics):
        return None
    metrics = trainer.callback_metrics
    keys = [pl_module.metric_key(split, layer) for layer in range(1, pl_module.num_layers + 1)]
    if not all(key in metrics for key in keys):
        return None
    return [float(metrics[key]) for key in keys]
