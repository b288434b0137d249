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
              f"layer saving (layer speed-up {method.speedup:.2f}x){versus}")
    print(f"results: {path}")
