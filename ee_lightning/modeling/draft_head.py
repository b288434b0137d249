"""A cheap head for drafts: the model's LM head restricted to the most frequent tokens.

A draft only has to be right often enough; the verifier's full head decides every emitted
token, so a draft head that cannot name a rare token costs acceptance, never correctness. On
SmolLM2-135M the tied head (49,152 x 576) costs about eight layers; 4,096 rows cost under one.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn


def frequent_tokens(sequences: Iterable[Iterable[int]], size: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The `size` most frequent ids over `sequences` (ties broken by the smaller id), plus the ids in
    `always` (e.g. EOS), sorted. Fewer when the text holds fewer distinct ids."""
    if size < 1:
        raise ValueError(f"size={size} must be >= 1")
    counts = Counter(int(t) for seq in sequences for t in seq)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    chosen = {token for token, _ in ranked[:size]} | {int(t) for t in always}
    if not chosen:
        raise ValueError("no token ids: give the training text's token ids (or ids in `always`)")
    return torch.tensor(sorted(chosen), dtype=torch.long)


class RestrictedHead(nn.Module):
    """Logits over `token_ids` only: the rows of the LM head's weight (and bias) for those ids.
    `ids(index)` maps an argmax over these logits back to vocabulary ids."""

    def __init__(self, lm_head: nn.Linear, token_ids: torch.Tensor):
        super().__init__()
        token_ids = torch.as_tensor(token_ids, dtype=torch.long)
        if token_ids.dim() != 1 or token_ids.numel() == 0:
            raise ValueError("token_ids must be a non-empty 1-d list of vocabulary ids")
        vocab = lm_head.weight.shape[0]
        if int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab:
            raise ValueError(f"token_ids must lie in 0..{vocab - 1} (the LM head's vocabulary)")
        self.register_buffer("token_ids", token_ids.to(lm_head.weight.device))
        self.register_buffer("weight", lm_head.weight.detach()[token_ids].clone())
        bias = getattr(lm_head, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach()[token_ids].clone())

    @property
    def rows(self) -> int:
        return int(self.token_ids.numel())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.weight, self.bias)

    def ids(self, index: torch.Tensor) -> torch.Tensor:
        return self.token_ids[index]
