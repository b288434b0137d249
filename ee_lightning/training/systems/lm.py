"""The decoder stages' LightningModules: the exit-state cache pass, the exits' adapters, the per-token
policy, CALM's classifier, and LoRA on the backbone (the run's order: `training/lm_pipeline.py`).

The decoder stays frozen (unless LoRA trains: then `LoraExitSystem` owns it for its fit). One
teacher-forced pass (`ExitStateCacheSystem`, a Lightning predict, sharded over processes under DDP)
caches every exit layer's hidden state for the response tokens; then three stages train on the cache:

1. adapters (`ExitAdapterSystem`): each exit's LM loss on the reference token, weighted over exits
   (w_l proportional to l by default, as the encoder side's stage 1); or, with
   `adapters.objective=distill` (`systems.exit_distill`), every exit distilled from the full model's
   top-k next tokens at every position of the training text, prompts included;
2. policy (`TokenPolicySystem`): ConsistentEE's REINFORCE per token, tokens in place of instances:
   K rollouts per token over its exit states, reward task - alpha * t * (1 - m/E) with m the token's
   memorized exit (t, m counted in exits; with an exit at every layer they are layers), baseline the
   mean over the K rollouts; the policy reads hidden states only. Optionally (`PropagatedPolicySystem`)
   then fine-tuned on rollouts of whole responses under propagated K/V, which the cache cannot show;
3. classifier (`ExitClassifierSystem`): CALM's trained measure, BCE on "this exit's token equals the
   last exit's".

A decoder a stage only reads is held outside its module tree (`training.held.Held`); each stage puts
it on its own device when it starts (under DDP, the process's device).
"""
from __future__ import annotations

import dataclasses

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ee_lightning.exits.lm_targets import exit_loss_weights
from ee_lightning.exits.rl import RowNoise, sequence_objective, step_statistics
from ee_lightning.inference.lm_cache import exit_state_parts, predicting_positions
from ee_lightning.inference.propagated import propagated_exits
from ee_lightning.modeling.lm_exits import ExitClassifier, LMExitHeads, TokenExitPolicy
from ee_lightning.training.held import Held
from ee_lightning.training.systems.policy import PolicyTrainingMixin, rl_settings


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


def batch_loss(module: L.LightningModule, per_row: torch.Tensor, batch: dict) -> torch.Tensor:
    """What this process minimises for the mean of `per_row` [B] over the batch. A batch of
    `data.resumable.GlobalBatches` is this process's share of the batch: its rows weighted by 1 / the
    batch's rows, times the number of processes, because DDP averages the processes' gradients; the
    update is then the one of the whole batch's mean, as in one process. A batch without weights (a
    plain loader) is the whole batch: its mean."""
    if "weight" not in batch:
        return per_row.mean()
    return (per_row * batch["weight"]).sum() * module.trainer.world_size


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

    def on_fit_start(self):
        self._decoder.model.to(self.device)

    def on_validation_start(self):
        self._decoder.model.to(self.device)

    def exit_logits(self, states: torch.Tensor, layers: list[int],
                    vocabulary: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[B, V] logits of each exit in `layers` from the states of every exit [B, E, H] (only the
        `vocabulary`'s tokens, where one is given)."""
        decoder = self._decoder.model
        dtype = next(decoder.parameters()).dtype
        index = {layer: e for e, layer in enumerate(self.exits.exit_layers)}
        return [self.exits.logits(layer, states[:, index[layer]].to(dtype), decoder, vocabulary).float()
                for layer in layers]

    def training_step(self, batch, batch_idx):
        ce = torch.stack([F.cross_entropy(logits, batch["targets"], reduction="none")
                          for logits in self.exit_logits(batch["states"], self.trained)])  # [E', B]
        per_row = (self.weights.unsqueeze(1) * ce).sum(0)
        self.log("adapter/loss", per_row.detach().mean(), prog_bar=True, batch_size=len(per_row))
        return batch_loss(self, per_row, batch)

    def validation_step(self, batch, batch_idx):
        size = len(batch["targets"])
        for layer, logits in zip(self.exits.exit_layers, self.exit_logits(batch["states"], self.exits.exit_layers)):
            self.log(f"val/token_acc_L{layer}", (logits.argmax(-1) == batch["targets"]).float().mean(), batch_size=size)
            self.log(f"val/ce_L{layer}", F.cross_entropy(logits, batch["targets"]), batch_size=size)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.exits.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class TrainsTokenPolicy:
    """What the callbacks read of a stage that trains the token policy (`callbacks.protocols.HasExits`),
    from that policy: one bin per exit."""

    policy: TokenExitPolicy

    @property
    def num_exits(self) -> int:
        return len(self.policy.exit_layers)

    @property
    def exit_layers(self) -> list[int]:
        return list(self.policy.exit_layers)


class TokenPolicySystem(TrainsTokenPolicy, PolicyTrainingMixin, L.LightningModule):
    """Stage 2: REINFORCE per token over cached exit states and exit scores (ce, correct, memorized),
    the encoders' policy step (`systems.policy.PolicyTrainingMixin`) with tokens for rows and exits
    for layers. Logs `policy/*` (reward and its parts, advantage spread, loss, entropy, mean exit,
    p_exit per exit)."""

    def __init__(self, policy: TokenExitPolicy, k: int = 16, alpha: float = 0.1, task_term: str = "correct",
                 depth_term: str = "hardness", sampler: str = "bernoulli", eps_start: float = 0.3,
                 eps_end: float = 0.0, eps_decay_steps: float = 200, normalize_advantages: bool = False,
                 entropy_bonus: float = 0.0, estimator: str = "reinforce", lr: float = 1e-3, seed: int = 0):
        super().__init__()
        self.policy = policy
        self.save_hyperparameters(ignore=["policy"])
        self.rl = rl_settings(dict(self.hparams))

    def exit_logits(self, states: torch.Tensor) -> torch.Tensor:
        """[B, E, H] -> [E, B] policy logits."""
        per_exit = _layers_first(states)
        return torch.stack([self.policy.logit(layer, per_exit[e]) for e, layer in enumerate(self.policy.exit_layers)])

    def training_step(self, batch, batch_idx):
        # A token named by its row draws its rollouts from its own stream (seed, epoch, row): the same
        # in any batch and any process. Without rows (a plain loader), from the global stream.
        noise = RowNoise(self.hparams.seed, self.current_epoch, batch["row"]) if "row" in batch else None
        step = self.policy_step(self.exit_logits(batch["states"]), batch["ce"].T, batch["correct"].T,
                                batch["memorized"], generator=noise)
        return batch_loss(self, step.instance_loss, batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.policy.parameters(), lr=self.hparams.lr, weight_decay=0.0)


class ResponseRollouts(Dataset):
    """The training responses for rollouts under propagation: item i = a split row's prompt and response
    ids with, per response token, the full model's own token and the token's memorized exit (from the
    response cache, whose tokens are ordered by (row, position))."""

    def __init__(self, split, cache: dict, memorized: torch.Tensor):
        rows, counts = torch.unique_consecutive(cache["rows"], return_counts=True)
        self.split, self.rows = split, rows.tolist()
        self.full_tokens = dict(zip(self.rows, cache["full_tokens"].split(counts.tolist())))
        self.memorized = dict(zip(self.rows, memorized.split(counts.tolist())))
        for row in self.rows:
            if len(self.full_tokens[row]) != len(split.response_ids[row]):
                raise ValueError(f"the response cache has {len(self.full_tokens[row])} tokens of row {row}, whose "
                                 f"response has {len(split.response_ids[row])}: rebuild the cache (delete lm_cache_train)")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {"prompt_ids": self.split.prompt_ids[row], "response_ids": self.split.response_ids[row],
                "full_tokens": self.full_tokens[row], "memorized": self.memorized[row]}


class RolloutCollate:
    """Prompts left-padded (as generation takes them); responses and their per-token tables right-padded."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(item["prompt_ids"]) for item in items)
        steps = max(len(item["response_ids"]) for item in items)
        batch = {"prompt_ids": torch.full((len(items), width), self.pad_id, dtype=torch.long),
                 "prompt_mask": torch.zeros(len(items), width, dtype=torch.long),
                 "response_ids": torch.full((len(items), steps), self.pad_id, dtype=torch.long),
                 "response_mask": torch.zeros(len(items), steps, dtype=torch.long),
                 "full_tokens": torch.zeros(len(items), steps, dtype=torch.long),
                 "memorized": torch.zeros(len(items), steps, dtype=torch.long)}
        for b, item in enumerate(items):
            prompt, n = item["prompt_ids"], len(item["response_ids"])
            batch["prompt_ids"][b, width - len(prompt):] = torch.tensor(prompt)
            batch["prompt_mask"][b, width - len(prompt):] = 1
            batch["response_ids"][b, :n] = torch.tensor(item["response_ids"])
            batch["response_mask"][b, :n] = 1
            batch["full_tokens"][b, :n] = item["full_tokens"]
            batch["memorized"][b, :n] = item["memorized"]
        return batch


class PropagatedPolicySystem(TrainsTokenPolicy, L.LightningModule):
    """Stage 2b: the token policy fine-tuned on K rollouts per training response under propagated K/V
    (`inference.propagated`): each position's reward is stage 2's (its exit's token against the full
    model's, less alpha * t * (1 - m/E)) plus `later_weight` times the discounted agreement of the later
    tokens of its rollout (`rl.sequence_objective`), so an exit that spoils what later tokens see pays for it.
    Starts from stage 2's policy; the decoder and the exits stay frozen, outside the module tree."""

    last_policy_step = None
    last_policy_memorized = None

    def __init__(self, policy: TokenExitPolicy, exits: LMExitHeads, decoder, k: int = 4, alpha: float = 0.1,
                 depth_term: str = "hardness", later_weight: float = 0.5, gamma: float = 0.9,
                 normalize_advantages: bool = False,
                 lr: float = 3e-4, seed: int = 0):
        super().__init__()
        self.policy = policy
        exits.requires_grad_(False)
        self._decoder, self._exits = Held(decoder), Held(exits)
        self.save_hyperparameters(ignore=["policy", "exits", "decoder"])

    def on_fit_start(self):
        self._decoder.model.to(self.device).eval()
        self._exits.model.to(self.device)

    def training_step(self, batch, batch_idx):
        h, k = self.hparams, self.hparams.k
        # the draws depend only on (seed, step): a resumed stage draws what the uninterrupted one did
        generator = torch.Generator(device=self.device).manual_seed(h.seed * 1_000_003 + self.global_step)
        roll = propagated_exits(self._decoder.model, self._exits.model, self.policy, batch["prompt_ids"],
                                batch["prompt_mask"], batch["response_ids"], batch["response_mask"], k=k,
                                generator=generator)
        rows, steps = batch["response_ids"].shape

        def per_rollout(table):  # [B*K, T] (row-major) -> [K, B, T]
            return table.view(rows, k, steps).transpose(0, 1)

        correct = per_rollout(roll.tokens) == batch["full_tokens"].unsqueeze(0)
        probs = roll.probs.view(self.num_exits, rows, k, steps).transpose(1, 2)
        step = sequence_objective(per_rollout(roll.log_prob), per_rollout(roll.exit_index), correct,
                                  batch["memorized"], batch["response_mask"], probs, num_exits=self.num_exits,
                                  alpha=h.alpha, later_weight=h.later_weight, gamma=h.gamma, depth_term=h.depth_term,
                                  normalize_advantages=h.normalize_advantages)
        size = int(batch["response_mask"].sum())
        self.log_dict({f"policy/{name}": value for name, value in step_statistics(step).items()}, batch_size=size,
                      on_step=True, on_epoch=False)
        # for the callbacks (exit histograms, reward curve): the step's valid tokens
        self.last_policy_step = dataclasses.replace(step, loss=step.loss.detach())
        self.last_policy_memorized = batch["memorized"][batch["response_mask"].bool()]
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
        per_row = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0)
        size = len(per_row)
        self.log("classifier/loss", per_row.detach().mean(), prog_bar=True, batch_size=size)
        self.log("classifier/acc", ((logits > 0).float() == labels).float().mean(), batch_size=size)
        return batch_loss(self, per_row, batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.classifier.parameters(), lr=self.lr)


class ExitStateCacheSystem(L.LightningModule):
    """The cache pass as a Lightning predict: each batch's exit states (`inference.lm_cache.exit_state_parts`).
    Under DDP each process predicts every world_size-th batch of the one batch order (its Trainer has
    `use_distributed_sampler=False`), so every sequence is padded as in one process and its states are
    the same; `lm_cache.merge_parts` over all processes' parts orders the tokens."""

    def __init__(self, decoder, exit_layers: list[int], cache_dtype: str = "float32", positions: str = "response",
                 top_k: int | None = None):
        super().__init__()
        self._decoder = Held(decoder)
        self.exit_layers, self.cache_dtype = list(exit_layers), cache_dtype
        self.positions, self.top_k = positions, top_k  # every position with top-k targets: distillation

    def on_predict_start(self):
        self._decoder.model.to(self.device).eval()

    def predict_step(self, batch, batch_idx):
        if batch_idx % self.trainer.world_size != self.trainer.global_rank:
            return None  # another process's batch
        return exit_state_parts(self._decoder.model, batch, self.exit_layers, self.cache_dtype, self.positions,
                                self.top_k)


class LoraExitSystem(L.LightningModule):
    """Stage 1 with LoRA: loss = sum_l w_l CE_l over every exit (the last included), from live passes.

    A batch is a `collate_train` batch (prompt + reference, labels -100 off the response). Each exit's
    state at the positions that predict a response token goes through its adapter, the final norm
    and the LM head; the LoRA weights (in the decoder) and the exits' adapters learn together.

    The decoder is this stage's own submodule, so that the Trainer's strategy (DDP, FSDP) wraps its
    LoRA weights; its checkpoint keeps only the trained weights (LoRA and the exits), not the frozen
    backbone's."""

    strict_loading = False  # the frozen backbone's weights are not in the checkpoint

    def __init__(self, exits: LMExitHeads, decoder, lora_parameters: dict[str, nn.Parameter], lr: float = 2e-4,
                 exits_lr: float = 1e-3, weights: str = "layer"):
        super().__init__()
        if not lora_parameters:
            raise ValueError("no LoRA parameters to train: attach_lora(decoder, settings) first")
        self.exits = exits
        self.decoder = decoder
        self.lora_parameters = lora_parameters
        self.lr, self.exits_lr = lr, exits_lr
        self.register_buffer("weights", exit_loss_weights(exits.exit_layers, weights), persistent=False)
        self.epoch_losses: list[float] = []
        self._sum = self._count = 0.0

    def exit_losses(self, batch) -> torch.Tensor:
        """[E] cross-entropy of each exit on the batch's response tokens."""
        decoder = self.decoder
        states = decoder(batch["input_ids"], batch["attention_mask"])  # start + step per layer
        keep = predicting_positions(batch["labels"])
        targets = batch["labels"][:, 1:][keep]
        return torch.stack([
            F.cross_entropy(self.exits.logits(layer, states[layer - 1][:, :-1][keep], decoder).float(), targets)
            for layer in self.exits.exit_layers])

    def training_step(self, batch, batch_idx):
        ce = self.exit_losses(batch)
        loss = (self.weights * ce).sum()
        size = int(batch["input_ids"].shape[0])
        self.log("lora/loss", loss, prog_bar=True, batch_size=size, on_step=True, on_epoch=True)
        self.log_dict({f"lora/ce_L{layer}": value for layer, value in zip(self.exits.exit_layers, ce.detach())},
                      batch_size=size, on_step=False, on_epoch=True)
        self._sum, self._count = self._sum + float(loss.detach()), self._count + 1
        return loss

    def on_train_start(self):
        self.decoder.train()  # LoRA dropout (and the model's own dropout, as any fine-tuning) while training

    def on_train_epoch_end(self):
        self.epoch_losses.append(self._sum / max(self._count, 1))
        self._sum = self._count = 0.0

    def on_train_end(self):
        self.decoder.eval()

    def trained_keys(self) -> set[str]:
        names = {id(p) for p in self.lora_parameters.values()}
        return {key for key, p in self.named_parameters() if id(p) in names or key.startswith("exits.")}

    def on_save_checkpoint(self, checkpoint):
        keep = self.trained_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["lora_epoch_losses"] = list(self.epoch_losses)

    def on_load_checkpoint(self, checkpoint):
        self.epoch_losses = list(checkpoint.get("lora_epoch_losses", []))

    def configure_optimizers(self):
        return torch.optim.AdamW([{"params": list(self.lora_parameters.values()), "lr": self.lr},
                                  {"params": list(self.exits.parameters()), "lr": self.exits_lr}], weight_decay=0.0)
