"""Stage 1 by distillation: every exit learns the frozen full model's next-token distribution.

Trained on a cache of exit states at every position of the training text with the full model's
top-k next tokens (`inference.lm_cache.collect_exit_states(positions="all", top_k=k)`); the loss
is `exits.distill.distill_loss`, weighted over exits as the reference-token stage weights them.
With a restricted vocabulary the LM head is sliced to it (cheaper by V/V'); with the full one the
student is normalised over every token.
"""
from __future__ import annotations

import lightning as L
import torch

from ee_lightning.exits.distill import distill_loss
from ee_lightning.exits.lm_targets import exit_loss_weights
from ee_lightning.modeling.lm_exits import LMExitHeads
from ee_lightning.training.held import Held


class ExitDistillSystem(L.LightningModule):
    """Batches: states [B, E, H] (E = every exit, the last included), top_ids [B, k] (ids into the
    student's vocabulary: the restricted one's positions, or token ids), top_logp [B, k]."""

    def __init__(self, exits: LMExitHeads, decoder, vocabulary: torch.Tensor | None = None, lr: float = 1e-3,
                 weights: str = "layer", weight_decay: float = 0.0):
        super().__init__()
        self.exits = exits
        decoder.requires_grad_(False)  # frozen: not this stage's parameters, not in its checkpoint
        self._decoder = Held(decoder)
        self.trained = [layer for layer in exits.exit_layers if layer != exits.num_layers]
        if not self.trained:
            raise ValueError("only the last layer has an exit: there is no adapter to train (lower exit_every)")
        self.lr, self.weight_decay = lr, weight_decay
        self.register_buffer("weights", exit_loss_weights(self.trained, weights), persistent=False)
        self.register_buffer("vocabulary", vocabulary, persistent=False)

    def losses(self, batch) -> torch.Tensor:
        """[E'] mean distillation loss of each trained exit."""
        decoder = self._decoder.model
        dtype = next(decoder.parameters()).dtype
        index = {layer: e for e, layer in enumerate(self.exits.exit_layers)}
        return torch.stack([
            distill_loss(self.exits.logits(layer, batch["states"][:, index[layer]].to(dtype), decoder, self.vocabulary),
                         batch["top_ids"], batch["top_logp"]).mean()
            for layer in self.trained])

    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        loss = (self.weights * losses).sum()
        size = len(batch["top_ids"])
        self.log("distill/loss", loss, prog_bar=True, batch_size=size)
        for layer, value in zip(self.trained, losses):
            self.log(f"distill/loss_L{layer}", value, batch_size=size)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.exits.parameters(), lr=self.lr, weight_decay=self.weight_decay)
