"""A trained early-exit model in your own code: `ee_lightning.load(path)`.

`path` is the folder every ee-train run writes to `<run>/model/` (see `modeling.export`). An
encoder loads as an `EarlyExitClassifier` (`predict`), a decoder as an `EarlyExitGenerator`
(`generate`). Both take the exit rule and its knob as arguments; the default is the run's trained
policy at its trained tau. Nothing of the run is needed: no training config, no pretrained folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ee_lightning.data.base import PadCollator, encode_texts
from ee_lightning.data.generation import collate_generate, encode_prompt
from ee_lightning.evaluation.generation_eval import GENERATION_KV, per_prompt
from ee_lightning.evaluation.text_metrics import trim_generation
from ee_lightning.exits.rules import ExitRule, build_rule, rule_from_grid
from ee_lightning.inference.deferred import generate_deferred_each
from ee_lightning.inference.generate import generate_with_exits
from ee_lightning.inference.runner import EarlyExitRunner
from ee_lightning.inference.verify import generate_verified
from ee_lightning.modeling.export import load_decoder, load_encoder, read_config
from ee_lightning.progress import progress
from ee_lightning.tasks import predictions

GENERATION_MODES = ("exit", "verify")  # per-token early exit; lossless drafting and verification
DRAFT_LENGTH = 3  # verify mode's drafts per round when neither the caller nor a trained draft policy sets it


def load(path: str | Path, device: str | torch.device = "cpu") -> "EarlyExitClassifier | EarlyExitGenerator":
    """The saved model folder at `path` (`<run>/model/`), ready to predict (encoder) or generate (decoder)."""
    kind = read_config(path)["kind"]
    return EarlyExitClassifier(path, device) if kind == "encoder" else EarlyExitGenerator(path, device)


def make_rule(name: str | ExitRule, knob, num_layers: int, tau: float | None) -> ExitRule:
    """The exit rule `name` at `knob`: a value of its knob (a threshold, tau, a layer, a patience), a
    (patience, threshold) pair for pcee, a (tau, margin) pair for confirmed_policy, or a dict of knobs by
    name; None: the policy's trained tau,
    any other rule's default knobs."""
    if isinstance(name, ExitRule):
        return build_rule(name, num_layers=num_layers)
    if name == "policy" and knob is None:
        knob = tau
    if knob is None or isinstance(knob, dict):
        return build_rule(name, num_layers=num_layers, **(knob or {}))
    return rule_from_grid(name, knob, num_layers)


@dataclass
class Predictions:
    """labels: class names (ids where the task has none), or the predicted values of a regression task;
    scores [N, C]: class probabilities at each row's exit ([N] values for regression);
    exit_layers [N]: the layer (1-based) where each row exited."""

    labels: list
    scores: torch.Tensor
    exit_layers: torch.Tensor


class EarlyExitClassifier:
    """An encoder with an exit head after every layer (and a trained policy, where the run trained one)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        model, self.tokenizer, self.task, self.config = load_encoder(path)
        self.model = model.to(device)
        self.runner = EarlyExitRunner(self.model)
        self.max_length = int(self.config["max_length"])
        self.tau = self.config["tau"]
        self.with_token_type_ids = "token_type_ids" in getattr(self.tokenizer, "model_input_names", [])
        pad = self.tokenizer.pad_token_id
        self.collator = PadCollator(0 if pad is None else pad, self.tokenizer.padding_side or "right")

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    def predict(self, texts, rule: str | ExitRule | None = None, knob=None, batch_size: int = 32) -> Predictions:
        """texts: strings, or (first, second) pairs for a pair task; rule: an exit rule name (policy,
        entropy, maxprob, softmax_margin, patience, pcee, static, full) or an ExitRule, default the
        policy at its trained tau (full depth when the run trained no policy); knob: the rule's knob."""
        rule = self._rule(rule, knob)
        firsts, seconds = _split_pairs(texts)
        encoded = encode_texts(self.tokenizer, firsts, seconds, self.max_length, self.with_token_type_ids)
        count = len(firsts)
        scores = torch.zeros((count, self.task.output_size)) if not self.task.is_regression else torch.zeros(count)
        exit_layers = torch.zeros(count, dtype=torch.long)
        # Rows of similar length share a batch (little padding), as the run's evaluation batches them.
        order = sorted(range(count), key=lambda i: len(encoded["input_ids"][i]))
        device = next(self.model.parameters()).device
        for start in progress(range(0, count, batch_size), "predict", unit="batch"):
            rows = order[start:start + batch_size]
            items = [{"input_ids": torch.tensor(encoded["input_ids"][i]), "labels": torch.tensor(0), "idx": i,
                      **({"token_type_ids": torch.tensor(encoded["token_type_ids"][i])}
                         if self.with_token_type_ids else {})} for i in rows]
            batch = {key: value.to(device) for key, value in self.collator(items).items() if key != "labels"}
            outputs, exits = self.runner.run(batch, rule, is_regression=self.task.is_regression)
            outputs = outputs.float().cpu()
            scores[rows] = outputs.squeeze(-1) if self.task.is_regression else torch.softmax(outputs, dim=-1)
            exit_layers[rows] = exits.cpu()
        return Predictions(self._labels(scores), scores, exit_layers)

    def _rule(self, rule, knob) -> ExitRule:
        if rule is None:
            rule = "policy" if self.tau is not None else "full"
        if rule == "policy" and self.tau is None and knob is None:
            raise ValueError("this model's run trained no policy (method=finetune): pass rule='policy' with a "
                             "knob (tau), or another rule (entropy, maxprob, patience, static, full, ...)")
        if getattr(rule, "name", rule) == "oracle":
            raise ValueError("the oracle rule reads the true labels: it is a bound for evaluation (ee-eval), "
                             "not a way to predict")
        return make_rule(rule, knob, self.num_layers, self.tau)

    def _labels(self, scores: torch.Tensor) -> list:
        if self.task.is_regression:
            return scores.tolist()
        ids = predictions(self.task, scores).tolist()
        names = self.task.label_names
        return [names[i] for i in ids] if names else ids


def _split_pairs(texts) -> tuple[list[str], list[str] | None]:
    if isinstance(texts, str):
        raise TypeError("predict takes a list of texts (or of (first, second) pairs), not one string: "
                        "wrap it in a list")
    texts = list(texts)
    pairs = [isinstance(t, (tuple, list)) for t in texts]
    if any(pairs) and not all(pairs):
        raise ValueError("predict got texts and (first, second) pairs mixed: give one kind")
    if not all(pairs):
        return [str(t) for t in texts], None
    if any(len(t) != 2 for t in texts):
        raise ValueError("a text pair must hold exactly two texts: (first, second)")
    return [str(a) for a, _ in texts], [str(b) for _, b in texts]


@dataclass
class Generations:
    """texts: each prompt's answer; tokens: its token ids (up to, not including, EOS);
    exit_layers: per row, each generated token's exit layer (1-based; the EOS token included);
    exit_counts: how many generated tokens exited at layers 1..L (all rows);
    drafts (mode="verify"): rounds, drafted and accepted tokens, acceptance_rate (all rows), the
        draft_layer, draft_length and stop rule used ("policy", "confidence" or "length")."""

    texts: list[str]
    tokens: list[list[int]]
    exit_layers: list[list[int]]
    exit_counts: list[int]
    drafts: dict | None = None


class EarlyExitGenerator:
    """A decoder LM with per-token exits, a token policy and CALM's exit classifier (where trained)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        parts, decoder, self.tokenizer, self.config = load_decoder(path)
        self.parts, self.decoder = parts.to(device), decoder
        self.generation, self.prompts = self.config["generation"], self.config["prompts"]
        self.tau = self.generation["tau"] if parts.policy is not None else None

    @property
    def num_layers(self) -> int:
        return self.decoder.num_layers

    def _rows(self, prompts) -> list[dict]:
        return [{"prompt_ids": encode_prompt(self.tokenizer, str(p), self.prompts["max_prompt_length"],
                                             self.prompts.get("system_prompt"), f"prompt {i}")[0],
                 "reference": "", "prompt": str(p), "idx": i} for i, p in enumerate(prompts)]

    def _verify(self, prompts, max_new_tokens, draft_layer, draft_length, min_confidence) -> Generations:
        stop = self.parts.draft_policy  # the run's learned stop rule drafts at its own layer
        if stop is not None and draft_layer not in (None, stop.draft_layer):
            stop = None
        if draft_layer is None and stop is None:
            raise ValueError(f"mode='verify' needs draft_layer=E, the exit that drafts: one of the exits below the "
                             f"last, {list(self.parts.exits.exit_layers)[:-1]} (this model has no trained draft policy "
                             "to choose it)")
        draft_layer = stop.draft_layer if draft_layer is None else draft_layer
        if draft_length is None:
            draft_length = stop.max_drafts if stop is not None else DRAFT_LENGTH
        max_new_tokens = int(max_new_tokens or self.generation["max_new_tokens"])
        eos = self.generation["eos_token_id"]
        device = next(self.decoder.parameters()).device
        L = self.num_layers
        tokens, exit_layers, drafts = [], [], {"rounds": 0, "drafted": 0, "accepted": 0}
        for row in progress(self._rows(prompts), "generate (verify)", unit="prompt"):
            ids = torch.tensor([row["prompt_ids"]], device=device)
            out = generate_verified(self.decoder, self.parts.exits, ids, torch.ones_like(ids), max_new_tokens,
                                    draft_layer=draft_layer, draft_length=draft_length, eos_token_id=eos,
                                    min_confidence=min_confidence, stop=stop)
            new = out.new_tokens[0].cpu().tolist()
            tokens.append(trim_generation(new, eos))
            exit_layers.append([L] * len(new))  # every kept token is the full model's
            drafts = {"rounds": drafts["rounds"] + out.rounds, "drafted": drafts["drafted"] + sum(out.drafted),
                      "accepted": drafts["accepted"] + sum(out.accepted)}
        drafts.update(draft_layer=draft_layer, draft_length=draft_length, stop="policy" if stop is not None else
                      "confidence" if min_confidence is not None else "length")
        drafts["acceptance_rate"] = drafts["accepted"] / max(drafts["drafted"], 1)
        counts = [0] * L
        counts[-1] = sum(len(layers) for layers in exit_layers)
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in tokens]
        return Generations(texts, tokens, exit_layers, counts, drafts)

    def generate(self, prompts, max_new_tokens: int | None = None, rule: str | ExitRule | None = None, knob=None,
                 mode: str = "exit", batch_size: int | None = None, draft_layer: int | None = None,
                 draft_length: int | None = None, min_confidence: float | None = None,
                 kv: str | None = None) -> Generations:
        """prompts: user messages (each goes into the chat template, with the run's system prompt);
        max_new_tokens: default the run's; rule / knob: any exit rule (policy, confirmed_policy (a run trained
        with lm_exits.confidence_tokens), softmax_margin, saturation, classifier, entropy, maxprob, patience,
        pcee, static, full), default the policy at its trained tau;
        mode: "exit" (each token leaves at its exit) or "verify" (the exit at `draft_layer` drafts up to
        `draft_length` tokens, stopping early below `min_confidence`; the layers above check them: the
        text is the full model's greedy text; one prompt at a time, no rule). Where the run trained a
        draft policy (stage lm_draft_policy), verify mode drafts at its layer by default, up to its
        max_drafts, and stops a round where it says so (also with draft_layer set to its layer; another
        layer drafts without it); batch_size: default the run's generation batch; kv (mode "exit"): what
        an exited token gives the layers it skipped, "propagate" (K/V from its exit state) or "defer" (the
        real layers, run when a later token climbs past them; one prompt at a time), default the run's."""
        if mode not in GENERATION_MODES:
            raise ValueError(f"mode={mode!r} is not available; modes: {', '.join(GENERATION_MODES)}")
        if isinstance(prompts, str):
            raise TypeError("generate takes a list of prompts, not one string: wrap it in a list")
        if mode == "verify":
            if rule is not None or knob is not None:
                raise ValueError("mode='verify' keeps the full model's tokens, so it takes no rule or knob: pass "
                                 "draft_layer (and draft_length, min_confidence) instead")
            return self._verify(prompts, max_new_tokens, draft_layer, draft_length, min_confidence)
        if rule is None:
            rule = "policy" if self.parts.policy is not None else "full"
        if getattr(rule, "name", rule) == "oracle":
            raise ValueError("the oracle rule needs the full model's token at every step: it is a bound for "
                             "evaluation, not a way to generate")
        rule = make_rule(rule, knob, self.num_layers, self.tau)
        kv = kv or self.generation.get("kv", "propagate")
        if kv not in GENERATION_KV:
            raise ValueError(f"kv={kv!r}: use one of {GENERATION_KV}")
        max_new_tokens = int(max_new_tokens or self.generation["max_new_tokens"])
        batch_size = int(batch_size or self.generation.get("batch_size") or 8)
        eos, pad = self.generation["eos_token_id"], self.generation["pad_token_id"]
        rows = self._rows(prompts)
        device = next(self.decoder.parameters()).device
        tokens, exit_layers, counts = [], [], torch.zeros(self.num_layers, dtype=torch.long)
        for start in progress(range(0, len(rows), batch_size), "generate", unit="batch"):
            batch = collate_generate(rows[start:start + batch_size], pad)
            generate_rows = generate_deferred_each if kv == "defer" else generate_with_exits
            out = generate_rows(self.decoder, self.parts.exits, rule, batch["input_ids"].to(device),
                                batch["attention_mask"].to(device), max_new_tokens, eos_token_id=eos,
                                pad_token_id=pad, policy=self.parts.policy, classifier=self.parts.classifier)
            batch_tokens, batch_layers = per_prompt(out, eos)
            tokens += batch_tokens
            exit_layers += batch_layers
            for layers in batch_layers:
                counts += torch.bincount(torch.tensor(layers, dtype=torch.long), minlength=self.num_layers + 1)[1:]
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in tokens]
        return Generations(texts, tokens, exit_layers, counts.tolist())
