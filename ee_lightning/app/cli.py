"""Console entry points. Each is a Hydra app over the config tree in conf/."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

import ee_lightning.config  # noqa: F401  (registers the config schemas; misspelt keys get a suggestion)

# ee_lightning/conf: the config tree inside the wheel; in a checkout, a link to the top-level conf/.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def _quiet_defaults() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")


def _log_once() -> None:
    """Lightning adds its own console handler; under Hydra's root handler every line would print twice."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def train_main(cfg: DictConfig) -> float | list[float] | None:
    from ee_lightning.app.sweep import sweep_return
    from ee_lightning.app.train import train

    _log_once()
    results = train(cfg)
    # The value a Hydra sweeper optimises: the last layer's metric, or the method's when there is one;
    # the values named by `optimized_metrics` when set (a list of floats for a multi-objective search).
    return sweep_return(results.to_dict(), cfg.get("optimized_metrics"))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def eval_main(cfg: DictConfig) -> None:
    from ee_lightning.app.evaluate_checkpoint import evaluate

    _log_once()
    evaluate(cfg)


_quiet_defaults()

if __name__ == "__main__":
    train_main()
