"""Exit rules on small hand-built per-layer outputs (L=4 layers, B=3 rows, C=3 classes)."""
from __future__ import annotations

import math

import pytest
import torch

from ee_lightning.exits.rules import (
    ENCODER_RULES,
    GRID_KNOBS,
    RULES,
    at_exit,
    build_rule,
    default_grid,
    exit_summary,
    policy_exits,
    replay,
    rule_from_grid,
    select_state,
)
from ee_lightning.exits.signals import all_layer_signals, entropy, layer_signals, margin, saturation


def dist(cls: int, p: float) -> list[float]:
    """Log-probabilities with `p` on class `cls` and the rest split evenly over the other two."""
    probs = [(1 - p) / 2] * 3
    probs[cls] = p
    return [math.log(q) for q in probs]


# (predicted class, its probability) per layer; entropies (nats): p=.4 -> 1.089, .5 -> 1.040,
# .6 -> 0.950, .9 -> 0.394, .95 -> 0.233, .99 -> 0.063.
PATTERN = [
    [(0, .4), (0, .9), (0, .99), (1, .99)],  # row 0: predictions 0 0 0 1
    [(1, .5), (2, .5), (2, .6), (2, .95)],  # row 1: predictions 1 2 2 2
    [(2, .99), (2, .99), (0, .4), (0, .4)],  # row 2: predictions 2 2 0 0
]
LOGITS = torch.tensor([[dist(*PATTERN[b][l]) for b in range(3)] for l in range(4)])  # [L=4, B=3, C=3]
EXIT_PROBS = torch.tensor([[.1, .5, .9], [.6, .5, .9], [.2, .5, .9], [.9, .5, .9]])  # [L, B]


def exits(name, logits=LOGITS, exit_probs=EXIT_PROBS, **kwargs):
    labels = kwargs.pop("labels", None)
    regression = kwargs.pop("is_regression", False)
    rule = build_rule(name, num_layers=logits.shape[0], **kwargs)
    signals = all_layer_signals(logits, exit_probs, regression)
    return replay(rule, signals, labels=labels, is_regression=regression).tolist()


def test_constructed_outputs_are_what_the_comments_say():
    assert LOGITS.shape == (4, 3, 3)
    assert entropy(LOGITS[1, 0]).item() == pytest.approx(0.394, abs=1e-3)
    assert LOGITS.argmax(-1).T.tolist() == [[0, 0, 0, 1], [1, 2, 2, 2], [2, 2, 0, 0]]


@pytest.mark.parametrize("threshold,expected", [
    (0.3, [3, 4, 1]),  # row 0 first below 0.3 at layer 3; row 1 only at 4 (forced anyway); row 2 at 1
    (0.5, [2, 4, 1]),
    (0.01, [4, 4, 4]),  # nothing is that sure: all forced at L
    (2.0, [1, 1, 1]),  # above ln 3: everything exits at once
])
def test_entropy(threshold, expected):
    assert exits("entropy", threshold=threshold) == expected


@pytest.mark.parametrize("threshold,expected", [(0.85, [2, 4, 1]), (0.55, [2, 3, 1]), (1.0, [4, 4, 4]), (0.3, [1, 1, 1])])
def test_maxprob(threshold, expected):
    assert exits("maxprob", threshold=threshold) == expected


@pytest.mark.parametrize("patience,expected", [
    (0, [4, 4, 4]),  # PABEE's own meaning: patience 0 runs every layer
    (1, [2, 3, 2]),  # same prediction as the layer before
    (2, [3, 4, 4]),  # row 2 changes at layer 3, so its counter is only 1 at layer 4: forced
    (3, [4, 4, 4]),
])
def test_patience(patience, expected):
    assert exits("patience", patience=patience) == expected


REG = torch.tensor([[1.0, 0.0, 2.0], [1.05, 1.0, 2.01], [1.5, 2.0, 2.02], [1.52, 3.0, 2.5]]).unsqueeze(-1)  # [L, B, 1]


@pytest.mark.parametrize("patience,expected", [(1, [2, 4, 2]), (2, [4, 4, 3])])
def test_patience_regression_uses_tolerance(patience, expected):
    assert exits("patience", logits=REG, exit_probs=None, patience=patience, tolerance=0.1, is_regression=True) == expected
    # a huge tolerance: every move counts as unchanged
    assert exits("patience", logits=REG, exit_probs=None, patience=patience, tolerance=10.0,
                 is_regression=True) == [patience + 1] * 3


# PCEE's threshold is normalised entropy H / ln C; with C = 3 the entropies above become
# .4 -> .991, .5 -> .947, .6 -> .865, .9 -> .359, .95 -> .212, .99 -> .057.
@pytest.mark.parametrize("threshold,patience,expected", [
    (0.27, 2, [4, 4, 2]),  # confident (H/ln3 < .27): row0 F F T T, row1 F F F T, row2 T T F F
    (0.45, 2, [3, 4, 2]),  # row0 F T T T
    (0.45, 1, [2, 4, 1]),  # patience 1 is the entropy rule
    (2.0, 3, [3, 3, 3]),
])
def test_pcee(threshold, patience, expected):
    assert exits("pcee", threshold=threshold, patience=patience) == expected


def test_normalised_entropy_is_one_for_a_uniform_head_of_any_size():
    for classes in (2, 3, 10):
        signals = layer_signals(torch.zeros(4, classes), needs=("entropy", "entropy_normalized"))
        assert signals["entropy"][0].item() == pytest.approx(math.log(classes))
        assert signals["entropy_normalized"].tolist() == pytest.approx([1.0] * 4)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_static(k):
    assert exits("static", k=k) == [k] * 3


@pytest.mark.parametrize("labels,expected", [([1, 2, 0], [4, 2, 3]), ([0, 0, 0], [1, 4, 3])])
def test_oracle(labels, expected):
    assert exits("oracle", labels=torch.tensor(labels)) == expected


def test_oracle_regression():
    assert exits("oracle", logits=REG, exit_probs=None, labels=torch.tensor([1.5, 3.0, 0.0]), tolerance=0.1,
                 is_regression=True) == [3, 4, 4]


def test_full():
    assert exits("full") == [4, 4, 4]


@pytest.mark.parametrize("tau,expected", [(0.5, [2, 4, 1]), (0.7, [4, 4, 1]), (0.95, [4, 4, 4]), (0.0, [1, 1, 1])])
def test_policy(tau, expected):
    assert exits("policy", tau=tau) == expected


# softmax margin of dist(cls, p) = p - (1 - p) / 2: .4 -> .1, .5 -> .25, .6 -> .4, .9 -> .85, .95 -> .925, .99 -> .985
@pytest.mark.parametrize("threshold,expected", [(0.8, [2, 4, 1]), (0.3, [2, 3, 1]), (0.95, [3, 4, 1]), (1.0, [4, 4, 4]),
                                                (0.0, [1, 1, 1])])
def test_softmax_margin(threshold, expected):
    assert exits("softmax_margin", threshold=threshold) == expected


def test_margin_and_saturation_by_hand():
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8]])
    assert margin(probs.log()).tolist() == pytest.approx([0.2, 0.7])  # 0.5 - 0.3, 0.8 - 0.1
    assert layer_signals(probs.log(), needs=("margin",))["margin"].tolist() == pytest.approx([0.2, 0.7])
    hidden = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    previous = torch.tensor([[2.0, 0.0], [1.0, -1.0], [4.0, 3.0]])
    assert saturation(hidden, previous).tolist() == pytest.approx([1.0, 0.0, 24 / 25])  # (12 + 12) / (5 * 5)


# Signals only generation computes, as [L=4, B=3] tables.
SATURATION = torch.tensor([[.5, .99, .2], [.97, .99, .3], [.99, .2, .3], [.1, .1, .1]])
CLASSIFIER_PROB = torch.tensor([[.1, .8, .3], [.6, .8, .3], [.9, .1, .3], [.2, .2, .2]])


@pytest.mark.parametrize("name,signal,threshold,expected", [
    ("saturation", "saturation", 0.98, [3, 1, 4]), ("saturation", "saturation", 0.96, [2, 1, 4]),
    ("saturation", "saturation", -1.0, [1, 1, 1]),
    ("classifier", "classifier_prob", 0.8, [3, 1, 4]), ("classifier", "classifier_prob", 0.5, [2, 1, 4]),
])
def test_generation_measures_replayed(name, signal, threshold, expected):
    table = SATURATION if signal == "saturation" else CLASSIFIER_PROB
    assert replay(build_rule(name, threshold=threshold), {signal: table}).tolist() == expected


def test_rules_without_signals_follow_their_rows_and_policy_is_strict():
    static, full = build_rule("static", k=3), build_rule("full")
    state = static.init_state(3)
    assert static.needs == () and full.needs == ()
    assert static.decide(2, {}, state)[0].tolist() == [False] * 3 and static.decide(3, {}, state)[0].tolist() == [True] * 3
    assert static.decide(3, {}, select_state(state, torch.tensor([0, 2])))[0].tolist() == [True, True]
    assert full.decide(3, {}, full.init_state(2))[0].tolist() == [False, False]
    assert build_rule("policy", tau=0.5).decide(1, {"exit_prob": torch.tensor([0.5, 0.51])}, {})[0].tolist() == [False, True]


def test_patience_first_decision_need_not_be_layer_1():
    """Generation decides at exit layers only (e.g. 3, 6, ...): the first decision has no predecessor,
    whatever the prediction (token 0 included)."""
    rule = build_rule("patience", patience=1)
    exit_now, state = rule.decide(3, {"prediction": torch.tensor([0, 7])}, rule.init_state(2))
    assert exit_now.tolist() == [False, False] and state["count"].tolist() == [0, 0]
    exit_now, state = rule.decide(6, {"prediction": torch.tensor([0, 5])}, state)
    assert exit_now.tolist() == [True, False]


def test_at_exit_and_summary():
    exit_layers = torch.tensor([3, 4, 1])
    picked = at_exit(LOGITS, exit_layers)
    assert picked.shape == (3, 3)
    for b, layer in enumerate(exit_layers.tolist()):
        assert torch.equal(picked[b], LOGITS[layer - 1, b])
    summary = exit_summary(exit_layers, 4)
    assert summary["avg_exit_layer"] == pytest.approx(8 / 3)
    assert summary["layer_saving"] == pytest.approx(1 - 2 / 3)
    assert summary["speedup"] == pytest.approx(1.5)


def test_decide_is_row_wise_so_state_can_be_subset():
    """What the runner relies on: deciding on a subset of rows with the subset state = the full decision's rows."""
    rule = build_rule("patience", patience=1)
    state = rule.init_state(3)
    full_state = state
    rows = torch.tensor([0, 2])
    sub_state = select_state(state, rows)
    for layer in range(1, 4):
        full_exit, full_state = rule.decide(layer, layer_signals(LOGITS[layer - 1]), full_state)
        sub_exit, sub_state = rule.decide(layer, layer_signals(LOGITS[layer - 1, rows]), sub_state)
        assert torch.equal(sub_exit, full_exit[rows])


def test_policy_exits_is_the_policy_rule():
    assert policy_exits(EXIT_PROBS, 0.5).tolist() == exits("policy", tau=0.5) == [2, 4, 1]


def test_default_grids_go_from_no_saving_to_full_saving():
    torch.manual_seed(0)
    logits = torch.randn(6, 50, 3)
    probs = torch.rand(6, 50)
    for name in RULES:
        grid = default_grid(name, 6, num_classes=3)
        assert grid, name
        labels = torch.randint(0, 3, (50,))
        signals = {**all_layer_signals(logits, probs), "saturation": torch.rand(6, 50) * 2 - 1,
                   "classifier_prob": torch.rand(6, 50), "frequent_margin": torch.rand(6, 50)}
        averages = [replay(rule_from_grid(name, value, num_layers=6), signals, labels=labels).float().mean().item()
                    for value in grid]
        if name in ("entropy", "maxprob", "softmax_margin", "saturation", "classifier", "static", "patience", "policy"):
            assert averages == sorted(averages, reverse=True), name  # monotone: later points save more
        if name in ("entropy", "maxprob", "softmax_margin", "saturation", "classifier", "static"):
            assert averages[0] == 6 and averages[-1] == 1, name
        if name in ("pcee", "confirmed_policy"):  # two knobs: pairs
            assert all(isinstance(v, tuple) and len(v) == 2 for v in grid)
            assert max(averages) > min(averages)
        if name in ("oracle", "full"):
            assert grid == [None]
    assert default_grid("patience", 4) == [3, 2, 1]
    assert default_grid("static", 4) == [4, 3, 2, 1]
    # The policy's grid starts at tau 1, which never exits, even where a saturated sigmoid gives p = 1.
    assert default_grid("policy", 4)[:3] == [1.0, 0.999, 0.99]
    saturated = torch.sigmoid(torch.full((4, 5), 40.0))
    assert bool((saturated == 1.0).all())
    assert replay(rule_from_grid("policy", 1.0, num_layers=4), {"exit_prob": saturated}).tolist() == [4] * 5
    assert default_grid("entropy", 4, num_classes=3)[-1] > math.log(3)
    assert set(GRID_KNOBS) == set(RULES)
    assert set(ENCODER_RULES) == set(RULES) - {"saturation", "classifier", "confirmed_policy"}


# --- errors ---------------------------------------------------------------------------------
def test_unknown_rule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown exit rule 'deebert'.*entropy.*maxprob.*patience.*pcee.*static.*oracle"):
        build_rule("deebert")
    with pytest.raises(ValueError, match="unknown exit rule"):
        default_grid("nope", 4)


def test_unknown_knob_lists_the_valid_ones():
    with pytest.raises(ValueError, match="no knob.*thresh.*its knobs: threshold"):
        build_rule("entropy", thresh=0.1)
    with pytest.raises(ValueError, match="its knobs: none"):
        build_rule("full", k=1)


@pytest.mark.parametrize("name,knobs,message", [
    ("static", {"k": 0}, "k=0 must be >= 1"),
    ("static", {"k": 5}, r"k=5 is outside 1\.\.4"),
    ("static", {"k": 1.5}, "must be an integer"),
    ("patience", {"patience": -1}, "patience=-1 must be >= 0"),
    ("patience", {"patience": 2, "tolerance": -0.1}, "tolerance"),
    ("pcee", {"patience": 0, "threshold": 0.3}, "patience=0 must be >= 1"),
    ("entropy", {"threshold": -0.5}, "threshold=-0.5 must be >= 0"),
    ("entropy", {"threshold": "low"}, "must be a number"),
    ("maxprob", {"threshold": 1.5}, "threshold=1.5 must be <= 1"),
    ("policy", {"tau": 2.0}, "tau=2.0 must be <= 1"),
    ("softmax_margin", {"threshold": 1.5}, "threshold=1.5 must be <= 1"),
    ("saturation", {"threshold": -1.5}, "threshold=-1.5 must be >= -1"),
    ("classifier", {"threshold": -0.1}, "threshold=-0.1 must be >= 0"),
])
def test_bad_knobs(name, knobs, message):
    with pytest.raises(ValueError, match=message):
        build_rule(name, num_layers=4, **knobs)


def test_static_beyond_the_model_fails_at_replay():
    rule = build_rule("static", k=5)  # no num_layers: checked when the depth is known
    with pytest.raises(ValueError, match=r"outside 1\.\.4"):
        replay(rule, all_layer_signals(LOGITS))


def test_missing_inputs():
    with pytest.raises(ValueError, match="needs the signal.*exit_prob.*a model with a policy"):
        replay(build_rule("policy"), all_layer_signals(LOGITS))
    with pytest.raises(ValueError, match="needs labels"):
        replay(build_rule("oracle"), all_layer_signals(LOGITS))
    with pytest.raises(ValueError, match="needs the signal.*entropy.*a classification head"):
        replay(build_rule("entropy"), all_layer_signals(REG, is_regression=True), is_regression=True)
    with pytest.raises(ValueError, match="does not match"):
        rule_from_grid("pcee", 0.3)
    with pytest.raises(ValueError, match=r"'saturation'.*not computed by an encoder's exits \(it is computed in "
                                         r"generation only\); rules that run there: entropy"):
        replay(build_rule("saturation"), all_layer_signals(LOGITS))
