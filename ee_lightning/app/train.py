"""ee-train: validate -> check writable -> seed -> build data and model -> stages -> results -> summary,
the same for every method (`training/methods.py`)."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from ee_lightning.app.validate import typed, validate_config
from ee_lightning.files import check_writable
from ee_lightning.results import LMRunResults, RunResults, format_layer_table
from ee_lightning.training.methods import METHODS

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> RunResults | LMRunResults:
    validate_config(cfg)  # every problem of the config at once, before any data or model loads
    if cfg.method.name not in METHODS:
        raise ValueError(f"method={cfg.method.name!r} is not a method; choose one of {sorted(METHODS)}")
    method = METHODS[cfg.method.name]
    run_dir = Path(cfg.paths.output_dir)
    check_writable(run_dir)  # before any data or model work: an unwritable run directory fails in a second
    L.seed_everything(cfg.seed, workers=True)
    run = method.build(cfg, run_dir, typed(cfg.method))
    # Seeded again: whatever the build drew (a first run converts the packaged GGUF through a random
    # model, later runs load it) must not change what the stages draw.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    results = method.run(run)
    print_summary(run_dir, results)
    return results


@rank_zero_only
def print_summary(run_dir: Path, results: RunResults | LMRunResults) -> None:
    path = results.write(run_dir)
    if isinstance(results, RunResults):
        print(format_layer_table(results.metric_name, results.layer_metrics, results.val_layer_metrics))
    else:
        print(Path(results.report["md"]).read_text())
    for name, method in results.methods.items():
        versus = (f"; entropy at that saving {method.entropy_at_same_saving:.4f}"
                  if method.entropy_at_same_saving is not None else "")
        print(f"{name}: {results.metric_name} {method.metric:.4f} at {100 * method.layer_saving:.1f}% "
              f"layer saving (layer speed-up {method.speedup:.2f}x){versus}{policy_text(method)}")
    if isinstance(results, RunResults) and results.policy_frontier and "per_seed" in results.policy_frontier:
        print(seed_spread_text(results.metric_name, results.policy_frontier["per_seed"]))
    print(f"results: {path}")


def policy_text(method) -> str:
    """Which policy and tau a ConsistentEE result is, and how they were chosen."""
    if method.tau is None:
        return ""
    how = f"chosen on {method.chosen_on}" if method.chosen_on else "set in the config"
    if method.target and method.alpha is None:  # a decoder's tau, calibrated for its target
        how += f" for {method.target}"
    missed = ", outside the target" if method.chosen_point and not method.chosen_point.get("within_target", True) else ""
    trained = f"; alpha {method.alpha:g}, RL seed {method.seed}," if method.alpha is not None else ";"
    return f"{trained} tau {method.tau:g}, {how}{missed}"


def seed_spread_text(metric_name: str, per_seed: dict) -> str:
    """Every RL seed's test point at the alpha and validation saving chosen over the seeds' mean: mean and spread."""
    rows, summary = per_seed["seeds"], per_seed["test"]
    missed = "" if per_seed["within_target"] else ", outside the target"
    points = ", ".join(f"seed {r['seed']} (tau {r['tau']:g}) -> {r['test']['metric']:.4f} at "
                       f"{100 * r['test']['layer_saving']:.1f}%" for r in rows)
    return (f"consistentee per RL seed at alpha {per_seed['alpha']:g}, each at its tau nearest "
            f"{100 * per_seed['mean']['validation']['layer_saving']:.1f}% validation layer saving (chosen on validation "
            f"over the seeds' mean{missed}): {points}; {metric_name} mean {summary['metric']:.4f} (spread "
            f"{100 * summary['metric_spread']:.2f} points), layer saving mean {100 * summary['layer_saving']:.1f}% "
            f"(spread {100 * summary['layer_saving_spread']:.1f} points)")
