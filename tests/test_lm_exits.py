"""Decoder exits: exit layers, zero-init adapters, policy and classifier heads."""
from __future__ import annotations

import pytest
import torch

from ee_lightning.modeling.lm_exits import (FORCED_LOGIT, ExitClassifier, LMExitHeads, TokenExitPolicy,
                                            exit_layer_list)
from tests.lm_fixtures import LlamaLayers, tiny_llama


@pytest.mark.parametrize("layers, every, expected", [(4, 1, [1, 2, 3, 4]), (5, 2, [2, 4, 5]), (30, 10, [10, 20, 30]),
                                                     (3, 5, [3])])
def test_exit_layer_list(layers, every, expected):
    assert exit_layer_list(layers, every) == expected


def test_untrained_exit_is_final_norm_and_head_and_last_exit_is_the_model():
    torch.manual_seed(0)
    decoder = LlamaLayers(tiny_llama(num_layers=4, hidden=16))
    exits = LMExitHeads(4, 16, exit_every=2, rank=4)
    assert exits.exit_layers == [2, 4] and set(exits.adapters) == {"2"}
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones_like(ids)
    states = decoder(ids, mask)
    raw = decoder.lm_head(decoder.final_norm(states[1]))
    assert torch.allclose(exits.logits(2, states[1], decoder), raw)
    assert torch.allclose(exits.logits(4, states[3], decoder), decoder.model(ids, attention_mask=mask).logits, atol=1e-5)
    with pytest.raises(ValueError, match="layer 3 has no exit"):
        exits.logits(3, states[2], decoder)


def test_adapter_trains_and_changes_only_its_exit():
    torch.manual_seed(0)
    exits = LMExitHeads(3, 8, rank=2)
    hidden = torch.randn(5, 8)
    target = torch.randn(5, 8)
    optimizer = torch.optim.SGD(exits.parameters(), lr=0.1)
    before = exits.adapt(1, hidden).detach()
    for _ in range(5):
        optimizer.zero_grad()
        (exits.adapt(1, hidden) - target).pow(2).mean().backward()
        optimizer.step()
    assert not torch.allclose(exits.adapt(1, hidden), before)
    assert torch.equal(exits.adapt(2, hidden), hidden)  # its own adapter untouched (still zero)
    assert torch.equal(exits.adapt(3, hidden), hidden)


def test_policy_and_classifier_shapes_and_forced_last_layer():
    policy = TokenExitPolicy(6, 8, hidden=4, exit_layers=[2, 4, 6])
    classifier = ExitClassifier(6, 8, exit_layers=[2, 4, 6])
    hidden = torch.randn(3, 5, 8)
    assert policy.logit(2, hidden).shape == (3, 5) and classifier.logit(4, hidden).shape == (3, 5)
    assert torch.equal(policy.logit(6, hidden), torch.full((3, 5), FORCED_LOGIT))
    assert set(policy.heads) == {"2", "4"} and set(classifier.heads) == {"2", "4"}
    assert len(policy.heads["2"]) == 4  # LayerNorm, Linear, GELU, Linear


def test_policy_and_classifier_read_the_residual_stream_on_one_scale():
    # A decoder's residual norm grows with depth (SmolLM2: ~80 at layer 3, ~800 at layer 30); read raw,
    # deep states saturate the sigmoid and the policy gets no gradient.
    torch.manual_seed(0)
    policy = TokenExitPolicy(6, 8, hidden=4, exit_layers=[2, 4, 6])
    classifier = ExitClassifier(6, 8, exit_layers=[2, 4, 6])
    hidden = torch.randn(3, 5, 8)
    for heads in (policy, classifier):
        assert torch.allclose(heads.logit(4, 100 * hidden), heads.logit(4, hidden), atol=1e-4)
    with pytest.raises(ValueError, match="must increase and end"):
        TokenExitPolicy(6, 8, exit_layers=[2, 4])
