"""Exit rules replayed on a split's cached signals (`inference.layer_cache.collect_signals`):
the task metric and the layer cost of every point."""
from __future__ import annotations

import torch

from ee_lightning.evaluation.frontier import value_at_saving
from ee_lightning.exits import hardness as hardness_lib
from ee_lightning.exits.rules import at_exit, build_rule, default_grid, exit_summary, replay, rule_from_grid
from ee_lightning.inference.layer_cache import signal_part
from ee_lightning.results import MethodResult
from ee_lightning.tasks import TaskSpec, is_right, make_metric


def metric_value(task: TaskSpec, predictions: torch.Tensor, labels: torch.Tensor) -> float:
    metric = make_metric(task, sync_on_compute=False)  # the cache already holds the whole split
    metric.update(predictions, labels)
    return float(metric.compute())


def cache_shape(cache: dict) -> tuple[int, int]:
    """(layers, rows) of a signal cache."""
    return tuple(cache["prediction"].shape)


def rule_exits(task: TaskSpec, cache: dict, rule) -> torch.Tensor:
    """Each cached row's exit layer (1..L) under `rule`."""
    return replay(rule, signal_part(cache), labels=cache["labels"], is_regression=task.is_regression)


def evaluate_rule(task: TaskSpec, cache: dict, rule, exits: torch.Tensor | None = None) -> dict:
    """One point: the rule's task metric at its exits, its layer cost, and its exit histogram."""
    num_layers = cache_shape(cache)[0]
    exits = rule_exits(task, cache, rule) if exits is None else exits
    point = {"metric": metric_value(task, at_exit(cache["prediction"], exits), cache["labels"])}
    point.update(exit_summary(exits, num_layers))
    point["exit_histogram"] = torch.bincount(exits - 1, minlength=num_layers).tolist()
    return point


def sweep_rule(task: TaskSpec, cache: dict, name: str, grid: list | None = None) -> list[dict]:
    """Every point of a rule's knob grid (the default grid spans no saving to maximal saving)."""
    num_layers = cache_shape(cache)[0]
    points = []
    for value in (grid if grid is not None else default_grid(name, num_layers, task.output_size)):
        point = evaluate_rule(task, cache, rule_from_grid(name, value, num_layers))
        points.append({"rule": name, "value": value, **point})
    return points


def exits_by_bucket(task: TaskSpec, cache: dict, exits: torch.Tensor, tolerance: float) -> dict:
    """Mean exit layer and exit histogram per memorized-layer bucket (computed from the split's labels)."""
    num_layers = cache_shape(cache)[0]
    correct = is_right(cache["prediction"], cache["labels"].unsqueeze(0), task.is_regression, tolerance)
    buckets = hardness_lib.hardness_buckets(hardness_lib.memorized_layer(correct), num_layers)
    report = {}
    for bucket, name in enumerate(hardness_lib.BUCKET_NAMES):
        chosen = exits[buckets == bucket]
        report[name] = {
            "count": int(chosen.numel()),
            "avg_exit_layer": float(chosen.float().mean()) if chosen.numel() else None,
            "exit_histogram": torch.bincount(chosen - 1, minlength=num_layers).tolist(),
        }
    return report


def evaluate_methods(cache: dict, task: TaskSpec, tau: float, tolerance: float) -> dict:
    """ConsistentEE at tau and the full model, with the entropy rule's curve on the same heads."""
    exits = rule_exits(task, cache, build_rule("policy", tau=tau))
    consistentee = evaluate_rule(task, cache, None, exits=exits)
    full = evaluate_rule(task, cache, build_rule("full"))
    entropy_curve = sweep_rule(task, cache, "entropy") if not task.is_regression else []
    if entropy_curve:
        consistentee["entropy_at_same_saving"] = value_at_saving(entropy_curve, consistentee["layer_saving"])
    return {
        "methods": {"consistentee": MethodResult(tau=tau, **consistentee), "full": MethodResult(**full)},
        "entropy_curve": [{k: p[k] for k in ("value", "metric", "layer_saving")} for p in entropy_curve],
        "consistentee_exits_by_bucket": exits_by_bucket(task, cache, exits, tolerance),
    }
