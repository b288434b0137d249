"""Where the policy exits: one histogram bin per layer, overall and per memorized-layer bucket.

At every validation and test of a stage whose system evaluates the policy (policy, joint), the
greedy exits at tau (accumulated by the system in `exit_counts`) are logged as
  - scalars `<split>/exit/frac_L<l>` and `<split>/exit/<bucket>/frac_L<l>` (every logger, CSV included),
  - a wandb.Histogram `<split>/exit/hist` (one bin per layer, and one per bucket), a bar chart
    `<split>/exit/bar` and a line chart `<split>/exit/by_bucket` (wandb only),
  - one JSON line in `<run dir>/exit_histograms.jsonl` (stage, split, epoch, step, num_exits, counts,
    buckets, exit_layers).
During policy training the exits sampled by the K rollouts are counted the same way and logged
once per epoch as split `train`, bucketed by the training rows' memorized layers.
On an evaluation split, the bucket of a row comes from its own memorized layer on that split. A
system whose evaluated rows have no memorized layer (generated tokens: `exit_buckets = False`)
keeps one row of counts [L] and gets the overall histogram only (`"buckets": {}` in the JSON
line). A system with `exit_layers` (a decoder's exits) numbers its bins by exit, 1..E, and its
JSON line names the layers of its exits.
"""
from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer

from ee_lightning.exits.hardness import BUCKET_NAMES, hardness_buckets
from ee_lightning.training.systems.base import bucket_exit_counts
from ee_lightning.training.callbacks._common import StageCallback, append_jsonl, layer_names, log_to_wandb
from ee_lightning.training.callbacks.protocols import CountsExits, TrainsPolicy


class ExitHistogram(StageCallback):
    def __init__(self, filename: str = "exit_histograms.jsonl", wandb_charts: bool = True, train: bool = True):
        self.filename = filename
        self.wandb_charts = wandb_charts
        self.train = train
        # Sampled training exits of the current epoch (kept in checkpoints, so a resumed epoch keeps its count).
        self._train_total: torch.Tensor | None = None
        self._train_buckets: torch.Tensor | None = None
        self._train_epoch: int | None = None
        self._seen_step = None

    # --- evaluation ---------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._emit_evaluation(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._emit_evaluation(trainer, pl_module, "test")

    def _emit_evaluation(self, trainer: Trainer, pl_module: LightningModule, split: str) -> None:
        if not (isinstance(pl_module, CountsExits) and pl_module.evaluates_policy):
            return
        num_exits = pl_module.num_exits
        bucketed = pl_module.exit_buckets  # [3 buckets, E] counts, else one row [E]
        counts = pl_module.exit_counts.get(split)
        if counts is None:  # no batch on this process: still take part in the reduction
            counts = torch.zeros((3, num_exits) if bucketed else (num_exits,), dtype=torch.long,
                                 device=pl_module.device)
        counts = _sum_over_processes(trainer, counts.to(pl_module.device))
        self._emit(trainer, pl_module, split, counts.sum(0) if bucketed else counts, counts if bucketed else None)

    # --- training -----------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._train_epoch != trainer.current_epoch:
            self._train_total = self._train_buckets = None
            self._train_epoch = trainer.current_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not (self.train and isinstance(pl_module, TrainsPolicy)):
            return
        step = pl_module.last_policy_step
        if step is None or step is self._seen_step:
            return
        self._seen_step = step
        num_exits = pl_module.num_exits
        exits = step.exits.detach().cpu()
        total = torch.bincount(exits.reshape(-1).long() - 1, minlength=num_exits)
        self._train_total = total if self._train_total is None else self._train_total + total
        memorized = pl_module.last_policy_memorized
        if memorized is not None:
            buckets = hardness_buckets(memorized.detach().cpu(), num_exits).view(1, -1)
            counts = bucket_exit_counts(exits, buckets, num_exits)
            self._train_buckets = counts if self._train_buckets is None else self._train_buckets + counts
        self._train_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Systems that train a policy, known the same way on every process (TrainsPolicy's members are
        # set from a stage's start).
        if not (self.train and isinstance(pl_module, TrainsPolicy)):
            return
        num_exits = pl_module.num_exits
        # Every process reduces both tensors (zeros where it has none), so the collectives match.
        total = self._train_total if self._train_total is not None else torch.zeros(num_exits, dtype=torch.long)
        total = _sum_over_processes(trainer, total.to(pl_module.device))
        buckets = self._train_buckets if self._train_buckets is not None else torch.zeros(3, num_exits,
                                                                                           dtype=torch.long)
        buckets = _sum_over_processes(trainer, buckets.to(pl_module.device))
        # No memorized layers (joint stage without a hardness table): no buckets.
        self._emit(trainer, pl_module, "train", total, buckets if int(buckets.sum()) else None)
        self._train_total = self._train_buckets = None

    # --- state: the sampled exits of an unfinished epoch ------------------------------------------
    def state_dict(self) -> dict:
        return {"train_total": None if self._train_total is None else self._train_total.tolist(),
                "train_buckets": None if self._train_buckets is None else self._train_buckets.tolist(),
                "train_epoch": self._train_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self._train_total = _as_counts(state_dict.get("train_total"))
        self._train_buckets = _as_counts(state_dict.get("train_buckets"))
        self._train_epoch = state_dict.get("train_epoch")

    # --- output -------------------------------------------------------------------------------
    def _emit(self, trainer: Trainer, pl_module: LightningModule, split: str, total: torch.Tensor,
              buckets: torch.Tensor | None) -> None:
        total = total.cpu()
        if int(total.sum()) == 0:
            return
        num_exits = total.numel()
        per_bucket = {}
        if buckets is not None:
            per_bucket = {name: buckets[i].cpu() for i, name in enumerate(BUCKET_NAMES)}
        scalars = fraction_scalars(f"{split}/exit", total)
        for name, counts in per_bucket.items():
            if int(counts.sum()):
                scalars.update(fraction_scalars(f"{split}/exit/{name}", counts))
        # Already summed over processes: every process logs the same values.
        pl_module.log_dict(scalars, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1, batch_size=1)
        if not trainer.is_global_zero:
            return
        append_jsonl(self.out_dir(trainer) / self.filename, {
            "stage": self.stage_name(trainer), "split": split, "epoch": trainer.current_epoch,
            "step": trainer.global_step, "num_exits": num_exits, "counts": total.tolist(),
            "buckets": {name: counts.tolist() for name, counts in per_bucket.items()},
            "exit_layers": list(pl_module.exit_layers),
        })
        if self.wandb_charts:
            log_to_wandb(trainer, wandb_exit_charts(split, total, per_bucket, self.stage_name(trainer)))


def fraction_scalars(prefix: str, counts: torch.Tensor) -> dict[str, torch.Tensor]:
    fractions = counts.double() / counts.sum().clamp(min=1)
    return {f"{prefix}/frac_L{layer}": fractions[layer - 1].float() for layer in range(1, counts.numel() + 1)}


def wandb_exit_charts(split: str, total: torch.Tensor, per_bucket: dict, stage: str = "") -> dict:
    """wandb objects for one exit histogram: histograms (a bin per layer), a bar chart, a by-bucket line chart."""
    import numpy as np
    import wandb

    num_exits = total.numel()
    edges = np.arange(num_exits + 1) + 0.5  # bins centred on exits 1..E

    def histogram(counts):
        return wandb.Histogram(np_histogram=(counts.numpy().astype(np.int64), edges))

    title = f"{stage}: {split} exits per layer" if stage else f"{split} exits per layer"
    fractions = (total.double() / total.sum()).tolist()
    table = wandb.Table(columns=["layer", "fraction"], data=[[name, f] for name, f in
                                                             zip(layer_names(num_exits), fractions)])
    values = {
        f"{split}/exit/hist": histogram(total),
        f"{split}/exit/bar": wandb.plot.bar(table, "layer", "fraction", title=title),
    }
    nonempty = {name: counts for name, counts in per_bucket.items() if int(counts.sum())}
    for name, counts in nonempty.items():
        values[f"{split}/exit/{name}/hist"] = histogram(counts)
    if nonempty:
        series = {"all": total, **nonempty}
        values[f"{split}/exit/by_bucket"] = wandb.plot.line_series(
            xs=list(range(1, num_exits + 1)),
            ys=[(c.double() / c.sum()).tolist() for c in series.values()],
            keys=list(series), title=f"{title}, by memorized-layer bucket", xname="layer")
    return values


def _sum_over_processes(trainer: Trainer, tensor: torch.Tensor) -> torch.Tensor:
    if trainer.world_size > 1:
        return trainer.strategy.reduce(tensor, reduce_op="sum")
    return tensor


def _as_counts(value):
    return None if value is None else torch.as_tensor(value, dtype=torch.long)
