"""Per-token exit rules for generation: pure decisions on per-token signals at one exit layer.

Generation asks a rule, at every exit layer below the last, which of the tokens still in the
network leave now. Each rule names the signals it reads (`needs`); the generation driver
computes only those, so a rule that does not read the vocabulary softmax costs no LM-head call
before its exit. Signals, each a tensor over the N tokens still running:
    margin      top-1 minus top-2 probability of this exit's softmax (CALM's softmax measure;
                an LM-head call at every exit layer evaluated)
    saturation  cosine of this exit layer's hidden state with the previous exit layer's (CALM's
                hidden-state saturation; the first exit compares with the token's embedding)
    classifier  P(this exit's token equals the final layer's), CALM's trained early-exit classifier
    policy      the ConsistentEE policy's exit probability, read from the hidden state
    oracle      whether this exit's greedy token equals the full model's (a bound, not a method)
Layer numbers are 1-based. The last layer always exits (the driver forces it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SIGNALS = ("margin", "saturation", "classifier", "policy", "oracle")


@dataclass(frozen=True)
class Full:
    """Never exit early: the full model, through the same generation code."""

    needs = frozenset()
    knob = None

    def decide(self, layer: int, n: int, signals: dict) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.bool)


@dataclass(frozen=True)
class Static:
    """Every token exits at `layer` (the first exit layer at or above it)."""

    layer: int
    needs = frozenset()

    @property
    def knob(self):
        return self.layer

    def decide(self, layer, n, signals):
        return torch.full((n,), layer >= self.layer, dtype=torch.bool)


@dataclass(frozen=True)
class _Threshold:
    """Exit where the rule's signal reaches `threshold`."""

    threshold: float
    signal = ""

    @property
    def needs(self):
        return frozenset({self.signal})

    @property
    def knob(self):
        return self.threshold

    def decide(self, layer, n, signals):
        return signals[self.signal] >= self.threshold


class SoftmaxMargin(_Threshold):
    signal = "margin"


class Saturation(_Threshold):
    signal = "saturation"


class Classifier(_Threshold):
    signal = "classifier"


class Policy(_Threshold):
    """ConsistentEE: exit where the policy's exit probability exceeds `threshold` (tau; 0.5 as trained),
    strictly, as the encoder side's `exits.rules.PolicyRule`."""

    signal = "policy"

    def decide(self, layer, n, signals):
        return signals[self.signal] > self.threshold


@dataclass(frozen=True)
class Oracle:
    """The first exit whose greedy token equals the full model's: an upper bound, not a method."""

    needs = frozenset({"oracle"})
    knob = None

    def decide(self, layer, n, signals):
        return signals["oracle"]


RULES = {"full": Full, "static": Static, "softmax_margin": SoftmaxMargin, "saturation": Saturation,
         "classifier": Classifier, "policy": Policy, "oracle": Oracle}


def rule_name(rule) -> str:
    for name, cls in RULES.items():
        if type(rule) is cls:
            return name
    raise ValueError(f"unknown token rule {rule!r}")


def make_rule(name: str, knob=None):
    """A rule by name (`RULES`) and its knob (a layer for static, a threshold for the others)."""
    if name not in RULES:
        raise ValueError(f"unknown token exit rule {name!r}; choose one of {', '.join(RULES)}")
    if name in ("full", "oracle"):
        return RULES[name]()
    if knob is None:
        raise ValueError(f"token exit rule {name!r} needs a knob ({'a layer' if name == 'static' else 'a threshold'})")
    return RULES[name](int(knob) if name == "static" else float(knob))


def margin(probs: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 of probabilities [..., V]."""
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def saturation(hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two hidden states [..., H]."""
    return torch.nn.functional.cosine_similarity(hidden.float(), previous.float(), dim=-1)


def knob_name(rule: str) -> str | None:
    """What a rule's knob is, for reports."""
    return {"static": "layer", "policy": "tau", "full": None, "oracle": None}.get(rule, "threshold")
