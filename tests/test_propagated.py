"""The one-pass replay of a policy's exits under propagated K/V equals generation forced to the same
tokens, and its rollouts' log-probabilities are the policy's."""
from __future__ import annotations

import pytest
import torch

from tiny_decoders import PAD, left_padded_prompts, tiny_lm
from ee_lightning.exits import rules as r
from ee_lightning.inference.generate import generate_with_exits
from ee_lightning.inference.propagated import propagated_exits
from ee_lightning.modeling.lm_exits import LMExitHeads, TokenExitPolicy


def _parts(decoder, exit_every=1, seed=3):
    torch.manual_seed(seed)
    exits = LMExitHeads(decoder.num_layers, decoder.hidden_size, exit_every=exit_every, rank=4)
    for adapter in exits.adapters.values():  # trained-looking exits: not the zero map
        torch.nn.init.normal_(adapter.up.weight, std=0.3)
    policy = TokenExitPolicy(decoder.num_layers, decoder.hidden_size, hidden=8, exit_layers=exits.exit_layers)
    return exits, policy


def _responses(lengths=(5, 3, 4), seed=2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 97, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_greedy_replay_equals_generation_forced_to_the_response(family):
    _, decoder = tiny_lm(family, layers=6)
    exits, policy = _parts(decoder, exit_every=2)
    prompts, prompt_mask = left_padded_prompts()
    response, response_mask = _responses()
    with torch.no_grad():
        tau = float(torch.sigmoid(torch.stack([policy.logit(layer, decoder(prompts, prompt_mask)[layer - 1])
                                               for layer in (2, 4)])).median())  # a tau that splits the tokens
        replay = propagated_exits(decoder, exits, policy, prompts, prompt_mask, response, response_mask, tau=tau)
    generated = generate_with_exits(decoder, exits, r.PolicyRule(tau), prompts, prompt_mask, response.shape[1],
                                    policy=policy, force_tokens=response, output_logits=True)
    valid = response_mask.bool()
    layers = replay.exit_layers(exits.exit_layers)
    assert torch.equal(layers[valid], generated.exit_layers[valid])
    assert len(set(layers[valid].tolist())) > 1  # the tokens left at different exits: propagation was exercised
    assert torch.equal(replay.tokens[valid], generated.logits.argmax(-1)[valid])
    assert bool((replay.exit_index[~valid] == 0).all()) and bool((replay.log_prob[~valid] == 0).all())


def test_rollouts_score_their_own_decisions_and_carry_the_policys_gradient():
    _, decoder = tiny_lm("llama", layers=4)
    exits, policy = _parts(decoder)
    prompts, prompt_mask = left_padded_prompts()
    response, response_mask = _responses()
    k = 3
    roll = propagated_exits(decoder, exits, policy, prompts, prompt_mask, response, response_mask, k=k,
                            generator=torch.Generator().manual_seed(0))
    assert roll.exit_index.shape == (3 * k, response.shape[1])
    assert torch.equal(roll.mask, response_mask.bool().repeat_interleave(k, dim=0))
    # log pi = sum over the exits a position reached of log(1 - p), with log p at the one it left by
    # (the last exit is forced: no term), from the probabilities the pass recorded
    p = roll.probs.double()
    expected = torch.zeros_like(roll.log_prob, dtype=torch.float64)
    for e in range(len(exits.exit_layers) - 1):
        reached = ~torch.isnan(p[e])
        left = roll.exit_index == e + 1
        expected += torch.where(reached & left, p[e].log(), torch.where(reached, torch.log1p(-p[e]), 0.0))
    torch.testing.assert_close(roll.log_prob.double(), expected, rtol=0, atol=1e-5)
    assert bool(torch.isnan(p[-1]).all())  # no decision at the last exit
    valid = roll.mask
    assert bool((roll.exit_index[valid] >= 1).all()) and bool((roll.exit_index[~valid] == 0).all())
    assert len(set(roll.exit_index[valid].tolist())) > 1
    roll.log_prob[valid].sum().backward()
    assert all(param.grad is not None for param in policy.parameters())
    assert all(param.grad is None for param in decoder.parameters())


def test_the_rollouts_of_one_row_share_its_prompt_and_differ_only_by_their_draws():
    _, decoder = tiny_lm("qwen2", layers=4)
    exits, policy = _parts(decoder)
    prompts, prompt_mask = left_padded_prompts()
    response, response_mask = _responses()
    with torch.no_grad():
        never = propagated_exits(decoder, exits, policy, prompts, prompt_mask, response, response_mask, k=2, tau=1.0)
        always = propagated_exits(decoder, exits, policy, prompts, prompt_mask, response, response_mask, k=2, tau=0.0)
    valid = never.mask
    assert bool((never.exit_index[valid] == 4).all()) and bool((always.exit_index[valid] == 1).all())
    assert torch.equal(never.tokens[0::2], never.tokens[1::2])  # identical draws, identical rollouts
    # never exiting is the full model teacher-forced on the response
    ids = torch.cat([prompts, response], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    with torch.no_grad():
        full = decoder.lm_head(decoder.final_norm(decoder(ids, mask)[-1])).argmax(-1)[:, prompts.shape[1] - 1:-1]
    assert torch.equal(never.tokens[0::2][response_mask.bool()], full[response_mask.bool()])
    with pytest.raises(ValueError, match="LEFT-padded"):
        propagated_exits(decoder, exits, policy, prompts.flip(1), prompt_mask.flip(1), response, response_mask)
