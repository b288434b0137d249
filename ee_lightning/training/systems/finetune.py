"""Stage 1: fine-tune backbone and exit heads with the layer-weighted loss."""
from __future__ import annotations

import torch

from ee_lightning.tasks import task_loss
from ee_lightning.training.systems.base import EarlyExitSystem, linear_warmup_schedule

LAYER_WEIGHTS = ("linear", "uniform")  # method.finetune.layer_weights


def layer_loss_weights(spec, num_layers: int) -> torch.Tensor:
    """`linear`: w_l = l (deeper layers weigh more, as PABEE); `uniform`; or an explicit list."""
    if spec == "linear":
        return torch.arange(1, num_layers + 1, dtype=torch.float)
    if spec == "uniform":
        return torch.ones(num_layers)
    weights = torch.tensor(list(spec), dtype=torch.float)
    if weights.shape != (num_layers,) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(
            f"method.finetune.layer_weights={list(spec)}: need {num_layers} non-negative numbers "
            "(one per layer, not all zero), or 'linear' / 'uniform'"
        )
    return weights


def weighted_layer_loss(per_layer_losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_l w_l * loss_l / sum_l w_l."""
    weights = weights.to(per_layer_losses)
    return (weights * per_layer_losses).sum() / weights.sum()


def self_distillation_loss(task, logits: torch.Tensor, teacher_logits: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """How far an exit head's outputs are from the last layer's (detached), mean over the batch.

    Classification: T^2 * KL(softmax(teacher / T) || softmax(logits / T)), the T^2 keeping its gradient on the
    scale of the cross-entropy's (Hinton et al. 2015). Regression: the squared error to the last layer's value."""
    teacher_logits = teacher_logits.detach()
    if task.is_regression:
        return torch.nn.functional.mse_loss(logits, teacher_logits)
    teacher = torch.log_softmax(teacher_logits / temperature, dim=-1)
    student = torch.log_softmax(logits / temperature, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return temperature ** 2 * kl.mean()


def exit_head_losses(task, layer_logits, labels: torch.Tensor, distill_weight: float,
                     temperature: float) -> torch.Tensor:
    """One loss per layer: the task loss, mixed below the last layer with self-distillation from it,
    (1 - w) * task_l + w * distill_l. The last layer learns from the labels alone."""
    losses = [task_loss(task, logits, labels) for logits in layer_logits]
    if distill_weight > 0:
        teacher = layer_logits[-1]
        losses[:-1] = [(1 - distill_weight) * loss
                       + distill_weight * self_distillation_loss(task, logits, teacher, temperature)
                       for loss, logits in zip(losses[:-1], layer_logits[:-1])]
    return torch.stack(losses)


def train_only(model, *parts: str) -> None:
    """Gradients for `parts` of the model only; frozen parts leave DDP no unused parameters to wait for."""
    model.requires_grad_(False)
    for part in parts:
        getattr(model, part).requires_grad_(True)
    if model.heads.pooling != "cls" or model.heads.first_token_pooler is None:
        pooler = getattr(model.backbone.model, "pooler", None)
        if pooler is not None:  # mean pooling never reads it
            pooler.requires_grad_(False)


def parameter_groups(module: torch.nn.Module, lr: float, weight_decay: float, skip=()) -> list[dict]:
    """AdamW groups of a module's trainable parameters, less those in `skip`: weight decay on matrices only,
    biases and norms without."""
    skipped = {id(param) for param in skip}
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad and id(param) not in skipped:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [group for group in ({"params": decay, "weight_decay": weight_decay, "lr": lr},
                                {"params": no_decay, "weight_decay": 0.0, "lr": lr}) if group["params"]]


class FinetuneSystem(EarlyExitSystem):
    """Stage 1: backbone and every exit head, sum_l w_l * loss_l / sum_l w_l (each loss_l optionally
    mixed with self-distillation from the last layer: `exit_head_losses`)."""

    def __init__(self, model, task, spec, *, lr: float, weight_decay: float, warmup_ratio: float,
                 layer_weights, head_lr: float | None = None, distill_weight: float = 0.0,
                 distill_temperature: float = 1.0):
        super().__init__(model, task, spec)
        self.save_hyperparameters({"stage": "finetune", "lr": lr, "weight_decay": weight_decay,
                                   "warmup_ratio": warmup_ratio, "layer_weights": layer_weights, "head_lr": head_lr,
                                   "distill_weight": distill_weight, "distill_temperature": distill_temperature})
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.head_lr = lr if head_lr is None else head_lr
        self.distill_weight, self.distill_temperature = distill_weight, distill_temperature
        self.register_buffer("loss_weights", layer_loss_weights(layer_weights, self.num_layers),
                             persistent=False)
        train_only(self.model, "backbone", "heads")

    def training_step(self, batch, batch_idx):
        outputs = self.model(batch)
        losses = exit_head_losses(self.task, outputs.logits, batch["labels"], self.distill_weight,
                                  self.distill_temperature)
        loss = weighted_layer_loss(losses, self.loss_weights)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        self.log(f"train/loss_L{self.num_layers}", losses[-1], batch_size=batch["labels"].shape[0])
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model.backbone, self.lr, self.weight_decay)
            # a pre-norm family's heads read the backbone's final norm (heads.output_norm): it learns as the backbone
            + parameter_groups(self.model.heads, self.head_lr, self.weight_decay,
                               skip=self.model.backbone.parameters()),
            lr=self.lr,
        )
        scheduler = linear_warmup_schedule(optimizer, self.trainer.estimated_stepping_batches, self.warmup_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
