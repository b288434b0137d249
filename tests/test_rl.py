"""rl.py against hand-computed numbers on small tensors."""
from __future__ import annotations

import math

import pytest
import torch

from ee_lightning.exits import rl


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# --------------------------------------------------------------------------- trajectories


def test_exit_layers_first_action_and_forced_exit():
    # K=1, L=4, B=4 (columns are instances)
    actions = torch.tensor([[
        [0, 1, 0, 0],
        [1, 1, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 1, 0],  # the action at L is ignored: exit at L is forced anyway
    ]], dtype=torch.bool)
    assert rl.exit_layers(actions).tolist() == [[2, 1, 4, 4]]


def test_exit_layers_single_layer():
    assert rl.exit_layers(torch.zeros(3, 1, 2, dtype=torch.bool)).tolist() == [[1, 1]] * 3


def test_trajectory_log_prob_hand_computed_L3():
    # one instance, p = [0.2, 0.5, 0.9]; p_3 never matters
    probs = torch.tensor([[0.2], [0.5], [0.9]])
    exits = torch.tensor([[1], [2], [3]])
    expected = [math.log(0.2), math.log(0.8) + math.log(0.5), math.log(0.8) + math.log(0.5)]
    got = rl.trajectory_log_prob(probs, exits)
    assert got.shape == (3, 1)
    assert got[:, 0].tolist() == pytest.approx(expected, abs=1e-6)

    logits = torch.tensor([[logit(0.2)], [logit(0.5)], [logit(0.9)]])
    from_logits = rl.trajectory_log_prob_from_logits(logits, exits)
    assert from_logits[:, 0].tolist() == pytest.approx(expected, abs=1e-6)
    # the logits path is taken when given, whatever probs says
    via_main = rl.trajectory_log_prob(torch.full_like(probs, 0.5), exits, logits=logits)
    assert via_main[:, 0].tolist() == pytest.approx(expected, abs=1e-6)


def test_trajectory_log_prob_batched_and_last_prob_ignored():
    probs = torch.tensor([[0.2, 0.6], [0.5, 0.1], [0.9, 0.3]])
    exits = torch.tensor([[3, 2], [1, 3]])
    expected = torch.tensor([
        [math.log(0.8) + math.log(0.5), math.log(0.4) + math.log(0.1)],
        [math.log(0.2), math.log(0.4) + math.log(0.9)],
    ])
    assert torch.allclose(rl.trajectory_log_prob(probs, exits), expected, atol=1e-6)
    changed = probs.clone()
    changed[-1] = 0.01
    assert torch.allclose(rl.trajectory_log_prob(changed, exits), expected, atol=1e-6)


def test_trajectory_log_prob_saturated_is_finite_and_differentiable():
    logits = torch.tensor([[-200.0], [200.0], [0.0]], requires_grad=True)
    exits = torch.tensor([[1], [2], [3]])
    lp = rl.trajectory_log_prob_from_logits(logits, exits)
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all()

    probs = torch.tensor([[0.0], [1.0], [0.5]], requires_grad=True)
    lp = rl.trajectory_log_prob(probs, exits)
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    assert torch.isfinite(probs.grad).all()


def test_trajectory_log_probs_sum_to_one_over_exits():
    torch.manual_seed(0)
    logits = torch.randn(5, 4)
    exits = torch.arange(1, 6).view(5, 1).expand(5, 4)
    total = rl.trajectory_log_prob_from_logits(logits, exits).exp().sum(0)
    assert torch.allclose(total, torch.ones(4), atol=1e-6)


def test_gather_layer():
    values = torch.tensor([[10.0, 20.0], [11.0, 21.0], [12.0, 22.0]])
    exits = torch.tensor([[1, 3], [2, 2], [3, 1]])
    assert rl.gather_layer(values, exits).tolist() == [[10.0, 22.0], [11.0, 21.0], [12.0, 20.0]]


# --------------------------------------------------------------------------- rewards

# L=4, B=2. Instance 0: m=2 (factor 0.5); instance 1: m=3 (factor 0.25). alpha = 0.1.
LOSSES = torch.tensor([[0.9, 1.2], [0.5, 0.8], [0.3, 0.6], [0.1, 0.2]])
CORRECT = torch.tensor([[False, False], [True, False], [True, True], [True, True]])
MEMORIZED = torch.tensor([2, 3])
EXITS = torch.tensor([[1, 4], [2, 3]])
# task "ce": -loss at exit                  -> [[-0.9, -0.2], [-0.5, -0.6]]
# task "correct": correct at exit           -> [[0, 1], [1, 1]]
# depth "hardness": 0.1 * t * (1 - m/4)     -> [[0.05, 0.1], [0.1, 0.075]]
# depth "plain": 0.1 * t                    -> [[0.1, 0.4], [0.2, 0.3]]
REWARD_CASES = [
    ("ce", "hardness", [[-0.95, -0.3], [-0.6, -0.675]], [[0.05, 0.1], [0.1, 0.075]]),
    ("ce", "plain", [[-1.0, -0.6], [-0.7, -0.9]], [[0.1, 0.4], [0.2, 0.3]]),
    ("ce", "none", [[-0.9, -0.2], [-0.5, -0.6]], [[0.0, 0.0], [0.0, 0.0]]),
    ("correct", "hardness", [[-0.05, 0.9], [0.9, 0.925]], [[0.05, 0.1], [0.1, 0.075]]),
    ("correct", "plain", [[-0.1, 0.6], [0.8, 0.7]], [[0.1, 0.4], [0.2, 0.3]]),
    ("correct", "none", [[0.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]),
]


@pytest.mark.parametrize("task_term,depth_term,expected,cost", REWARD_CASES)
def test_rewards_hand_computed(task_term, depth_term, expected, cost):
    parts = rl.rewards(EXITS, LOSSES, CORRECT, MEMORIZED, num_layers=4, alpha=0.1,
                       task_term=task_term, depth_term=depth_term)
    assert torch.allclose(parts.reward, torch.tensor(expected), atol=1e-6)
    assert torch.allclose(parts.depth_cost, torch.tensor(cost), atol=1e-6)
    assert torch.allclose(parts.task, parts.reward + parts.depth_cost, atol=1e-6)


def test_rewards_hardest_instance_pays_nothing_for_depth():
    parts = rl.rewards(torch.tensor([[4]]), torch.zeros(4, 1), None, torch.tensor([4]), 4, alpha=1.0)
    assert parts.depth_cost.item() == 0.0


def test_rewards_bad_arguments():
    with pytest.raises(ValueError):
        rl.rewards(EXITS, LOSSES, CORRECT, MEMORIZED, 4, 0.1, task_term="acc")
    with pytest.raises(ValueError):
        rl.rewards(EXITS, LOSSES, CORRECT, None, 4, 0.1, depth_term="hardness")
    with pytest.raises(ValueError):
        rl.rewards(EXITS, LOSSES, None, MEMORIZED, 4, 0.1, task_term="correct")


# --------------------------------------------------------------------------- advantages and loss


def test_advantages_zero_mean_per_instance():
    r = torch.tensor([[1.0, -2.0], [3.0, 0.0], [2.0, 5.0]])
    a = rl.advantages(r)
    assert torch.allclose(a, torch.tensor([[-1.0, -3.0], [1.0, -1.0], [0.0, 4.0]]))
    assert torch.allclose(a.mean(0), torch.zeros(2))


def test_advantages_normalized():
    r = torch.tensor([[1.0, -2.0], [3.0, 0.0], [2.0, 5.0]])
    a = rl.advantages(r, normalize=True)
    raw = torch.tensor([[-1.0, -3.0], [1.0, -1.0], [0.0, 4.0]])
    std = math.sqrt((1 + 9 + 1 + 1 + 0 + 16) / 6)  # population std of the raw advantages (mean 0)
    assert torch.allclose(a, raw / std, atol=1e-6)
    assert a.std(correction=0).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(a.mean(0), torch.zeros(2), atol=1e-6)
    # equal rewards: zero advantages, no nan
    assert torch.equal(rl.advantages(torch.ones(4, 3), normalize=True), torch.zeros(4, 3))


def _one_step_p1(rewards: list[float]) -> float:
    """One SGD step of the policy loss on L=3 logits (all 0: p = 0.5); returns the new p_1."""
    logits = torch.zeros(3, 1, requires_grad=True)
    exits = torch.tensor([[1], [3]])  # rollout 0 exits at layer 1, rollout 1 runs to the end
    adv = rl.advantages(torch.tensor(rewards).view(2, 1))
    loss = rl.policy_loss(adv, rl.trajectory_log_prob_from_logits(logits, exits))
    loss.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    return torch.sigmoid(logits[0, 0]).item()


def test_policy_gradient_moves_p1_towards_the_better_rollout():
    assert _one_step_p1([1.0, 0.0]) > 0.5  # early exit rewarded more: exit at 1 more likely
    assert _one_step_p1([0.0, 1.0]) < 0.5  # deep exit rewarded more: exit at 1 less likely


def test_policy_gradient_through_rewards():
    # layer 1 is already right on an easy instance (m=1): the depth cost favours exiting at 1
    probs = torch.full((3, 1), 0.5, requires_grad=True)
    exits = torch.tensor([[1], [3]])
    correct = torch.ones(3, 1, dtype=torch.bool)
    parts = rl.rewards(exits, torch.zeros(3, 1), correct, torch.tensor([1]), 3, alpha=0.1,
                       task_term="correct", depth_term="hardness")
    loss = rl.policy_loss(rl.advantages(parts.reward), rl.trajectory_log_prob(probs, exits))
    loss.backward()
    assert probs.grad[0, 0] < 0  # descending the loss raises p_1
    assert probs.grad[2, 0] == 0  # p_L plays no part


def test_policy_loss_entropy_bonus():
    adv = torch.tensor([[0.5], [-0.5]])
    log_probs = torch.tensor([[-1.0], [-2.0]])
    base = rl.policy_loss(adv, log_probs)
    assert base.item() == pytest.approx(-(0.5 * -1.0 + -0.5 * -2.0) / 2)
    probs = torch.tensor([[0.5], [0.2], [0.99]])  # layer L (0.99) is left out of the entropy
    h = [math.log(2), -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))]
    with_bonus = rl.policy_loss(adv, log_probs, entropy_bonus=0.1, probs=probs)
    assert with_bonus.item() == pytest.approx(base.item() - 0.1 * sum(h) / 2, abs=1e-6)
    assert rl.policy_loss(adv, log_probs, entropy_bonus=0.0, probs=probs).item() == base.item()
    with pytest.raises(ValueError):
        rl.policy_loss(adv, log_probs, entropy_bonus=0.1)


def test_bernoulli_entropy():
    h = rl.bernoulli_entropy(torch.tensor([0.5, 0.0, 1.0, 0.1]))
    assert h[0].item() == pytest.approx(math.log(2))
    assert h[1].item() == pytest.approx(0.0, abs=1e-4)
    assert h[2].item() == pytest.approx(0.0, abs=1e-4)
    assert h[3].item() == pytest.approx(-(0.1 * math.log(0.1) + 0.9 * math.log(0.9)))


# --------------------------------------------------------------------------- samplers


def test_sample_bernoulli_frequencies():
    probs = torch.tensor([[0.1, 0.5], [0.5, 0.9], [0.9, 0.0]])
    gen = torch.Generator().manual_seed(0)
    actions = rl.sample_bernoulli(probs, 20000, generator=gen)
    assert actions.shape == (20000, 3, 2) and actions.dtype == torch.bool
    assert torch.allclose(actions.float().mean(0), probs, atol=0.015)
    # same generator seed, same draws
    again = rl.sample_bernoulli(probs, 20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(actions, again)


def test_sample_epsilon_greedy_frequencies():
    probs = torch.tensor([[0.2], [0.7], [0.5]])  # 0.5 is not > 0.5: greedy says stay
    eps = 0.3
    gen = torch.Generator().manual_seed(1)
    actions = rl.sample_epsilon_greedy(probs, 20000, eps, generator=gen)
    expected = (1 - eps) * (probs > 0.5).float() + eps / 2  # [0.15, 0.85, 0.15]
    assert torch.allclose(actions.float().mean(0), expected, atol=0.015)
    assert torch.equal(rl.sample_epsilon_greedy(probs, 10, 0.0), (probs > 0.5).expand(10, 3, 1))


def test_epsilon_schedule():
    assert rl.epsilon_schedule(0, 0.5, 0.05, 100) == pytest.approx(0.5)
    assert rl.epsilon_schedule(10**6, 0.5, 0.05, 100) == pytest.approx(0.05)
    assert rl.epsilon_schedule(100, 0.5, 0.05, 100) == pytest.approx(0.05 + 0.45 / math.e)
    with pytest.raises(ValueError):
        rl.epsilon_schedule(0, 0.5, 0.05, 0)


# --------------------------------------------------------------------------- inference and rollout


def test_greedy_inference_is_the_policy_rule():
    """Inference has one definition (the policy exit rule); it exits at the first p_l > tau."""
    from ee_lightning.exits.rules import policy_exits

    probs = torch.tensor([[0.6, 0.2, 0.1], [0.9, 0.7, 0.3], [0.1, 0.1, 0.9]])  # [L=3, B=3]
    assert policy_exits(probs, 0.5).tolist() == [1, 2, 3]
    assert policy_exits(probs, 0.65).tolist() == [2, 2, 3]
    assert policy_exits(probs, 0.95).tolist() == [3, 3, 3]

def test_rollout_composes_sampling_and_log_prob():
    logits = torch.tensor([[logit(0.2), 3.0], [0.0, -3.0], [1.0, 1.0]], requires_grad=True)
    exits, log_probs = rl.rollout(64, logits=logits, generator=torch.Generator().manual_seed(0))
    assert exits.shape == log_probs.shape == (64, 2)
    assert ((exits >= 1) & (exits <= 3)).all()
    assert torch.allclose(log_probs, rl.trajectory_log_prob_from_logits(logits, exits))
    log_probs.sum().backward()
    assert logits.grad is not None

    probs = torch.sigmoid(logits.detach())
    exits_p, lp_p = rl.rollout(64, probs=probs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(exits_p, exits)  # same draws from the same seed
    assert torch.allclose(lp_p, log_probs.detach(), atol=1e-5)

    greedy_exits, _ = rl.rollout(8, probs=probs, sampler="epsilon_greedy", eps=0.0)
    assert greedy_exits.tolist() == [[3, 1]] * 8
    with pytest.raises(ValueError):
        rl.rollout(8, probs=probs, sampler="greedy")
    with pytest.raises(ValueError):
        rl.rollout(8)


# --------------------------------------------------------------------------- the exact expected reward


def test_exit_distribution_by_hand():
    # p = 0.5, 0.2, (forced): exit at 1 w.p. 0.5, at 2 w.p. 0.5 * 0.2 = 0.1, at 3 w.p. 0.5 * 0.8 = 0.4
    logits = torch.tensor([[logit(0.5)], [logit(0.2)], [logit(0.9)]])
    assert rl.exit_distribution(logits)[:, 0].tolist() == pytest.approx([0.5, 0.1, 0.4])


def test_expected_estimator_is_the_exact_expected_reward_and_reinforce_estimates_its_gradient():
    # rewards (correct, plain depth cost alpha = 0.1): exit 1 -> 0 - 0.1, exit 2 -> 1 - 0.2, exit 3 -> 1 - 0.3
    logits = torch.tensor([[logit(0.5)], [logit(0.2)], [0.0]], requires_grad=True)
    correct = torch.tensor([[False], [True], [True]])
    settings = dict(losses=torch.zeros(3, 1), correct=correct, memorized=None, alpha=0.1, task_term="correct",
                    depth_term="plain")
    exact = rl.reinforce_objective(logits, k=2, estimator="expected", **settings)
    assert exact.loss.item() == pytest.approx(-(0.5 * -0.1 + 0.1 * 0.8 + 0.4 * 0.7))
    exact_grad, = torch.autograd.grad(exact.loss, logits)
    sampled = rl.reinforce_objective(logits, k=200_000, generator=torch.Generator().manual_seed(0), **settings)
    sampled_grad, = torch.autograd.grad(sampled.loss, logits)
    assert sampled_grad[:2, 0].tolist() == pytest.approx(exact_grad[:2, 0].tolist(), abs=2e-3)
    with pytest.raises(ValueError, match="estimator 'exactly'"):
        rl.reinforce_objective(logits, k=2, estimator="exactly", **settings)


def test_row_noise_gives_an_instance_the_same_draws_in_any_batch():
    whole = rl.RowNoise(7, 1, torch.tensor([10, 11, 12, 13]))
    part = rl.RowNoise(7, 1, torch.tensor([12, 10]))
    a, b = whole.rand((3, 2, 4)), part.rand((3, 2, 2))
    assert torch.equal(a[..., 2], b[..., 0]) and torch.equal(a[..., 0], b[..., 1])
    assert not torch.equal(a[..., 0], a[..., 1])  # each row its own stream
    assert not torch.equal(rl.RowNoise(7, 2, torch.tensor([10])).rand((3, 2, 1))[..., 0], a[..., 0])  # and epoch
    # the samplers draw from it: a token's rollouts do not depend on its batch
    probs = torch.tensor([[0.3, 0.6, 0.5, 0.9], [1.0, 1.0, 1.0, 1.0]])
    exits, _ = rl.rollout(5, probs=probs, generator=rl.RowNoise(0, 0, torch.tensor([10, 11, 12, 13])))
    alone, _ = rl.rollout(5, probs=probs[:, 2:3], generator=rl.RowNoise(0, 0, torch.tensor([12])))
    assert torch.equal(exits[:, 2:3], alone)
    with pytest.raises(ValueError, match="noise for 3 instances from the streams of 4 rows"):
        whole.rand((2, 3))


def test_the_per_instance_loss_averages_to_the_loss():
    logits = torch.tensor([[0.2, -1.0, 2.0], [0.0, 0.0, 0.0]], requires_grad=True)
    losses, correct = torch.rand(2, 3), torch.tensor([[1, 0, 1], [1, 1, 0]])
    for estimator in rl.ESTIMATORS:
        step = rl.reinforce_objective(logits, losses, correct, torch.tensor([1, 2, 2]), k=4, alpha=0.1,
                                      estimator=estimator, entropy_bonus=0.05, generator=torch.Generator().manual_seed(0))
        assert step.instance_loss.shape == (3,) and step.loss == step.instance_loss.mean()


def test_later_agreement_is_the_discounted_sum_over_the_valid_positions_after_each_one():
    from ee_lightning.exits.rl import later_agreement

    correct = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    # row 0: t3 nothing after; t2 = c3 = 1; t1 = c2 + 0.5 * 1 = 1.5; t0 = c1 + 0.5 * 1.5 = 0.75
    # row 1 (t3 is padding): t2 = 0; t1 = c2 = 1; t0 = c1 + 0.5 * 1 = 1.5
    expected = torch.tensor([[0.75, 1.5, 1.0, 0.0], [1.5, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(later_agreement(correct, mask, gamma=0.5), expected)
    torch.testing.assert_close(later_agreement(correct, mask, gamma=1.0)[0], torch.tensor([2.0, 2.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="gamma"):
        later_agreement(correct, mask, gamma=1.5)


def test_sequence_objective_adds_the_later_agreement_and_baselines_over_rollouts():
    from ee_lightning.exits.rl import sequence_objective

    # K=2 rollouts of one sequence of 3 tokens (the third is padding), E=2 exits, alpha 0.5, plain depth cost
    exits = torch.tensor([[[1, 2, 1]], [[2, 2, 2]]])
    correct = torch.tensor([[[0, 1, 0]], [[1, 1, 1]]])
    mask = torch.tensor([[True, True, False]])
    log_probs = torch.tensor([[[-1.0, -2.0, -5.0]], [[-3.0, -4.0, -5.0]]], requires_grad=True)
    probs = torch.tensor([[[[0.4, 0.3, 0.2]], [[0.6, 0.3, 0.2]]], [[[float("nan")] * 3], [[float("nan")] * 3]]])
    step = sequence_objective(log_probs, exits, correct, None, mask, probs, num_exits=2, alpha=0.5,
                              later_weight=1.0, gamma=1.0, depth_term="plain")
    # returns: rollout 0: t0 = 0 - 0.5 + 1 (t1 agrees) = 0.5, t1 = 1 - 1 + 0 = 0; rollout 1: t0 = 1 - 1 + 1 = 1, t1 = 0
    torch.testing.assert_close(step.parts.reward, torch.tensor([[0.5, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(step.advantages, torch.tensor([[-0.25, 0.0], [0.25, 0.0]]))
    # loss = -mean(A * log pi) over the valid positions: -(-0.25 * -1 + 0.25 * -3) / 4
    torch.testing.assert_close(step.loss, torch.tensor(0.125))
    step.loss.backward()
    torch.testing.assert_close(log_probs.grad, torch.tensor([[[0.0625, 0.0, 0.0]], [[-0.0625, 0.0, 0.0]]]))
    assert step.exits.tolist() == [[1, 2], [2, 2]]
    torch.testing.assert_close(step.probs[0], torch.tensor([0.5, 0.3]))
    with pytest.raises(ValueError, match="k >= 2"):
        sequence_objective(log_probs[:1], exits[:1], correct[:1], None, mask, probs[:, :1], num_exits=2, alpha=0.5)
