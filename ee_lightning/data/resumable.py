"""Training loaders that resume mid-epoch: the order is a function of (seed, epoch), and the position
inside the epoch travels in the checkpoint (Lightning saves and restores a loader's `state_dict`).
On resume a loader skips the batches already trained, so the rest of the epoch sees the same batches."""
from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


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


class GlobalBatches(Sampler[list]):
    """The batches of an epoch's order (`EpochShuffle`), `batch_size` rows each, whatever the number of
    processes: under DDP each process takes its share of every batch (rows rank, rank + W, ...), so W
    processes step through the batches that one process would, each on about 1/W of every batch.

    It yields (row, weight) pairs (read by `WeightedRows`): weight is 1 / the rows of the whole batch,
    so that a process's loss, its rows' losses times their weights summed and multiplied by W, makes
    DDP's average of the processes' gradients the gradient of the batch's mean loss. A process whose
    share of a short last batch is empty gets the batch's first row with weight 0 (every process must
    step). The processes are read when a pass starts (the process group exists by then)."""

    def __init__(self, order: EpochShuffle, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.order, self.batch_size = order, int(batch_size)

    @property
    def epoch(self) -> int:
        return self.order.epoch

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __iter__(self):
        rank, world = process_rank_and_count()
        rows = list(self.order)
        for start in range(0, len(rows), self.batch_size):
            yield process_share(rows[start:start + self.batch_size], rank, world)


def process_share(batch: list[int], rank: int, world: int) -> list[tuple[int, float]]:
    """Process `rank`'s (row, weight) pairs of `batch` among `world` processes (`GlobalBatches`)."""
    share = [(row, 1.0 / len(batch)) for row in batch[rank::world]]
    return share or [(batch[0], 0.0)]


def process_rank_and_count() -> tuple[int, int]:
    """(this process's rank, the number of processes) under torch.distributed, (0, 1) without it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class WeightedRows(Dataset):
    """`dataset`'s items, indexed by `GlobalBatches`' (row, weight) pairs: each item dict gets its
    `row` (its index in `dataset`, which names it in any process) and its loss `weight`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, pair: tuple[int, float]) -> dict:
        row, weight = pair
        return {**self.dataset[row], "row": torch.tensor(row), "weight": torch.tensor(weight, dtype=torch.float32)}


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
