"""Stage 1 by distillation: every exit learns the frozen full model's next-token distribution.

Trained on a cache of exit states at every position of the training text with the full model's
top-k next tokens (`inference.lm_cache.collect_exit_states(positions="all", top_k=k)`); the loss
is `exits.distill.distill_loss`, weighted over exits as the reference-token stage weights them.
With a restricted vocabulary the LM head is sliced to it (cheaper by V/V'); with the full one the
student is normalised over every token.
"""
from __future__ import annotations

import torch

from ee_lightning.exits.distill import distill_loss
from ee_lightning.modeling.lm_exits import LMExitHeads
from ee_lightning.training.systems.lm import ExitAdapterSystem, batch_loss


class ExitDistillSystem(ExitAdapterSystem):
    """Batches: states [B, E, H] (E = every exit, the last included), top_ids [B, k] (ids into the
    student's vocabulary: the restricted one's positions, or token ids), top_logp [B, k]."""

    def __init__(self, exits: LMExitHeads, decoder, vocabulary: torch.Tensor | None = None, lr: float = 1e-3,
                 weights: str = "layer", weight_decay: float = 0.0):
        super().__init__(exits, decoder, lr=lr, weights=weights, weight_decay=weight_decay)
        self.register_buffer("vocabulary", vocabulary, persistent=False)

    def losses(self, batch) -> torch.Tensor:
        """[E'] mean distillation loss of each trained exit."""
        return self.position_losses(batch).mean(1)

    def position_losses(self, batch) -> torch.Tensor:
        """[E', B] distillation loss of each trained exit at each position."""
        logits = self.exit_logits(batch["states"], self.trained, self.vocabulary)
        return torch.stack([distill_loss(each, batch["top_ids"], batch["top_logp"]) for each in logits])

    def training_step(self, batch, batch_idx):
        losses = self.position_losses(batch)
        per_row = (self.weights.unsqueeze(1) * losses).sum(0)
        size = len(batch["top_ids"])
        self.log("distill/loss", per_row.detach().mean(), prog_bar=True, batch_size=size)
        for layer, value in zip(self.trained, losses.detach().mean(1)):
            self.log(f"distill/loss_L{layer}", value, batch_size=size)
        return batch_loss(self, per_row, batch)
