"""Batches of similar length: less padding, so fewer wasted FLOPs on a CPU.

Training keeps its randomness: indices are shuffled, cut into pools of `pool_batches` batches,
sorted by length inside each pool, cut into batches, and the batches shuffled. Evaluation passes
(no shuffle) simply take the split in length order; every batch carries each row's `idx`.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class LengthGroupedBatches(Sampler[list[int]]):
    def __init__(self, lengths: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0, pool_batches: int = 50):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.lengths = torch.as_tensor(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pool = batch_size * pool_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        if not self.shuffle:
            order = torch.argsort(self.lengths, stable=True)
            yield from (order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size))
            return
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1  # a new order every pass, reproducible from the seed
        order = torch.randperm(len(self.lengths), generator=generator)
        batches = []
        for start in range(0, len(order), self.pool):
            pool = order[start:start + self.pool]
            pool = pool[torch.argsort(self.lengths[pool], stable=True)]
            batches += [pool[i:i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b]
