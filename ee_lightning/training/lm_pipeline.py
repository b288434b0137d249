"""method=consistentee_lm: ConsistentEE for a decoder LM, every stage, then every exit rule through
real generation.

  1. the frozen decoder's exit states are cached once (teacher-forced on the train references);
  2. stage 1: the exits' low-rank adapters (weighted LM loss over exits);
  3. per-token memorized layer, then the per-token REINFORCE policy; CALM's exit classifier;
  4. every rule at every knob generates on the held-out prompts (evaluation/generation_eval.py):
     ROUGE, agreement with the full model, exit layers, FLOPs, tokens per second;
  5. pareto.csv/md/png and results.json in the run directory.
Stages 1-3 are `training.systems.lm.train_lm_exits`; step 4 is a Lightning test of
`training.systems.generation.GenerationEvalSystem` (stage `lm_generation`). Every stage's Trainer
carries the configured loggers and callbacks (reward curve, exit histograms: in generation, the
policy's exits at its trained tau).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ee_lightning.app.validate import typed
from ee_lightning.config.schema import ConsistentEELMMethod
from ee_lightning.evaluation.generation_eval import comparison_rows, rule_points_grid, write_generation_report
from ee_lightning.modeling.backbones.decoder_build import build_decoder
from ee_lightning.modeling.export import save_decoder
from ee_lightning.modeling.lm_exits import exit_layer_list
from ee_lightning.results import LMRunResults
from ee_lightning.training.systems.lm import train_lm_exits
from ee_lightning.training.systems.generation import GenerationEvalSystem
from ee_lightning.training.trainers import finish_loggers, make_trainer

log = logging.getLogger(__name__)


def generation_batches(datamodule, split: str, batch_size: int, max_prompts: int | None) -> tuple[list[dict], list[str]]:
    batches, references, seen = [], [], 0
    for batch in datamodule.generation_dataloader(split, batch_size=batch_size):
        if max_prompts is not None and seen >= max_prompts:
            break
        if max_prompts is not None and seen + len(batch["references"]) > max_prompts:
            keep = max_prompts - seen
            batch = {k: v[:keep] for k, v in batch.items()}
            # a cut batch may start with a padding column on every row: drop it
            while not bool(batch["attention_mask"][:, 0].any()):
                batch["input_ids"], batch["attention_mask"] = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:]
        batches.append(batch)
        references += list(batch["references"])
        seen += len(batch["references"])
    return batches, references


def run_consistentee_lm(cfg: DictConfig) -> LMRunResults:
    started = time.time()
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.backbone.get("kind") != "decoder":
        raise ValueError(f"method=consistentee_lm needs a decoder backbone (kind: decoder, e.g. backbone=smollm2_135m), "
                         f"got backbone={cfg.backbone.get('name')}")
    decoder, tokenizer = build_decoder(cfg.backbone, cfg.paths.get("cache_dir"))
    # Seeded after the build: converting the packaged GGUF builds a randomly initialised model once,
    # and that draw must not change what the stages draw (a first run would differ from later ones).
    L.seed_everything(cfg.seed, workers=True)
    wants_gpu = str(cfg.trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto")
    device = torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")
    decoder.to(device)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, _convert_="all")
    method: ConsistentEELMMethod = typed(cfg.method)  # validated by ee-train before anything loaded
    # The rule grid against this model's depth now, not after training (a static layer past the
    # last one would otherwise fail only when generation starts).
    rule_points_grid(dataclasses.asdict(method.generation.rules),
                     exit_layer_list(decoder.num_layers, method.lm_exits.exit_every), True, True, decoder.vocab_size)
    opened: list[L.Trainer] = []

    def stage_trainer(stage: str, **overrides) -> L.Trainer:
        """The stage's Trainer from the run's config; the previous stage's wandb run is closed first, so
        that each stage logs to its own run (a WandbLogger joins whichever run is still open)."""
        for trainer in opened:
            finish_loggers(trainer)
        opened[:] = [make_trainer(cfg, stage, run_dir, **overrides)]
        return opened[0]

    trained = train_lm_exits(decoder, datamodule, method.lm_exits, run_dir,
                             trainer_factory=lambda stage, epochs: stage_trainer(stage, max_epochs=epochs),
                             identity={"backbone": cfg.backbone.name, "pretrained_path": str(cfg.backbone.pretrained_path)})
    trained_at = time.time()
    gen = method.generation
    batches, _ = generation_batches(datamodule, gen.split, gen.batch_size, gen.max_prompts)
    modules = [m for m in (trained.exits, trained.policy, trained.classifier) if m is not None]
    for module in modules:
        module.to(device).eval()
    tau = method.lm_exits.policy.tau  # the policy's trained threshold: its exits go to the exit histogram
    rules = rule_points_grid(dataclasses.asdict(gen.rules), trained.exits.exit_layers, trained.policy is not None,
                             trained.classifier is not None, decoder.vocab_size, tau=tau)
    system = GenerationEvalSystem(decoder, tokenizer, trained.exits, rules, gen.max_new_tokens, trained.policy,
                                  trained.classifier, tau=tau)
    # One device, the model's own dtypes (no autocast): the measured generation is the one reported.
    trainer = stage_trainer("lm_generation", devices=1, strategy="auto", precision="32-true")
    trainer.test(system, dataloaders=DataLoader(batches, batch_size=None))  # the batches as they are
    finish_loggers(trainer)
    points, extras = system.report()
    references = system.references  # the prompts tested (trainer.limit_test_batches may cut the split)
    title = f"{cfg.backbone.name} on {datamodule.name} ({gen.split}, {len(references)} prompts)"
    paths = write_generation_report(points, extras, run_dir, title)
    results = LMRunResults(**{
        "method": method.name, "backbone": cfg.backbone.name, "data": datamodule.name, "num_layers": decoder.num_layers,
        "exit_layers": trained.exits.exit_layers, "split": gen.split, "prompts": len(references),
        "max_new_tokens": gen.max_new_tokens, "metric_name": "rougeL", "points": points,
        "consistentee_vs_calm": comparison_rows(points), "training_summary": trained.summary, **extras,
        "seconds": {"training": round(trained_at - started, 1), "evaluation": round(time.time() - trained_at, 1)},
        "report": {k: str(v) for k, v in paths.items()}, "policy_tau": tau if trained.policy is not None else None,
    })
    path = results.write(run_dir)
    save_decoder(run_dir / "model", decoder, tokenizer, trained.exits, trained.policy, trained.classifier,
                 generation={"rules": dataclasses.asdict(gen.rules), "tau": tau, "max_new_tokens": gen.max_new_tokens,
                             "batch_size": gen.batch_size, "max_prompts": gen.max_prompts},
                 data=OmegaConf.to_container(cfg.data, resolve=True), backbone=cfg.backbone.name)
    print(paths["md"].read_text())
    print(f"results: {path}")
    return results
