"""Stage 4 (optional): the consistent objective. Each instance trains the head where its
sampled exit is (and the backbone below it), plus the policy loss; two optimizers.

With `layer_loss_weight` > 0 the stage-1 loss over every head (its layer weights) is added with that
weight: trained on its exit alone, a deep head sees only the instances the policy sends deep, and the
full model it ends is worse on the rest."""
from __future__ import annotations

import torch

from ee_lightning.exits.rl import gather_layer
from ee_lightning.training.systems.base import EarlyExitSystem
from ee_lightning.training.systems.finetune import train_only, weighted_layer_loss
from ee_lightning.training.systems.policy import PolicyTrainingMixin, layer_losses_and_correct, rl_settings


def joint_model_loss(losses: torch.Tensor, exits: torch.Tensor, layer_loss_weight: float = 0.0,
                     layer_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's and heads' loss from per-layer losses [L, B] and the sampled exits [K, B] (layers
    1..L): (the consistent loss, the mean loss at the exits; the whole loss, that plus `layer_loss_weight` times
    stage 1's weighted mean over the layers (`layer_weights` [L], default uniform) of the batch-mean losses)."""
    consistent = gather_layer(losses, exits).mean()
    if not layer_loss_weight:
        return consistent, consistent
    weights = torch.ones(losses.shape[0]) if layer_weights is None else layer_weights
    return consistent, consistent + layer_loss_weight * weighted_layer_loss(losses.mean(1), weights)


class JointSystem(PolicyTrainingMixin, EarlyExitSystem):
    evaluates_policy = True

    def __init__(self, model, task, spec, *, rl: dict, lr_model: float, lr_policy: float,
                 memorized: torch.Tensor | None = None, tau: float, tolerance: float,
                 layer_loss_weight: float = 0.0, layer_weights: torch.Tensor | None = None):
        super().__init__(model, task, spec, tau=tau, tolerance=tolerance)
        self.automatic_optimization = False
        self.rl = rl_settings(rl)
        self.lr_model, self.lr_policy = lr_model, lr_policy
        self.layer_loss_weight = layer_loss_weight
        self.save_hyperparameters({"stage": "joint", "lr_model": lr_model, "lr_policy": lr_policy, "tau": tau,
                                   "layer_loss_weight": layer_loss_weight, **self.rl})
        self.register_buffer("layer_weights", torch.ones(self.num_layers) if layer_weights is None else layer_weights,
                             persistent=False)
        train_only(self.model, "backbone", "heads", "policy")
        # Memorized layer per training row (by `idx`), from the hardness stage.
        self.register_buffer("memorized", torch.zeros(0, dtype=torch.long) if memorized is None else memorized,
                             persistent=False)

    def training_step(self, batch, batch_idx):
        model_opt, policy_opt = self.optimizers()
        outputs = self.model(batch)
        losses, correct = layer_losses_and_correct(self.task, outputs.logits, batch["labels"], self.tolerance)
        memorized = self.memorized[batch["idx"]] if self.memorized.numel() else None
        step = self.policy_step(outputs.exit_logits, losses, correct, memorized)
        consistent, model_loss = joint_model_loss(losses, step.exits, self.layer_loss_weight, self.layer_weights)
        model_opt.zero_grad()
        policy_opt.zero_grad()
        self.manual_backward(model_loss + step.loss)
        model_opt.step()
        policy_opt.step()
        self.log("joint/consistent_loss", consistent, prog_bar=True, batch_size=batch["labels"].shape[0])
        return consistent

    def configure_optimizers(self):
        model_params = [p for name, p in self.model.named_parameters()
                        if not name.startswith("policy.") and p.requires_grad]
        return (torch.optim.AdamW(model_params, lr=self.lr_model, weight_decay=0.01),
                torch.optim.AdamW(self.model.policy.parameters(), lr=self.lr_policy, weight_decay=0.0))
