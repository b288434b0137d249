"""Exit heads: one classifier (or regressor) after every layer."""
from __future__ import annotations

import torch
from torch import nn


class ExitHeads(nn.Module):
    def __init__(self, num_layers: int, hidden_size: int, output_size: int, dropout: float = 0.1):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, output_size)) for _ in range(num_layers)
        )

    def __len__(self) -> int:
        return len(self.heads)

    def forward(self, index: int, pooled: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of head `index` (0-based) on pooled states [B, H]."""
        return self.heads[index](pooled)
