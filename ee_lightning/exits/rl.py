"""REINFORCE for exit policies, as pure tensor functions over per-layer values cached for a batch.

Shapes: L layers, B instances, K rollouts per instance. Per-layer inputs are [L, B] (layer is
dim 0); rollout outputs are [K, B]. Exit layers are ints 1..L. The action at layer L is never
drawn from the policy: an instance still running there exits (forced).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ee_lightning.modeling.lm_exits import FORCED_LOGIT as FORCED_STOP_LOGIT

TASK_TERMS = ("ce", "correct")
DEPTH_TERMS = ("hardness", "plain", "none")
SAMPLERS = ("bernoulli", "epsilon_greedy")
ESTIMATORS = ("reinforce", "expected")
PROB_EPS = 1e-6


def _check_layers_first(values: torch.Tensor, name: str) -> None:
    if values.dim() != 2 or values.shape[0] < 1:
        raise ValueError(f"{name} must be [L, B] with L >= 1, got {tuple(values.shape)}")


# --------------------------------------------------------------------------- sampling


class RowNoise:
    """A generator of uniform noise [..., B] whose column b comes from instance b's own stream, seeded
    by (seed, epoch, the instance's row id): an instance draws the same rollouts whichever batch, or
    process, it is in (DDP processes then sample what one process would)."""

    def __init__(self, seed: int, epoch: int, rows: torch.Tensor):
        self.generators = [torch.Generator().manual_seed(row_seed(seed, epoch, int(row))) for row in rows]

    def rand(self, shape: tuple[int, ...]) -> torch.Tensor:
        if shape[-1] != len(self.generators):
            raise ValueError(f"noise for {shape[-1]} instances from the streams of {len(self.generators)} rows")
        count = math.prod(shape[:-1])
        return torch.stack([torch.rand(count, generator=g) for g in self.generators], dim=-1).view(shape)


def row_seed(seed: int, epoch: int, row: int) -> int:
    """A 63-bit seed per (seed, epoch, row), the same in every process (a hash, unlike hash(), that is not salted)."""
    digest = hashlib.blake2b(f"{int(seed)},{int(epoch)},{int(row)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _uniform(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | RowNoise | None) -> torch.Tensor:
    if isinstance(generator, RowNoise):
        return generator.rand(shape).to(like.device)
    return torch.rand(shape, generator=generator, device=like.device, dtype=torch.float32)


def sample_bernoulli(probs: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[L, B] exit probabilities -> [K, L, B] bool actions a_l ~ Bernoulli(p_l) (no gradient)."""
    _check_layers_first(probs, "probs")
    p = probs.detach().float()
    return _uniform((k, *p.shape), p, generator) < p


def sample_epsilon_greedy(probs: torch.Tensor, k: int, eps: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """[L, B] -> [K, L, B] bool: a_l = [p_l > 0.5] with prob. 1 - eps, a fair coin with prob. eps.

    The authors' sampler; each (rollout, layer, instance) explores independently.
    """
    _check_layers_first(probs, "probs")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must lie in [0, 1], got {eps}")
    p = probs.detach().float()
    shape = (k, *p.shape)
    greedy = (p > 0.5).expand(shape)
    explore = _uniform(shape, p, generator) < eps
    coin = _uniform(shape, p, generator) < 0.5
    return torch.where(explore, coin, greedy)


def epsilon_schedule(step: int, eps_start: float, eps_end: float, decay_steps: float) -> float:
    """Exponential decay from eps_start (step 0) towards eps_end: e-fold per decay_steps steps."""
    if decay_steps <= 0:
        raise ValueError(f"decay_steps must be positive, got {decay_steps}")
    return eps_end + (eps_start - eps_end) * math.exp(-step / decay_steps)


# --------------------------------------------------------------------------- trajectories


def exit_layers(actions: torch.Tensor) -> torch.Tensor:
    """[K, L, B] bool actions -> [K, B] long: first l (1-based) with a_l = 1, else L (forced).

    The action at layer L is ignored: exit there happens regardless.
    """
    if actions.dim() != 3 or actions.shape[1] < 1:
        raise ValueError(f"actions must be [K, L, B] with L >= 1, got {tuple(actions.shape)}")
    num_layers = actions.shape[1]
    stop = actions.bool().clone()
    stop[:, -1] = True
    layer = torch.arange(1, num_layers + 1, device=actions.device).view(1, -1, 1)
    return torch.where(stop, layer, num_layers).amin(dim=1)


def _exit_log_prob_table(log_p: torch.Tensor, log_not_p: torch.Tensor) -> torch.Tensor:
    """[L, B] log p_l and log(1 - p_l) -> [L, B] log pi(exit at l) for l = 1..L."""
    # sum_{j<l} log(1 - p_j): exclusive cumulative sum over layers
    survive = torch.cat([torch.zeros_like(log_not_p[:1]), log_not_p[:-1].cumsum(0)], dim=0)
    # the forced exit at L has no log p_L term
    stop = torch.cat([log_p[:-1], torch.zeros_like(log_p[-1:])], dim=0)
    return survive + stop


def exit_distribution(logits: torch.Tensor) -> torch.Tensor:
    """[L, B] exit logits -> [L, B] probability of exiting at each layer l = 1..L (sums to 1 over layers)."""
    _check_layers_first(logits, "logits")
    z = logits.float()
    return _exit_log_prob_table(F.logsigmoid(z), F.logsigmoid(-z)).exp()


def gather_layer(values: torch.Tensor, exits: torch.Tensor) -> torch.Tensor:
    """[L, B] per-layer values and [K, B] exit layers (1..L) -> [K, B] value at each exit (differentiable)."""
    _check_layers_first(values, "values")
    return values.gather(0, exits.long() - 1)


def trajectory_log_prob_from_logits(logits: torch.Tensor, exits: torch.Tensor) -> torch.Tensor:
    """[L, B] exit logits, [K, B] exit layers -> [K, B] log pi of each trajectory (float32).

    Exit at t < L: sum_{j<t} log(1 - p_j) + log p_t; at L: sum_{j<L} log(1 - p_j). logsigmoid keeps
    saturated logits finite.
    """
    _check_layers_first(logits, "logits")
    z = logits.float()
    return gather_layer(_exit_log_prob_table(F.logsigmoid(z), F.logsigmoid(-z)), exits)


def trajectory_log_prob(probs: torch.Tensor, exits: torch.Tensor, logits: torch.Tensor | None = None,
                        eps: float = PROB_EPS) -> torch.Tensor:
    """[L, B] exit probabilities, [K, B] exit layers -> [K, B] log pi (float32, differentiable).

    Uses `logits` when given (exact); else clamps probs to [eps, 1 - eps] so log never hits -inf.
    """
    if logits is not None:
        return trajectory_log_prob_from_logits(logits, exits)
    _check_layers_first(probs, "probs")
    p = probs.float().clamp(eps, 1.0 - eps)
    return gather_layer(_exit_log_prob_table(p.log(), torch.log1p(-p)), exits)


# --------------------------------------------------------------------------- rewards


@dataclass(frozen=True)
class RewardParts:
    """reward = task - depth_cost, each [K, B]; kept apart so callbacks can log them."""

    reward: torch.Tensor
    task: torch.Tensor
    depth_cost: torch.Tensor


def rewards(exits: torch.Tensor, losses: torch.Tensor, correct: torch.Tensor | None,
            memorized: torch.Tensor | None, num_layers: int, alpha: float,
            task_term: str = "ce", depth_term: str = "hardness") -> RewardParts:
    """R = task - alpha * t * factor for exits t [K, B].

    task: -loss_t ("ce"; pass squared errors as `losses` for regression) or correct_t as 0/1
    ("correct"). factor: 1 - m/L ("hardness"), 1 ("plain"), 0 ("none"). Inputs are detached:
    REINFORCE treats rewards as constants.
    """
    if task_term not in TASK_TERMS:
        raise ValueError(f"task_term {task_term!r}: use one of {TASK_TERMS}")
    if exits.dim() != 2:
        raise ValueError(f"exits must be [K, B], got {tuple(exits.shape)}")
    if task_term == "ce":
        task = -gather_layer(losses.detach().float(), exits)
    else:
        if correct is None:
            raise ValueError("task_term='correct' needs the correct table")
        task = gather_layer(correct.detach(), exits).float()
    cost = depth_cost(exits, memorized, num_layers, alpha, depth_term)
    return RewardParts(reward=task - cost, task=task, depth_cost=cost)


def depth_cost(exits: torch.Tensor, memorized: torch.Tensor | None, num_layers: int, alpha: float,
               depth_term: str = "hardness") -> torch.Tensor:
    """alpha * t * factor for exits t [K, ...] of instances with memorized layers m [...]: factor 1 - m/L
    ("hardness"), 1 ("plain"), 0 ("none")."""
    if depth_term not in DEPTH_TERMS:
        raise ValueError(f"depth_term {depth_term!r}: use one of {DEPTH_TERMS}")
    t = exits.float()
    if depth_term == "hardness":
        if memorized is None:
            raise ValueError("depth_term='hardness' needs memorized layers")
        factor = (1.0 - memorized.detach().float() / num_layers).to(t.device).unsqueeze(0)
    elif depth_term == "plain":
        factor = torch.ones_like(t)
    else:
        factor = torch.zeros_like(t)
    return alpha * t * factor


def advantages(rewards: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """[K, B] -> A = R - mean_k R (per-instance baseline); normalize divides by the batch std of A."""
    adv = rewards - rewards.mean(dim=0, keepdim=True)
    if normalize:
        # population std: a single entry gives 0 rather than nan
        adv = adv / (adv.std(correction=0) + 1e-8)
    return adv


# --------------------------------------------------------------------------- losses


def bernoulli_entropy(probs: torch.Tensor, eps: float = PROB_EPS) -> torch.Tensor:
    """Elementwise entropy (nats) of Bernoulli(p), finite at p = 0 or 1."""
    p = probs.float().clamp(eps, 1.0 - eps)
    return -(p * p.log() + (1.0 - p) * torch.log1p(-p))


def policy_loss(advantages: torch.Tensor, log_probs: torch.Tensor, entropy_bonus: float = 0.0,
                probs: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE: -mean(A * log pi) over rollouts and instances, minus entropy_bonus * mean entropy.

    The entropy (of probs [L, B], layers 1..L-1 only, since L is forced) counts only when
    entropy_bonus > 0. Advantages are detached.
    """
    return instance_policy_loss(advantages, log_probs, entropy_bonus, probs).mean()


def instance_policy_loss(advantages: torch.Tensor, log_probs: torch.Tensor, entropy_bonus: float = 0.0,
                         probs: torch.Tensor | None = None) -> torch.Tensor:
    """[B] each instance's part of `policy_loss` (their mean is it): -mean_k(A * log pi) - its entropy term."""
    return -(advantages.detach() * log_probs).mean(0) - instance_entropy_term(probs, entropy_bonus)


def instance_entropy_term(probs: torch.Tensor | None, entropy_bonus: float) -> torch.Tensor | float:
    """[B] entropy_bonus * each instance's mean entropy of probs [L, B] over layers 1..L-1 (L is forced);
    0 without a bonus."""
    if entropy_bonus <= 0:
        return 0.0
    if probs is None:
        raise ValueError("entropy_bonus > 0 needs probs")
    _check_layers_first(probs, "probs")
    return entropy_bonus * bernoulli_entropy(probs[:-1]).mean(0) if probs.shape[0] > 1 else 0.0


# --------------------------------------------------------------------------- inference and rollouts


def rollout(k: int, *, probs: torch.Tensor | None = None, logits: torch.Tensor | None = None,
            sampler: str = "bernoulli", eps: float = 0.0,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K rollouts per instance over cached [L, B] probs or logits -> (exits [K, B], log pi [K, B]).

    Give logits for exact log-probabilities; the epsilon-greedy sampler still scores its
    trajectories under Bernoulli(p), as the authors' code does.
    """
    if probs is None and logits is None:
        raise ValueError("give probs or logits")
    if probs is None:
        probs = torch.sigmoid(logits.float())
    if sampler == "bernoulli":
        actions = sample_bernoulli(probs, k, generator)
    elif sampler == "epsilon_greedy":
        actions = sample_epsilon_greedy(probs, k, eps, generator)
    else:
        raise ValueError(f"sampler {sampler!r}: use one of {SAMPLERS}")
    exits = exit_layers(actions)
    return exits, trajectory_log_prob(probs, exits, logits=logits)


# --------------------------------------------------------------------------- one policy-gradient step


@dataclass(frozen=True)
class PolicyStep:
    loss: torch.Tensor  # scalar, differentiable w.r.t. the policy logits
    parts: RewardParts  # [K, B] each
    advantages: torch.Tensor  # [K, B]
    exits: torch.Tensor  # [K, B], 1..L
    probs: torch.Tensor  # [L, B]
    instance_loss: torch.Tensor  # [B], each instance's part of the loss (their mean)


def reinforce_objective(policy_logits: torch.Tensor, losses: torch.Tensor, correct: torch.Tensor,
                        memorized: torch.Tensor | None, *, k: int, alpha: float, task_term: str = "ce",
                        depth_term: str = "hardness", sampler: str = "bernoulli", eps: float = 0.0,
                        normalize_advantages: bool = False, entropy_bonus: float = 0.0, estimator: str = "reinforce",
                        generator: torch.Generator | RowNoise | None = None) -> PolicyStep:
    """K rollouts over cached per-layer values [L, B] -> the policy-gradient loss and what went into it.

    estimator "reinforce": the score-function estimate from the K rollouts (ConsistentEE's).
    "expected": the exact expected reward, sum_l pi(exit at l) R_l: every layer's reward is known
    from the cache, so its gradient is the K -> infinity limit of REINFORCE's, without its variance.
    The rollouts are drawn either way: the reward curve and exit histograms read them.
    Only sampling and bookkeeping happen here: the backbone is not run again per rollout.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator {estimator!r}: use one of {ESTIMATORS}")
    exits, log_probs = rollout(k, logits=policy_logits, sampler=sampler, eps=eps, generator=generator)
    num_layers = policy_logits.shape[0]
    parts = rewards(exits, losses, correct, memorized, num_layers, alpha, task_term, depth_term)
    adv = advantages(parts.reward, normalize=normalize_advantages)
    probs = torch.sigmoid(policy_logits.float())
    if estimator == "reinforce":
        per_instance = instance_policy_loss(adv, log_probs, entropy_bonus=entropy_bonus, probs=probs)
    else:
        every_layer = torch.arange(1, num_layers + 1, device=policy_logits.device).view(-1, 1).expand_as(policy_logits)
        layer_rewards = rewards(every_layer, losses, correct, memorized, num_layers, alpha, task_term, depth_term).reward
        per_instance = instance_expected_loss(policy_logits, layer_rewards, entropy_bonus, probs)
    return PolicyStep(loss=per_instance.mean(), parts=parts, advantages=adv, exits=exits, probs=probs,
                      instance_loss=per_instance)


def instance_expected_loss(policy_logits: torch.Tensor, layer_rewards: torch.Tensor, entropy_bonus: float = 0.0,
                           probs: torch.Tensor | None = None) -> torch.Tensor:
    """[B] -sum_l pi(exit at l) R_l per instance, less its entropy term: the exact expected reward of logits
    [L, B] whose every exit's reward [L, B] is known (REINFORCE's K -> infinity limit), as a loss."""
    return -(exit_distribution(policy_logits) * layer_rewards).sum(0) - instance_entropy_term(probs, entropy_bonus)


# --------------------------------------------------------------------------- rollouts of whole sequences


def later_agreement(correct: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """[..., T] 0/1 agreement per position and [..., T] validity -> [..., T] the discounted sum of the
    agreement of the valid positions after each one, sum_{s>t} gamma^(s-t-1) correct_s (0 at the end)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    hits = correct.float() * mask
    out = torch.zeros_like(hits)
    for t in range(hits.shape[-1] - 2, -1, -1):
        out[..., t] = hits[..., t + 1] + gamma * out[..., t + 1]
    return out


def sequence_objective(log_probs: torch.Tensor, exits: torch.Tensor, correct: torch.Tensor,
                       memorized: torch.Tensor | None, mask: torch.Tensor, probs: torch.Tensor, *, num_exits: int,
                       alpha: float, later_weight: float = 0.5, gamma: float = 0.9, depth_term: str = "hardness",
                       normalize_advantages: bool = False) -> PolicyStep:
    """REINFORCE over K rollouts of whole sequences [K, B, T] in which each position's exit changed what
    the later positions saw (`inference.propagated`).

    Each position's decisions earn its own reward, correct_t - alpha * t * factor (as `rewards`), plus
    `later_weight` times the discounted agreement of the positions after it in its rollout
    (`later_agreement`): an exit whose propagated K/V spoil the later tokens pays for each of them.
    Baseline: the mean return over the K rollouts of the same position.
    log_probs [K, B, T] (differentiable), exits [K, B, T] (1..E), correct [K, B, T], memorized [B, T],
    mask [B, T], probs [E, K, B, T] (nan where not reached, for the statistics). The returned step's
    tables are over the valid positions ([K, N], [E, N]).
    """
    if exits.dim() != 3 or log_probs.shape != exits.shape or correct.shape != exits.shape:
        raise ValueError(f"log_probs, exits and correct must be [K, B, T], got {tuple(log_probs.shape)}, "
                         f"{tuple(exits.shape)}, {tuple(correct.shape)}")
    if exits.shape[0] < 2:
        raise ValueError("a sequence rollout's baseline is the mean over the other rollouts: use k >= 2")
    valid = mask.bool()
    task = correct.float()
    cost = depth_cost(exits, memorized, num_exits, alpha, depth_term)
    returns = task - cost + later_weight * later_agreement(correct, valid.unsqueeze(0).expand_as(correct), gamma)
    adv = advantages(returns[:, valid], normalize=normalize_advantages)
    per_position = instance_policy_loss(adv, log_probs[:, valid])
    parts = RewardParts(reward=returns[:, valid], task=task[:, valid], depth_cost=cost[:, valid])
    return PolicyStep(loss=per_position.mean(), parts=parts, advantages=adv, exits=exits[:, valid],
                      probs=probs[:, :, valid].nanmean(1), instance_loss=per_position)


def step_statistics(step: PolicyStep) -> dict[str, torch.Tensor]:
    """What a reward curve shows of one step: mean reward and its parts, advantage spread, loss,
    policy entropy (layers 1..L-1), mean exit layer, and mean exit probability per layer."""
    stats = {
        "reward": step.parts.reward.mean(),
        "task_term": step.parts.task.mean(),
        "depth_cost": step.parts.depth_cost.mean(),
        "advantage_std": step.advantages.std(),
        "loss": step.loss,
        "entropy": bernoulli_entropy(step.probs[:-1]).nanmean(),
        "exit_layer": step.exits.float().mean(),
    }
    # nan marks a layer an instance never reached (rollouts under propagation record only those it did)
    stats.update({f"p_exit_L{layer + 1}": step.probs[layer].nanmean() for layer in range(step.probs.shape[0])})
    return stats


# --------------------------------------------------------------------------- the drafting policy of verify mode
#
# In verify mode (inference/verify.py) the exit at layer E drafts tokens one at a time until a stop
# rule ends the round; the layers above then verify them. A round's stop decisions are a trajectory
# of the kind above, with drafts for layers: step j is the j-th draft of the round, "exit at j" is
# "stop drafting after draft j", and the last draft a round may make stops it (forced). A round of
# d drafts, a of them accepted, emits T = a + 1 tokens and costs C(d) sequential layer passes
# (`exits.drafting.round_layer_passes`). The objective is the rate J = sum T / sum C: tokens per
# layer pass. Its gradient is (grad E[sum T] - J grad E[sum C]) / E[sum C], so with J held at its
# current value each round's reward is T - J C (the renewal-reward identity): the gradient of that
# expected reward points where J's does, exactly when rounds are independent.


def draft_round_tokens(agree: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """[S, k] whether the exit's token equals the full model's at the k positions from each round's start,
    and [S] drafts each round may make (1..k) -> [k, S] tokens a round of d = 1..k drafts emits: its
    accepted drafts, min(d, leading agreements), plus the verifier's token. Positions past `allowed`
    count as disagreeing (a round never drafts them)."""
    if agree.dim() != 2 or allowed.shape != agree.shape[:1]:
        raise ValueError(f"agree must be [S, k] and allowed [S], got {tuple(agree.shape)} and {tuple(allowed.shape)}")
    steps = torch.arange(1, agree.shape[1] + 1, device=agree.device)
    within = steps.unsqueeze(0) <= allowed.unsqueeze(1)
    leading = (agree.bool() & within).long().cumprod(dim=1).sum(dim=1)  # agreements before the first disagreement
    return torch.minimum(steps.unsqueeze(1), leading.unsqueeze(0)).float() + 1.0


def forced_stops(stop_logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """[k, S] stop logits with the stop forced at each round's last allowed draft (and past it)."""
    steps = torch.arange(1, stop_logits.shape[0] + 1, device=stop_logits.device).unsqueeze(1)
    return torch.where(steps >= allowed.unsqueeze(0), torch.full_like(stop_logits.float(), FORCED_STOP_LOGIT),
                       stop_logits.float())


def draft_objective(stop_logits: torch.Tensor, tokens: torch.Tensor, costs: torch.Tensor, allowed: torch.Tensor, *,
                    rollouts: int, estimator: str = "expected", normalize_advantages: bool = False,
                    entropy_bonus: float = 0.0, generator: torch.Generator | None = None
                    ) -> tuple[PolicyStep, torch.Tensor]:
    """The drafting policy's step over S round starts -> (the step, the rate J it used).

    stop_logits [k, S]: the policy's logit to stop after draft j, read from the state the j-th draft was
    made from; tokens [k, S]: `draft_round_tokens`; costs [k]: layer passes of a round of d = 1..k drafts;
    allowed [S]. Each round's reward is T - J C (see above), with J the rate of the rounds drawn
    ("reinforce": K = `rollouts` sampled rounds per start, baseline their mean) or of the policy's
    expected rounds ("expected": sum_d pi(d) T_d over sum_d pi(d) C_d, and the exact expected reward).
    The step's parts: reward, task = T, depth_cost = J C; its exits are the drafts of each sampled round.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator {estimator!r}: use one of {ESTIMATORS}")
    if tokens.shape != stop_logits.shape or costs.shape != stop_logits.shape[:1]:
        raise ValueError(f"stop_logits and tokens must be [k, S] and costs [k], got {tuple(stop_logits.shape)}, "
                         f"{tuple(tokens.shape)} and {tuple(costs.shape)}")
    logits = forced_stops(stop_logits, allowed)
    drafts, log_probs = rollout(rollouts, logits=logits, generator=generator)
    cost_table = costs.float().unsqueeze(1).expand_as(logits)
    drawn_tokens, drawn_costs = gather_layer(tokens, drafts), gather_layer(cost_table, drafts)
    if estimator == "reinforce":
        rate = drawn_tokens.sum() / drawn_costs.sum()
    else:
        chance = exit_distribution(logits).detach()
        rate = (chance * tokens).sum() / (chance * cost_table).sum()
    rate = rate.detach()
    parts = RewardParts(reward=drawn_tokens - rate * drawn_costs, task=drawn_tokens, depth_cost=rate * drawn_costs)
    adv = advantages(parts.reward, normalize=normalize_advantages)
    probs = torch.sigmoid(logits)
    if estimator == "reinforce":
        per_instance = instance_policy_loss(adv, log_probs, entropy_bonus=entropy_bonus, probs=probs)
    else:
        per_instance = instance_expected_loss(logits, tokens - rate * cost_table, entropy_bonus, probs)
    return PolicyStep(loss=per_instance.mean(), parts=parts, advantages=adv, exits=drafts, probs=probs,
                      instance_loss=per_instance), rate
