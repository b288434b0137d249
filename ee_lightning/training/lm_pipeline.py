"""method=consistentee_lm: ConsistentEE for a decoder LM, every stage, then every exit rule through
real generation. The run's shape is every method's (`training/methods.py`); its stages, each in the
ledger (stages.json) and resumed after a kill:

  lm_lora              (optional, GPU) LoRA on the backbone trained with the exits, merged in (training/lm_lora.py);
  lm_cache_train       the frozen decoder's exit states, teacher-forced on the train references (a predict);
  lm_adapters          stage 1: the exits' adapters (weighted LM loss over exits, or distilled from the full
                       model's top-k at every position of the text: adapters.objective=distill);
  lm_scores            every exit's token and cross-entropy on every cached token, and each token's memorized exit;
  lm_adapters_fold<k>, lm_scores_cross_fit  (optional, `lm_exits.cross_fit`) the same scores out of fold: each
                       fold's tokens scored by exits trained on the other folds (training/lm_cross_fit.py);
  lm_policy            the per-token REINFORCE policy;
  lm_policy_propagated (optional) the policy fine-tuned on rollouts of whole responses under propagated K/V;
  lm_classifier        CALM's exit classifier;
  lm_draft_policy      (optional) verify mode's stop rule: keep drafting or verify (training/lm_draft.py);
  lm_cache_<split>     the held-out split's exit states (`lm_exits.evaluate_split`), for the training summary;
  lm_generation        every rule at every knob generates on the held-out prompts (a Lightning test of
                       `systems.generation.GenerationEvalSystem`): ROUGE, agreement with the full model, exit
                       layers, FLOPs, tokens per second -> pareto.csv/md/png.

Each stage's artefacts live in checkpoints/<stage>/, as the encoder stages' do. Every Trainer is the
run's (strategy, devices, precision, loggers and callbacks): under DDP the cache passes and the
generation are split across processes and gathered once, the trained stages are data-parallel.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from tqdm.auto import tqdm
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ee_lightning.config.schema import ConsistentEELMMethod, LMCacheConfig, LMExitsConfig
from ee_lightning.data.resumable import EpochShuffle, GlobalBatches, ResumableLoader, WeightedRows
from ee_lightning.evaluation.calibration import calibrated_on
from ee_lightning.evaluation.generation_eval import (comparison_rows, rule_points_grid, write_generation_report,
                                                     write_generations)
from ee_lightning.exits.hardness import histogram
from ee_lightning.exits.lm_targets import agrees_with_last, exit_correct, hardness_targets, token_memorized_exit
from ee_lightning.exits.rules import policy_exits
from ee_lightning.files import atomic_write_text, load_or_build
from ee_lightning.inference.propagated import propagated_exits
from ee_lightning.inference.lm_cache import (check_exit_layers, confidence_tokens, exit_tables, merge_parts,
                                             response_only, source_meta)
from ee_lightning.modeling.backbones.decoder_build import build_decoder
from ee_lightning.modeling.draft_policy import DraftStopPolicy
from ee_lightning.modeling.export import save_decoder
from ee_lightning.modeling.lm_exits import ExitClassifier, LMExitHeads, TokenExitPolicy, exit_layer_list
from ee_lightning.progress import progress_enabled
from ee_lightning.results import LMRunResults
from ee_lightning.training.lm_distill import distillation
from ee_lightning.training.lm_draft import draft_policy_stage, draft_summary, make_draft_policy
from ee_lightning.training.lm_cross_fit import cross_fitted_scores
from ee_lightning.training.lm_lora import digest, train_backbone_lora
from ee_lightning.training.lm_responses import model_responses
from ee_lightning.training.processes import all_processes, is_global_zero
from ee_lightning.training.stages import Run, Stages
from ee_lightning.training.systems.generation import GenerationEvalSystem
from ee_lightning.training.systems.policy import RL_KEYS
from ee_lightning.training.trainers import finish_loggers
from ee_lightning.training.systems.lm import (ExitAdapterSystem, ExitClassifierSystem, ExitStateCacheSystem,
                                              PropagatedPolicySystem, ResponseRollouts, RolloutCollate,
                                              TokenPolicySystem, TokenStateDataset, _layers_first)

log = logging.getLogger(__name__)


def build_decoder_run(cfg: DictConfig, run_dir: Path, method: ConsistentEELMMethod) -> Run:
    """The decoder, its tokenizer and the generation data, built once."""
    if cfg.backbone.get("kind") != "decoder":
        raise ValueError(f"method=consistentee_lm needs a decoder backbone (kind: decoder, e.g. backbone=smollm2_135m), "
                         f"got backbone={cfg.backbone.get('name')}")
    decoder, tokenizer = build_decoder(cfg.backbone, cfg.paths.get("cache_dir"))
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, _convert_="all")
    datamodule.setup()
    # The rule grid against this model's depth now, not after training (a static layer past the
    # last one would otherwise fail only when generation starts).
    rule_points_grid(dataclasses.asdict(method.generation.rules),
                     exit_layer_list(decoder.num_layers, method.lm_exits.exit_every), True, True, decoder.vocab_size)
    return Run(cfg, run_dir, datamodule, decoder, method, tokenizer=tokenizer)


# --------------------------------------------------------------------------- the exits' stages


@dataclass
class LMExitRun:
    """What `train_lm_exits` produced: the trained modules, the train split's cache and the summary."""

    exits: LMExitHeads
    policy: TokenExitPolicy | None
    classifier: ExitClassifier | None
    cache: dict
    summary: dict
    draft_policy: DraftStopPolicy | None = None  # verify mode's stop rule (stage lm_draft_policy), where trained


def cached_policy_exits(policy: TokenExitPolicy, states: torch.Tensor, tau: float) -> torch.Tensor:
    """Greedy exits (1..E) of cached tokens [N, E, H]: the policy rule (first exit with p > tau, else the last)."""
    return policy_exits(per_exit_probs(policy, states), tau)


def per_exit_probs(heads, states: torch.Tensor, layers: list[int] | None = None, chunk: int = 4096) -> torch.Tensor:
    """[E', N] probabilities of a policy or classifier at `layers` (default: all its exits) over cached
    states [N, E, H], in chunks of tokens (the whole cache may not fit on the device at once)."""
    layers = heads.exit_layers if layers is None else layers
    index = {layer: e for e, layer in enumerate(heads.exit_layers)}
    device = next(heads.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(states), chunk):
            per_exit = _layers_first(states[start:start + chunk].to(device, torch.float32))
            out.append(torch.stack([heads.prob(layer, per_exit[index[layer]]) for layer in layers]).cpu())
    return torch.cat(out, dim=1)


def exit_summary(cache: dict, tables: dict, policy: TokenExitPolicy | None = None, tau: float = 0.5,
                 classifier: ExitClassifier | None = None) -> dict:
    """Per exit: token accuracy against the reference and agreement with the full model's token; with a
    policy, its mean greedy exit (1..E) and the accuracy / agreement of the tokens it emits; with CALM's
    classifier, its accuracy per exit below the last (p > 0.5 vs "same token as the last exit")."""
    correct = exit_correct(tables["tokens"], cache["targets"])
    agree = exit_correct(tables["tokens"], cache["full_tokens"])
    summary = {"tokens": len(cache["targets"]), "token_acc": correct.float().mean(1).tolist(),
               "agreement_with_full": agree.float().mean(1).tolist()}
    if policy is not None:
        at = (cached_policy_exits(policy, cache["states"], tau) - 1).unsqueeze(0)
        summary["policy_mean_exit"] = (at + 1).float().mean().item()
        summary["policy_token_acc"] = correct.gather(0, at).float().mean().item()
        summary["policy_agreement_with_full"] = agree.gather(0, at).float().mean().item()
    if classifier is not None:
        labels = agrees_with_last(tables["tokens"])
        said = per_exit_probs(classifier, cache["states"], classifier.exit_layers[:-1]) > 0.5
        summary["classifier_acc"] = (said == labels).float().mean(1).tolist()
    return summary


@torch.no_grad()
def propagated_summary(decoder, exits: LMExitHeads, policy: TokenExitPolicy, datamodule, split: str, cache: dict,
                       tau: float, batch_size: int) -> dict:
    """The policy's greedy exits (tau) replayed over the split's responses under propagated K/V, as
    generation forced to these tokens would take them (`inference.propagated`): its mean exit (1..E)
    and agreement with the full model's token. Beside `exit_summary`'s numbers from full-depth states,
    it shows what propagation costs the policy before any text is generated."""
    rollouts = ResponseRollouts(datamodule.dataset(split), cache, torch.zeros_like(cache["targets"]))
    loader = DataLoader(rollouts, batch_size=batch_size, collate_fn=RolloutCollate(datamodule.pad_id))
    device = next(decoder.parameters()).device
    agree = exit_sum = count = 0
    for batch in tqdm(loader, desc=f"policy under propagation ({split})", unit="batch", dynamic_ncols=True,
                      disable=not progress_enabled()):
        batch = {key: value.to(device) for key, value in batch.items()}
        roll = propagated_exits(decoder, exits, policy, batch["prompt_ids"], batch["prompt_mask"],
                                batch["response_ids"], batch["response_mask"], tau=tau)
        valid = roll.mask
        agree += int((roll.tokens == batch["full_tokens"])[valid].sum())
        exit_sum += int(roll.exit_index[valid].sum())
        count += int(valid.sum())
    return {"tokens": count, "policy_mean_exit": exit_sum / max(count, 1),
            "policy_agreement_with_full": agree / max(count, 1)}


def split_cache(decoder, datamodule, split: str, exit_layers: list[int], cache_cfg: LMCacheConfig, stages: Stages,
                identity: dict | None, top_k: int | None = None) -> dict:
    """Stage lm_cache_<split>: the split's exit-state cache, one predict pass (split across processes
    under DDP, gathered in every process), saved and reused while its settings hold. With `top_k`
    (distillation) it holds every position of the text and the full model's top-k next tokens."""
    dtype, stage = cache_cfg.dtype, f"lm_cache_{split}"
    check_exit_layers(decoder, exit_layers, dtype)
    meta = {**source_meta(decoder, datamodule, split, identity), "exit_layers": exit_layers, "dtype": dtype,
            "format_version": CACHE_FORMAT}
    positions = "response"
    if top_k:
        positions, meta = "all", {**meta, "positions": "all", "top_k": top_k}

    def build() -> dict:
        loader = datamodule.dataloader(split, "train", batch_size=cache_cfg.batch_size)
        # every process sees the one batch order and predicts its share of the batches (ExitStateCacheSystem)
        trainer = stages.make_trainer(stage, 1, log=False, use_distributed_sampler=False, **REPLICATED)
        parts = trainer.predict(ExitStateCacheSystem(decoder, exit_layers, dtype, positions, top_k), dataloaders=loader)
        return merge_parts([part for shard in all_processes(parts) for part in shard if part is not None], exit_layers)

    cache = load_or_build(stages.folder(stage) / f"exit_states_{split}.pt", meta, build, save=is_global_zero())
    if not stages.ledger.done(stage):
        stages.ledger.mark(stage, None, tokens=len(cache["targets"]))
    return cache


def stage_loader(dataset, batch_size: int, seed: int, collate_fn=None) -> ResumableLoader:
    """A trained stage's loader: its order depends only on (seed, epoch), and it resumes mid-epoch. Its
    batches are the same in any number of processes, each process taking its share of every batch
    with loss weights (`data.resumable.GlobalBatches`; its Trainer: TRAINED). Its own generator: a
    loader's iterator draws a seed when it starts, which must not come from the global stream (a
    resumed stage starts its iterator at another point of that stream)."""
    return ResumableLoader(WeightedRows(dataset), batch_sampler=GlobalBatches(EpochShuffle(len(dataset), seed), batch_size),
                           generator=torch.Generator().manual_seed(seed), collate_fn=collate_fn)


def exit_scores(cache: dict, exits: LMExitHeads, decoder, batch_size: int, hardness_target: str,
                stages: Stages) -> tuple[dict, torch.Tensor]:
    """Stage lm_scores: every exit's token and cross-entropy on every cached token (one LM-head pass
    per exit) and each token's memorized exit, saved in checkpoints/lm_scores/ and read back by a rerun."""
    def build() -> dict:
        tables = exit_tables(cache, exits, decoder, batch_size=batch_size)
        return {**tables, "memorized": token_memorized_exit(tables["tokens"], hardness_targets(
            hardness_target, cache["targets"], cache["full_tokens"]))}

    # keyed by the cache's tokens and the exits' weights: other exits (a rerun of lm_adapters) score again
    meta = {"tokens": len(cache["targets"]), "hardness_target": hardness_target,
            "exits": digest(exits.state_dict())}
    scores = load_or_build(stages.folder("lm_scores") / "scores.pt", meta, build, save=is_global_zero())
    if not stages.ledger.done("lm_scores"):
        stages.ledger.mark("lm_scores", None)
    return {key: scores[key] for key in ("tokens", "ce", "ce_full")}, scores["memorized"]


def out_of_fold_scores(cache: dict, decoder, fold_exits: list[LMExitHeads], cfg: LMExitsConfig,
                       stages: Stages) -> tuple[dict, torch.Tensor]:
    """Stages lm_adapters_fold<k> and lm_scores_cross_fit: `exit_scores`' tables and memorized exits with every
    training token scored by exits that never trained on its response (`lm_cross_fit.cross_fitted_scores`),
    saved in checkpoints/lm_scores_cross_fit/ and read back by a rerun."""
    adapters = cfg.adapters

    def fit_fold(k: int, system, dataset) -> None:  # each fold its own loader order, as its own stage
        # Scores are rebuilt only when the cache or the recipe changed (or were never saved): the folds train
        # again then, rather than read back exits a finished stage made under another recipe.
        stages.fit(f"lm_adapters_fold{k}", system, adapters.epochs, restore=False, trainer=TRAINED,
                   train_dataloaders=stage_loader(dataset, adapters.batch_size, stages.seed + k))

    def build() -> dict:
        return cross_fitted_scores(cache, decoder, fold_exits, fit_fold, adapters, cfg.hardness.target, stages.seed)

    # keyed by the cache's tokens, the folds and the fold exits' recipe (the exits themselves exist only once built)
    meta = {"tokens": len(cache["targets"]), "folds": len(fold_exits), "seed": stages.seed,
            "hardness_target": cfg.hardness.target, "adapter": cfg.adapter, "rank": cfg.rank,
            "adapters": {key: getattr(adapters, key) for key in ("epochs", "lr", "batch_size", "weights", "target")}}
    scores = load_or_build(stages.folder("lm_scores_cross_fit") / "scores.pt", meta, build, save=is_global_zero())
    if not stages.ledger.done("lm_scores_cross_fit"):
        stages.ledger.mark("lm_scores_cross_fit", None, folds=len(fold_exits))
    return {key: scores[key] for key in ("tokens", "ce", "ce_full")}, scores["memorized"]


def make_exits(cfg: LMExitsConfig, decoder) -> LMExitHeads:
    """Fresh exits of `method.lm_exits` on `decoder` (block adapters copy its layers)."""
    return LMExitHeads(decoder.num_layers, decoder.hidden_size, exit_every=cfg.exit_every, rank=cfg.rank,
                       adapter=cfg.adapter, layers=decoder.layers() if cfg.adapter == "block" else None)


# These stages call their modules outside a forward pass (the exits' LM head, the policy on cached
# states, generation): under a sharding strategy (conf/trainer/fsdp.yaml, for LoRA) they run replicated.
REPLICATED = {"replicate": True}
# The trained stages' Trainers: their loaders shard every batch themselves (`stage_loader`), so that
# several processes train on the batches of one.
TRAINED = {**REPLICATED, "use_distributed_sampler": False}

CACHE_FORMAT = 2  # the exit-state cache's layout (inference/lm_cache.py); another value rebuilds old files

# TokenPolicySystem's knobs, read from method.lm_exits.policy: the encoders' REINFORCE settings and lr.
REINFORCE_KEYS = (*RL_KEYS, "lr")


def policy_stage(policy: TokenExitPolicy, policy_cfg, cache: dict, tables: dict, memorized: torch.Tensor,
                 seed: int) -> tuple[TokenPolicySystem, TokenStateDataset]:
    """Stage lm_policy's system and its cached tokens (states, each exit's score, the memorized exit), under
    the typed `method.lm_exits.policy` settings."""
    system = TokenPolicySystem(policy, **{key: getattr(policy_cfg, key) for key in REINFORCE_KEYS}, seed=seed)
    # the task term scores an exit's token against the reference or the full model's own token
    correct = exit_correct(tables["tokens"], hardness_targets(policy_cfg.task_target, cache["targets"],
                                                              cache["full_tokens"]))
    ce = tables["ce" if policy_cfg.task_target == "reference" else "ce_full"]
    return system, TokenStateDataset(cache["states"], ce=ce.T, correct=correct.T, memorized=memorized)


def policy_points(policy: TokenExitPolicy, cache: dict, tables: dict, taus: list[float], num_layers: int) -> list[dict]:
    """The policy at every tau on a cache, teacher-forced (`teacher_forced_point`)."""
    probs = per_exit_probs(policy, cache["states"])
    return [teacher_forced_point(policy_exits(probs, tau).long() - 1, cache, tables, policy.exit_layers, num_layers,
                                 tau=tau) for tau in taus]


def teacher_forced_point(at: torch.Tensor, cache: dict, tables: dict, exit_layers: list[int], num_layers: int,
                         **knob) -> dict:
    """One rule point on a cache from each token's exit index `at` [N] (0..E-1): its layer saving (1 - mean exit
    layer / L), the share of tokens whose exit keeps the full model's token, and how many tokens leave at each
    exit; `knob` (e.g. tau=0.5) names the point."""
    agree = exit_correct(tables["tokens"], cache["full_tokens"])
    layers = torch.tensor(exit_layers)
    return {**knob, "layer_saving": 1 - layers[at].float().mean().item() / num_layers,
            "agreement_with_full": agree.gather(0, at.unsqueeze(0)).float().mean().item(),
            "exits": torch.bincount(at, minlength=len(layers)).tolist()}


def train_lm_exits(decoder, datamodule, cfg: LMExitsConfig, stages: Stages, identity: dict | None = None) -> LMExitRun:
    """Cache -> adapters -> exit scores -> memorized exits -> policy -> classifier -> held-out summary,
    each a stage of `stages` (a finished one is read back, an interrupted one resumes).

    `decoder` is a layer-wise decoder (`modeling.backbones.decoders`): `decoder(input_ids, attention_mask)`
    gives the L layer states, and its step interface replays the policy under propagated K/V;
    `datamodule` is a `data.generation.GenerationDataModule`; `cfg` the typed `method.lm_exits`
    (`app.validate.lm_exits_config` types and checks a plain node); `identity` (e.g. the model name)
    goes into the caches' keys, so another model rebuilds them. With `cfg.lora.enabled` the backbone
    first gets LoRA trained with the exits and merged in (training/lm_lora.py); the cached stages then
    run on the adapted backbone. The summary has the train split's numbers and, under "evaluation",
    those of `cfg.evaluate_split`.
    """
    num_layers, hidden_size = decoder.num_layers, decoder.hidden_size
    # Every module is made before any stage runs: a stage reseeds, so a module made after it would
    # start from other weights when that stage was read back instead of trained.
    exits = make_exits(cfg, decoder)
    fold_exits = [make_exits(cfg, decoder) for _ in range(cfg.cross_fit)]  # out-of-fold scores (lm_cross_fit)
    policy_cfg, classifier_cfg = cfg.policy, cfg.classifier
    policy = (TokenExitPolicy(num_layers, hidden_size, hidden=policy_cfg.hidden, exit_layers=exits.exit_layers)
              if policy_cfg.epochs > 0 else None)
    classifier = (ExitClassifier(num_layers, hidden_size, exit_layers=exits.exit_layers)
                  if classifier_cfg.epochs > 0 and len(exits.exit_layers) > 1 else None)
    draft_cfg = cfg.draft_policy
    draft_policy = make_draft_policy(draft_cfg, exits.exit_layers, num_layers, hidden_size)
    lora_outcome = None
    if cfg.lora.enabled:
        # stage 1 on the backbone itself: LoRA + these exits' adapters, merged before anything is cached;
        # the caches' identity then names the adapted weights
        lora_outcome = train_backbone_lora(decoder, exits, datamodule, cfg.lora, stages, identity,
                                           exits_lr=cfg.adapters.lr, weights=cfg.adapters.weights)
        identity = {**(identity or {}), "lora": lora_outcome.digest}
    if cfg.responses == "model":  # every cache on the text generation produces (training/lm_responses.py)
        for split in dict.fromkeys(["train", *([cfg.evaluate_split] if cfg.evaluate_split else [])]):
            datamodule.use_responses(split, model_responses(decoder, datamodule, split, stages, identity,
                                                            cfg.cache.batch_size))
    # --- distillation (adapters.objective=distill): one pass caches every position of the text with the
    # full model's top-k; the later stages read its response tokens, as they read a response cache
    distilling = cfg.adapters.objective == "distill"
    text_cache = split_cache(decoder, datamodule, "train", exits.exit_layers, cfg.cache, stages, identity,
                             top_k=cfg.adapters.top_k if distilling else None)
    cache = response_only(text_cache)
    # ---
    targets = cache["targets"]
    batch = cfg.adapters.batch_size
    summary: dict = {"exit_layers": exits.exit_layers, "responses": cfg.responses}
    if cfg.confidence_tokens > 0:  # the head rows the frequent_margin signal reads (rules.ConfirmedPolicyRule)
        exits.set_confidence_tokens(confidence_tokens(cache, cfg.confidence_tokens, datamodule.tokenizer.eos_token_id))
        summary["confidence_tokens"] = int(exits.confidence_tokens.numel())
    # the exits before their own stage (untrained, or trained with LoRA): the same on every rerun
    before = exit_summary(cache, exit_tables(cache, exits, decoder, batch_size=batch))
    if lora_outcome is None:
        summary["untrained"] = before
    else:
        summary.update(lora=lora_outcome.summary(), after_lora=before)

    adapters = cfg.adapters
    if adapters.epochs > 0 and distilling:
        system, data, summary["distillation"] = distillation(exits, decoder, text_cache, adapters.vocabulary,
                                                             adapters.lr, adapters.weights)
        stages.fit("lm_adapters", system, adapters.epochs, trainer=TRAINED,
                   train_dataloaders=stage_loader(data, batch, stages.seed))
    elif adapters.epochs > 0:
        system = ExitAdapterSystem(exits, decoder, lr=adapters.lr, weights=adapters.weights)
        # the LM loss's token: the reference (teacher forcing) or the full model's own (distillation)
        adapter_targets = hardness_targets(adapters.target, targets, cache["full_tokens"])
        loader = stage_loader(TokenStateDataset(cache["states"], targets=adapter_targets), batch, stages.seed)
        stages.fit("lm_adapters", system, adapters.epochs, trainer=TRAINED, train_dataloaders=loader)
    exits.to(next(decoder.parameters()).device)

    tables, memorized = exit_scores(cache, exits, decoder, batch, cfg.hardness.target, stages)
    summary["memorized_histogram"] = histogram(memorized, len(exits.exit_layers)).tolist()
    # what the policy, the classifier and the draft policy learn from: the exits' scores on these tokens, or
    # (cross_fit) the scores of exits that never trained on them
    learned_tables, learned_memorized = tables, memorized
    if fold_exits:
        learned_tables, learned_memorized = out_of_fold_scores(cache, decoder, fold_exits, cfg, stages)
        summary["out_of_fold"] = {"folds": cfg.cross_fit, **exit_summary(cache, learned_tables),
                                  "memorized_histogram": histogram(learned_memorized, len(exits.exit_layers)).tolist()}

    if policy is not None:
        system, data = policy_stage(policy, policy_cfg, cache, learned_tables, learned_memorized, stages.seed)
        stages.fit("lm_policy", system, policy_cfg.epochs, trainer=TRAINED,
                   train_dataloaders=stage_loader(data, policy_cfg.batch_size, stages.seed))
        propagated = policy_cfg.propagated
        if propagated.epochs > 0:
            system = PropagatedPolicySystem(policy, exits, decoder, k=propagated.k, alpha=policy_cfg.alpha,
                                            depth_term=policy_cfg.depth_term, later_weight=propagated.later_weight,
                                            gamma=propagated.gamma,
                                            normalize_advantages=policy_cfg.normalize_advantages,
                                            lr=propagated.lr, seed=stages.seed)
            rollouts = ResponseRollouts(datamodule.dataset("train"), cache, learned_memorized)
            stages.fit("lm_policy_propagated", system, propagated.epochs, trainer=TRAINED,
                       train_dataloaders=stage_loader(rollouts, propagated.batch_size, stages.seed,
                                                      collate_fn=RolloutCollate(datamodule.pad_id)))
    summary["train"] = exit_summary(cache, tables, policy, policy_cfg.tau)

    if classifier is not None:
        system = ExitClassifierSystem(classifier, lr=classifier_cfg.lr)
        data = TokenStateDataset(cache["states"], agree=agrees_with_last(learned_tables["tokens"]).T)
        stages.fit("lm_classifier", system, classifier_cfg.epochs, trainer=TRAINED,
                   train_dataloaders=stage_loader(data, classifier_cfg.batch_size, stages.seed))

    if draft_policy is not None:  # verify mode's stop rule, on the draft exit's cached states
        system, data = draft_policy_stage(draft_policy, decoder, exits, cache, learned_tables["tokens"], draft_cfg)
        stages.fit("lm_draft_policy", system, draft_cfg.epochs, trainer=REPLICATED,
                   train_dataloaders=stage_loader(data, draft_cfg.batch_size, stages.seed))
        summary["draft_policy"] = draft_summary(draft_policy, decoder, exits, cache, tables["tokens"])

    split = cfg.evaluate_split
    if split:
        held_out = split_cache(decoder, datamodule, split, exits.exit_layers, cfg.cache, stages, identity)
        held_out_tables = exit_tables(held_out, exits, decoder, batch_size=batch)
        summary["evaluation"] = {"split": split, **exit_summary(held_out, held_out_tables, policy, policy_cfg.tau,
                                                                classifier)}
        if draft_policy is not None:
            summary["evaluation"]["draft_policy"] = draft_summary(draft_policy, decoder, exits, held_out,
                                                                  held_out_tables["tokens"])
        if policy is not None:
            summary["evaluation"]["under_propagation"] = propagated_summary(
                decoder, exits, policy, datamodule, split, held_out, policy_cfg.tau, cfg.cache.batch_size)
    log.info("lm exits trained: %s", summary)
    return LMExitRun(exits, policy, classifier, cache, summary, draft_policy)


# --------------------------------------------------------------------------- generation and the run


def generation_batches(datamodule, split: str, batch_size: int, max_prompts: int | None) -> list[dict]:
    batches, seen = [], 0
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
        seen += len(batch["references"])
    return batches


GENERATIONS_FILE = "generations.jsonl"  # every rule point's tokens and exit layers per prompt, in the run directory


def generation_stage(run: Run, trained: LMExitRun, stage: str = "lm_generation") -> dict:
    """Stage lm_generation: every rule point generates on the held-out prompts, as a Lightning test
    under the run's strategy (batches split across processes, gathered once). Its report is kept in
    checkpoints/<stage>/report.json, so a rerun after it finished does not generate again; each
    prompt's tokens and exit layers under every rule point go to <run>/generations.jsonl.
    Stage lm_calibration does the same on the calibration split's prompts (no generations file)."""
    stages, gen = run.stages, run.method.generation
    split, max_prompts = ((gen.split, gen.max_prompts) if stage == "lm_generation"
                          else (gen.calibration.split, gen.calibration.max_prompts))
    path = stages.folder(stage) / "report.json"
    if stages.ledger.done(stage) and path.is_file():
        return json.loads(path.read_text())
    decoder = run.model
    tau = run.method.lm_exits.policy.tau  # the policy's trained threshold: its exits go to the exit histogram
    rules = rule_points_grid(dataclasses.asdict(gen.rules), trained.exits.exit_layers, trained.policy is not None,
                             trained.classifier is not None, decoder.vocab_size, tau=tau)
    # The calibration reads only the text, so under deferral it takes the batched pass with deferral's tokens
    kv = "real" if stage == "lm_calibration" and gen.kv == "defer" else gen.kv
    system = GenerationEvalSystem(decoder, run.tokenizer, trained.exits, rules, gen.max_new_tokens, trained.policy,
                                  trained.classifier, tau=tau, kv=kv, timed_rows=gen.timed_per_batch)
    # The model's own dtypes (no autocast): the measured generation is the one reported. Each process
    # takes every world_size-th batch itself (a distributed sampler would pad the last shard with repeats).
    trainer = stages.make_trainer(stage, 1, precision="32-true", use_distributed_sampler=False, **REPLICATED)
    batches = generation_batches(run.datamodule, split, gen.batch_size, max_prompts)
    trainer.test(system, dataloaders=DataLoader(batches, batch_size=None))  # the batches as they are
    points, extras = system.report()
    report = {"points": points, "extras": extras, "prompts": len(system.references)}
    if is_global_zero():
        if stage == "lm_generation":
            write_generations(system.generations(), run.run_dir / GENERATIONS_FILE)
        atomic_write_text(path, json.dumps(report, indent=2))
    stages.ledger.mark(stage, None)
    finish_loggers(trainer)
    return report


def run_consistentee_lm(run: Run) -> LMRunResults:
    """The exits' stages, then the generation of every rule; the Pareto files (rank 0) and the results."""
    method, cfg = run.method, run.cfg
    identity = {"backbone": cfg.backbone.name, "pretrained_path": str(cfg.backbone.pretrained_path)}
    trained = train_lm_exits(run.model, run.datamodule, method.lm_exits, run.stages, identity=identity)
    gen = method.generation
    # CALM's calibration: each rule's knob is chosen on prompts the test never sees, before the test
    chosen_on = generation_stage(run, trained, "lm_calibration") if gen.calibration.split else None
    report = generation_stage(run, trained)
    points, extras = report["points"], report["extras"]
    calibration = None
    if chosen_on is not None:
        calibration = {"split": gen.calibration.split, "prompts": chosen_on["prompts"], "level": gen.calibration.level,
                       "key": "rougeL_vs_full",
                       "chosen": calibrated_on(points, chosen_on["points"], gen.calibration.level)}
    # the policy's point: its calibrated tau, else the tau it was trained with
    tau = (calibration or {}).get("chosen", {}).get("policy", {}).get("value", method.lm_exits.policy.tau)
    title = f"{cfg.backbone.name} on {run.datamodule.name} ({gen.split}, {report['prompts']} prompts)"
    paths = ({**write_generation_report(points, extras, run.run_dir, title, calibration),
              "generations": run.run_dir / GENERATIONS_FILE} if is_global_zero() else {})
    seconds = {stage: info.get("seconds") for stage, info in run.stages.ledger.stages.items() if "seconds" in info}
    if is_global_zero():  # the saved early-exit model (ee_lightning.load)
        save_decoder(run.run_dir / "model", run.model, run.tokenizer, trained.exits, trained.policy, trained.classifier,
                     draft_policy=trained.draft_policy,
                     generation={"rules": dataclasses.asdict(gen.rules), "tau": tau,
                                 "max_new_tokens": gen.max_new_tokens, "batch_size": gen.batch_size,
                                 "max_prompts": gen.max_prompts, "kv": gen.kv, "timed_per_batch": gen.timed_per_batch},
                     data=OmegaConf.to_container(cfg.data, resolve=True), backbone=cfg.backbone.name)
    return LMRunResults(**{
        "method": method.name, "backbone": cfg.backbone.name, "data": run.datamodule.name,
        "num_layers": run.model.num_layers, "exit_layers": trained.exits.exit_layers, "split": gen.split,
        "prompts": report["prompts"], "max_new_tokens": gen.max_new_tokens, "metric_name": "rougeL", "points": points,
        "consistentee_vs_calm": comparison_rows(points), "training_summary": trained.summary, **extras,
        "seconds": seconds, "report": {k: str(v) for k, v in paths.items()},
        "policy_tau": tau if trained.policy is not None else None, "calibration": calibration,
    })
