"""Numerical faults: NaN or inf in a logit, a loss or a reward stops the stage at once, saying
where (stage, global step, the batch's row ids) and which checkpoint is the last good one.

`NumericalGuard` (a Lightning callback, conf/callbacks/default.yaml) watches, on every training
step and before the backward pass:
  - the batch's floating tensors (the policy stage reads cached head logits and pooled states),
  - the exit heads' logits and the exit policy's logits (forward hooks on those modules),
  - the loss, and the policy's rewards (`last_policy_step` of the policy and joint stages).
The fault is raised before the optimizer step, so the weights never take a non-finite update and
the stage's last checkpoint (written before the fault) stays the last good state; nothing is saved
after it. With `skip_anomalies: true` the faulty step's update is skipped instead (its gradients
are dropped) and counted (`faults/skipped_steps`), until `max_skips` is exceeded.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from ee_lightning.training.callbacks.protocols import TrainsPolicy

log = logging.getLogger(__name__)


class NumericalFault(RuntimeError):
    """A NaN or inf in training; the message names the stage, the step, the rows and the checkpoint."""


def non_finite(tensors: dict[str, torch.Tensor | None]) -> str | None:
    """The name of the first floating tensor holding a NaN or inf, or None."""
    for name, tensor in tensors.items():
        if tensor is not None and torch.is_tensor(tensor) and tensor.is_floating_point() \
                and not bool(torch.isfinite(tensor.detach()).all()):
            return name
    return None


def bad_rows(tensor: torch.Tensor, rows: list[int] | None) -> list[int] | None:
    """The row ids whose slice of `tensor` ([B, ...], B = the batch's rows) is not finite, else None."""
    if rows is None or not torch.is_tensor(tensor) or tensor.dim() == 0 or tensor.shape[0] != len(rows):
        return None
    finite = torch.isfinite(tensor.detach().reshape(len(rows), -1)).all(dim=1)
    return [row for row, ok in zip(rows, finite.tolist()) if not ok]


class NumericalGuard(Callback):
    def __init__(self, skip_anomalies: bool = False, max_skips: int = 50):
        self.skip_anomalies = bool(skip_anomalies)
        self.max_skips = int(max_skips)
        self.skipped = 0
        self.stage = "?"
        self.checkpoint: Path | None = None
        self._hooks: list = []
        self._fault: str | None = None  # what went non-finite in the current step
        self._rows: list[int] | None = None
        self._offending: list[int] | None = None  # the rows whose values went non-finite, when known
        self._batch_idx = 0
        self._in_step = False  # hooks only judge training steps (not validation, not caching passes)
        self._counted = False  # this step's skip is counted once, however many optimizers step

    def bind_stage(self, stage: str, run_dir: Path) -> None:
        self.stage = stage
        self.checkpoint = Path(run_dir) / "checkpoints" / stage / "last.ckpt"

    # --- watching ------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        model = getattr(pl_module, "model", None)
        watched = {"exit head logits": getattr(model, "heads", None)}
        policy_nets = getattr(getattr(model, "policy", None), "nets", None)
        for layer, net in enumerate(policy_nets or []):
            watched[f"exit policy logits (layer {layer + 1})"] = net
        for name, module in watched.items():
            if isinstance(module, torch.nn.Module):
                self._hooks.append(module.register_forward_hook(self._output_hook(name)))

    def _output_hook(self, name: str):
        def hook(module, inputs, output):
            if self._in_step and self._fault is None and non_finite({name: output if torch.is_tensor(output) else None}):
                self._fault, self._offending = name, bad_rows(output, self._rows)
        return hook

    def on_train_end(self, trainer, pl_module) -> None:
        self._remove_hooks()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_idx, self._in_step, self._counted = batch_idx, True, False
        self._rows = batch["idx"].tolist() if isinstance(batch, dict) and torch.is_tensor(batch.get("idx")) else None
        tensors = {f"batch['{key}']": value for key, value in batch.items()} if isinstance(batch, dict) else {}
        self._fault = non_finite(tensors)
        self._offending = bad_rows(tensors[self._fault], self._rows) if self._fault else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_step, self._fault = False, None

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        step = pl_module.last_policy_step if isinstance(pl_module, TrainsPolicy) else None
        parts = getattr(step, "parts", None)
        self._fault = self._fault or non_finite({"loss": loss, "policy reward": getattr(parts, "reward", None)})
        # Under DDP every process must take the same decision: one that stopped (or skipped) alone
        # would leave the others waiting for its gradients. (One process: the local decision.)
        if trainer.strategy.reduce_boolean_decision(self._fault is not None, all=False) and self._fault is None:
            self._fault = "another process's step"
        if self._fault is not None and not self.skip_anomalies:
            raise NumericalFault(self.stop_message(trainer))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._fault is None:
            return
        # skip_anomalies: no update from this step (an optimizer skips parameters without a gradient).
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        if self._counted:  # a second optimizer of the same step (joint stage)
            return
        self._counted = True
        self.skipped += 1
        log.warning(f"{self.describe(trainer)}: update skipped ({self.skipped} skipped in this stage so far)")
        pl_module.log("faults/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
        if self.skipped > self.max_skips:
            raise NumericalFault(f"{self.skipped} steps of stage {self.stage} had non-finite values, more than "
                                 f"callbacks.numerical_guard.max_skips={self.max_skips}; the last checkpoint is "
                                 f"{self._last_checkpoint()}")

    def describe(self, trainer) -> str:
        """Where: what went non-finite, the stage, the step and the batch's row ids."""
        rows = "unknown (the batch has no 'idx')" if self._rows is None else str(self._rows)
        offending = f", non-finite in rows {self._offending}" if self._offending else ""
        return (f"non-finite value (NaN or inf) in {self._fault}: stage {self.stage}, global step "
                f"{trainer.global_step}, epoch {trainer.current_epoch}, batch {self._batch_idx}, row ids (idx) "
                f"{rows}{offending}")

    def stop_message(self, trainer) -> str:
        return (f"{self.describe(trainer)}. Training stopped before this step's update; the last good checkpoint is "
                f"{self._last_checkpoint()} (rerunning the same command resumes from it). Lower the learning rate, "
                "check those rows, or set callbacks.numerical_guard.skip_anomalies=true to skip such steps")

    def _last_checkpoint(self) -> str:
        return str(self.checkpoint) if self.checkpoint is not None and self.checkpoint.is_file() \
            else "none (no checkpoint was written yet)"

    # --- the skip count travels in checkpoints --------------------------------------------------------
    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
