"""Real batched early exit: run a batch layer by layer and drop rows as they exit.

At each layer only the rows still running go through the layer, the pooler, the exit head and
(for rules that read it) the policy net. The exit decision is the rule's own `decide` (see
`ee_lightning.exits.rules`), the same function that `replay` evaluates over cached outputs, so
the runner and replay agree row for row. At batch size 1 this is simply stopping early.
"""
from __future__ import annotations

import torch

from ee_lightning.modeling.model import EarlyExitModel
from ee_lightning.exits.rules import ExitRule, build_rule, select_state


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
        if isinstance(rule, str):
            rule = build_rule(rule)
        L = model.num_layers
        rule.check(L, bool(is_regression))  # knobs against the depth, before any work
        if labels is None and rule.needs_labels:
            labels = batch.get("labels")
            if labels is None:
                raise ValueError(f"rule {rule.name!r} needs labels: pass labels= or batch['labels']")
        if rule.needs_policy and model.policy is None:
            raise ValueError(f"rule {rule.name!r} needs exit probabilities but the model has no policy")

        attention_mask = batch["attention_mask"]
        hidden, bias = model.start(batch)
        batch_size = hidden.shape[0]
        device = hidden.device
        if labels is not None:
            labels = torch.as_tensor(labels, device=device)
        rows = torch.arange(batch_size, device=device)  # original positions of the running rows
        exit_layers = torch.full((batch_size,), L, dtype=torch.long, device=device)
        outputs = None
        state = None
        regression = None
        self.active_per_layer = []

        for index in range(L):
            layer = index + 1
            self.active_per_layer.append(int(rows.numel()))
            hidden, pooled, logits = model.step(index, hidden, bias, attention_mask)
            if outputs is None:
                outputs = logits.new_empty((batch_size, logits.shape[-1]))
                regression = bool(logits.shape[-1] == 1) if is_regression is None else bool(is_regression)
                rule.check(L, regression)
                state = rule.init_state(batch_size, device)
            if layer == L:  # forced exit: no decision (and no policy net) needed
                outputs[rows] = logits
                break
            prob = model.policy(index, pooled, logits) if rule.needs_policy else None
            exit_now, state = rule.decide(layer, logits, prob, state, labels=labels, is_regression=regression)
            if not bool(exit_now.any()):
                continue
            done = exit_now.nonzero().squeeze(1)
            outputs[rows[done]] = logits.index_select(0, done)
            exit_layers[rows[done]] = layer
            if bool(exit_now.all()):
                break
            keep = (~exit_now).nonzero().squeeze(1)
            rows = rows.index_select(0, keep)
            attention_mask = attention_mask.index_select(0, keep)
            # Columns that are padding for every row still running are dropped too.
            width = int(attention_mask.any(0).nonzero().max()) + 1
            attention_mask = attention_mask[:, :width]
            hidden = hidden.index_select(0, keep)[:, :width]
            bias = model.backbone.attention_bias(attention_mask, hidden.dtype)
            state = select_state(state, keep)
            if labels is not None:
                labels = labels.index_select(0, keep)
        return outputs, exit_layers
