"""Experiment-tracking callbacks.

Lightning callbacks (configured in conf/callbacks/, built per stage by trainers.build_callbacks):
  ExitHistogram      per-layer exit histograms of the policy at every validation, at test and per
                     training epoch (by memorized-layer bucket), to the loggers and exit_histograms.jsonl
  RewardCurve        the policy stage's reward and its parts per step, to reward_curve.csv (+ wandb charts)
  LayerMetricCurves  per-layer task metric curves as wandb line charts (validation and test)

Hydra callbacks (configured under hydra.callbacks in conf/hydra/default.yaml):
  JobReport          at the end of each job: a wandb `report` run with the Pareto plot and results,
                     and any wandb run a failed job left open is finished
  (ee_lightning.app.sweep.SweepSummary writes the summary of a multirun.)

Names resolve lazily so that Hydra can build its callbacks without importing torch.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "ExitHistogram": "exit_histogram",
    "RewardCurve": "reward_curve",
    "LayerMetricCurves": "layer_curves",
    "JobReport": "job_report",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
