"""Stage 4 (optional): the consistent objective. Each instance trains the head where its
sampled exit is (and the backbone below it), plus the policy loss; two optimizers."""
from __future__ import annotations

import torch

from ee_lightning.exits.rl import gather_layer
from ee_lightning.training.systems.base import EarlyExitSystem
from ee_lightning.training.systems.policy import PolicyTrainingMixin, layer_losses_and_correct


class JointSystem(PolicyTrainingMixin, EarlyExitSystem):
    evaluates_policy = True

    def __init__(self, cfg, task):
        super().__init__(cfg, task)
        self.automatic_optimization = False
        # Memorized layer per training row (by `idx`), filled from the hardness artefact.
        self.register_buffer("memorized", torch.zeros(0, dtype=torch.long), persistent=False)

    def set_memorized(self, table: torch.Tensor) -> None:
        self.memorized = table.to(self.device)

    def training_step(self, batch, batch_idx):
        model_opt, policy_opt = self.optimizers()
        outputs = self.model(batch)
        losses, correct = layer_losses_and_correct(self.task, outputs.logits, batch["labels"],
                                                   self.cfg.method.hardness.tolerance)
        memorized = self.memorized[batch["idx"]] if self.memorized.numel() else None
        step = self.policy_step(outputs.exit_logits, losses, correct, memorized)
        consistent = gather_layer(losses, step.exits).mean()
        model_opt.zero_grad()
        policy_opt.zero_grad()
        self.manual_backward(consistent + step.loss)
        model_opt.step()
        policy_opt.step()
        self.log("joint/consistent_loss", consistent, prog_bar=True, batch_size=batch["labels"].shape[0])
        return consistent

    def configure_optimizers(self):
        cfg = self.cfg.method.joint
        model_params = [p for name, p in self.model.named_parameters() if not name.startswith("policy.")]
        return (torch.optim.AdamW(model_params, lr=cfg.lr_model, weight_decay=0.01),
                torch.optim.AdamW(self.model.policy.parameters(), lr=cfg.lr_policy, weight_decay=0.0))
