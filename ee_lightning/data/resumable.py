"""Training loaders that resume mid-epoch: the order is a function of (seed, epoch), and the position
inside the epoch travels in the checkpoint (Lightning saves and restores a loader's `state_dict`).
On resume a loader skips the batches already trained, so the rest of the epoch sees the same batches."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler


class EpochShuffle(Sampler[int]):
    """A random order of `size` rows that depends only on (seed, epoch); Lightning sets the epoch."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class ResumableLoader(DataLoader):
    """A DataLoader that counts the batches it served in the current pass and, after
    `load_state_dict`, starts its next pass past that many.

    Lightning does not pre-fetch from a loader with a length, so at a checkpoint the count equals
    the batches trained in the epoch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._served = 0
        self._epoch = None
        self._resume_at: dict | None = None

    def _order_epoch(self) -> int | None:
        """The epoch the sampler's order is for (Lightning sets it before the pass starts)."""
        for sampler in (self.batch_sampler, self.sampler):
            if hasattr(sampler, "epoch"):
                return int(sampler.epoch)
        return None

    def __iter__(self):
        # A generator: this body runs at the first batch asked for, after Lightning set the epoch.
        resume_at, self._resume_at = self._resume_at, None
        self._epoch, self._served = self._order_epoch(), 0
        batches = super().__iter__()
        # Only the pass the checkpoint was taken in is resumed: one saved at the epoch's last batch
        # resumes into the next epoch, from its start.
        if resume_at and resume_at["epoch"] == self._epoch and 0 < resume_at["served"] < len(self):
            for _ in range(resume_at["served"]):  # loads and collates the skipped rows: cheap next to a step
                next(batches)
            self._served = resume_at["served"]
        for batch in batches:
            self._served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"served": self._served, "epoch": self._epoch}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = {"served": int(state.get("served", 0)), "epoch": state.get("epoch")}
