"""Real batched early exit: run a batch layer by layer and drop rows as they exit.

At each layer only the rows still running go through the layer, the exit head and (for rules
that read it) the policy net; only the signals the rule needs are computed. The exit decision is
the rule's own `decide` (see `ee_lightning.exits.rules`), the same function that `replay`
evaluates over cached signals, so the runner and replay agree row for row. At batch size 1 this
is simply stopping early.
"""
from __future__ import annotations

import torch

from ee_lightning.exits.rules import ExitRule, build_rule, require_signals, select_state
from ee_lightning.exits.signals import SIGNALS, layer_signals
from ee_lightning.modeling.exit_policy import exit_probability
from ee_lightning.modeling.model import EarlyExitModel


class EarlyExitRunner:
    def __init__(self, model: EarlyExitModel):
        self.model = model
        # Rows that went through each layer in the last run (len = layers run): for cost accounting.
        self.active_per_layer: list[int] = []

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    def run(self, batch: dict, rule: ExitRule | str, labels: torch.Tensor | None = None,
            is_regression: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (head outputs at each row's exit [B, C], exit layers LongTensor [B] in 1..L),
        rows in the batch's order.

        batch: input_ids, attention_mask (and token_type_ids) as the tokenizer gives them;
        rule: an ExitRule or a rule name (built with its default knobs);
        labels [B]: needed by the oracle rule (falls back to batch["labels"]);
        is_regression: None infers it from the head's output size (1 = regression).
        """
        with torch.inference_mode():
            return self._run(batch, rule, labels, is_regression)

    def _run(self, batch, rule, labels, is_regression):
        model = self.model
        rule = build_rule(rule) if isinstance(rule, str) else rule
        L = model.num_layers
        output_size = model.heads.output_size
        regression = output_size == 1 if is_regression is None else bool(is_regression)
        rule.check(L, regression)  # knobs against the depth and the task, before any work
        require_signals(rule, SIGNALS, "an encoder's exits")
        if labels is None and rule.needs_labels:
            labels = batch.get("labels")
            if labels is None:
                raise ValueError(f"rule {rule.name!r} needs labels: pass labels= or batch['labels']")
        if rule.needs_policy and model.policy is None:
            raise ValueError(f"rule {rule.name!r} needs exit probabilities but the model has no policy")

        hidden, ctx = model.start(batch)
        batch_size, device = hidden.shape[0], hidden.device
        if labels is not None:
            labels = torch.as_tensor(labels, device=device)
        rows = torch.arange(batch_size, device=device)  # original positions of the running rows
        exit_layers = torch.full((batch_size,), L, dtype=torch.long, device=device)
        outputs = hidden.new_empty((batch_size, output_size))
        state = rule.init_state(batch_size, device)
        self.active_per_layer = []

        for index in range(L):
            layer = index + 1
            self.active_per_layer.append(int(rows.numel()))
            # The last layer's exit is forced: no decision, no policy net.
            step = model.step(index, hidden, ctx, with_policy=rule.needs_policy and layer < L)
            if layer == L:
                outputs[rows] = step.logits
                break
            exit_prob = exit_probability(step.exit_logit) if step.exit_logit is not None else None
            signals = layer_signals(step.logits, exit_prob, regression, needs=rule.needs)
            exit_now, state = rule.decide(layer, signals, state, labels=labels, is_regression=regression)
            if not bool(exit_now.any()):
                hidden = step.hidden
                continue
            done = exit_now.nonzero().squeeze(1)
            outputs[rows[done]] = step.logits.index_select(0, done)
            exit_layers[rows[done]] = layer
            if bool(exit_now.all()):
                break
            keep = (~exit_now).nonzero().squeeze(1)
            rows = rows.index_select(0, keep)
            hidden, ctx = ctx.select(keep, step.hidden)
            state = select_state(state, keep)
            if labels is not None:
                labels = labels.index_select(0, keep)
        return outputs, exit_layers
