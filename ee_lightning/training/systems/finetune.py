"""Stage 1: fine-tune backbone and exit heads with the layer-weighted loss."""
from __future__ import annotations

import torch

from ee_lightning.tasks import task_loss
from ee_lightning.training.systems.base import EarlyExitSystem, linear_warmup_schedule


def layer_weights(spec, num_layers: int) -> torch.Tensor:
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


class FinetuneSystem(EarlyExitSystem):
    def __init__(self, cfg, task):
        super().__init__(cfg, task)
        self.register_buffer("loss_weights", layer_weights(self.cfg.method.finetune.layer_weights, self.num_layers),
                             persistent=False)
        # The policy is trained in a later stage; frozen here so DDP sees no unused parameters.
        self.model.policy.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        outputs = self.model(batch)
        losses = torch.stack([task_loss(self.task, logits, batch["labels"]) for logits in outputs.logits])
        loss = weighted_layer_loss(losses, self.loss_weights)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        self.log(f"train/loss_L{self.num_layers}", losses[-1], batch_size=batch["labels"].shape[0])
        return loss

    def configure_optimizers(self):
        opt_cfg = self.cfg.method.finetune
        decay, no_decay = [], []
        for param in self.model.parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=opt_cfg.lr,
        )
        scheduler = linear_warmup_schedule(optimizer, self.trainer.estimated_stepping_batches, opt_cfg.warmup_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
