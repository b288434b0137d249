"""Stage 3: train the exit policies with REINFORCE; backbone and heads frozen.

The backbone ran once over the training set (see `inference.layer_cache.collect_states`); each step
here reads cached pooled states and head logits, so K rollouts cost K Bernoulli draws.
"""
from __future__ import annotations

import dataclasses

import torch

from ee_lightning.exits.rl import epsilon_schedule, reinforce_objective, step_statistics
from ee_lightning.tasks import is_correct, task_loss
from ee_lightning.training.systems.base import EarlyExitSystem
from ee_lightning.training.systems.finetune import train_only

# The REINFORCE settings (method.policy in the config), passed to `reinforce_objective`.
RL_KEYS = ("k", "alpha", "task_term", "depth_term", "sampler", "eps_start", "eps_end", "eps_decay_steps",
           "normalize_advantages", "entropy_bonus", "estimator")


def layer_losses_and_correct(task, logits: torch.Tensor, labels: torch.Tensor, tolerance: float):
    """Per-layer task losses [L, B] (differentiable) and correctness [L, B] from head logits [L, B, C]."""
    losses = torch.stack([task_loss(task, layer_logits, labels, reduction="none") for layer_logits in logits])
    correct = torch.stack([is_correct(task, layer_logits, labels, tolerance) for layer_logits in logits])
    return losses, correct


def rl_step(rl: dict, step: int, exit_logits, losses, correct, memorized, generator=None):
    """The policy-gradient step (`exits.rl.reinforce_objective`) under the settings `rl` (RL_KEYS) at
    optimizer step `step` (the epsilon schedule reads it)."""
    eps = epsilon_schedule(step, rl["eps_start"], rl["eps_end"], rl["eps_decay_steps"])
    return reinforce_objective(
        exit_logits, losses.detach(), correct, memorized, k=rl["k"], alpha=rl["alpha"], task_term=rl["task_term"],
        depth_term=rl["depth_term"], sampler=rl["sampler"], eps=eps, normalize_advantages=rl["normalize_advantages"],
        entropy_bonus=rl["entropy_bonus"], estimator=rl["estimator"], generator=generator,
    ), eps


def cached_batch_inputs(policy, batch: dict, task, tolerance: float):
    """A batch of cached layer outputs (`inference.layer_cache.CachedLayerDataset`) -> the policy's exit
    logits [L, B], the heads' task losses [L, B] and correctness [L, B]."""
    pooled = batch["pooled"].transpose(0, 1)  # [L, B, H]
    logits = batch["logits"].transpose(0, 1)  # [L, B, C]
    exit_logits = torch.stack([policy.logit(layer, pooled[layer], logits[layer]) for layer in range(len(pooled))])
    losses, correct = layer_losses_and_correct(task, logits, batch["labels"], tolerance)
    return exit_logits, losses, correct


class PolicyTrainingMixin:
    """The REINFORCE step shared by the encoders' policy and joint stages and the decoders' token
    policy stage. `self.rl` holds RL_KEYS; `policy_step` keeps what callbacks read
    (`callbacks.protocols.TrainsPolicy`)."""

    last_policy_step = None
    last_policy_memorized = None

    def policy_step(self, exit_logits, losses, correct, memorized, generator=None):
        step, eps = rl_step(self.rl, self.global_step, exit_logits, losses, correct, memorized, generator)
        size = losses.shape[1]
        stats = {f"policy/{name}": value for name, value in step_statistics(step).items()}
        self.log_dict({**stats, "policy/eps": torch.tensor(eps)}, batch_size=size, on_step=True, on_epoch=False)
        # For callbacks (exit histograms by bucket, reward curve): this step, detached, and its rows' memorized layers.
        self.last_policy_step = dataclasses.replace(step, loss=step.loss.detach(), probs=step.probs.detach())
        self.last_policy_memorized = memorized
        return step


def rl_settings(settings) -> dict:
    """The REINFORCE settings (RL_KEYS) of the policy stage's typed node (`config.schema.PolicyStage`)
    or of a mapping that holds them."""
    if dataclasses.is_dataclass(settings):
        settings = dataclasses.asdict(settings)
    missing = [key for key in RL_KEYS if key not in settings]
    if missing:
        raise ValueError(f"method.policy lacks {missing}")
    return {key: settings[key] for key in RL_KEYS}


class PolicySystem(PolicyTrainingMixin, EarlyExitSystem):
    evaluates_policy = True

    def __init__(self, model, task, spec, *, rl: dict, lr: float, tau: float, tolerance: float):
        super().__init__(model, task, spec, tau=tau, tolerance=tolerance)
        self.rl = rl_settings(rl)
        self.lr = lr
        self.save_hyperparameters({"stage": "policy", "lr": lr, "tau": tau, **self.rl})
        train_only(self.model, "policy")
        self.train()

    def train(self, mode: bool = True):
        # Frozen parts stay in eval mode: their outputs were cached without dropout.
        super().train(mode)
        self.model.backbone.eval()
        self.model.heads.eval()
        return self

    def training_step(self, batch, batch_idx):
        exit_logits, losses, correct = cached_batch_inputs(self.model.policy, batch, self.task, self.tolerance)
        return self.policy_step(exit_logits, losses, correct, batch["memorized"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.policy.parameters(), lr=self.lr, weight_decay=0.0)
