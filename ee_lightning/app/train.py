"""ee-train: seed -> instantiate -> fit -> test -> report."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from ee_lightning.modeling.backbones import load_tokenizer
from ee_lightning.data import build_datamodule
from ee_lightning.training.stages import METHODS
from ee_lightning.results import format_layer_table, write_results

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    if cfg.method.name == "consistentee_lm":  # decoder LMs: their own data, stages and report
        from ee_lightning.training.lm_pipeline import run_consistentee_lm

        return run_consistentee_lm(cfg)
    if cfg.method.name not in METHODS:
        raise ValueError(f"method={cfg.method.name!r} is not a method; choose one of {sorted(METHODS)}")
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    datamodule = build_datamodule(cfg.data, load_tokenizer(cfg.backbone))
    datamodule.prepare_data()
    datamodule.setup()
    _, results = METHODS[cfg.method.name](cfg, datamodule, run_dir)
    report(run_dir, results)
    return results


@rank_zero_only
def report(run_dir: Path, results: dict) -> None:
    path = write_results(run_dir, results)
    print(format_layer_table(results["metric_name"], results["layer_metrics"], results.get("val_layer_metrics")))
    for name, method in results.get("methods", {}).items():
        versus = (f"; entropy at that saving {method['entropy_at_same_saving']:.4f}"
                  if "entropy_at_same_saving" in method else "")
        print(f"{name}: {results['metric_name']} {method['metric']:.4f} at {100 * method['layer_saving']:.1f}% "
              f"layer saving (layer speed-up {method['speedup']:.2f}x){versus}")
    print(f"results: {path}")
