"""The batched early-exit runner agrees with replay over cached all-layer outputs, row for row."""
from __future__ import annotations

import pytest
import torch

from conftest import SENTENCES, TINY_BACKBONES, make_batch, make_tiny_model
from ee_lightning.inference.runner import EarlyExitRunner
from ee_lightning.exits.rules import ENCODER_RULES, at_exit, build_rule, replay
from ee_lightning.exits.signals import all_layer_signals, entropy, margin, max_prob

L = 4  # the tiny backbones' depth


def signals_of(out, is_regression: bool = False) -> dict:
    return all_layer_signals(out.logits, out.exit_probs, is_regression)


@torch.no_grad()
def spread_model(model, batch, scale: float = 2.0):
    """Random tiny models give near-identical, near-uniform heads for every row. Re-centre and rescale
    each head (and each policy net's output layer) on this batch so that predictions, confidences and
    exit probabilities vary across rows and layers. Only parameters change: still a valid model."""
    out = model(batch)
    for index in range(model.num_layers):
        linear = model.heads.heads[index][-1]
        pooled = out.pooled[index]
        centred = (pooled - pooled.mean(0)) @ linear.weight.T
        factor = scale / centred.std().clamp_min(1e-12)
        linear.weight.mul_(factor)
        linear.bias.copy_(-(pooled.mean(0) @ linear.weight.T))
        if model.policy is not None:
            last = model.policy.nets[index][-1]
            logit = model.policy.logit(index, pooled, out.logits[index])
            factor = scale / logit.std().clamp_min(1e-12)
            last.weight.mul_(factor)
            last.bias.copy_((last.bias - logit.median()) * factor)
    return model


def midpoints(values: torch.Tensor, min_gap: float = 1e-3) -> list[float]:
    """Thresholds between distinct observed values, away from every value (robust to float noise)."""
    v = torch.unique(values.flatten().float()).sort().values
    gaps = v[1:] - v[:-1]
    return [float((a + b) / 2) for a, b, g in zip(v[:-1], v[1:], gaps) if g > min_gap]


def spread(exit_layers: torch.Tensor) -> tuple[int, float]:
    counts = torch.bincount(exit_layers, minlength=L + 1).float()
    p = counts[counts > 0] / counts.sum()
    return int((counts > 0).sum()), float(-(p * p.log()).sum())


def candidate_rules(name: str, out, labels, is_regression=False, min_gap=1e-2):
    logits = out.logits[:-1]  # decisions are taken at layers 1..L-1
    if name == "entropy":
        return [build_rule(name, threshold=t) for t in midpoints(entropy(logits), min_gap)]
    if name == "maxprob":
        return [build_rule(name, threshold=t) for t in midpoints(max_prob(logits), min_gap)]
    if name == "softmax_margin":
        return [build_rule(name, threshold=t) for t in midpoints(margin(logits), min_gap)]
    if name == "patience":
        if is_regression:
            moves = (out.logits[1:-1] - out.logits[:-2]).abs()
            return [build_rule(name, patience=p, tolerance=t) for p in (1, 2) for t in midpoints(moves, min_gap)]
        return [build_rule(name, patience=p) for p in (0, 1, 2, 3)]
    if name == "pcee":
        normalised = entropy(logits) / torch.log(torch.tensor(float(logits.shape[-1])))
        return [build_rule(name, threshold=t, patience=p) for p in (1, 2) for t in midpoints(normalised, min_gap)]
    if name == "static":
        return [build_rule(name, k=k) for k in (1, 2, 3, 4)]
    if name == "policy":
        return [build_rule(name, tau=t) for t in midpoints(out.exit_probs[:-1], min_gap)]
    return [build_rule(name)]


def chosen_rules(name, out, labels, is_regression=False, min_gap=1e-2):
    """Knobs picked from the data: the candidate whose exits spread most over the layers
    (static: every k; oracle and full have no knob)."""
    candidates = candidate_rules(name, out, labels, is_regression, min_gap)
    if name in ("static", "full", "oracle"):
        return candidates
    scored = [(spread(replay(r, signals_of(out, is_regression), labels=labels, is_regression=is_regression)), i)
              for i, r in enumerate(candidates)]
    return [candidates[max(scored)[1]]]


def oracle_labels(out) -> torch.Tensor:
    """Labels that make the oracle's exits spread: row i is right first at layer (i % L) + 1 (at most)."""
    B = out.logits.shape[1]
    layers = torch.arange(B) % L
    return out.logits[layers, torch.arange(B)].argmax(-1)


# Mean pooling for every family: with random weights the [CLS] vectors of different sentences differ by
# ~0.5%, so heads spread over them amplify float noise from running different row subsets. The two
# cls cases (one with BERT's pooler, one without a pooler) therefore use looser tolerances and knobs
# kept further from every observed value.
CASES = [(name, "mean") for name in TINY_BACKBONES] + [("tiny_bert", "cls"), ("tiny_electra", "cls")]
TOLERANCE = {"mean": dict(rtol=1e-4, atol=1e-4, min_gap=1e-2), "cls": dict(rtol=1e-3, atol=2e-3, min_gap=5e-2)}


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def setup(request):
    name, pooling = request.param
    model, tokenizer = make_tiny_model(name, output_size=3, with_policy=True, pooling=pooling)
    batch = make_batch(tokenizer)
    assert (batch["attention_mask"] == 0).any(), "the test batch must contain padding"
    spread_model(model, batch)
    with torch.inference_mode():
        out = model(batch)
    return f"{name}-{pooling}", model, tokenizer, batch, out, TOLERANCE[pooling]


@pytest.mark.parametrize("name", list(ENCODER_RULES))
def test_runner_equals_replay(setup, name):
    backbone, model, _, batch, out, tol = setup
    labels = oracle_labels(out)
    runner = EarlyExitRunner(model)
    seen = set()
    for rule in chosen_rules(name, out, labels, min_gap=tol["min_gap"]):
        expected = replay(rule, signals_of(out), labels=labels)
        logits, exit_layers = runner.run(batch, rule, labels=labels)
        assert exit_layers.dtype == torch.long and exit_layers.shape == (8,)
        assert exit_layers.tolist() == expected.tolist(), (backbone, rule.describe())
        torch.testing.assert_close(logits, at_exit(out.logits, expected), rtol=tol["rtol"], atol=tol["atol"])
        # the runner ran only the rows still active at each layer
        assert runner.active_per_layer == [int((expected >= layer).sum()) for layer in range(1, int(expected.max()) + 1)]
        seen.update(exit_layers.tolist())
    if name not in ("full",):
        assert len(seen) >= 2, (backbone, name, seen)  # exits actually spread across layers
    else:
        assert seen == {L}


def test_exits_spread_for_the_confidence_rules(setup):
    """The knob picked from the data gives at least three distinct exit layers for entropy and policy."""
    _, model, _, batch, out, tol = setup
    for name in ("entropy", "policy"):
        (rule,) = chosen_rules(name, out, None, min_gap=tol["min_gap"])
        assert spread(replay(rule, signals_of(out)))[0] >= 3, name


@pytest.mark.parametrize("name", ["pcee", "policy", "oracle"])  # stateful, policy-driven, label-driven
def test_batch_of_one_equals_batch_of_eight(setup, name):
    backbone, model, _, batch, out, tol = setup
    labels = oracle_labels(out)
    runner = EarlyExitRunner(model)
    (rule,) = chosen_rules(name, out, labels, min_gap=tol["min_gap"])
    logits8, exits8 = runner.run(batch, rule, labels=labels)
    for i in range(8):
        row = {key: value[i:i + 1] for key, value in batch.items()}
        logits1, exits1 = runner.run(row, rule, labels=labels[i:i + 1])
        assert exits1.tolist() == [exits8[i].item()], (backbone, rule.describe(), i)
        torch.testing.assert_close(logits1[0], logits8[i], rtol=tol["rtol"], atol=tol["atol"])


def test_batch_of_one_unpadded(setup):
    """A sentence tokenized on its own (no padding) exits where it does inside the padded batch."""
    backbone, model, tokenizer, batch, out, tol = setup
    (rule,) = chosen_rules("entropy", out, None, min_gap=tol["min_gap"])
    runner = EarlyExitRunner(model)
    _, exits8 = runner.run(batch, rule)
    for i, sentence in enumerate(SENTENCES):
        _, exits1 = runner.run(make_batch(tokenizer, [sentence]), rule)
        assert exits1.item() == exits8[i].item(), (backbone, i)


def test_regression_runner_equals_replay():
    model, tokenizer = make_tiny_model("tiny_bert", output_size=1, with_policy=True, pooling="mean")
    batch = make_batch(tokenizer)
    spread_model(model, batch)
    with torch.inference_mode():
        out = model(batch)
    labels = out.logits[torch.arange(8) % L, torch.arange(8), 0] + 0.05
    runner = EarlyExitRunner(model)
    for name in ("patience", "static", "oracle", "full", "policy"):
        for rule in chosen_rules(name, out, labels, is_regression=True):
            expected = replay(rule, signals_of(out, True), labels=labels, is_regression=True)
            logits, exit_layers = runner.run(batch, rule, labels=labels)  # regression inferred from 1 output
            assert exit_layers.tolist() == expected.tolist(), rule.describe()
            if name == "patience":
                assert len(set(exit_layers.tolist())) >= 2, rule.describe()  # the tolerance knob matters
            torch.testing.assert_close(logits, at_exit(out.logits, expected), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="regression"):
        runner.run(batch, build_rule("entropy"))


def test_runner_errors_and_conveniences(setup):
    _, model, _, batch, out, tol = setup
    runner = EarlyExitRunner(model)
    with pytest.raises(ValueError, match="needs labels"):
        runner.run(batch, build_rule("oracle"))
    with pytest.raises(ValueError, match=r"outside 1\.\.4"):
        runner.run(batch, build_rule("static", k=5))
    labelled = dict(batch, labels=oracle_labels(out))
    assert runner.run(labelled, "oracle")[1].tolist() == replay(build_rule("oracle"), signals_of(out),
                                                                labels=labelled["labels"]).tolist()
    assert runner.run(batch, "full")[1].tolist() == [L] * 8
    no_policy, tokenizer = make_tiny_model("tiny_bert", output_size=3, with_policy=False)
    with pytest.raises(ValueError, match="no policy"):
        EarlyExitRunner(no_policy).run(make_batch(tokenizer), build_rule("policy"))
    with pytest.raises(ValueError, match=r"'classifier' reads the signal\(s\) \['classifier_prob'\], not computed by an "
                                         r"encoder's exits \(it is computed in generation only\)"):
        runner.run(batch, build_rule("classifier"))


def test_runner_does_not_track_gradients(setup):
    _, model, _, batch, _, _ = setup
    logits, _ = EarlyExitRunner(model).run(batch, build_rule("static", k=2))
    assert not logits.requires_grad
