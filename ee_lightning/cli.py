"""Console entry points. Each is a Hydra app over the config tree in conf/."""
from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def _quiet_defaults() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    from .train import train

    results = train(cfg)
    # The value a Hydra sweeper optimises: the last layer's metric, or the method's when there is one.
    return results.get("objective", results.get("full"))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def eval_main(cfg: DictConfig) -> None:
    from .evaluate import evaluate

    evaluate(cfg)


_quiet_defaults()

if __name__ == "__main__":
    train_main()
