"""ee-train: seed -> instantiate -> fit -> test -> report."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ee_lightning.app.validate import validate_config
from ee_lightning.data import build_datamodule
from ee_lightning.files import check_writable
from ee_lightning.modeling.backbones import load_tokenizer
from ee_lightning.modeling.export import save_encoder
from ee_lightning.modeling.saved import build_model
from ee_lightning.results import LMRunResults, RunResults, format_layer_table
from ee_lightning.training.stages import METHODS, Run

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> RunResults | LMRunResults:
    validate_config(cfg)  # every problem of the config at once, before any data or model loads
    if cfg.method.name == "consistentee_lm":  # decoder LMs: their own data, stages and report
        from ee_lightning.training.lm_pipeline import run_consistentee_lm

        return run_consistentee_lm(cfg)
    if cfg.method.name not in METHODS:
        raise ValueError(f"method={cfg.method.name!r} is not a method; choose one of {sorted(METHODS)}")
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    check_writable(run_dir)  # before any data or model work: an unwritable run directory fails in a second
    tokenizer = load_tokenizer(cfg.backbone)
    datamodule = build_datamodule(cfg.data, tokenizer)
    datamodule.prepare_data()
    datamodule.setup()
    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    model, spec = build_model(plain(cfg.backbone), plain(cfg.head), plain(cfg.policy), datamodule.task, tokenizer,
                              data=plain(cfg.data), tau=cfg.method.get("tau"))
    results = METHODS[cfg.method.name](Run(cfg, run_dir, datamodule, model, spec))
    rank_zero_only(save_encoder)(run_dir / "model", model, spec, tokenizer, spec["tau"], datamodule.max_length)
    print_summary(run_dir, results)
    return results


@rank_zero_only
def print_summary(run_dir: Path, results: RunResults) -> None:
    path = results.write(run_dir)
    print(format_layer_table(results.metric_name, results.layer_metrics, results.val_layer_metrics))
    for name, method in results.methods.items():
        versus = (f"; entropy at that saving {method.entropy_at_same_saving:.4f}"
                  if method.entropy_at_same_saving is not None else "")
        print(f"{name}: {results.metric_name} {method.metric:.4f} at {100 * method.layer_saving:.1f}% "
              f"layer saving (layer speed-up {method.speedup:.2f}x){versus}")
    print(f"results: {path}")
