"""Per-layer exit policies: p_l = sigmoid(g_l(s_l)), the probability of exiting at layer l."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def confidence_features(logits: torch.Tensor) -> torch.Tensor:
    """The head's softmax and its entropy, [B, C + 1]: what a confidence rule would look at."""
    probs = logits.float().softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1, keepdim=True)
    return torch.cat([probs, entropy], dim=-1).to(logits.dtype)


def exit_probability(exit_logit: torch.Tensor) -> torch.Tensor:
    """sigmoid(exit logit) in float64. In float32 every logit above about 17 rounds to 1, so the rows a policy is
    sure of pile up at one value that no tau can split, and the least savings a policy allows fall out of reach
    (on SST-2, taus set for 20-35% saved about 11% or 34% on test, nothing between); float64 keeps them apart up
    to a logit of about 37. Every encoder path that compares a policy with tau reads this, so replays and live runs
    agree. Apple's MPS has no float64: there it stays float32."""
    if exit_logit.device.type == "mps":
        return torch.sigmoid(exit_logit.float())
    return torch.sigmoid(exit_logit.double())


class ExitPolicy(nn.Module):
    """One small net per layer (the authors': Linear(H, 32) -> GELU -> Linear(32, 1)).

    normalize_state: the net reads the pooled state standardised over its features (a layer norm without
    weights). The pooled states' scale differs from layer to layer and from one instance's length to another's;
    read raw, every layer's net first has to learn it."""

    def __init__(self, num_layers: int, hidden_size: int, num_logits: int, hidden: int = 32,
                 use_confidence: bool = False, detach_state: bool = True, normalize_state: bool = False):
        super().__init__()
        self.use_confidence = use_confidence
        self.detach_state = detach_state
        self.normalize_state = normalize_state
        in_size = hidden_size + (num_logits + 1 if use_confidence else 0)
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(in_size, hidden), nn.GELU(), nn.Linear(hidden, 1)) for _ in range(num_layers)
        )

    def features(self, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        state = pooled.detach() if self.detach_state else pooled
        if self.normalize_state:
            state = F.layer_norm(state, state.shape[-1:])
        if not self.use_confidence:
            return state
        return torch.cat([state, confidence_features(logits.detach())], dim=-1)

    def logit(self, index: int, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Exit logit [B] at layer `index` (0-based)."""
        return self.nets[index](self.features(pooled, logits)).squeeze(-1)

    def forward(self, index: int, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return exit_probability(self.logit(index, pooled, logits))
