"""Exit rules as pure functions over compact per-layer signals (see `ee_lightning.exits.signals`):
the one rule set of the encoders' classification and of the decoders' per-token generation.

Each rule is one small frozen dataclass that names the signals it reads (`needs`) and has two methods:

- ``init_state(batch_size, device)`` -> a dict of per-row tensors (dim 0 = row);
- ``decide(layer, signals, state, labels=None, is_regression=False)`` -> ``(exit_now bool[B], new_state)``,
  for layer ``layer`` (1-based), with ``signals`` a dict of [B] tensors.

``decide`` is row-wise: row i's answer depends only on row i's inputs and state. That one
definition serves both uses:

- replay (`replay`) loops ``decide`` over all-layer cached signals of the whole split
  and records each row's first exit (forced at L);
- the batched runner (`ee_lightning.inference.runner.EarlyExitRunner`) calls the same ``decide`` on
  the rows still running, with the state rows subset alongside (`select_state`).

So the runner and replay cannot drift apart: they evaluate the same function on the same rows.
Generation (`ee_lightning.inference.generate`) calls the same ``decide`` at every exit layer on
the new tokens still running, with the state subset the same way: there a "row" is one new
token, `prediction` is the exit's greedy token and the oracle's labels are the full model's
tokens. Rules that read no signal (static, full) take their row count from their state
(`row_state`), so they cost no head call.

Rules and knobs (see ``RULES``):

==============  ===========================================================  ===================
name            exits at the first layer l where                             knobs
==============  ===========================================================  ===================
entropy         entropy(softmax(logits_l)) < threshold, nats (DeeBERT)       threshold
maxprob         max softmax(logits_l) >= threshold                           threshold
softmax_margin  top-1 minus top-2 softmax probability >= threshold (CALM's   threshold
                softmax measure)
patience        prediction unchanged for ``patience`` consecutive layers     patience, tolerance
                (PABEE; regression: |y_l - y_{l-1}| < tolerance);
                patience 0 never exits early, as in PABEE's own code
pcee            ``patience`` consecutive layers with normalised entropy      threshold, patience
                (entropy / ln C, in [0, 1], as in PCEE-BERT) < threshold
static          l = k                                                        k
oracle          head l is right (needs labels; regression: |y - label| <=    tolerance
                tolerance)
full            never before L                                               none
policy          exit_prob_l > tau (ConsistentEE)                             tau
saturation      cosine(h_l, h at the previous exit) >= threshold (CALM's     threshold
                hidden-state saturation; generation only)
classifier      CALM's trained classifier's probability >= threshold         threshold
                (generation only)
confirmed_      exit_prob_l > tau and the exit's margin over the frequent    tau, margin
policy          rows >= margin (the policy proposes, the exit's own
                confidence confirms; generation only)
==============  ===========================================================  ===================

Every rule is forced to exit at the last layer L. `ENCODER_RULES` are those an encoder's exits
can run (their signals are `signals.SIGNALS`); generation runs every rule.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from ee_lightning.exits.signals import GENERATION_SIGNALS, SIGNALS
from ee_lightning.tasks import is_right

State = dict[str, torch.Tensor]


def select_state(state: State, index: torch.Tensor) -> State:
    """Keep rows `index` (a LongTensor of row positions) of every tensor in a rule state."""
    return {key: value.index_select(0, index) for key, value in state.items()}


def row_state(batch_size: int, device: torch.device | str | None = None) -> State:
    """The state of a rule that reads no signal: one entry per row, so that it follows the running
    rows (`select_state`) and gives the rule its row count."""
    return {"rows": torch.zeros(batch_size, dtype=torch.bool, device=device)}


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
    needs: ClassVar[tuple[str, ...]] = ()  # the signals decide() reads
    needs_labels: ClassVar[bool] = False  # decide() reads labels (oracle)
    # signals a driver reads only on the rows `candidates` keeps (the rest get NaN): the dear ones
    gated: ClassVar[tuple[str, ...]] = ()
    classification_only: ClassVar[bool] = False  # meaningless for a regression head

    @property
    def needs_policy(self) -> bool:
        return "exit_prob" in self.needs

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return {}

    def decide(self, layer: int, signals: dict[str, torch.Tensor], state: State,
               labels: torch.Tensor | None = None, is_regression: bool = False) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def candidates(self, signals: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """bool [B]: the rows that can still leave given the signals not `gated`; None: every row."""
        return None

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
    needs: ClassVar[tuple[str, ...]] = ("entropy",)
    classification_only: ClassVar[bool] = True

    def __post_init__(self):
        _check_number(self.name, "threshold", self.threshold, low=0.0)

    def decide(self, layer, signals, state, labels=None, is_regression=False):
        return signals["entropy"] < self.threshold, state


@dataclass(frozen=True)
class MaxProbRule(ExitRule):
    threshold: float = 0.9
    name: ClassVar[str] = "maxprob"
    needs: ClassVar[tuple[str, ...]] = ("max_prob",)
    classification_only: ClassVar[bool] = True

    def __post_init__(self):
        _check_number(self.name, "threshold", self.threshold, low=0.0, high=1.0)

    def decide(self, layer, signals, state, labels=None, is_regression=False):
        return signals["max_prob"] >= self.threshold, state


@dataclass(frozen=True)
class PatienceRule(ExitRule):
    """PABEE. The counter is 0 at the first layer decided on; at each later one it grows by one
    when the prediction equals the previous one's (regression: moved less than `tolerance`) and
    resets to 0 otherwise. Exit when counter == patience. The previous prediction starts as NaN,
    which equals nothing: generation's first decision is at its first exit layer, not layer 1. Patience 0 runs every layer, as in PABEE's own code, so that
    settings brought from PABEE mean what they meant there."""

    patience: int = 2
    tolerance: float = 0.1  # regression only
    name: ClassVar[str] = "patience"
    needs: ClassVar[tuple[str, ...]] = ("prediction",)

    def __post_init__(self):
        _check_number(self.name, "patience", self.patience, low=0, integer=True)
        _check_number(self.name, "tolerance", self.tolerance, low=0.0)

    def init_state(self, batch_size, device=None):
        return {
            "count": torch.zeros(batch_size, dtype=torch.long, device=device),
            # float32 holds class ids and token ids exactly (up to 2**24)
            "previous": torch.full((batch_size,), float("nan"), dtype=torch.float32, device=device),
        }

    def decide(self, layer, signals, state, labels=None, is_regression=False):
        current = signals["prediction"].float()
        same = ((current - state["previous"]).abs() < self.tolerance) if is_regression else current == state["previous"]
        count = torch.where(same, state["count"] + 1, torch.zeros_like(state["count"]))
        exit_now = count >= self.patience if self.patience > 0 else torch.zeros_like(count, dtype=torch.bool)
        return exit_now, {"count": count, "previous": current}


@dataclass(frozen=True)
class PceeRule(ExitRule):
    """PCEE-BERT: exit once `patience` consecutive layers (ending at l) had an entropy below
    `threshold`, in PCEE-BERT's normalised units: entropy / ln C, so 0..1 for any number of classes."""

    threshold: float = 0.1
    patience: int = 2
    name: ClassVar[str] = "pcee"
    needs: ClassVar[tuple[str, ...]] = ("entropy_normalized",)
    classification_only: ClassVar[bool] = True

    def __post_init__(self):
        _check_number(self.name, "threshold", self.threshold, low=0.0)
        _check_number(self.name, "patience", self.patience, low=1, integer=True)

    def init_state(self, batch_size, device=None):
        return {"count": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def decide(self, layer, signals, state, labels=None, is_regression=False):
        confident = signals["entropy_normalized"] < self.threshold
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

    def init_state(self, batch_size, device=None):
        return row_state(batch_size, device)

    def decide(self, layer, signals, state, labels=None, is_regression=False):
        return torch.full_like(state["rows"], layer >= self.k), state


@dataclass(frozen=True)
class OracleRule(ExitRule):
    """First layer whose head is right (else L): the bound on savings with these heads. In
    generation the labels are the full model's tokens: the first exit that gives its token."""

    tolerance: float = 0.5  # regression: |y - label| <= tolerance counts as right
    name: ClassVar[str] = "oracle"
    needs: ClassVar[tuple[str, ...]] = ("prediction",)
    needs_labels: ClassVar[bool] = True

    def __post_init__(self):
        _check_number(self.name, "tolerance", self.tolerance, low=0.0)

    def decide(self, layer, signals, state, labels=None, is_regression=False):
        if labels is None:
            raise ValueError("rule 'oracle' needs the labels")
        return is_right(signals["prediction"], labels, is_regression, self.tolerance), state


@dataclass(frozen=True)
class FullRule(ExitRule):
    name: ClassVar[str] = "full"

    def init_state(self, batch_size, device=None):
        return row_state(batch_size, device)

    def decide(self, layer, signals, state, labels=None, is_regression=False):
        return torch.zeros_like(state["rows"]), state


@dataclass(frozen=True)
class PolicyRule(ExitRule):
    """ConsistentEE inference: exit at the first layer with p_l > tau."""

    tau: float = 0.5
    name: ClassVar[str] = "policy"
    needs: ClassVar[tuple[str, ...]] = ("exit_prob",)

    def __post_init__(self):
        _check_number(self.name, "tau", self.tau, low=0.0, high=1.0)

    def decide(self, layer, signals, state, labels=None, is_regression=False):
        if "exit_prob" not in signals:
            raise ValueError("rule 'policy' needs exit probabilities: the model has no policy (model.policy is None)")
        return signals["exit_prob"] > self.tau, state


@dataclass(frozen=True)
class _ThresholdRule(ExitRule):
    """Exit where the rule's one signal reaches `threshold` (>=), a value within [low, high]."""

    threshold: float = 0.9
    low: ClassVar[float] = 0.0
    high: ClassVar[float] = 1.0

    def __post_init__(self):
        _check_number(self.name, "threshold", self.threshold, low=self.low, high=self.high)

    def decide(self, layer, signals, state, labels=None, is_regression=False):
        return signals[self.needs[0]] >= self.threshold, state


@dataclass(frozen=True)
class SoftmaxMarginRule(_ThresholdRule):
    """CALM's softmax measure: top-1 minus top-2 probability of the exit's softmax (for a decoder an
    LM-head call at every exit evaluated)."""

    name: ClassVar[str] = "softmax_margin"
    needs: ClassVar[tuple[str, ...]] = ("margin",)
    classification_only: ClassVar[bool] = True


@dataclass(frozen=True)
class SaturationRule(_ThresholdRule):
    """CALM's hidden-state saturation: cosine of this exit's state with the previous exit's (the
    first exit compares with the token's embedding)."""

    name: ClassVar[str] = "saturation"
    needs: ClassVar[tuple[str, ...]] = ("saturation",)
    low: ClassVar[float] = -1.0


@dataclass(frozen=True)
class ClassifierRule(_ThresholdRule):
    """CALM's trained measure: the classifier's P(this exit's token equals the last exit's)."""

    name: ClassVar[str] = "classifier"
    needs: ClassVar[tuple[str, ...]] = ("classifier_prob",)


@dataclass(frozen=True)
class ConfirmedPolicyRule(ExitRule):
    """ConsistentEE's policy proposes an exit (p_l > tau), the exit's own confidence confirms it (its softmax
    margin over the head's frequent rows >= margin). The margin is `gated`: read only where the policy proposes,
    so a token pays a read (about a layer) at the exits the policy would leave at, not at every exit."""

    tau: float = 0.05
    margin: float = 0.35
    name: ClassVar[str] = "confirmed_policy"
    needs: ClassVar[tuple[str, ...]] = ("exit_prob", "frequent_margin")
    gated: ClassVar[tuple[str, ...]] = ("frequent_margin",)

    def __post_init__(self):
        _check_number(self.name, "tau", self.tau, low=0.0, high=1.0)
        _check_number(self.name, "margin", self.margin, low=0.0, high=1.0)

    def candidates(self, signals):
        return signals["exit_prob"] > self.tau

    def decide(self, layer, signals, state, labels=None, is_regression=False):
        # NaN (not read) compares False: a row the policy did not propose never leaves
        return (signals["exit_prob"] > self.tau) & (signals["frequent_margin"] >= self.margin), state


RULES: dict[str, type[ExitRule]] = {
    cls.name: cls
    for cls in (EntropyRule, MaxProbRule, PatienceRule, PceeRule, StaticRule, OracleRule, FullRule, PolicyRule,
                SoftmaxMarginRule, SaturationRule, ClassifierRule, ConfirmedPolicyRule)
}
# The rules an encoder's exits can run: those that read only the signals its heads give.
ENCODER_RULES: tuple[str, ...] = tuple(name for name, cls in RULES.items() if set(cls.needs) <= set(SIGNALS))


def require_signals(rule: ExitRule, available: tuple[str, ...], where: str) -> None:
    """Raise if `rule` reads a signal that `where` (e.g. "the batched runner") does not compute."""
    missing = [name for name in rule.needs if name not in available]
    if missing:
        runs = [name for name, cls in RULES.items() if set(cls.needs) <= set(available)]
        only = " (it is computed in generation only)" if set(missing) <= set(GENERATION_SIGNALS) else ""
        raise ValueError(f"rule {rule.name!r} reads the signal(s) {missing}, not computed by {where}{only}; "
                         f"rules that run there: {', '.join(runs)}")

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
    "softmax_margin": ("threshold",),
    "saturation": ("threshold",),
    "classifier": ("threshold",),
    "confirmed_policy": ("tau", "margin"),
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
    # a pair comes as a tuple, a list or a config's list node
    values = () if value is None else (tuple(value) if isinstance(value, Sequence) and not isinstance(value, str)
                                       else (value,))
    if len(values) != len(names):
        raise ValueError(f"rule {name!r}: grid point {value!r} does not match its knobs {names}")
    return build_rule(name, num_layers=num_layers, **dict(zip(names, values)), **extra)


def default_grid(rule_name: str, num_layers: int, num_classes: int = 2) -> list:
    """Knob values for a sweep, ordered from (about) no saving to maximal saving.

    entropy: thresholds 0 .. ln(C) (41 points, the last just above ln C so everything exits at 1);
    maxprob: thresholds 1.0 .. 1/C; softmax_margin, classifier: thresholds 1.0 .. 0.0 (21 points);
    saturation: cosines 1.0 .. -1.0, dense near 1; patience: L-1 .. 1; static: L .. 1;
    policy: tau 1 (never exits), 0.999, 0.99, 0.95 .. 0.05;
    pcee: (patience, threshold) tuples, patience L-1..1 (at most 3 values) x 6 normalised-entropy thresholds;
    confirmed_policy: (tau, margin) tuples, tau 0.02 / 0.05 / 0.1 x margin 0.9 .. 0.1;
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
    if rule_name in ("softmax_margin", "classifier"):
        return [round(1.0 - i / 20, 6) for i in range(21)]
    if rule_name == "saturation":
        return [1.0, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.5, -1.0]
    if rule_name == "patience":
        return list(range(max(L - 1, 1), 0, -1))
    if rule_name == "static":
        return list(range(L, 0, -1))
    if rule_name == "policy":
        # Trained policies put most probabilities near 0 or 1, so the top of the grid is dense; tau 1 never exits.
        return [1.0, 0.999, 0.99] + [round(0.95 - 0.05 * i, 2) for i in range(19)]
    if rule_name == "pcee":
        patiences = sorted({min(p, max(L - 1, 1)) for p in (3, 2, 1)}, reverse=True)
        thresholds = [0.05, 0.1, 0.2, 0.4, 0.7, 1.001]  # normalised entropy
        return [(p, t) for p in patiences for t in thresholds]
    if rule_name == "confirmed_policy":
        return [(tau, m) for tau in (0.1, 0.05, 0.02) for m in (0.9, 0.7, 0.5, 0.4, 0.35, 0.3, 0.25, 0.2, 0.1)]
    return [None]


# --- replay over cached signals ----------------------------------------------------------
def replay(rule: ExitRule, signals: dict[str, torch.Tensor], labels: torch.Tensor | None = None,
           is_regression: bool = False) -> torch.Tensor:
    """Exit layers (LongTensor [N], values 1..L) of `rule` over cached all-layer signals {name: [L, N]}
    (`ee_lightning.inference.layer_cache`); labels [N] for the oracle."""
    missing = [name for name in rule.needs if name not in signals]
    if missing:
        if not set(missing) <= set(SIGNALS):
            require_signals(rule, SIGNALS, "an encoder's exits")
        need = "a model with a policy" if "exit_prob" in missing else "a classification head"
        raise ValueError(f"rule {rule.name!r} needs the signal(s) {missing}, which this cache lacks ({need})")
    if rule.needs_labels and labels is None:
        raise ValueError(f"rule {rule.name!r} needs labels")
    any_signal = signals[rule.needs[0] if rule.needs else "prediction"]  # [L, N]: the depth and the rows
    L, N = any_signal.shape
    rule.check(L, is_regression)
    device = any_signal.device
    state = rule.init_state(N, device)
    exit_layers = torch.full((N,), L, dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    for index in range(L - 1):  # layer L is forced
        layer_signals = {name: signals[name][index] for name in rule.needs}
        exit_now, state = rule.decide(index + 1, layer_signals, state, labels=labels, is_regression=is_regression)
        exit_layers[exit_now & ~done] = index + 1
        done |= exit_now
        if bool(done.all()):
            break
    return exit_layers


def policy_exits(exit_probs: torch.Tensor, tau: float) -> torch.Tensor:
    """ConsistentEE's exits (1..L) from exit probabilities [L, N]: the policy rule, replayed."""
    return replay(PolicyRule(tau=tau), {"exit_prob": exit_probs})


def tau_for_saving(exit_probs: torch.Tensor, saving: float) -> float:
    """The tau at which the policy rule (exit at the first layer with p_l > tau, forced at the last) saves the
    nearest to `saving` of the layers that these exit probabilities [L, N] allow (ties: the less saving).

    A row leaves before layer l + 1 exactly when the running maximum of its p_1..p_l exceeds tau, so its exit
    layer is 1 + the number of layers l < L whose running maximum is <= tau, and the mean exit layer is
    1 + (the count of such running maxima over all rows) / N. Each gap between two distinct running maxima gives
    one count; the one nearest N (L (1 - saving) - 1) is chosen, and tau is the middle of its gap, so that no
    row's probability sits on it (a forward pass that rounds differently moves no row)."""
    num_layers, rows = exit_probs.shape
    running = torch.cummax(exit_probs[:-1].double(), dim=0).values.flatten().sort().values
    wanted = rows * (num_layers * (1.0 - saving) - 1.0)
    values = torch.unique(running).tolist()
    counts = torch.searchsorted(running, torch.tensor(values, dtype=running.dtype), right=True).tolist()
    uppers = [*values[1:], max(values[-1], 1.0)] if values else []
    candidates = [(count, (low + high) / 2) for count, low, high in zip(counts, values, uppers)]
    if not values or values[0] > 0.0:
        candidates.insert(0, (0, values[0] / 2 if values else 0.0))  # below every running maximum
    return min(candidates, key=lambda c: (abs(c[0] - wanted), -c[0]))[1]


def at_exit(per_layer: torch.Tensor, exit_layers: torch.Tensor) -> torch.Tensor:
    """Each row's value at its exit: per_layer [L, N, ...], exit_layers [N] (1..L) -> [N, ...]."""
    rows = torch.arange(per_layer.shape[1], device=per_layer.device)
    return per_layer[exit_layers.to(per_layer.device).long() - 1, rows]


def exit_summary(exit_layers: torch.Tensor, num_layers: int) -> dict[str, float]:
    """Layer cost, labelled: avg_exit_layer E[t], layer_saving 1 - E[t]/L, speedup L / E[t]."""
    avg = float(exit_layers.float().mean())
    return {"avg_exit_layer": avg, "layer_saving": 1.0 - avg / num_layers, "speedup": num_layers / avg}
