"""One run in several processes (DDP): which process writes the run's files, and gathering values."""
from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_only


def is_global_zero() -> bool:
    """Rank 0, also in a DDP process that Lightning launched and that has not joined the group yet
    (its rank comes from the environment)."""
    return rank_zero_only.rank == 0


def all_processes(value) -> list:
    """[value of every process] under DDP (in rank order), [value] in one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
