"""The policy's frontier: policies trained from one stage 1 over a grid of depth costs (alpha) and RL
seeds, each replayed at every tau on the validation and test splits.

Every policy trains on the training set's cached layer outputs (`inference.layer_cache.collect_states`,
the same cache the policy stage reads) by the same step as the policy stage
(`systems.policy.cached_batch_inputs` and `rl_step`), in a plain loop: a grid member costs about a second
of policy-net arithmetic, where a Trainer per member would cost its loggers and checkpoints.
"""
from __future__ import annotations

import copy
import statistics
from pathlib import Path

import torch
from torch import nn

from ee_lightning.config.schema import PolicyStage
from ee_lightning.evaluation.frontier import choose_on_split, choose_setting, frontier, seed_settings, target_text
from ee_lightning.evaluation.rule_points import sweep_rule
from ee_lightning.exits.rules import tau_for_saving
from ee_lightning.files import atomic_torch_save
from ee_lightning.inference.layer_cache import CachedLayerDataset, signals_from_states
from ee_lightning.progress import progress
from ee_lightning.tasks import TaskSpec
from ee_lightning.training.systems.policy import cached_batch_inputs, rl_settings, rl_step


# The savings at which the run's report sets every policy's tau (`frontier_at_savings`): the whole curve, not only
# where the tau grid's points fall.
SET_SAVINGS = [round(0.1 + 0.05 * i, 2) for i in range(15)]  # 10% .. 80%


def fresh_policy(template: nn.Module, seed: int) -> nn.Module:
    """A copy of `template` with every layer re-initialised from `seed` (its architecture, new weights)."""
    policy = copy.deepcopy(template)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in policy.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return policy.train()


def lr_scheduler(optimizer, schedule: str, total_steps: int):
    """The policy's learning-rate schedule, stepped once per optimizer step: "constant", or "cosine" (decays to
    zero by the last step, so the final weights are not one noisy step's)."""
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    raise ValueError(f"the policy's learning-rate schedule {schedule!r} is unknown: use 'constant' or 'cosine'")


def train_policy(policy: nn.Module, dataset: CachedLayerDataset, task: TaskSpec, rl: dict, *, lr: float,
                 epochs: int, batch_size: int, seed: int, tolerance: float, schedule: str = "constant") -> nn.Module:
    """Fit `policy` on cached layer outputs: AdamW, shuffled batches, the policy stage's step. `seed` draws
    the batch order and the rollouts."""
    rl = rl_settings(rl)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = -(-len(dataset) // batch_size)
    scheduler = lr_scheduler(optimizer, schedule, epochs * steps_per_epoch)
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
            scheduler.step()
            step += 1
    return policy.eval()


def policy_curve(policy: nn.Module, states: dict, task: TaskSpec, taus: list[float]) -> list[dict]:
    """The policy at every tau on a split's cached layer outputs (`collect_states`)."""
    return sweep_rule(task, signals_from_states(states, task.is_regression, policy), "policy", taus)


def full_metric(states: dict, task: TaskSpec) -> float:
    """The full model's (last layer's) metric on a split's cached layer outputs: what the target is measured from."""
    return sweep_rule(task, signals_from_states(states, task.is_regression), "full", [None])[0]["metric"]


def choose_tau(policy: nn.Module, states: dict, task: TaskSpec, taus: list[float], tolerance: float) -> dict:
    """The policy's point ({"tau", "metric", "layer_saving", ...}) at the tau with the most saving on `states`
    (validation) within `tolerance` of the full model's metric there. Where no tau is within it, the tau of
    the best metric, with "within_target": False."""
    point, within = choose_on_split(policy_curve(policy, states, task, taus), full_metric(states, task), tolerance)
    return {"tau": point["value"], "within_target": within, **point}


def train_grid(template: nn.Module, dataset: CachedLayerDataset, task: TaskSpec, rl: dict, *, alphas: list[float],
               seeds: list[int], lr: float, epochs: int, batch_size: int, tolerance: float,
               schedule: str = "constant") -> dict[tuple, nn.Module]:
    """One policy per (alpha, seed), each fresh from `seed`: {(alpha, seed): policy}."""
    grid = [(alpha, seed) for alpha in alphas for seed in seeds]
    return {(alpha, seed): train_policy(fresh_policy(template, seed), dataset, task, {**rl, "alpha": alpha}, lr=lr,
                                        epochs=epochs, batch_size=batch_size, seed=seed, tolerance=tolerance,
                                        schedule=schedule)
            for alpha, seed in progress(grid, "policy grid (alpha, seed)", unit="policy")}


def replay_grid(policies: dict[tuple, nn.Module], states: dict[str, dict], task: TaskSpec,
                taus: list[float]) -> list[dict]:
    """Every policy of `train_grid` at every tau on every split of `states` ({split: collect_states cache}): one
    member per (alpha, seed, tau), {"setting": (alpha, tau), "seed", <split>: point}."""
    members = []
    for (alpha, seed), policy in policies.items():
        curves = {split: policy_curve(policy, split_states, task, taus) for split, split_states in states.items()}
        for index, tau in enumerate(taus):
            members.append({"setting": (alpha, tau), "seed": seed,
                            **{split: {k: curve[index][k] for k in ("metric", "layer_saving", "avg_exit_layer")}
                               for split, curve in curves.items()}})
    return members


def grid_members(template: nn.Module, dataset: CachedLayerDataset, states: dict[str, dict], task: TaskSpec,
                 rl: dict, *, alphas: list[float], seeds: list[int], taus: list[float], lr: float, epochs: int,
                 batch_size: int, tolerance: float, schedule: str = "constant") -> tuple[list[dict], dict]:
    """`train_grid`, then `replay_grid`: the members, and the policies ({(alpha, seed): policy})."""
    policies = train_grid(template, dataset, task, rl, alphas=alphas, seeds=seeds, lr=lr, epochs=epochs,
                          batch_size=batch_size, tolerance=tolerance, schedule=schedule)
    return replay_grid(policies, states, task, taus), policies


def policy_frontier(members: list[dict], splits=("validation", "test")) -> dict:
    """Every setting's mean and spread over seeds, and the frontier chosen on validation."""
    settings = seed_settings(members, splits)
    return {"settings": settings, "frontier": frontier(settings, "validation")}


def saving_matcher(policies: dict[tuple, nn.Module], states: dict[str, dict], task: TaskSpec):
    """`frontier.choose_setting`'s `match`: the seed's policy at the chosen alpha, at the tau whose layer saving on
    the first split of `states` ({split: collect_states cache}, validation first) is nearest the chosen saving
    (`rules.tau_for_saving`, exact: no grid between), and its point on every split."""
    choosing = next(iter(states))
    replayed: dict[tuple, dict] = {}  # (alpha, seed) -> {split: signals}: one policy pass serves every saving

    def match(seed: int, setting: tuple, saving: float) -> dict:
        alpha = setting[0]
        if (alpha, seed) not in replayed:
            replayed[(alpha, seed)] = {split: signals_from_states(split_states, task.is_regression, policies[(alpha, seed)])
                                       for split, split_states in states.items()}
        signals = replayed[(alpha, seed)]
        tau = tau_for_saving(signals[choosing]["exit_prob"], saving)
        points = {split: sweep_rule(task, split_signals, "policy", [tau])[0] for split, split_signals in signals.items()}
        return {"setting": (alpha, tau), **{split: {k: point[k] for k in ("metric", "layer_saving", "avg_exit_layer")}
                                            for split, point in points.items()}}
    return match


def frontier_at_savings(match, alphas: list[float], seeds: list[int], savings: list[float],
                        splits=("validation", "test")) -> list[dict]:
    """The policy's frontier at set layer savings, chosen on the first of `splits`: at each saving, every alpha's seeds
    run at their own tau for that saving on that split (`match`: `saving_matcher`), and the alpha whose mean metric
    there is best (ties: the earlier alpha) stands for the policy at that saving; its seeds' points on every split.

    On the tau grid a policy's points sit where its exit probabilities crowd (near 0 and 1), so a seed's curve
    misses whole ranges of saving and the frontier has no point there; a tau set for each saving reaches every saving
    that the probabilities can tell apart. Those that round to 1 tie, so a policy sure of many rows at the first
    layers cannot save less than they make it: its points then sit at the saving they reach, which they report.
    Returns [{"saving", "alpha", <split>: {"metric", "layer_saving"} (means over seeds), "seeds": [{"seed", "tau",
    <split>: point}]}]."""
    rows = []
    for saving in savings:
        best = None
        for alpha in alphas:
            points = [match(seed, (alpha,), saving) for seed in seeds]
            score = statistics.mean(point[splits[0]]["metric"] for point in points)
            if best is None or score > best[0]:
                best = (score, alpha, points)
        _, alpha, points = best
        row = {"saving": saving, "alpha": alpha,
               "seeds": [{"seed": seed, "tau": point["setting"][-1], **{split: point[split] for split in splits}}
                         for seed, point in zip(seeds, points)]}
        for split in splits:
            row[split] = {key: statistics.mean(point[split][key] for point in points)
                          for key in ("metric", "layer_saving")}
        rows.append(row)
    return rows


def choose_in_grid(members: list[dict], full_validation: float, tolerance: float, splits=("validation", "test"),
                   run_seed: int | None = None, match=None) -> dict:
    """The run's operating point, chosen on validation (`frontier.choose_setting`): the alpha and validation layer
    saving of the (alpha, tau) whose mean over the RL seeds' policies meets the target, each seed's policy at its
    tau for that saving (`match`: `saving_matcher`; default: the nearest on the grid), the run's policy being
    `run_seed`'s (default: the grid's first seed); and every seed's point, which says whether the point holds
    across seeds. Both record the split that chose them and the target."""
    choice = choose_setting(members, full_validation, tolerance, split=splits[0], reported=splits[-1], match=match)
    rows = choice["seeds"]
    run_seed = members[0]["seed"] if run_seed is None else run_seed
    mine = next((row for row in rows if row["seed"] == run_seed), None)
    if mine is None:
        raise ValueError(f"the policy grid has no RL seed {run_seed}: its seeds are {[row['seed'] for row in rows]}")
    meta = {"chosen_on": splits[0], "target": target_text(tolerance), "within_target": choice["within_target"]}
    alpha, mean_tau = choice["setting"]
    mean = {splits[0]: choice[splits[0]], "tau": mean_tau}
    return {"chosen": {"alpha": alpha, "tau": mine["setting"][-1], **meta, "seed": run_seed, "mean": mean,
                       **{s: mine[s] for s in splits}},
            "per_seed": {"alpha": alpha, **meta, "mean": mean,
                         "seeds": [{"seed": row["seed"], "alpha": alpha, "tau": row["setting"][-1], **meta,
                                    **{s: row[s] for s in splits}} for row in rows],
                         splits[-1]: choice[splits[-1]]}}


def save_policies(path: Path, policies: dict[tuple, nn.Module]) -> Path:
    """The grid's policies, tensors and plain containers only (read back with weights_only=True)."""
    rows = [{"alpha": alpha, "seed": seed, "state_dict": policy.state_dict()} for (alpha, seed), policy in policies.items()]
    atomic_torch_save({"policies": rows}, Path(path))
    return Path(path)


def load_policy(path: str | Path, alpha: float, seed: int) -> dict:
    """The state dict of the grid's policy at (alpha, seed) from `save_policies`' file."""
    rows = torch.load(path, map_location="cpu", weights_only=True)["policies"]
    found = [row["state_dict"] for row in rows if row["alpha"] == alpha and row["seed"] == seed]
    if not found:
        held = sorted((row["alpha"], row["seed"]) for row in rows)
        raise KeyError(f"{path} holds no policy at alpha={alpha}, seed={seed}; it holds (alpha, seed) {held}")
    return found[0]


def run_frontier(template: nn.Module, cache: dict, memorized: torch.Tensor, states: dict[str, dict], task: TaskSpec,
                 stage: PolicyStage, *, alphas: list[float], seeds: list[int], taus: list[float],
                 tolerance: float, choose_tolerance: float | None = None) -> tuple[dict, dict[tuple, nn.Module]]:
    """The run's policy frontier (results.json `policy_frontier`) and its policies ({(alpha, seed): policy}):
    policies over `alphas` x `seeds` trained on the training set's cached outputs `cache` (`collect_states`)
    with the policy stage's settings `stage`; the frontier on the tau grid, and at SET_SAVINGS (`at_savings`). With
    `choose_tolerance`, also the operating point chosen on validation (`choose_in_grid`: one alpha and validation
    saving for every seed; the run's policy is the first seed's, `seeds[0]`)."""
    policies = train_grid(template, CachedLayerDataset(cache, memorized), task, rl_settings(stage), alphas=alphas,
                          seeds=seeds, lr=stage.lr, epochs=stage.epochs, batch_size=stage.batch_size,
                          tolerance=tolerance)
    members = replay_grid(policies, states, task, taus)
    result = policy_frontier(members, tuple(states))
    match = saving_matcher(policies, states, task)
    report = {"alphas": list(alphas), "seeds": list(seeds), "chosen_on": "validation",
              "settings": [{**row, "setting": list(row["setting"])} for row in result["settings"]],
              "frontier": result["frontier"],
              "at_savings": frontier_at_savings(match, alphas, seeds, SET_SAVINGS, tuple(states))}
    if choose_tolerance is not None:
        report.update(choose_in_grid(members, full_metric(states["validation"], task), choose_tolerance, tuple(states),
                                     run_seed=seeds[0], match=match))
    return report, policies
