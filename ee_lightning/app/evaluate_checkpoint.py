"""ee-eval: one checkpoint, one split, every exit rule at every knob -> pareto.csv / .md / .png.

The checkpoint alone is enough: it carries the model spec (backbone architecture, heads, policy,
task and tokenizer), so the pretrained folder the run started from is not read.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from ee_lightning.app.validate import validate_config
from ee_lightning.data import build_datamodule
from ee_lightning.evaluation.pareto import compare_rules
from ee_lightning.inference.layer_cache import collect_signals
from ee_lightning.modeling.saved import SPEC_KEY, check_same_model, load_parts, model_from_spec
from ee_lightning.training.systems.base import read_checkpoint

log = logging.getLogger(__name__)


def load_checkpoint_model(ckpt_path: str):
    """(model in eval mode, tokenizer, task, spec) from an ee-train checkpoint alone."""
    checkpoint = read_checkpoint(ckpt_path)
    spec = checkpoint[SPEC_KEY]
    model, tokenizer, task = model_from_spec(spec)
    load_parts(model, checkpoint["state_dict"], ("backbone", "heads", "policy"), f"ckpt_path={ckpt_path}")
    return model.eval(), tokenizer, task, spec


def check_expected(spec: dict, cfg: DictConfig, ckpt_path: str) -> None:
    """`expect.backbone` / `expect.task`: refuse a checkpoint of another backbone or task."""
    expect = cfg.get("expect") or {}
    found = {"backbone": spec["backbone"].get("name"), "task": spec["task"]["name"]}
    for key, wanted in expect.items():
        if wanted is not None and found.get(key) != wanted:
            raise ValueError(f"{ckpt_path} holds {key}={found.get(key)!r}, but expect.{key}={wanted!r}; "
                             "pass the checkpoint of the run you mean")


def evaluate(cfg: DictConfig) -> dict:
    validate_config(cfg)  # every problem of the config at once, before the checkpoint or data loads
    model, tokenizer, task, spec = load_checkpoint_model(cfg.ckpt_path)
    check_expected(spec, cfg, cfg.ckpt_path)
    data_cfg = OmegaConf.create(spec["data"])
    if cfg.get("data"):
        # A data config with its own _target_ replaces the checkpoint's; otherwise it overrides keys of it.
        replaces = cfg.data.get("_target_") not in (None, data_cfg.get("_target_"))
        data_cfg = OmegaConf.create(OmegaConf.to_container(cfg.data)) if replaces else OmegaConf.merge(data_cfg, cfg.data)
    with open_dict(data_cfg):
        data_cfg.cache_dir = str(Path(cfg.paths.cache_dir) / "data")
    datamodule = build_datamodule(data_cfg, tokenizer)
    datamodule.prepare_data()
    datamodule.setup()
    check_same_model(spec, datamodule.task, cfg.ckpt_path)
    out_dir = Path(cfg.paths.output_dir)
    tau = cfg.tau if cfg.get("tau") is not None else spec["tau"]
    title = f"{spec['backbone'].get('name')} on {task.name} ({cfg.split})"
    cache = collect_signals(model, datamodule.dataloader(cfg.split, by_length=True), task.is_regression)
    report = compare_rules(model, task, cache, datamodule, cfg.split, out_dir, cfg.report, tau=tau, title=title)
    (out_dir / "eval.json").write_text(json.dumps({"ckpt_path": str(cfg.ckpt_path), "split": cfg.split, **report},
                                                  indent=2, default=str))
    print(f"pareto files: {out_dir}")
    return report
