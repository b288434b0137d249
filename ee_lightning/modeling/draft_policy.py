"""Verify mode's stop rule, learned: after each draft, keep drafting or stop and verify.

The exit at layer E drafts a token from the layer-E state of the token before it; the policy reads
that same state and gives the probability that drafting should stop after this draft (the round is
then verified). It is ConsistentEE's token policy net (LayerNorm -> MLP -> sigmoid, for the same
reason: the residual stream's scale grows with depth), one for the draft layer, trained on cached
exit states with a reward of tokens per layer pass (`exits.rl.draft_objective`,
`training.draft_policy`). In generation a round stops at the first draft whose probability exceeds
`tau`, or at `max_drafts`.
"""
from __future__ import annotations

import torch
from torch import nn

from ee_lightning.modeling.lm_exits import policy_net


class DraftStopPolicy(nn.Module):
    """p(stop after this draft) = sigmoid(net(h_E)), h_E the layer-`draft_layer` state the draft was made from."""

    def __init__(self, hidden_size: int, draft_layer: int, max_drafts: int, hidden: int = 32, tau: float = 0.5):
        super().__init__()
        if draft_layer < 1 or max_drafts < 1 or hidden < 1:
            raise ValueError(f"draft_layer={draft_layer}, max_drafts={max_drafts} and hidden={hidden} must be >= 1")
        if not 0.0 < tau < 1.0:
            raise ValueError(f"tau={tau} must lie in (0, 1): a round stops after a draft whose stop probability exceeds it")
        self.draft_layer, self.max_drafts, self.hidden, self.tau = int(draft_layer), int(max_drafts), int(hidden), float(tau)
        self.net = policy_net(hidden_size, hidden)

    def settings(self) -> dict:
        """What rebuilds it (the saved model's config.json)."""
        return {"draft_layer": self.draft_layer, "max_drafts": self.max_drafts, "hidden": self.hidden, "tau": self.tau}

    def logit(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] layer-E states -> [...] stop logits (float32)."""
        first = next(self.net.parameters())
        return self.net(hidden.to(first.dtype)).squeeze(-1).float()

    def prob(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(hidden))

    def stops(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [...] bool: stop drafting after the draft made from this state (p > tau)."""
        return self.prob(hidden) > self.tau
