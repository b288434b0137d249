"""Exit rules as pure functions over per-layer outputs.

Each rule is one small frozen dataclass with two methods:

- ``init_state(batch_size, device)`` -> a dict of per-row tensors (dim 0 = row);
- ``decide(layer, logits, exit_prob, state, labels=None, is_regression=False)``
  -> ``(exit_now bool[B], new_state)``, for layer ``layer`` (1-based).

``decide`` is row-wise: row i's answer depends only on row i's inputs and state. That one
definition serves both uses:

- replay (`replay`) loops ``decide`` over all-layer cached outputs of the whole batch
  and records each row's first exit (forced at L);
- the batched runner (`ee_lightning.inference.runner.EarlyExitRunner`) calls the same ``decide`` on
  the rows still running, with the state rows subset alongside (`select_state`).

So the runner and replay cannot drift apart: they evaluate the same function on the same rows.

Rules and knobs (see ``RULES``):

========  ===========================================================  =====================
name      exits at the first layer l where                             knobs
========  ===========================================================  =====================
entropy   entropy(softmax(logits_l)) < threshold (DeeBERT)             threshold
maxprob   max softmax(logits_l) >= threshold                           threshold
patience  prediction unchanged for ``patience`` consecutive layers     patience, tolerance
          (PABEE; regression: |y_l - y_{l-1}| < tolerance)
pcee      ``patience`` consecutive layers with entropy < threshold     threshold, patience
static    l = k                                                        k
oracle    head l is right (needs labels; regression: |y - label| <=    tolerance
          tolerance)
full      never before L                                               none
policy    exit_prob_l > tau (ConsistentEE)                             tau
========  ===========================================================  =====================

Every rule is forced to exit at the last layer L.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

State = dict[str, torch.Tensor]


# --- helpers -----------------------------------------------------------------------------
def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last dim, computed in float32: [..., C] -> [...]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """max softmax(logits) over the last dim, in float32: [..., C] -> [...]."""
    return logits.float().softmax(-1).amax(-1)


def select_state(state: State, index: torch.Tensor) -> State:
    """Keep rows `index` (a LongTensor of row positions) of every tensor in a rule state."""
    return {key: value.index_select(0, index) for key, value in state.items()}


def _regression_value(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().squeeze(-1) if logits.dim() > 1 else logits.float()


def _check_number(rule: str, knob: str, value, low=None, high=None, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"rule {rule!r}: knob {knob}={value!r} must be {kind}")
    if isinstance(value, float) and math.isnan(value):
        raise ValueError(f"rule {rule!r}: knob {knob} is NaN")
    if low is not None and value < low:
        raise ValueError(f"rule {rule!r}: knob {knob}={value!r} must be >= {low}")
    if high is not None and value > high:
        raise ValueError(f"rule {rule!r}: knob {knob}={value!r} must be <= {high}")


# --- the rules ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ExitRule:
    """Base class. Subclasses set `name` and implement `decide`."""

    name: ClassVar[str] = ""
    needs_policy: ClassVar[bool] = False  # decide() reads exit_prob (the model's policy)
    needs_labels: ClassVar[bool] = False  # decide() reads labels (oracle)
    classification_only: ClassVar[bool] = False  # meaningless for a regression head

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return {}

    def decide(self, layer: int, logits: torch.Tensor, exit_prob: torch.Tensor | None, state: State,
               labels: torch.Tensor | None = None, is_regression: bool = False) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def check(self, num_layers: int, is_regression: bool = False) -> None:
        """Raise if the rule cannot run on a model of `num_layers` layers / this task kind."""
        if is_regression and self.classification_only:
            raise ValueError(f"rule {self.name!r} needs class probabilities; it does not apply to a regression head")

    @property
    def knobs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        knobs = ", ".join(f"{k}={v}" for k, v in self.knobs.items())
        return f"{self.name}({knobs})"


@dataclass(frozen=True)
class EntropyRule(ExitRule):
    threshold: float = 0.1
    name: ClassVar[str] = "entropy"
    classification_only: ClassVar[bool] = True

    def __post_init__(self):
        _check_number(self.name, "threshold", self.threshold, low=0.0)

    def decide(self, layer, logits, exit_prob, state, labels=None, is_regression=False):
        return entropy(logits) < self.threshold, state


@dataclass(frozen=True)
class MaxProbRule(ExitRule):
    threshold: float = 0.9
    name: ClassVar[str] = "maxprob"
    classification_only: ClassVar[bool] = True

    def __post_init__(self):
        _check_number(self.name, "threshold", self.threshold, low=0.0, high=1.0)

    def decide(self, layer, logits, exit_prob, state, labels=None, is_regression=False):
        return max_prob(logits) >= self.threshold, state


@dataclass(frozen=True)
class PatienceRule(ExitRule):
    """PABEE. The counter is 0 at layer 1; at layer l > 1 it grows by one when the prediction
    equals layer l-1's (regression: moved less than `tolerance`) and resets to 0 otherwise.
    Exit when counter >= patience (so patience 0 exits at layer 1)."""

    patience: int = 2
    tolerance: float = 0.1  # regression only
    name: ClassVar[str] = "patience"

    def __post_init__(self):
        _check_number(self.name, "patience", self.patience, low=0, integer=True)
        _check_number(self.name, "tolerance", self.tolerance, low=0.0)

    def init_state(self, batch_size, device=None):
        return {
            "count": torch.zeros(batch_size, dtype=torch.long, device=device),
            "previous": torch.zeros(batch_size, dtype=torch.float32, device=device),
        }

    def decide(self, layer, logits, exit_prob, state, labels=None, is_regression=False):
        current = _regression_value(logits) if is_regression else logits.argmax(-1).float()
        if layer == 1:
            count = torch.zeros_like(state["count"])
        else:
            same = ((current - state["previous"]).abs() < self.tolerance) if is_regression else current == state["previous"]
            count = torch.where(same, state["count"] + 1, torch.zeros_like(state["count"]))
        return count >= self.patience, {"count": count, "previous": current}


@dataclass(frozen=True)
class PceeRule(ExitRule):
    """PCEE-BERT: exit once `patience` consecutive layers (ending at l) had entropy < threshold."""

    threshold: float = 0.1
    patience: int = 2
    name: ClassVar[str] = "pcee"
    classification_only: ClassVar[bool] = True

    def __post_init__(self):
        _check_number(self.name, "threshold", self.threshold, low=0.0)
        _check_number(self.name, "patience", self.patience, low=1, integer=True)

    def init_state(self, batch_size, device=None):
        return {"count": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def decide(self, layer, logits, exit_prob, state, labels=None, is_regression=False):
        confident = entropy(logits) < self.threshold
        count = torch.where(confident, state["count"] + 1, torch.zeros_like(state["count"]))
        return count >= self.patience, {"count": count}


@dataclass(frozen=True)
class StaticRule(ExitRule):
    k: int = 1
    name: ClassVar[str] = "static"

    def __post_init__(self):
        _check_number(self.name, "k", self.k, low=1, integer=True)

    def check(self, num_layers, is_regression=False):
        super().check(num_layers, is_regression)
        if not 1 <= self.k <= num_layers:
            raise ValueError(f"rule 'static': k={self.k} is outside 1..{num_layers} (the model has {num_layers} layers)")

    def decide(self, layer, logits, exit_prob, state, labels=None, is_regression=False):
        return torch.full((logits.shape[0],), layer >= self.k, dtype=torch.bool, device=logits.device), state


@dataclass(frozen=True)
class OracleRule(ExitRule):
    """First layer whose head is right (else L): the bound on savings with these heads."""

    tolerance: float = 0.5  # regression: |y - label| <= tolerance counts as right
    name: ClassVar[str] = "oracle"
    needs_labels: ClassVar[bool] = True

    def __post_init__(self):
        _check_number(self.name, "tolerance", self.tolerance, low=0.0)

    def decide(self, layer, logits, exit_prob, state, labels=None, is_regression=False):
        if labels is None:
            raise ValueError("rule 'oracle' needs the labels")
        if is_regression:
            return (_regression_value(logits) - labels.float()).abs() <= self.tolerance, state
        return logits.argmax(-1) == labels, state


@dataclass(frozen=True)
class FullRule(ExitRule):
    name: ClassVar[str] = "full"

    def decide(self, layer, logits, exit_prob, state, labels=None, is_regression=False):
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device), state


@dataclass(frozen=True)
class PolicyRule(ExitRule):
    """ConsistentEE inference: exit at the first layer with p_l > tau."""

    tau: float = 0.5
    name: ClassVar[str] = "policy"
    needs_policy: ClassVar[bool] = True

    def __post_init__(self):
        _check_number(self.name, "tau", self.tau, low=0.0, high=1.0)

    def decide(self, layer, logits, exit_prob, state, labels=None, is_regression=False):
        if exit_prob is None:
            raise ValueError("rule 'policy' needs exit probabilities: the model has no policy (model.policy is None)")
        return exit_prob > self.tau, state


RULES: dict[str, type[ExitRule]] = {
    cls.name: cls
    for cls in (EntropyRule, MaxProbRule, PatienceRule, PceeRule, StaticRule, OracleRule, FullRule, PolicyRule)
}

# Which knobs a point of `default_grid(name, ...)` sets, in order.
GRID_KNOBS: dict[str, tuple[str, ...]] = {
    "entropy": ("threshold",),
    "maxprob": ("threshold",),
    "patience": ("patience",),
    "pcee": ("patience", "threshold"),
    "static": ("k",),
    "oracle": (),
    "full": (),
    "policy": ("tau",),
}


def build_rule(name: str, num_layers: int | None = None, **knobs) -> ExitRule:
    """Make the rule `name` with `knobs`; with `num_layers`, also check the knobs against the model
    (e.g. static k within 1..L). Unknown names and knobs raise ValueError listing the valid ones."""
    if isinstance(name, ExitRule):
        rule = name
    else:
        if name not in RULES:
            raise ValueError(f"unknown exit rule {name!r}; valid rules: {', '.join(RULES)}")
        cls = RULES[name]
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(knobs) - set(valid))
        if unknown:
            raise ValueError(
                f"rule {name!r} has no knob(s) {', '.join(unknown)}; its knobs: {', '.join(valid) or 'none'}"
            )
        rule = cls(**knobs)
    if num_layers is not None:
        rule.check(num_layers)
    return rule


def rule_from_grid(name: str, value, num_layers: int | None = None, **extra) -> ExitRule:
    """Build the rule for one point of `default_grid(name, ...)` (a scalar, a tuple for pcee, None)."""
    if name not in GRID_KNOBS:
        raise ValueError(f"unknown exit rule {name!r}; valid rules: {', '.join(RULES)}")
    names = GRID_KNOBS[name]
    values = () if value is None else (tuple(value) if isinstance(value, (tuple, list)) else (value,))
    if len(values) != len(names):
        raise ValueError(f"rule {name!r}: grid point {value!r} does not match its knobs {names}")
    return build_rule(name, num_layers=num_layers, **dict(zip(names, values)), **extra)


def default_grid(rule_name: str, num_layers: int, num_classes: int = 2) -> list:
    """Knob values for a sweep, ordered from (about) no saving to maximal saving.

    entropy: thresholds 0 .. ln(C) (41 points, the last just above ln C so everything exits at 1);
    maxprob: thresholds 1.0 .. 1/C; patience: L-1 .. 1; static: L .. 1; policy: tau 0.95 .. 0.05;
    pcee: (patience, threshold) tuples, patience L-1..1 (at most 3 values) x 6 thresholds;
    oracle / full: [None] (no knob).
    """
    if rule_name not in RULES:
        raise ValueError(f"unknown exit rule {rule_name!r}; valid rules: {', '.join(RULES)}")
    L, C = int(num_layers), max(int(num_classes), 2)
    if L < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    ln_c = math.log(C)
    if rule_name == "entropy":
        return [round(ln_c * i / 40, 6) for i in range(40)] + [round(ln_c * 1.001, 6)]
    if rule_name == "maxprob":
        return [round(1.0 - (1.0 - 1.0 / C) * i / 20, 6) for i in range(21)]
    if rule_name == "patience":
        return list(range(max(L - 1, 1), 0, -1))
    if rule_name == "static":
        return list(range(L, 0, -1))
    if rule_name == "policy":
        return [round(0.95 - 0.05 * i, 2) for i in range(19)]
    if rule_name == "pcee":
        patiences = sorted({min(p, max(L - 1, 1)) for p in (3, 2, 1)}, reverse=True)
        thresholds = [round(ln_c * f, 6) for f in (0.05, 0.1, 0.2, 0.4, 0.7, 1.001)]
        return [(p, t) for p in patiences for t in thresholds]
    return [None]


# --- replay over cached outputs -----------------------------------------------------------
def _infer_regression(logits: torch.Tensor, is_regression: bool | None) -> bool:
    return bool(logits.shape[-1] == 1) if is_regression is None else bool(is_regression)


def replay(rule: ExitRule, logits: torch.Tensor, exit_probs: torch.Tensor | None = None,
           labels: torch.Tensor | None = None, is_regression: bool | None = None) -> torch.Tensor:
    """Exit layers (LongTensor [B], values 1..L) of `rule` over cached all-layer outputs.

    logits [L, B, C]; exit_probs [L, B] (for the policy rule); labels [B] (for oracle).
    is_regression: None (default) infers it from the head's output size (C == 1 is regression).
    """
    if logits.dim() != 3:
        raise ValueError(f"replay wants logits [L, B, C], got shape {tuple(logits.shape)}")
    L, B = logits.shape[:2]
    regression = _infer_regression(logits, is_regression)
    rule.check(L, regression)
    if rule.needs_policy and exit_probs is None:
        raise ValueError(f"rule {rule.name!r} needs exit_probs [L, B] (a model with a policy)")
    if rule.needs_labels and labels is None:
        raise ValueError(f"rule {rule.name!r} needs labels")
    state = rule.init_state(B, logits.device)
    exit_layers = torch.full((B,), L, dtype=torch.long, device=logits.device)
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    for index in range(L - 1):  # layer L is forced
        prob = exit_probs[index] if exit_probs is not None else None
        exit_now, state = rule.decide(index + 1, logits[index], prob, state, labels=labels, is_regression=regression)
        first = exit_now & ~done
        exit_layers[first] = index + 1
        done |= exit_now
        if bool(done.all()):
            break
    return exit_layers


def predictions_at_exit(logits: torch.Tensor, exit_layers: torch.Tensor) -> torch.Tensor:
    """The head outputs where each row exits: logits [L, B, C], exit_layers [B] (1..L) -> [B, C]."""
    rows = torch.arange(logits.shape[1], device=logits.device)
    return logits[exit_layers.to(logits.device).long() - 1, rows]


def exit_summary(exit_layers: torch.Tensor, num_layers: int) -> dict[str, float]:
    """Layer cost, labelled: avg_exit_layer E[t], layer_saving 1 - E[t]/L, speedup L / E[t]."""
    avg = float(exit_layers.float().mean())
    return {"avg_exit_layer": avg, "layer_saving": 1.0 - avg / num_layers, "speedup": num_layers / avg}
