"""What every stage shares: the early-exit model, the task, and per-layer evaluation.

A stage system is handed the run's model (built once, see `ee_lightning.modeling.saved`), the task
and its own arguments; it never reads the config tree. Its checkpoints carry the model spec, so
`ee-eval` rebuilds the model from a checkpoint alone.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric

from ee_lightning.exits import hardness as hardness_lib
from ee_lightning.exits.rules import at_exit, policy_exits
from ee_lightning.exits.signals import all_layer_signals
from ee_lightning.modeling.model import EarlyExitModel
from ee_lightning.modeling.saved import SPEC_KEY
from ee_lightning.tasks import TaskSpec, make_metric, predictions


def read_checkpoint(path, key: str = "ckpt_path", needs_spec: bool = True) -> dict:
    """A checkpoint written by an ee-lightning stage: its state dict and (an encoder stage's) the model
    spec that rebuilds the model. `key` names the setting in error messages."""
    path = Path(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path} does not exist; give the .ckpt of an ee-train run "
                                "(its run directory's checkpoints/<stage>/last.ckpt)")
    try:
        # weights_only: tensors and plain containers only, so a checkpoint someone sent cannot run code on load
        # (every stage's checkpoint holds nothing else; resume.py stores the numpy random state as tensors)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds objects other than tensors and plain containers, which are not loaded, "
                         f"because unpickling them can run code ({str(err).splitlines()[0]}); give a checkpoint "
                         "written by ee-train, or its saved model folder (<run>/model/)") from None
    if "state_dict" not in checkpoint or (needs_spec and SPEC_KEY not in checkpoint):
        raise ValueError(f"{path} is not an ee-lightning checkpoint (it has no model spec); "
                         "give a checkpoint written by ee-train")
    return checkpoint


class EarlyExitSystem(L.LightningModule):
    """Base LightningModule. Subclasses define training; evaluation logs every layer's metric and,
    where the stage has a policy, what the policy achieves at inference (exit at the first p_l > tau)."""

    evaluates_policy = False
    exit_buckets = True  # exit counts by memorized-layer bucket (callbacks.protocols.CountsExits)

    def __init__(self, model: EarlyExitModel, task: TaskSpec, spec: dict, tau: float | None = None,
                 tolerance: float | None = None):
        super().__init__()
        self.model = model
        self.task = task
        self.spec = spec  # travels in every checkpoint (see on_save_checkpoint)
        # What a stage with a policy evaluates (method.tau, method.hardness.tolerance); stage 1 has none.
        self.tau = tau
        self.tolerance = tolerance  # regression: |prediction - label| <= tolerance counts as right
        # from_pretrained returns eval mode and Lightning keeps modules' modes: train() turns dropout on.
        self.model.train()
        num_layers = self.model.num_layers
        self.layer_metrics = nn.ModuleDict({
            split: nn.ModuleList(make_metric(self.task) for _ in range(num_layers)) for split in ("val", "test")
        })
        self.policy_metrics = nn.ModuleDict({split: make_metric(self.task) for split in ("val", "test")})
        self.exit_layer_mean = nn.ModuleDict({split: MeanMetric() for split in ("val", "test")})
        # How many rows an evaluation saw, summed over processes: the whole split, once each.
        self.num_examples = nn.ModuleDict({split: SumMetric() for split in ("val", "test")})
        # The policy's greedy exits of the current evaluation, [3 buckets, L] counts per split (reset at each
        # evaluation's start; read by callbacks.ExitHistogram at its end).
        self.exit_counts: dict[str, torch.Tensor] = {}
        # This process's rows of the last test pass, as signals: the cache the exit rules replay.
        self.test_signals: list[dict[str, torch.Tensor]] = []

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[SPEC_KEY] = self.spec

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def num_exits(self) -> int:
        """An exit after every layer."""
        return self.model.num_layers

    @property
    def exit_layers(self) -> list[int]:
        return list(range(1, self.model.num_layers + 1))

    def metric_key(self, split: str, layer: int) -> str:
        """`val/acc_L3`: split, the task's metric, 1-based layer."""
        return f"{split}/{self.task.metric}_L{layer}"

    def _evaluate(self, batch: dict, split: str) -> None:
        outputs = self.model(batch)
        if split == "test":
            self._keep_test_signals(batch, outputs)
        for index, metric in enumerate(self.layer_metrics[split]):
            metric.update(predictions(self.task, outputs.logits[index]), batch["labels"])
            self.log(self.metric_key(split, index + 1), metric, on_step=False, on_epoch=True,
                     batch_size=batch["labels"].shape[0])
        self.num_examples[split].update(batch["labels"].shape[0])
        self.log(f"{split}/num_examples", self.num_examples[split], on_step=False, on_epoch=True)
        if self.evaluates_policy:
            self._evaluate_policy(batch, outputs, split)

    def _keep_test_signals(self, batch: dict, outputs) -> None:
        exit_probs = outputs.exit_probs if self.evaluates_policy else None
        signals = all_layer_signals(outputs.logits, exit_probs, self.task.is_regression)
        kept = {name: value.cpu() for name, value in signals.items()}
        kept.update(labels=batch["labels"].cpu(), idx=batch["idx"].cpu(), lengths=batch["attention_mask"].sum(-1).cpu())
        self.test_signals.append(kept)

    def test_cache(self) -> dict[str, torch.Tensor]:
        """The last test pass's signals, as `layer_cache.collect_signals` returns them (this process's rows)."""
        per_row = ("labels", "idx", "lengths")
        return {key: torch.cat([chunk[key] for chunk in self.test_signals], dim=0 if key in per_row else 1)
                for key in self.test_signals[0]}

    def _evaluate_policy(self, batch: dict, outputs, split: str) -> None:
        exits = policy_exits(outputs.exit_probs, self.tau)
        size = batch["labels"].shape[0]
        self.policy_metrics[split].update(predictions(self.task, at_exit(outputs.logits, exits)), batch["labels"])
        self.exit_layer_mean[split].update(exits.float())
        self.log(f"{split}/policy_{self.task.metric}", self.policy_metrics[split], on_epoch=True, batch_size=size)
        self.log(f"{split}/avg_exit_layer", self.exit_layer_mean[split], on_epoch=True, batch_size=size)
        self._count_exits(split, exits, outputs.logits, batch["labels"])

    def _count_exits(self, split: str, exits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch's exits to `exit_counts[split]`, by the memorized-layer bucket of each row on this split."""
        correct = hardness_lib.correct_table(self.task, logits.detach(), labels, self.tolerance)
        buckets = hardness_lib.hardness_buckets(hardness_lib.memorized_layer(correct), self.num_layers)
        counts = bucket_exit_counts(exits, buckets, self.num_layers)
        self.exit_counts[split] = counts + self.exit_counts[split] if split in self.exit_counts else counts

    def on_validation_epoch_start(self):
        self.exit_counts.pop("val", None)

    def on_test_epoch_start(self):
        self.exit_counts.pop("test", None)
        self.test_signals = []

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
