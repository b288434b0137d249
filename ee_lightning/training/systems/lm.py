"""Training a decoder LM's exits on cached frozen states: adapters, the per-token policy, CALM's classifier.

The decoder stays frozen throughout (unless `lora.enabled`: then LoRA on its layers trains with the
exits first and is merged in, training/lm_lora.py). One teacher-forced pass caches every exit layer's
hidden state for the response tokens (`inference.lm_cache`); then three Lightning stages train on the cache:

1. adapters (`ExitAdapterSystem`): each exit's LM loss on the reference token, weighted over exits
   (w_l proportional to l by default, as the encoder side's stage 1);
2. policy (`TokenPolicySystem`): ConsistentEE's REINFORCE per token, tokens in place of instances:
   K rollouts per token over its exit states, reward task - alpha * t * (1 - m/E) with m the token's
   memorized exit (t, m counted in exits; with an exit at every layer they are layers), baseline the
   mean over the K rollouts; the policy reads hidden states only;
3. classifier (`ExitClassifierSystem`): CALM's trained measure, BCE on "this exit's token equals the
   last exit's".

Between 1 and 2, one pass scores every exit on every cached token (argmax token and cross-entropy),
so rollouts cost Bernoulli draws, not LM-head calls.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from ee_lightning.config.schema import LMCacheConfig, LMExitsConfig
from ee_lightning.app.validate import lm_exits_config
from ee_lightning.exits.hardness import histogram
from ee_lightning.exits.lm_targets import (agrees_with_last, exit_correct, exit_loss_weights, hardness_targets,
                                           token_memorized_exit)
from ee_lightning.exits.rules import policy_exits
from ee_lightning.exits.rl import epsilon_schedule, reinforce_objective, step_statistics
from ee_lightning.files import atomic_torch_save
from ee_lightning.inference.lm_cache import collect_exit_states, exit_tables, load_or_build, source_meta
from ee_lightning.modeling.lm_exits import ExitClassifier, LMExitHeads, TokenExitPolicy
from ee_lightning.training.held import Held
from ee_lightning.training.lm_lora import train_backbone_lora

log = logging.getLogger(__name__)


class TokenStateDataset(Dataset):
    """Cached tokens: item i = {"states": [E, H] float32, and row i of every other given tensor}."""

    def __init__(self, states: torch.Tensor, **per_token: torch.Tensor):
        for name, values in per_token.items():
            if len(values) != len(states):
                raise ValueError(f"{name} has {len(values)} rows for {len(states)} cached tokens")
        self.states, self.per_token = states, per_token

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i: int) -> dict:
        return {"states": self.states[i].float(), **{name: values[i] for name, values in self.per_token.items()}}


def _layers_first(batch_states: torch.Tensor) -> torch.Tensor:
    """[B, E, H] -> [E, B, H]: the exits/rl functions take layer-first tables."""
    return batch_states.transpose(0, 1)


class ExitAdapterSystem(L.LightningModule):
    """Stage 1: the exits' adapters learn the next token; loss = sum_l w_l CE_l over exits with an adapter."""

    def __init__(self, exits: LMExitHeads, decoder, lr: float = 1e-3, weights: str = "layer",
                 weight_decay: float = 0.0):
        super().__init__()
        self.exits = exits
        decoder.requires_grad_(False)  # frozen: not this stage's parameters, not in its checkpoint
        self._decoder = Held(decoder)
        self.trained = [layer for layer in exits.exit_layers if layer != exits.num_layers]
        if not self.trained:
            raise ValueError("only the last layer has an exit: there is no adapter to train (lower exit_every)")
        self.lr, self.weight_decay = lr, weight_decay
        self.register_buffer("weights", exit_loss_weights(self.trained, weights), persistent=False)

    def exit_logits(self, states: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        decoder = self._decoder.model
        dtype = next(decoder.parameters()).dtype
        index = {layer: e for e, layer in enumerate(self.exits.exit_layers)}
        return [self.exits.logits(layer, states[:, index[layer]].to(dtype), decoder).float() for layer in layers]

    def training_step(self, batch, batch_idx):
        ce = torch.stack([F.cross_entropy(logits, batch["targets"])
                          for logits in self.exit_logits(batch["states"], self.trained)])
        loss = (self.weights * ce).sum()
        self.log("adapter/loss", loss, prog_bar=True, batch_size=len(batch["targets"]))
        return loss

    def validation_step(self, batch, batch_idx):
        size = len(batch["targets"])
        for layer, logits in zip(self.exits.exit_layers, self.exit_logits(batch["states"], self.exits.exit_layers)):
            self.log(f"val/token_acc_L{layer}", (logits.argmax(-1) == batch["targets"]).float().mean(), batch_size=size)
            self.log(f"val/ce_L{layer}", F.cross_entropy(logits, batch["targets"]), batch_size=size)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.exits.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class TokenPolicySystem(L.LightningModule):
    """Stage 2: REINFORCE per token over cached exit states and exit scores (ce, correct, memorized).

    Logs `policy/*` (reward and its parts, advantage spread, loss, entropy, mean exit, p_exit per
    exit) and keeps `last_policy_step` / `last_policy_memorized` for the reward-curve callback, as
    the encoder policy stage does."""

    def __init__(self, policy: TokenExitPolicy, k: int = 16, alpha: float = 0.1, task_term: str = "correct",
                 depth_term: str = "hardness", sampler: str = "bernoulli", eps_start: float = 0.3,
                 eps_end: float = 0.0, eps_decay_steps: float = 200, normalize_advantages: bool = False,
                 entropy_bonus: float = 0.0, lr: float = 1e-3):
        super().__init__()
        self.policy = policy
        self.save_hyperparameters(ignore=["policy"])
        self.last_policy_step = None
        self.last_policy_memorized = None

    @property
    def num_layers(self) -> int:
        """The number of exits E: the exit-histogram callback counts sampled exits 1..E."""
        return len(self.policy.exit_layers)

    def exit_logits(self, states: torch.Tensor) -> torch.Tensor:
        """[B, E, H] -> [E, B] policy logits."""
        per_exit = _layers_first(states)
        return torch.stack([self.policy.logit(layer, per_exit[e]) for e, layer in enumerate(self.policy.exit_layers)])

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        eps = epsilon_schedule(self.global_step, hp.eps_start, hp.eps_end, hp.eps_decay_steps)
        step = reinforce_objective(
            self.exit_logits(batch["states"]), batch["ce"].T, batch["correct"].T, batch["memorized"], k=hp.k,
            alpha=hp.alpha, task_term=hp.task_term, depth_term=hp.depth_term, sampler=hp.sampler, eps=eps,
            normalize_advantages=hp.normalize_advantages, entropy_bonus=hp.entropy_bonus)
        stats = {f"policy/{name}": value for name, value in step_statistics(step).items()}
        self.log_dict({**stats, "policy/eps": torch.tensor(eps)}, batch_size=len(batch["memorized"]), on_step=True,
                      on_epoch=False)
        self.last_policy_step = dataclasses.replace(step, loss=step.loss.detach(), probs=step.probs.detach())
        self.last_policy_memorized = batch["memorized"]
        return step.loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.policy.parameters(), lr=self.hparams.lr, weight_decay=0.0)


class ExitClassifierSystem(L.LightningModule):
    """Stage 3 (CALM): BCE of each exit's classifier against "this exit's token == the last exit's"."""

    def __init__(self, classifier: ExitClassifier, lr: float = 1e-3):
        super().__init__()
        self.classifier = classifier
        self.lr = lr

    def training_step(self, batch, batch_idx):
        per_exit = _layers_first(batch["states"])
        layers = self.classifier.exit_layers[:-1]
        logits = torch.stack([self.classifier.logit(layer, per_exit[e]) for e, layer in enumerate(layers)])
        labels = batch["agree"].T.float()
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        size = len(labels[0])
        self.log("classifier/loss", loss, prog_bar=True, batch_size=size)
        self.log("classifier/acc", ((logits > 0).float() == labels).float().mean(), batch_size=size)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.classifier.parameters(), lr=self.lr)


# --------------------------------------------------------------------------- the whole run


@dataclass
class LMExitRun:
    """What `train_lm_exits` produced; the modules are also saved under its out_dir."""

    exits: LMExitHeads
    policy: TokenExitPolicy | None
    classifier: ExitClassifier | None
    cache: dict
    tables: dict
    memorized: torch.Tensor
    summary: dict


def default_trainer(stage: str, max_epochs: int) -> L.Trainer:
    """A bare Trainer (no logger, no checkpoints: the runner saves the small exit modules itself)."""
    return L.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_model_summary=False,
                     enable_progress_bar=sys.stderr.isatty(), accelerator="auto", devices=1)


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


def _split_cache(decoder, datamodule, split: str, exit_layers: list[int], cache_cfg: LMCacheConfig, out_dir: Path,
                 identity: dict | None) -> dict:
    """The exit-state cache of one split, built once and reused while its settings hold."""
    dtype = cache_cfg.dtype
    meta = {**source_meta(decoder, datamodule, split, identity), "exit_layers": exit_layers, "dtype": dtype}
    loader = datamodule.dataloader(split, "train", batch_size=cache_cfg.batch_size)
    return load_or_build(out_dir / f"exit_states_{split}.pt", meta,
                         lambda: collect_exit_states(decoder, loader, exit_layers, dtype=dtype))


# TokenPolicySystem's knobs, read from method.lm_exits.policy.
REINFORCE_KEYS = ("k", "alpha", "task_term", "depth_term", "sampler", "eps_start", "eps_end", "eps_decay_steps",
                  "normalize_advantages", "entropy_bonus", "lr")


def train_lm_exits(decoder, datamodule, cfg: LMExitsConfig | dict, out_dir: str | Path, trainer_factory=default_trainer,
                   identity: dict | None = None) -> LMExitRun:
    """Cache -> adapters -> exit scores -> memorized exits -> policy -> classifier -> held-out summary.

    `decoder(input_ids, attention_mask)` gives the L layer states and has final_norm / lm_head;
    `datamodule` is a `data.generation.GenerationDataModule`; `cfg` the `lm_exits` config: the composed
    `method.lm_exits`, an `LMExitsConfig`, or a dict / DictConfig with every key (conf/lm_exits/default.yaml),
    typed and checked here (`app.validate.lm_exits_config`); `trainer_factory(stage, max_epochs)` makes
    each stage's Trainer; `identity` (e.g. the model name) goes into the caches' keys, so another model
    rebuilds them. Writes exit_states_<split>.pt (caches), lm_exits.pt, token_policy.pt, exit_classifier.pt
    in out_dir. With `cfg.lora.enabled` the backbone first gets LoRA trained with the exits and merged in
    (training/lm_lora.py, lora_backbone.pt); the cached stages then run on the adapted backbone.
    The summary has the train split's numbers and, under "evaluation", those of `cfg.evaluate_split`.
    """
    out_dir = Path(out_dir)
    cfg = lm_exits_config(cfg)
    num_layers, hidden_size = decoder.num_layers, decoder.hidden_size
    exits = LMExitHeads(num_layers, hidden_size, exit_every=cfg.exit_every, rank=cfg.rank)
    datamodule.setup()
    lora_outcome = None
    if cfg.lora.enabled:
        # stage 1 on the backbone itself: LoRA + these exits' adapters, merged before anything is cached;
        # the caches' identity then names the adapted weights
        lora_outcome = train_backbone_lora(decoder, exits, datamodule, cfg.lora, out_dir, trainer_factory, identity,
                                           exits_lr=cfg.adapters.lr, weights=cfg.adapters.weights)
        identity = {**(identity or {}), "lora": lora_outcome.digest}
    cache = _split_cache(decoder, datamodule, "train", exits.exit_layers, cfg.cache, out_dir, identity)
    targets = cache["targets"]
    batch = cfg.adapters.batch_size
    before = exit_summary(cache, exit_tables(cache, exits, decoder, batch_size=batch))
    summary: dict = {"exit_layers": exits.exit_layers}
    if lora_outcome is None:
        summary["untrained"] = before
    else:
        summary.update(lora=lora_outcome.summary(), after_lora=before)

    adapters = cfg.adapters
    if adapters.epochs > 0:
        system = ExitAdapterSystem(exits, decoder, lr=adapters.lr, weights=adapters.weights)
        # the LM loss's token: the reference (teacher forcing) or the full model's own (distillation)
        adapter_targets = hardness_targets(adapters.target, targets, cache["full_tokens"])
        loader = DataLoader(TokenStateDataset(cache["states"], targets=adapter_targets), batch_size=batch,
                            shuffle=True)
        trainer_factory("lm_adapters", adapters.epochs).fit(system, train_dataloaders=loader)
    exits.to(next(decoder.parameters()).device)
    atomic_torch_save(exits.state_dict(), out_dir / "lm_exits.pt")

    tables = exit_tables(cache, exits, decoder, batch_size=batch)
    memorized = token_memorized_exit(tables["tokens"], hardness_targets(cfg.hardness.target, targets,
                                                                        cache["full_tokens"]))
    summary["memorized_histogram"] = histogram(memorized, len(exits.exit_layers)).tolist()

    policy, policy_cfg = None, cfg.policy
    if policy_cfg.epochs > 0:
        policy = TokenExitPolicy(num_layers, hidden_size, hidden=policy_cfg.hidden, exit_layers=exits.exit_layers)
        system = TokenPolicySystem(policy, **{key: getattr(policy_cfg, key) for key in REINFORCE_KEYS})
        # the task term scores an exit's token against the reference or the full model's own token
        correct = exit_correct(tables["tokens"], hardness_targets(policy_cfg.task_target, targets,
                                                                  cache["full_tokens"]))
        ce = tables["ce" if policy_cfg.task_target == "reference" else "ce_full"]
        data = TokenStateDataset(cache["states"], ce=ce.T, correct=correct.T, memorized=memorized)
        loader = DataLoader(data, batch_size=policy_cfg.batch_size, shuffle=True)
        trainer_factory("lm_policy", policy_cfg.epochs).fit(system, train_dataloaders=loader)
        atomic_torch_save(policy.state_dict(), out_dir / "token_policy.pt")
    summary["train"] = exit_summary(cache, tables, policy, policy_cfg.tau)

    classifier, classifier_cfg = None, cfg.classifier
    if classifier_cfg.epochs > 0 and len(exits.exit_layers) > 1:
        classifier = ExitClassifier(num_layers, hidden_size, exit_layers=exits.exit_layers)
        system = ExitClassifierSystem(classifier, lr=classifier_cfg.lr)
        data = TokenStateDataset(cache["states"], agree=agrees_with_last(tables["tokens"]).T)
        loader = DataLoader(data, batch_size=classifier_cfg.batch_size, shuffle=True)
        trainer_factory("lm_classifier", classifier_cfg.epochs).fit(system, train_dataloaders=loader)
        atomic_torch_save(classifier.state_dict(), out_dir / "exit_classifier.pt")

    split = cfg.evaluate_split
    if split:
        held_out = _split_cache(decoder, datamodule, split, exits.exit_layers, cfg.cache, out_dir, identity)
        summary["evaluation"] = {"split": split, **exit_summary(
            held_out, exit_tables(held_out, exits, decoder, batch_size=batch), policy, policy_cfg.tau, classifier)}
    log.info("lm exits trained: %s", summary)
    return LMExitRun(exits, policy, classifier, cache, tables, memorized, summary)
