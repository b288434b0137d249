"""The policy's frontier: policies trained from one stage 1 over a grid of depth costs (alpha) and RL
seeds, each replayed at every tau on the validation and test splits.

Every policy trains on the training set's cached layer outputs (`inference.layer_cache.collect_states`,
the same cache the policy stage reads) by the same step as the policy stage
(`systems.policy.cached_batch_inputs` and `rl_step`), in a plain loop: a grid member costs about a second
of policy-net arithmetic, where a Trainer per member would cost its loggers and checkpoints.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ee_lightning.evaluation.frontier import best_within, frontier, seed_settings
from ee_lightning.evaluation.rule_points import sweep_rule
from ee_lightning.inference.layer_cache import CachedLayerDataset, signals_from_states
from ee_lightning.progress import progress
from ee_lightning.tasks import TaskSpec
from ee_lightning.training.systems.policy import cached_batch_inputs, rl_settings, rl_step


def fresh_policy(template: nn.Module, seed: int) -> nn.Module:
    """A copy of `template` with every layer re-initialised from `seed` (its architecture, new weights)."""
    policy = copy.deepcopy(template)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in policy.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return policy.train()


def train_policy(policy: nn.Module, dataset: CachedLayerDataset, task: TaskSpec, rl: dict, *, lr: float,
                 epochs: int, batch_size: int, seed: int, tolerance: float) -> nn.Module:
    """Fit `policy` on cached layer outputs: AdamW, shuffled batches, the policy stage's step. `seed` draws
    the batch order and the rollouts."""
    rl = rl_settings(rl)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(dataset), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = dataset.rows(order[start:start + batch_size])
            exit_logits, losses, correct = cached_batch_inputs(policy, batch, task, tolerance)
            loss = rl_step(rl, step, exit_logits, losses, correct, batch["memorized"], generator=generator)[0].loss
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"policy grid (alpha={rl['alpha']}, seed={seed}): a non-finite loss at epoch "
                                         f"{epoch}, step {step}; lower method.policy.lr or check the cached outputs")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return policy.eval()


def policy_curve(policy: nn.Module, states: dict, task: TaskSpec, taus: list[float]) -> list[dict]:
    """The policy at every tau on a split's cached layer outputs (`collect_states`)."""
    return sweep_rule(task, signals_from_states(states, task.is_regression, policy), "policy", taus)


def choose_tau(policy: nn.Module, states: dict, task: TaskSpec, taus: list[float], tolerance: float) -> dict:
    """The policy's point ({"tau", "metric", "layer_saving", ...}) at the tau with the most saving on `states`
    (validation) within `tolerance` of the full model's metric there. Where no tau is within it, the tau of
    the best metric, with "within_target": False."""
    full = sweep_rule(task, signals_from_states(states, task.is_regression), "full", [None])[0]["metric"]
    curve = policy_curve(policy, states, task, taus)
    point = best_within(curve, full, tolerance)
    within = point is not None
    if not within:
        point = max(curve, key=lambda p: (p["metric"], p["layer_saving"]))
    return {"tau": point["value"], "within_target": within, **point}


def grid_members(template: nn.Module, dataset: CachedLayerDataset, states: dict[str, dict], task: TaskSpec,
                 rl: dict, *, alphas: list[float], seeds: list[int], taus: list[float], lr: float, epochs: int,
                 batch_size: int, tolerance: float) -> list[dict]:
    """One policy per (alpha, seed), each at every tau on every split of `states` ({split: collect_states
    cache}): one member per (alpha, seed, tau), {"setting": (alpha, tau), "seed", <split>: point}."""
    members = []
    grid = [(alpha, seed) for alpha in alphas for seed in seeds]
    for alpha, seed in progress(grid, "policy grid (alpha, seed)", unit="policy"):
        policy = train_policy(fresh_policy(template, seed), dataset, task, {**rl, "alpha": alpha}, lr=lr,
                              epochs=epochs, batch_size=batch_size, seed=seed, tolerance=tolerance)
        curves = {split: policy_curve(policy, split_states, task, taus) for split, split_states in states.items()}
        for index, tau in enumerate(taus):
            members.append({"setting": (alpha, tau), "seed": seed,
                            **{split: {k: curve[index][k] for k in ("metric", "layer_saving", "avg_exit_layer")}
                               for split, curve in curves.items()}})
    return members


def policy_frontier(members: list[dict], splits=("validation", "test")) -> dict:
    """Every setting's mean and spread over seeds, and the frontier chosen on validation."""
    settings = seed_settings(members, splits)
    return {"settings": settings, "frontier": frontier(settings, "validation")}


def run_frontier(template: nn.Module, cache: dict, memorized: torch.Tensor, states: dict[str, dict], task: TaskSpec,
                 policy_settings: dict, *, alphas: list[float], seeds: list[int], taus: list[float],
                 tolerance: float) -> dict:
    """The run's policy frontier (results.json `policy_frontier`): policies over `alphas` x `seeds` trained
    on the training set's cached outputs `cache` (`collect_states`) with the policy stage's settings."""
    members = grid_members(template, CachedLayerDataset(cache, memorized), states, task, policy_settings,
                           alphas=alphas, seeds=seeds, taus=taus, lr=policy_settings["lr"],
                           epochs=policy_settings["epochs"], batch_size=policy_settings["batch_size"],
                           tolerance=tolerance)
    result = policy_frontier(members, tuple(states))
    return {"alphas": list(alphas), "seeds": list(seeds), "chosen_on": "validation",
            "settings": [{**row, "setting": list(row["setting"])} for row in result["settings"]],
            "frontier": result["frontier"]}
