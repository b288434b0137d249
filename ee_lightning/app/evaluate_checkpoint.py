"""ee-eval: one model, one split, every exit rule at every knob -> pareto.csv / .md / .png.

The model is an encoder run's checkpoint (`ckpt_path`) or a saved model folder of either kind
(`model_dir=<run>/model`). Either alone is enough: it carries the backbone's architecture, the
exits, the policy, the task or generation settings and the tokenizer, so the pretrained folder
the run started from is not read. A decoder's folder is evaluated as its run evaluated it: every
rule of the run's grid through real generation (ROUGE, agreement, FLOPs, tokens per second).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from ee_lightning.app.validate import validate_config
from ee_lightning.data import build_datamodule
from ee_lightning.evaluation.generation_eval import rule_points_grid, write_generation_report, write_generations
from ee_lightning.evaluation.pareto import compare_rules
from ee_lightning.inference.layer_cache import collect_signals
from ee_lightning.modeling.export import load_decoder, load_encoder, read_config
from ee_lightning.modeling.saved import SPEC_KEY, check_same_model, load_parts, model_from_spec
from ee_lightning.progress import progress_enabled
from ee_lightning.training.lm_pipeline import generation_batches
from ee_lightning.training.systems.base import read_checkpoint
from ee_lightning.training.systems.generation import GenerationEvalSystem

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


def run_data_config(run_data: dict, cfg: DictConfig) -> DictConfig:
    """The run's data config with ee-eval's `data` overrides: a config with its own _target_ replaces the
    run's; otherwise it overrides keys of it."""
    data_cfg = OmegaConf.create(run_data)
    if cfg.get("data"):
        replaces = cfg.data.get("_target_") not in (None, data_cfg.get("_target_"))
        data_cfg = OmegaConf.create(OmegaConf.to_container(cfg.data)) if replaces else OmegaConf.merge(data_cfg, cfg.data)
    return data_cfg


def evaluate(cfg: DictConfig) -> dict:
    validate_config(cfg)  # every problem of the config at once, before the model or data loads
    if cfg.get("model_dir"):
        source = {"model_dir": str(cfg.model_dir)}
        if read_config(cfg.model_dir)["kind"] == "decoder":
            return evaluate_decoder(cfg)
        model, tokenizer, task, spec = load_encoder(cfg.model_dir)
    else:
        source = {"ckpt_path": str(cfg.ckpt_path)}
        model, tokenizer, task, spec = load_checkpoint_model(cfg.ckpt_path)
    where = next(iter(source.values()))
    check_expected(spec, cfg, where)
    data_cfg = run_data_config(spec["data"], cfg)
    with open_dict(data_cfg):
        data_cfg.cache_dir = str(Path(cfg.paths.cache_dir) / "data")
    datamodule = build_datamodule(data_cfg, tokenizer)
    datamodule.prepare_data()
    datamodule.setup()
    check_same_model(spec, datamodule.task, where)
    out_dir = Path(cfg.paths.output_dir)
    tau = cfg.tau if cfg.get("tau") is not None else spec["tau"]
    title = f"{spec['backbone'].get('name')} on {task.name} ({cfg.split})"
    cache = collect_signals(model, datamodule.dataloader(cfg.split, by_length=True), task.is_regression)
    report = compare_rules(model, task, cache, datamodule, cfg.split, out_dir, cfg.report, tau=tau, title=title)
    (out_dir / "eval.json").write_text(json.dumps({**source, "split": cfg.split, **report}, indent=2, default=str))
    print(f"pareto files: {out_dir}")
    return report


def evaluate_decoder(cfg: DictConfig) -> dict:
    """A decoder's saved folder: every rule of its run's grid through generation on `split`'s prompts
    (the run's prompt count and batch size), on the CPU, as one Lightning test."""
    parts, decoder, tokenizer, config = load_decoder(cfg.model_dir)
    check_expected({"backbone": config["backbone"], "task": {"name": None}}, cfg, str(cfg.model_dir))  # no task
    gen = config["generation"]
    datamodule = instantiate(run_data_config(config["data"], cfg), tokenizer=tokenizer, _convert_="all")
    datamodule.setup()
    batches = generation_batches(datamodule, cfg.split, gen["batch_size"], gen.get("max_prompts"))
    tau = cfg.tau if cfg.get("tau") is not None else gen["tau"]
    has_policy, has_classifier = parts.policy is not None, parts.classifier is not None
    rules = rule_points_grid(gen["rules"], parts.exits.exit_layers, has_policy, has_classifier, decoder.vocab_size,
                             tau=tau if has_policy else None)
    # under kv=defer the run timed that many prompts per batch one at a time, and generate on the same prompts; a
    # folder saved before the key times every prompt deferred (its 'vs generate' is then against generate's batches)
    system = GenerationEvalSystem(decoder, tokenizer, parts.exits, rules, gen["max_new_tokens"], parts.policy,
                                  parts.classifier, tau=tau if has_policy else None, kv=gen.get("kv", "propagate"),
                                  timed_rows=gen.get("timed_per_batch"))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=progress_enabled())
    trainer.test(system, dataloaders=DataLoader(batches, batch_size=None), verbose=False)
    points, extras = system.report()
    out_dir = Path(cfg.paths.output_dir)
    title = f"{config['backbone']['name']} on {datamodule.name} ({cfg.split}, {len(system.references)} prompts)"
    paths = write_generation_report(points, extras, out_dir, title)
    write_generations(system.generations(), out_dir / "generations.jsonl")
    paths["generations"] = out_dir / "generations.jsonl"
    report = {"model_dir": str(cfg.model_dir), "split": cfg.split, "points": points,
              "files": {k: str(v) for k, v in paths.items()}}
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"pareto files: {out_dir}")
    return report
