"""Per-token targets for decoder exits, as pure functions over [E, N] tables (E exits, N tokens).

Exits are counted 1..E in the order of the exit layers (with an exit at every layer, exit e is
layer e). A token's memorized exit is the smallest e such that exits e..E all predict its target
(E when the last exit is wrong): `hardness.memorized_layer` applied to the exits' correctness.
The target is the reference token (teacher forcing) or the full model's own next token.
"""
from __future__ import annotations

import torch

from ee_lightning.exits.hardness import memorized_layer

WEIGHT_SCHEMES = ("layer", "uniform")
HARDNESS_TARGETS = ("reference", "full")


def exit_correct(exit_tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[E, N] argmax tokens of each exit and [N] targets -> [E, N] bool (exit e predicts the target)."""
    if exit_tokens.dim() != 2 or targets.shape != exit_tokens.shape[1:]:
        raise ValueError(f"exit_tokens must be [E, N] and targets [N], got {tuple(exit_tokens.shape)} and "
                         f"{tuple(targets.shape)}")
    return exit_tokens == targets.unsqueeze(0)


def token_memorized_exit(exit_tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[E, N], [N] -> [N] long in 1..E: the first exit from which every exit predicts the target."""
    return memorized_layer(exit_correct(exit_tokens, targets))


def hardness_targets(target: str, references: torch.Tensor, full_tokens: torch.Tensor) -> torch.Tensor:
    """The tokens the memorized exit is measured against: the reference ('reference') or the full model's ('full')."""
    if target not in HARDNESS_TARGETS:
        raise ValueError(f"hardness target {target!r}: use one of {HARDNESS_TARGETS}")
    return references if target == "reference" else full_tokens


def agrees_with_last(exit_tokens: torch.Tensor) -> torch.Tensor:
    """[E, N] -> [E - 1, N] bool: exit e's token equals the last exit's (CALM's classifier labels)."""
    if exit_tokens.dim() != 2 or exit_tokens.shape[0] < 2:
        raise ValueError(f"exit_tokens must be [E, N] with E >= 2, got {tuple(exit_tokens.shape)}")
    return exit_tokens[:-1] == exit_tokens[-1:]


def exit_loss_weights(exit_layers: list[int], scheme: str = "layer") -> torch.Tensor:
    """[E] weights summing to 1 for the exits' LM losses: w_l proportional to the layer number l
    ('layer', deeper exits count more, as the encoder side's stage 1) or equal ('uniform')."""
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"loss weights {scheme!r}: use one of {WEIGHT_SCHEMES}")
    weights = torch.tensor(exit_layers, dtype=torch.float32) if scheme == "layer" \
        else torch.ones(len(exit_layers))
    return weights / weights.sum()
