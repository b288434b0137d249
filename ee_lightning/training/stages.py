"""The stages of a run, each a LightningModule fitted by its own Trainer, on one model built once.

Every method (`training/methods.py`) runs its stages through one `Stages` object: each stage gets
its Trainer from the run's config, starts from its own seed, resumes its interrupted fit from its
`last.ckpt`, and is recorded in the run directory's ledger (`stages.json`), so rerunning into the
same directory (`hydra.run.dir=<run dir>`) never redoes a finished stage.

`method=finetune` runs stage 1. `method=consistentee` runs stage 1 (or starts from `init_from`),
the memorized layers, policy training, optionally the joint stage, then evaluates the policy
against the other exit rules on the test split. The decoder method is `training/lm_pipeline.py`.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from ee_lightning.evaluation.pareto import compare_rules
from ee_lightning.evaluation.rule_points import evaluate_methods
from ee_lightning.exits import hardness as hardness_lib
from ee_lightning.evaluation.frontier import target_text
from ee_lightning.exits.rules import default_grid
from ee_lightning.files import atomic_write_text, load_or_build
from ee_lightning.inference.layer_cache import CachedLayerDataset, collect_signals, collect_states, signals_from_states
from ee_lightning.modeling.export import save_encoder
from ee_lightning.modeling.model import EarlyExitModel
from ee_lightning.modeling.saved import SPEC_KEY, check_same_model, load_parts
from ee_lightning.results import RunResults
from ee_lightning.tasks import TaskSpec
from ee_lightning.training.systems.base import EarlyExitSystem, read_checkpoint
from ee_lightning.training.systems.finetune import FinetuneSystem, layer_loss_weights
from ee_lightning.training.systems.joint import JointSystem
from ee_lightning.training.systems.policy import PolicySystem, rl_settings
from ee_lightning.data.resumable import EpochShuffle, ResumableLoader
from ee_lightning.training.policy_grid import choose_tau, run_frontier, save_policies
from ee_lightning.training.processes import is_global_zero
from ee_lightning.training.resume import seed_stage
from ee_lightning.training.trainers import best_or_last, finish_loggers, make_trainer

log = logging.getLogger(__name__)


class StageLedger:
    """stages.json: which stages of this run finished, and the checkpoint each left."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "stages.json"
        self.stages = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def done(self, stage: str) -> bool:
        return stage in self.stages

    def checkpoint(self, stage: str) -> str | None:
        return self.stages.get(stage, {}).get("checkpoint")

    def info(self, stage: str, key: str, default=None):
        return self.stages.get(stage, {}).get(key, default)

    def mark(self, stage: str, checkpoint: str | None, **info) -> None:
        self.stages[stage] = {"checkpoint": checkpoint, **info}
        if is_global_zero():
            atomic_write_text(self.path, json.dumps(self.stages, indent=2))


class Stages:
    """How a run fits its stages: `make_trainer(stage, max_epochs, **overrides)` gives each stage's
    Trainer (`log=False`: without loggers, for a pass that only computes), every
    stage starts from its own seed, an interrupted fit resumes from its `last.ckpt`, and the ledger
    records what finished."""

    def __init__(self, run_dir: Path, make_trainer, seed: int = 0):
        self.run_dir = Path(run_dir)
        self.ledger = StageLedger(self.run_dir)
        self.make_trainer = make_trainer
        self.seed = int(seed)

    def folder(self, stage: str) -> Path:
        """checkpoints/<stage>/: the stage's checkpoints and the artefacts it leaves (caches, tables)."""
        return self.run_dir / "checkpoints" / stage

    def fit(self, stage: str, system, max_epochs: int, restore: bool = True, trainer: dict | None = None,
            **fit_kwargs) -> str | None:
        """Fit `stage` and record its checkpoint. A fit that was cut off resumes from its last.ckpt; a
        stage the ledger holds as finished is not trained again: with `restore`, its weights are read
        back from its checkpoint (the caller restores what else it needs when `restore` is False).
        `trainer`: arguments of `make_trainer` for this stage."""
        ledger = self.ledger
        if restore and ledger.done(stage) and ledger.checkpoint(stage):
            restore_weights(system, ledger.checkpoint(stage), stage)
            rank_zero_info(f"stage {stage} finished earlier: weights read from {ledger.checkpoint(stage)}")
            return ledger.checkpoint(stage)
        started = time.perf_counter()
        trainer = self.make_trainer(stage, max_epochs, **(trainer or {}))
        seed_stage(self.seed, stage)  # the same stream whether or not earlier stages ran in this process
        # a finished stage fitted again (its artefact went stale) starts over rather than from its end
        resume = None if ledger.done(stage) else interrupted_checkpoint(self.run_dir, stage)
        # weights_only: a stage checkpoint holds tensors and plain containers only (see read_checkpoint)
        trainer.fit(system, ckpt_path=resume, weights_only=True, **fit_kwargs)
        checkpoint = best_or_last(trainer)
        ledger.mark(stage, checkpoint, seconds=round(time.perf_counter() - started, 1))
        finish_loggers(trainer)
        return checkpoint


def restore_weights(system, checkpoint: str, stage: str) -> None:
    """A finished stage's weights, from its Lightning checkpoint, into `system` (its own checkpoint
    hooks run too, for weights it keeps outside its state dict)."""
    state = read_checkpoint(checkpoint, key=f"stages.json {stage}", needs_spec=False)
    system.on_load_checkpoint(state)
    system.load_state_dict(state["state_dict"], strict=getattr(system, "strict_loading", True))


@dataclass
class Run:
    """What every stage of one run shares: its config, directory, data and the model, built once.
    `model` is an `EarlyExitModel` (encoders, with `spec` to rebuild it) or a layer-wise decoder
    (with its `tokenizer`); `method` is the typed `cfg.method`."""

    cfg: DictConfig
    run_dir: Path
    datamodule: object
    model: object
    method: object
    spec: dict | None = None  # rebuilds an encoder model from a checkpoint alone (see modeling.saved)
    tokenizer: object = None
    stages: Stages = field(init=False)

    def __post_init__(self):
        cfg, run_dir = self.cfg, self.run_dir
        self.stages = Stages(run_dir, lambda stage, max_epochs, **overrides: make_trainer(
            cfg, stage, run_dir, max_epochs=max_epochs, **overrides), seed=cfg.seed)

    @property
    def task(self) -> TaskSpec:
        return self.datamodule.task


def interrupted_checkpoint(run_dir: Path, stage: str) -> str | None:
    """The last checkpoint a stage wrote before the run stopped, to resume its fit."""
    last = Path(run_dir) / "checkpoints" / stage / "last.ckpt"
    return str(last) if last.is_file() else None


def load_stage_weights(run: Run, checkpoint: str, parts, key: str) -> None:
    """Load `parts` of a checkpoint into the run's model, refusing one of another backbone or task."""
    state = read_checkpoint(checkpoint, key=key)
    check_same_model(state[SPEC_KEY], run.task, checkpoint, backbone_name=run.cfg.backbone.get("name"))
    load_parts(run.model, state["state_dict"], parts, f"{key}={checkpoint}")


def fit_stage(run: Run, system, stage: str, max_epochs: int, datamodule=None, **fit_kwargs) -> str | None:
    """Fit one encoder stage (resuming its interrupted fit if any) and record its checkpoint; the
    caller reads a finished stage back (`load_stage_weights`, which checks the model's spec)."""
    return run.stages.fit(stage, system, max_epochs, restore=False, datamodule=datamodule, **fit_kwargs)


def test_stage(run: Run, system: EarlyExitSystem, stage: str) -> tuple[list[float], dict]:
    """The test split, once: per-layer metrics (logged), test exit histograms (callbacks) and the
    signal cache the exit rules replay. Under DDP each process saw a shard, so rank 0 makes the
    whole-split cache with one more pass of its own."""
    trainer = make_trainer(run.cfg, f"{stage}-test", run.run_dir)
    trainer.test(system, datamodule=run.datamodule, verbose=False)
    finish_loggers(trainer)
    if trainer.world_size == 1:
        cache = system.test_cache()
    else:
        cache = collect_signals(run.model, run.datamodule.dataloader("test", by_length=True), run.task.is_regression)
    return system.layer_results("test"), cache


def save_model(run: Run, tau: float | None = None) -> None:
    """The saved early-exit model (`<run>/model/`, read by `ee_lightning.load`), written by rank 0, its policy
    at `tau` (the one chosen on validation; None: the config's)."""
    if is_global_zero():
        save_encoder(run.run_dir / "model", run.model, run.spec, run.tokenizer, run.spec["tau"] if tau is None else tau,
                     run.datamodule.max_length)


def base_results(run: Run, test: list[float]) -> RunResults:
    return RunResults(task=run.task.name, metric_name=run.task.metric, num_layers=run.model.num_layers,
                      layer_metrics=test, full=test[-1], backbone=run.cfg.backbone.name, data=run.cfg.data.name,
                      seed=run.cfg.seed)


def finetune_system(run: Run) -> FinetuneSystem:
    stage = run.method.finetune
    return FinetuneSystem(run.model, run.task, run.spec, lr=stage.lr, weight_decay=stage.weight_decay,
                          warmup_ratio=stage.warmup_ratio, layer_weights=stage.layer_weights, head_lr=stage.head_lr,
                          distill_weight=stage.distill_weight, distill_temperature=stage.distill_temperature)


def run_finetune(run: Run) -> RunResults:
    """Stage 1: fit backbone + heads, then test every layer."""
    ledger = run.stages.ledger
    system = finetune_system(run)
    checkpoint = fit_stage(run, system, "finetune", run.method.finetune.epochs, datamodule=run.datamodule)
    trainer_metrics = system.trainer.callback_metrics
    val = system.layer_results("val") if any(k.startswith("val/") for k in trainer_metrics) else None
    results = base_results(run, test_stage(run, system, "finetune")[0])
    results.val_layer_metrics = val
    results.checkpoints = {"finetune": checkpoint}
    results.seconds = {"finetune": ledger.stages["finetune"]["seconds"]}
    save_model(run)
    return results


def stage_one(run: Run, ledger: StageLedger) -> str | None:
    """Backbone and heads of stage 1 in the run's model: from init_from, from this run's finished
    stage 1, or fitted now. Returns the stage-1 checkpoint (None under fast_dev_run, which writes none)."""
    if run.cfg.get("init_from"):
        checkpoint = str(run.cfg.init_from)
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"init_from={checkpoint} does not exist; give the path of a stage-1 .ckpt file")
        load_stage_weights(run, checkpoint, ("backbone", "heads"), key="init_from")
        return checkpoint
    if ledger.done("finetune") and ledger.checkpoint("finetune"):
        load_stage_weights(run, ledger.checkpoint("finetune"), ("backbone", "heads"), key="stages.json finetune")
        return ledger.checkpoint("finetune")
    return fit_stage(run, finetune_system(run), "finetune", run.method.finetune.epochs, datamodule=run.datamodule)


def training_set_outputs(run: Run, checkpoint: str | None):
    """All-layer outputs (pooled states, head logits) and memorized layers of the training set under
    the stage-1 weights. Both are saved beside the stage-1 checkpoint, so every run that starts from
    it (`init_from`, e.g. a sweep over policy knobs) skips the backbone pass and only trains the policy."""
    cfg, datamodule = run.cfg, run.datamodule
    split_size = datamodule.split_size("train")
    meta = None
    if checkpoint:
        meta = hardness_lib.hardness_meta(checkpoint, run.model.num_layers, run.task, split_size,
                                          run.method.hardness.tolerance, hash_contents=False, data=cfg.data.name,
                                          max_train_samples=cfg.data.get("max_train_samples"),
                                          pooling=cfg.head.pooling)
    def build() -> dict:
        return collect_states(run.model, datamodule.dataloader("train", shuffle=False, by_length=True))

    if checkpoint:
        cache = load_or_build(Path(checkpoint).with_suffix(".train_outputs.pt"), meta, build,
                              save=run.method.hardness.cache_train_outputs and is_global_zero())
    else:
        cache = build()
    return cache, memorized_layers(run, cache, checkpoint, meta, split_size)


def memorized_layers(run: Run, cache: dict, checkpoint: str | None, meta: dict | None, split_size: int) -> torch.Tensor:
    """The memorized layer of every training row (a table indexed by row idx), saved beside the
    stage-1 checkpoint and reused."""
    artefact = Path(checkpoint).with_suffix(".hardness.pt") if checkpoint else None
    table = hardness_lib.load_hardness(artefact, meta) if artefact else None
    if table is not None and bool((table[cache["idx"]] > 0).all()):
        rank_zero_info(f"memorized layers reused from {artefact}")
        return table
    correct = hardness_lib.correct_table(run.task, cache["logits"], cache["labels"], run.method.hardness.tolerance)
    memorized = hardness_lib.memorized_layer(correct)
    if artefact and is_global_zero():
        hardness_lib.save_hardness(artefact, memorized, cache["idx"], meta)
        rank_zero_info(f"memorized layers saved to {artefact}")
    table = torch.zeros(max(split_size, int(cache["idx"].max()) + 1), dtype=torch.long)
    table[cache["idx"]] = memorized
    return table


def split_states(run: Run, splits) -> dict[str, dict]:
    """Every layer's pooled states and head logits of each split: policies replay on them without the backbone."""
    return {split: collect_states(run.model, run.datamodule.dataloader(split, by_length=True)) for split in splits}


def operating_point(run: Run, validation: dict, frontier: dict | None = None) -> dict | None:
    """The policy's operating point chosen on the validation split (`method.choose`): {"alpha", "seed", "tau",
    "within_target", "metric", "layer_saving"} (validation). Where the frontier ran, its choice among every
    (alpha, RL seed, tau) it trained; else the policy stage's policy (the config's alpha, the run's seed) at
    the tau chosen for it. None: method.tau as set."""
    tolerance = run.method.choose.tolerance
    if tolerance is None:
        return None
    if frontier and "chosen" in frontier:
        pick = frontier["chosen"]
        return {k: pick[k] for k in ("alpha", "seed", "tau", "within_target")} | {
            k: pick["validation"][k] for k in ("metric", "layer_saving")}
    taus = sorted(set(default_grid("policy", run.model.num_layers)) | {run.method.tau}, reverse=True)
    return {**choose_tau(run.model.policy, validation, run.task, taus, tolerance),
            "alpha": run.method.policy.alpha, "seed": run.cfg.seed}


def run_consistentee(run: Run) -> RunResults:
    cfg, task = run.cfg, run.task
    ledger = run.stages.ledger
    seconds = {}
    method = run.method
    tau, tolerance = method.tau, method.hardness.tolerance
    policy_stage = method.policy
    rl = rl_settings(policy_stage)

    started = time.perf_counter()
    stage1_checkpoint = stage_one(run, ledger)
    seconds["finetune"] = ledger.stages.get("finetune", {}).get("seconds", round(time.perf_counter() - started, 1))

    # Hardness and the policy's training data come from one all-layers pass over the training set.
    started = time.perf_counter()
    cache, table = training_set_outputs(run, stage1_checkpoint)
    memorized = table[cache["idx"]]
    seconds["hardness"] = round(time.perf_counter() - started, 1)
    hardness_hist = hardness_lib.histogram(memorized, run.model.num_layers).tolist()
    rank_zero_info(f"memorized-layer histogram (layers 1..{run.model.num_layers}): {hardness_hist}")

    system = PolicySystem(run.model, task, run.spec, rl=rl, lr=policy_stage.lr, tau=tau, tolerance=tolerance)
    if ledger.done("policy"):
        load_stage_weights(run, ledger.checkpoint("policy"), ("policy",), key="stages.json policy")
    else:
        policy_loader = ResumableLoader(CachedLayerDataset(cache, memorized), batch_size=policy_stage.batch_size,
                                        sampler=EpochShuffle(len(memorized), seed=cfg.seed),
                                        generator=torch.Generator().manual_seed(cfg.seed))
        fit_stage(run, system, "policy", policy_stage.epochs, train_dataloaders=policy_loader,
                  val_dataloaders=run.datamodule.val_dataloader(),
                  trainer={"check_val_every_n_epoch": min(policy_stage.validate_every, policy_stage.epochs)})
    seconds["policy"] = ledger.stages["policy"].get("seconds")
    frontier_cfg, frontier, policies, states = method.frontier, None, {}, {}
    # Rank 0 alone trains the frontier and so may choose another policy (and tau) than the policy stage's; under
    # DDP the other ranks keep that one, which only their share of the test stage's logged exit histograms sees
    # (results, report and saved model are rank 0's).
    if frontier_cfg.alphas and not method.joint.enabled and is_global_zero():
        started = time.perf_counter()  # the frontier's policies read stage 1's heads: the joint stage changes them
        states = split_states(run, ("validation", "test"))
        frontier, policies = run_frontier(run.model.policy, cache, memorized, states, task, policy_stage,
                                          alphas=list(frontier_cfg.alphas),
                                          seeds=[cfg.seed + i for i in range(frontier_cfg.seeds)],
                                          taus=default_grid("policy", run.model.num_layers), tolerance=tolerance,
                                          choose_tolerance=method.choose.tolerance)
        # kept, so that the chosen policy (saved in <run>/model/) can be traced to its file; relative to the
        # run directory, as results.json must not depend on where the run lives (resume and seed checks compare it)
        path = save_policies(run.stages.folder("frontier") / "policies.pt", policies)
        frontier["policies"] = str(Path(path).relative_to(run.run_dir))
        seconds["frontier"] = round(time.perf_counter() - started, 1)
    del cache

    joint = method.joint
    if joint.enabled:
        system = JointSystem(run.model, task, run.spec, rl=rl, lr_model=joint.lr_model, lr_policy=joint.lr_policy,
                             memorized=table, tau=tau, tolerance=tolerance, layer_loss_weight=joint.layer_loss_weight,
                             layer_weights=layer_loss_weights(method.finetune.layer_weights, run.model.num_layers))
        if ledger.done("joint"):
            load_stage_weights(run, ledger.checkpoint("joint"), ("backbone", "heads", "policy"), key="stages.json joint")
        else:
            fit_stage(run, system, "joint", joint.epochs, datamodule=run.datamodule)
        seconds["joint"] = ledger.stages["joint"].get("seconds")

    started = time.perf_counter()
    validation = states.get("validation") or split_states(run, ("validation",))["validation"]
    chosen = operating_point(run, validation, frontier)
    if chosen and policies:  # from here on (test, report, saved model) the run's policy is the chosen one
        run.model.policy.load_state_dict(policies[(chosen["alpha"], chosen["seed"])].state_dict())
    tau = chosen["tau"] if chosen else tau
    seconds["choose"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    layer_metrics, test_cache = test_stage(run, system, "consistentee")
    results = base_results(run, layer_metrics)
    for key, value in evaluate_methods(test_cache, task, tau=tau, tolerance=tolerance).items():
        setattr(results, key, value)
    consistentee = results.methods["consistentee"]
    consistentee.alpha, consistentee.seed = (chosen["alpha"], chosen["seed"]) if chosen else (
        policy_stage.alpha, cfg.seed)
    if chosen:
        results.methods["consistentee"].chosen_on = "validation"
        results.methods["consistentee"].target = target_text(method.choose.tolerance)
        results.methods["consistentee"].chosen_point = {k: chosen[k] for k in ("metric", "layer_saving",
                                                                                "within_target")}
    seconds["evaluate"] = round(time.perf_counter() - started, 1)
    if cfg.get("report") and is_global_zero():
        started = time.perf_counter()
        title = f"{cfg.backbone.name} on {task.name} (test)"
        frontier_rows = frontier["frontier"] if frontier else None
        report = compare_rules(run.model, task, test_cache, run.datamodule, "test", run.run_dir, cfg.report, tau=tau,
                               title=title, frontier_rows=frontier_rows, tolerance=method.choose.tolerance,
                               policy_choice=frontier if frontier and "chosen" in frontier else None,
                               at_savings=frontier.get("at_savings") if frontier else None,
                               choose_on=signals_from_states(validation, task.is_regression, run.model.policy)
                               if chosen else None)
        results.pareto = {"files": report["files"], "summary_within_1pt": report["summary_within_1pt"]}
        results.chosen_points = report["chosen"]
        latency = next((p for p in report["points"] if "latency_b1_ms" in p), None)
        if latency:
            results.methods["consistentee"].wallclock = {
                k: latency[k] for k in latency if k.startswith(("latency_", "plain_", "wallclock_"))}
        seconds["report"] = round(time.perf_counter() - started, 1)
    results.policy_frontier = frontier
    results.hardness_histogram = hardness_hist
    results.checkpoints = {stage: info.get("checkpoint") for stage, info in ledger.stages.items()}
    if stage1_checkpoint:
        results.checkpoints.setdefault("finetune", stage1_checkpoint)
    results.seconds = seconds
    results.objective = results.methods["consistentee"].metric
    save_model(run, tau)
    return results


METHODS = {"finetune": run_finetune, "consistentee": run_consistentee}
