"""What every stage shares: the early-exit model, the task, and per-layer evaluation."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MeanMetric, SumMetric

from ee_lightning.exits import hardness as hardness_lib
from ee_lightning.modeling.backbones import build_backbone
from ee_lightning.modeling.heads import ExitHeads
from ee_lightning.modeling.model import EarlyExitModel
from ee_lightning.modeling.exit_policy import ExitPolicy
from ee_lightning.exits.rl import greedy_exit
from ee_lightning.exits.rules import predictions_at_exit
from ee_lightning.tasks import TaskSpec, make_metric, predictions


def build_model(cfg: DictConfig, task: TaskSpec) -> EarlyExitModel:
    """Backbone, heads and policy nets. Every stage builds the same modules, so a checkpoint
    of any stage loads into any other (stage 1 simply leaves the policy untrained)."""
    backbone, _ = build_backbone(cfg.backbone)
    heads = ExitHeads(backbone.num_layers, backbone.hidden_size, task.output_size, dropout=cfg.head.dropout)
    policy = ExitPolicy(backbone.num_layers, backbone.hidden_size, task.output_size,
                        hidden=cfg.policy.hidden, use_confidence=cfg.policy.use_confidence,
                        detach_state=cfg.policy.detach_state)
    if cfg.head.pooling != "cls" and backbone.has_pooler:
        # Mean pooling never reads the pooler; frozen, so DDP does not wait for its gradients.
        backbone.model.pooler.requires_grad_(False)
    return EarlyExitModel(backbone, heads, pooling=cfg.head.pooling, policy=policy)


def read_checkpoint(path, key: str = "ckpt_path") -> dict:
    """A checkpoint written by an ee-lightning stage: its state dict and, in its hyper-parameters, the
    resolved config and task that rebuild the model. `key` names the setting in error messages."""
    path = Path(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path} does not exist; give the .ckpt of an ee-train run "
                                "(its run directory's checkpoints/<stage>/last.ckpt)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    hparams = checkpoint.get("hyper_parameters", {})
    if "cfg" not in hparams or "task" not in hparams:
        raise ValueError(f"{path} is not an ee-lightning checkpoint (no cfg/task in its hyper-parameters)")
    return checkpoint


def task_from_dict(task: dict | TaskSpec) -> TaskSpec:
    if isinstance(task, TaskSpec):
        return task
    task = dict(task)
    task["label_names"] = tuple(task.get("label_names") or ())
    return TaskSpec(**task)


class EarlyExitSystem(L.LightningModule):
    """Base LightningModule. Subclasses define training; evaluation logs every layer's metric.

    The resolved config and the task travel in the checkpoint's hyper-parameters, so any
    stage's checkpoint rebuilds its model with `load_from_checkpoint(path)` alone.
    """

    evaluates_policy = False

    def __init__(self, cfg: dict | DictConfig, task: dict | TaskSpec):
        super().__init__()
        cfg = OmegaConf.create(cfg) if not isinstance(cfg, DictConfig) else cfg
        self.task = task_from_dict(task)
        self.save_hyperparameters({
            "cfg": OmegaConf.to_container(cfg, resolve=True),
            "task": {**self.task.__dict__, "label_names": list(self.task.label_names)},
        })
        self.cfg = OmegaConf.create(self.hparams.cfg)
        self.model = build_model(self.cfg, self.task)
        # from_pretrained returns eval mode and Lightning keeps modules' modes: train() turns dropout on.
        self.model.train()
        num_layers = self.model.num_layers
        self.layer_metrics = nn.ModuleDict({
            split: nn.ModuleList(make_metric(self.task) for _ in range(num_layers)) for split in ("val", "test")
        })
        # What the policy achieves at inference (exit at the first p_l > tau), once it is trained.
        self.policy_metrics = nn.ModuleDict({split: make_metric(self.task) for split in ("val", "test")})
        self.exit_layer_mean = nn.ModuleDict({split: MeanMetric() for split in ("val", "test")})
        # How many rows an evaluation saw, summed over processes: the whole split, once each.
        self.num_examples = nn.ModuleDict({split: SumMetric() for split in ("val", "test")})
        # The policy's greedy exits of the current evaluation, [3 buckets, L] counts per split (reset at each
        # evaluation's start; read by callbacks.ExitHistogram at its end).
        self.exit_counts: dict[str, torch.Tensor] = {}

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    def metric_key(self, split: str, layer: int) -> str:
        """`val/acc_L3`: split, the task's metric, 1-based layer."""
        return f"{split}/{self.task.metric}_L{layer}"

    def _evaluate(self, batch: dict, split: str) -> None:
        outputs = self.model(batch)
        for index, metric in enumerate(self.layer_metrics[split]):
            metric.update(predictions(self.task, outputs.logits[index]), batch["labels"])
            self.log(self.metric_key(split, index + 1), metric, on_step=False, on_epoch=True,
                     batch_size=batch["labels"].shape[0])
        self.num_examples[split].update(batch["labels"].shape[0])
        self.log(f"{split}/num_examples", self.num_examples[split], on_step=False, on_epoch=True)
        if self.evaluates_policy:
            self._evaluate_policy(batch, outputs, split)

    def _evaluate_policy(self, batch: dict, outputs, split: str) -> None:
        exits = greedy_exit(outputs.exit_probs, self.cfg.method.get("tau", 0.5))
        at_exit = predictions_at_exit(outputs.logits, exits)
        size = batch["labels"].shape[0]
        self.policy_metrics[split].update(predictions(self.task, at_exit), batch["labels"])
        self.exit_layer_mean[split].update(exits.float())
        self.log(f"{split}/policy_{self.task.metric}", self.policy_metrics[split], on_epoch=True, batch_size=size)
        self.log(f"{split}/avg_exit_layer", self.exit_layer_mean[split], on_epoch=True, batch_size=size)
        self._count_exits(split, exits, outputs.logits, batch["labels"])

    def _count_exits(self, split: str, exits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch's exits to `exit_counts[split]`, by the memorized-layer bucket of each row on this split."""
        tolerance = self.cfg.method.get("hardness", {}).get("tolerance", 0.5)
        correct = hardness_lib.correct_table(self.task, logits.detach(), labels, tolerance)
        buckets = hardness_lib.hardness_buckets(hardness_lib.memorized_layer(correct), self.num_layers)
        counts = bucket_exit_counts(exits, buckets, self.num_layers)
        self.exit_counts[split] = counts + self.exit_counts[split] if split in self.exit_counts else counts

    def on_validation_epoch_start(self):
        self.exit_counts.pop("val", None)

    def on_test_epoch_start(self):
        self.exit_counts.pop("test", None)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def layer_results(self, split: str) -> list[float]:
        """The per-layer metric values logged at the end of the last evaluation of `split`."""
        metrics = self.trainer.callback_metrics
        return [float(metrics[self.metric_key(split, layer)]) for layer in range(1, self.num_layers + 1)]


def bucket_exit_counts(exits: torch.Tensor, buckets: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Exits (1..L) and their rows' buckets (0..2, broadcast to exits' shape) -> [3, L] counts."""
    buckets = buckets.expand_as(exits)
    flat = buckets.reshape(-1).long() * num_layers + exits.reshape(-1).long() - 1
    return torch.bincount(flat, minlength=3 * num_layers).view(3, num_layers)


def linear_warmup_schedule(optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
