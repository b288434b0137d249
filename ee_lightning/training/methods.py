"""The methods ee-train runs: one table, every method in the same run shape.

`app/train.py` does, for each: validate -> check the run directory is writable -> seed -> `build`
(data and model, once) -> seed again -> `run` (the ledgered stages, then the evaluation) -> typed
results -> summary. Seeding again after the build keeps what a build draws (converting the packaged
GGUF builds a random model on a first run only) out of the stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from ee_lightning.data import build_datamodule
from ee_lightning.modeling.backbones import load_tokenizer
from ee_lightning.modeling.saved import build_model
from ee_lightning.results import LMRunResults, RunResults
from ee_lightning.training.lm_pipeline import build_decoder_run, run_consistentee_lm
from ee_lightning.training.stages import Run, run_consistentee, run_finetune


def build_encoder_run(cfg: DictConfig, run_dir: Path, method) -> Run:
    """The tokenizer, the classification data and the early-exit model, built once."""
    tokenizer = load_tokenizer(cfg.backbone)
    datamodule = build_datamodule(cfg.data, tokenizer)
    datamodule.prepare_data()
    datamodule.setup()
    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    model, spec = build_model(plain(cfg.backbone), plain(cfg.head), plain(cfg.policy), datamodule.task, tokenizer,
                              data=plain(cfg.data), tau=cfg.method.get("tau"))
    return Run(cfg, run_dir, datamodule, model, method, spec=spec, tokenizer=tokenizer)


@dataclass(frozen=True)
class Method:
    build: Callable[[DictConfig, Path, object], Run]  # (config, run directory, typed cfg.method) -> the run
    run: Callable[[Run], RunResults | LMRunResults]  # the stages and the evaluation


METHODS = {
    "finetune": Method(build_encoder_run, run_finetune),
    "consistentee": Method(build_encoder_run, run_consistentee),
    "consistentee_lm": Method(build_decoder_run, run_consistentee_lm),
}
