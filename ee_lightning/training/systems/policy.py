"""Stage 3: train the exit policies with REINFORCE; backbone and heads frozen.

The backbone ran once over the training set (see `replay.collect_layer_outputs`); each step
here reads cached pooled states and head logits, so K rollouts cost K Bernoulli draws.
"""
from __future__ import annotations

import dataclasses

import torch

from ee_lightning.exits.rl import epsilon_schedule, reinforce_objective, step_statistics
from ee_lightning.tasks import is_correct, task_loss
from ee_lightning.training.systems.base import EarlyExitSystem


def layer_losses_and_correct(task, logits: torch.Tensor, labels: torch.Tensor, tolerance: float):
    """Per-layer task losses [L, B] (differentiable) and correctness [L, B] from head logits [L, B, C]."""
    losses = torch.stack([task_loss(task, layer_logits, labels, reduction="none") for layer_logits in logits])
    correct = torch.stack([is_correct(task, layer_logits, labels, tolerance) for layer_logits in logits])
    return losses, correct


class PolicyTrainingMixin:
    """The REINFORCE step shared by the policy stage and the joint stage."""

    def policy_step(self, exit_logits, losses, correct, memorized):
        cfg = self.cfg.method.policy
        eps = epsilon_schedule(self.global_step, cfg.eps_start, cfg.eps_end, cfg.eps_decay_steps)
        step = reinforce_objective(
            exit_logits, losses.detach(), correct, memorized, k=cfg.k, alpha=cfg.alpha, task_term=cfg.task_term,
            depth_term=cfg.depth_term, sampler=cfg.sampler, eps=eps,
            normalize_advantages=cfg.normalize_advantages, entropy_bonus=cfg.entropy_bonus,
        )
        size = losses.shape[1]
        stats = {f"policy/{name}": value for name, value in step_statistics(step).items()}
        self.log_dict({**stats, "policy/eps": torch.tensor(eps)}, batch_size=size, on_step=True, on_epoch=False)
        # For callbacks (exit histograms by bucket, reward curve): this step, detached, and its rows' memorized layers.
        self.last_policy_step = dataclasses.replace(step, loss=step.loss.detach(), probs=step.probs.detach())
        self.last_policy_memorized = memorized
        return step


class PolicySystem(PolicyTrainingMixin, EarlyExitSystem):
    evaluates_policy = True

    def __init__(self, cfg, task):
        super().__init__(cfg, task)
        self.model.backbone.requires_grad_(False)
        self.model.heads.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True):
        # Frozen parts stay in eval mode: their outputs were cached without dropout.
        super().train(mode)
        self.model.backbone.eval()
        self.model.heads.eval()
        return self

    def training_step(self, batch, batch_idx):
        pooled = batch["pooled"].transpose(0, 1)  # [L, B, H]
        logits = batch["logits"].transpose(0, 1)  # [L, B, C]
        policy = self.model.policy
        exit_logits = torch.stack([policy.logit(layer, pooled[layer], logits[layer]) for layer in range(self.num_layers)])
        losses, correct = layer_losses_and_correct(self.task, logits, batch["labels"], self.cfg.method.hardness.tolerance)
        return self.policy_step(exit_logits, losses, correct, batch["memorized"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.policy.parameters(), lr=self.cfg.method.policy.lr, weight_decay=0.0)
