"""What the tracking callbacks read from a stage's LightningModule, declared once.

A stage is read by a callback only when it has the members of that callback's protocol
(`isinstance(pl_module, CountsExits)`); the systems in `training/systems/` provide them.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class HasExits(Protocol):
    """A stage over a model's exits: the histograms' bins."""

    @property
    def num_exits(self) -> int:
        """E: one bin per exit (1-based in what is written)."""

    @property
    def exit_layers(self) -> list[int]:
        """The layer of each exit, 1-based."""


@runtime_checkable
class CountsExits(HasExits, Protocol):
    """A stage whose evaluation counts the policy's exits (the encoder policy and joint stages, the
    decoders' generation); `callbacks.ExitHistogram` logs the counts at the evaluation's end."""

    evaluates_policy: bool  # False: this stage counts nothing (stage 1)
    exit_buckets: bool  # counts are [3 memorized-layer buckets, E]; False: one row [E]
    exit_counts: dict[str, torch.Tensor]  # split -> counts of the current evaluation, this process's rows


@runtime_checkable
class TrainsPolicy(HasExits, Protocol):
    """A stage that trains an exit policy with REINFORCE: its last step, read by `RewardCurve`,
    `ExitHistogram` (the sampled exits, split train) and `NumericalGuard` (the rewards)."""

    last_policy_step: object  # exits.rl's step (detached), None before the first
    last_policy_memorized: torch.Tensor | None  # the step's rows' memorized layers (exits), 1-based


@runtime_checkable
class HasLayerMetrics(Protocol):
    """A stage that logs a metric per layer under `metric_key(split, layer)` (`LayerMetricCurves`)."""

    task: object  # tasks.TaskSpec: its `metric` names the curves

    @property
    def num_layers(self) -> int:
        """L, the layers (1-based) whose metric is logged."""

    def metric_key(self, split: str, layer: int) -> str:
        """The logged name of `layer`'s metric on `split`."""
