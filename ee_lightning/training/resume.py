"""What a checkpoint must hold so that a stage killed at any step resumes to the same numbers.

Lightning's checkpoint already holds the weights, optimizers, schedulers and loop counters
(global step, epoch, batches done in the epoch). What it lacks, and this module adds:

- the training loaders (`ee_lightning.data.resumable`: `ResumableLoader`, `EpochShuffle`): their
  position inside the epoch travels in the checkpoint, and their order is a function of the epoch.
- `ResumeState`: the torch, numpy and python random states at the checkpoint (dropout, the policy's
  Bernoulli draws), restored before training continues; it also hands the loaders their position.
- `StepCheckpoint`: `last.ckpt` every N optimizer steps as well as at epoch ends, so a kill costs
  at most N steps.
- `AtomicCheckpointIO`: checkpoints written atomically, so a kill mid-save loses nothing.
- `seed_stage`: each stage starts from its own seed, so a stage runs the same whether the stages
  before it ran in this process or were read from the ledger.
"""
from __future__ import annotations

import random
import zlib
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from ee_lightning.files import atomic_torch_save


def rng_state() -> dict:
    """The random states, in types a weights-only `torch.load` reads (tensors, numbers, tuples)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss),
            "python": random.getstate(),
            **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(Callback):
    """Saves the random states in every checkpoint and restores them when a fit resumes from one;
    and hands the training loaders their saved position."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state_dict: dict) -> None:
        # Called while the checkpoint is restored, after the model was built and before the first step.
        set_rng_state(state_dict)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        set_loader_epoch(trainer.train_dataloader, trainer.current_epoch)

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning sets the epoch of samplers, not of batch samplers (LengthGroupedBatches), and calls
        # no epoch-start hook when it resumes mid-epoch: the epoch about to run, set here for both.
        set_loader_epoch(trainer.train_dataloader, trainer.current_epoch)
        # Lightning gives the loaders their saved states when it sets up the training data; but a
        # scheduler sized by `trainer.estimated_stepping_batches` sets the data up before the
        # checkpoint is read, and the states then wait unused. Hand them over now, before the first
        # batch is drawn (a no-op when there are none or they were handed over already).
        trainer.fit_loop._load_combined_loader_states()


def set_loader_epoch(loaders, epoch: int) -> None:
    """`set_epoch(epoch)` on the samplers and batch samplers of a loader (or a list / dict of them)."""
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        samplers = [getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
        # Under DDP Lightning wraps a custom sampler (DistributedSamplerWrapper), and sets the epoch of
        # the wrapper only: the wrapped order (EpochShuffle) must change with the epoch too.
        samplers += [getattr(getattr(s, "dataset", None), "_sampler", None) for s in samplers]
        for sampler in {id(s): s for s in samplers if hasattr(s, "set_epoch")}.values():
            sampler.set_epoch(epoch)


def stage_seed(seed: int, stage: str) -> int:
    """A seed per (run seed, stage); crc32 rather than hash(): the same in every process."""
    return (int(seed) * 1_000_003 + zlib.crc32(stage.encode())) % (2 ** 31)


def seed_stage(seed: int, stage: str) -> None:
    from lightning.fabric.utilities.seed import seed_everything

    seed_everything(stage_seed(seed, stage), workers=True, verbose=False)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole to a temporary file and renamed: a kill during a save leaves the
    previous `last.ckpt` intact, never half of a new one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, Path(path))


class StepCheckpoint(Callback):
    """Writes the stage's `last.ckpt` every `every_n_train_steps` optimizer steps, the file a rerun
    resumes from (ModelCheckpoint writes it at epoch ends)."""

    def __init__(self, every_n_train_steps: int = 100):
        if every_n_train_steps < 1:
            raise ValueError(f"callbacks.step_checkpoint.every_n_train_steps={every_n_train_steps}: need >= 1 "
                             "(or callbacks.step_checkpoint=null to checkpoint at epoch ends only)")
        self.every = int(every_n_train_steps)
        self.path: Path | None = None
        self._saved_at = 0

    def bind_stage(self, stage: str, run_dir: Path) -> None:
        self.path = Path(run_dir) / "checkpoints" / stage / "last.ckpt"

    def on_train_start(self, trainer, pl_module) -> None:
        self._saved_at = trainer.global_step  # a resumed fit does not save its starting point again

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step // every: a manual-optimization stage may take several optimizer steps per batch.
        if self.path is None or trainer.sanity_checking or trainer.fast_dev_run:
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            # The epoch's end is checkpointed by ModelCheckpoint, in a state Lightning resumes from
            # exactly (from a save at the last batch it would run that epoch again).
            return
        if trainer.global_step // self.every > self._saved_at // self.every:
            self._saved_at = trainer.global_step
            trainer.save_checkpoint(self.path)
