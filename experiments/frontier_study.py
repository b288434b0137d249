"""Study: the ConsistentEE policy's frontier over RL seeds against entropy, patience, max-prob and PCEE
at matched layer savings, with every frontier point and operating point chosen on validation.

One stage-1 fine-tuning per data seed (`ee-train method=finetune`, or `--stage1 CKPT`), then, in this
process, one all-layers pass over train, validation and test (kept beside the checkpoint), and a grid
of policies over alpha and RL seeds trained on the cached training outputs by the policy stage's own
step (`ee_lightning.training.policy_grid`):

    python experiments/frontier_study.py rotten_tomatoes --stage1 <ckpt>          # the default run's heads
    python experiments/frontier_study.py sst2 --glue-dir <folder with SST-2/>
    python experiments/frontier_study.py bbc_news
    python experiments/frontier_study.py rotten_tomatoes --stage1 <ckpt> --variants   # policy variants, validation only
    python experiments/frontier_study.py rotten_tomatoes --stage1 <ckpt> --rl-seeds 0 1 2 3 4 5 \
        --variants "16 epochs" --seed-groups 3    # make train's choice made by each seed triple alone
    python experiments/frontier_study.py bbc_news -- method.finetune.epochs=1   # after --: stage-1 overrides
    python experiments/frontier_study.py rotten_tomatoes --stage1 <ckpt> --joint 0.05   # stage 4, per RL seed

With --joint ALPHA the grid gives way to stage 4: per RL seed, `ee-train method=consistentee` from the study's
stage 1 (`init_from`) trains the policy at ALPHA and then the joint stage (`method.joint`, stage 1's loss at
--joint-weight), and each seed's model is read at set savings against entropy, on stage 1's heads and on its own.

Writes experiments/results/frontier_<study>.{md,json,png} (or frontier_variants_<study>.{md,json}, or
frontier_joint_weight<w>_<study>.{md,json} with --joint), or under
--results DIR (a dry run that must not replace the committed results).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from ee_lightning.app.evaluate_checkpoint import load_checkpoint_model
from ee_lightning.data import build_datamodule
from ee_lightning.evaluation.frontier import (best_within, choose_setting, frontier, gaps_at_savings, mean_sd,
                                             seed_settings, value_at_saving)
from ee_lightning.evaluation.rule_points import sweep_rule
from ee_lightning.exits import hardness as hardness_lib
from ee_lightning.exits.rules import default_grid
from ee_lightning.inference.layer_cache import CachedLayerDataset, collect_states, signals_from_states
from ee_lightning.modeling.exit_policy import ExitPolicy
from ee_lightning.training.policy_grid import frontier_at_savings, grid_members, saving_matcher
from ee_lightning.training.systems.policy import rl_settings

# The data presets (and where results go) are the reward study's: the two studies compare on the same runs.
from reward_study import PRESETS, QUIET, RESULTS, ROOT  # noqa: E402  (a sibling script on sys.path)

COMPARED = ("entropy", "patience", "maxprob", "pcee", "static")
SAVINGS = [round(0.2 + 0.05 * i, 2) for i in range(10)]  # 20% .. 65%
TOLERANCE = 0.005  # operating points: the most validation saving within 0.5 points of the full model's
# The shipped policy settings, read from the config tree so that the studies and make train cannot drift
# apart; a variant overrides some of them (train_grid sets alpha per member).
SHIPPED = OmegaConf.load(ROOT / "conf" / "method" / "consistentee.yaml").policy
POLICY_NET = OmegaConf.load(ROOT / "conf" / "policy" / "default.yaml")
BASE_RL = rl_settings(OmegaConf.to_container(SHIPPED))
# The policy stage trains at a constant learning rate; "schedule" is a variant of the study's grid loop alone.
BASE = {"rl": BASE_RL, "lr": SHIPPED.lr, "schedule": "constant", "epochs": SHIPPED.epochs,
        "batch_size": SHIPPED.batch_size, "hidden": POLICY_NET.hidden, "use_confidence": POLICY_NET.use_confidence,
        "normalize_state": POLICY_NET.get("normalize_state", False)}


def ee_train(args: list[str]) -> None:
    command = [sys.executable, "-m", "ee_lightning.app.cli", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


# make train's exit-head recipe (conf/experiment/rt_consistentee.yaml), on every study's stage 1.
_MAKE_TRAIN_STAGE1 = OmegaConf.load(ROOT / "conf" / "experiment" / "rt_consistentee.yaml").method.finetune
HEADS = [f"method.finetune.{key}={_MAKE_TRAIN_STAGE1[key]}" for key in ("layer_weights", "head_lr")]


def stage_one(study: str, seed: int, extra: list[str], out: Path) -> str:
    run_dir = out / f"stage1-seed{seed}"
    if not (run_dir / "stages.json").is_file():
        preset = PRESETS[study]
        ee_train(["method=finetune", *preset["data"], *preset["finetune"], *HEADS, f"seed={seed}",
                  f"task_name={study}", f"hydra.run.dir={run_dir}", *QUIET, *extra])
    return json.loads((run_dir / "stages.json").read_text())["finetune"]["checkpoint"]


SPLITS = ("train", "validation", "test")
HELD_OUT = ("validation", "test")


def split_states(checkpoint: str, splits: tuple[str, ...] = SPLITS, loaded: tuple | None = None) -> tuple[dict, object]:
    """The layer outputs of a checkpoint on `splits` (cached beside it), and the task. `loaded`: the caller's
    `load_checkpoint_model(checkpoint)`, so that the checkpoint is not read twice."""
    model, tokenizer, task, spec = loaded or load_checkpoint_model(checkpoint)
    path = Path(checkpoint).with_suffix(".study_states.pt" if splits == SPLITS else ".heldout_study_states.pt")
    every_split = Path(checkpoint).with_suffix(".study_states.pt")  # holds the held-out splits too
    for cached in dict.fromkeys((path, every_split)):
        if cached.is_file():
            states = torch.load(cached, weights_only=False)
            if set(splits) <= set(states):
                return {split: states[split] for split in splits}, task
    data_cfg = OmegaConf.create(spec["data"])
    with open_dict(data_cfg):
        data_cfg.cache_dir = str(Path(os.environ.get("EE_CACHE_DIR", ROOT / ".cache")) / "data")
    datamodule = build_datamodule(data_cfg, tokenizer)
    datamodule.prepare_data()
    datamodule.setup()
    states = {split: collect_states(model, datamodule.dataloader(split, by_length=True)) for split in splits}
    torch.save(states, path)
    return states, task


def rule_curves(states: dict, task) -> dict[str, dict[str, list[dict]]]:
    """{split: {rule: points}} of every compared rule, the full model and the oracle."""
    curves = {}
    for split in ("validation", "test"):
        cache = signals_from_states(states[split], task.is_regression)
        num_layers = cache["prediction"].shape[0]
        curves[split] = {rule: sweep_rule(task, cache, rule, default_grid(rule, num_layers, task.output_size))
                         for rule in (*COMPARED, "oracle", "full")}
    return curves


def train_grid(states: dict, task, variant: dict, alphas: list[float], seeds: list[int]) -> tuple[list[dict], object]:
    """The members, and make train's matcher of each seed's tau to a validation saving (`saving_matcher`)."""
    train = states["train"]
    correct = hardness_lib.correct_table(task, train["logits"], train["labels"])
    dataset = CachedLayerDataset(train, hardness_lib.memorized_layer(correct))
    num_layers, _, hidden = train["pooled"].shape
    template = ExitPolicy(num_layers, hidden, task.output_size, hidden=variant["hidden"],
                          use_confidence=variant["use_confidence"], normalize_state=variant["normalize_state"])
    taus = default_grid("policy", num_layers)
    splits = {"validation": states["validation"], "test": states["test"]}
    members, policies = grid_members(template, dataset, splits, task, variant["rl"], alphas=alphas, seeds=seeds,
                                     taus=taus, lr=variant["lr"], epochs=variant["epochs"],
                                     batch_size=variant["batch_size"], tolerance=0.5, schedule=variant["schedule"])
    return members, saving_matcher(policies, splits, task)


def seed_curve(members: list[dict], seed: int, split: str) -> list[dict]:
    """One seed's policy frontier on `split`: its settings that are Pareto-optimal on validation."""
    mine = [m for m in members if m["seed"] == seed]
    kept = frontier(seed_settings(mine, ("validation", split)), "validation")
    return [row[split] for row in kept]


def chosen_by_alpha(members: list[dict], full_val: float, alphas: list[float], seeds: list[int]) -> dict:
    """Per alpha and seed: the tau chosen on validation (most saving within TOLERANCE of full), its test point."""
    out = {}
    for alpha in alphas:
        rows = []
        for seed in seeds:
            mine = [m for m in members if m["seed"] == seed and m["setting"][0] == alpha]
            pick = best_within([{**m["validation"], "member": m} for m in mine], full_val, TOLERANCE)
            if pick is not None:
                m = pick["member"]
                rows.append({"seed": seed, "tau": m["setting"][1], "test_metric": m["test"]["metric"],
                             "test_saving": m["test"]["layer_saving"], "val_metric": m["validation"]["metric"],
                             "val_saving": m["validation"]["layer_saving"]})
        out[str(alpha)] = rows
    return out


def matched(members: list[dict], curves: dict, seeds: list[int], split: str) -> list[dict]:
    """At every saving of SAVINGS: the policy frontier's metric (per seed, then mean ± sd) and each rule's."""
    rows = []
    for saving in SAVINGS:
        per_seed = [value_at_saving(seed_curve(members, seed, split), saving) for seed in seeds]
        known = [v for v in per_seed if v is not None]
        row = {"saving": saving, "policy": mean_sd(known) if len(known) == len(per_seed) else None}
        for rule in COMPARED:
            row[rule] = value_at_saving(curves[split][rule], saving)
        rows.append(row)
    return rows


def savings_rows(at_savings: list[dict], curves: dict) -> list[dict]:
    """`frontier.gaps_at_savings` against the compared rules on validation and test."""
    return gaps_at_savings(at_savings, {split: {rule: curves[split][rule] for rule in COMPARED}
                                        for split in ("validation", "test")})


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval over seeds (0 for one value)."""
    t95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}
    mean, sd = mean_sd(values)
    n = len(values)
    return mean, (t95.get(n, 1.96) * sd / math.sqrt(n) if n > 1 else 0.0)


def run_study(study: str, checkpoints: dict[int, str], variant: dict, alphas: list[float], rl_seeds: list[int]) -> dict:
    per_stage1 = {}
    for data_seed, checkpoint in checkpoints.items():
        started = time.perf_counter()
        states, task = split_states(checkpoint)
        curves = rule_curves(states, task)
        members, match = train_grid(states, task, variant, alphas, rl_seeds)
        full_val = curves["validation"]["full"][0]["metric"]
        at_savings = frontier_at_savings(match, alphas, rl_seeds, SAVINGS)
        per_stage1[data_seed] = {
            "checkpoint": checkpoint, "metric": task.metric, "full": {s: curves[s]["full"][0]["metric"] for s in curves},
            "oracle": {s: {k: curves[s]["oracle"][0][k] for k in ("metric", "layer_saving")} for s in curves},
            "members": members, "curves": {s: {r: [{k: p[k] for k in ("value", "metric", "layer_saving")} for p in c]
                                               for r, c in curves[s].items()} for s in curves},
            "at_savings": at_savings, "at_savings_rows": savings_rows(at_savings, curves),
            "matched_test": matched(members, curves, rl_seeds, "test"),
            "matched_validation": matched(members, curves, rl_seeds, "validation"),
            "chosen": chosen_by_alpha(members, full_val, alphas, rl_seeds),
            "chosen_rules": {rule: _chosen_rule(curves, rule, full_val) for rule in COMPARED},
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"{study} stage-1 seed {data_seed}: {per_stage1[data_seed]['seconds']} s", flush=True)
    return per_stage1


# --- stage 4: the joint, consistent stage, one per RL seed ------------------------------------------
def joint_runs(study: str, checkpoint: str, alpha: float, weight: float, rl_seeds: list[int], extra: list[str],
               out: Path) -> dict[int, str]:
    """Per RL seed, the joint checkpoint of an `ee-train method=consistentee` run from the study's stage 1
    (`init_from`): its policy stage at `alpha`, then stage 4 with stage 1's loss added at `weight`."""
    checkpoints = {}
    for seed in rl_seeds:
        run_dir = out / f"joint-alpha{alpha:g}-weight{weight:g}-seed{seed}"
        stages = run_dir / "stages.json"
        if not stages.is_file() or "joint" not in json.loads(stages.read_text()):
            ee_train(["method=consistentee", *PRESETS[study]["data"], *HEADS, f"init_from={checkpoint}",
                      f"method.policy.alpha={alpha}", "method.frontier.alphas=[]", "method.joint.enabled=true",
                      f"method.joint.layer_loss_weight={weight}", f"seed={seed}", "report.latency.enabled=false",
                      f"task_name={study}", f"hydra.run.dir={run_dir}", *QUIET, *extra])
        checkpoints[seed] = json.loads(stages.read_text())["joint"]["checkpoint"]
    return checkpoints


def joint_study(stage1: str, joints: dict[int, str], alpha: float) -> dict:
    """Each RL seed's stage-4 model at set savings (its policy's tau for each saving on validation), against
    entropy on stage 1's heads (`savings_rows`: each rule with its own training) and on that seed's own heads."""
    states, task = split_states(stage1, HELD_OUT)
    curves = rule_curves(states, task)
    matchers, own_curves = {}, {}
    for seed, checkpoint in joints.items():
        loaded = load_checkpoint_model(checkpoint)
        joint_states, _ = split_states(checkpoint, HELD_OUT, loaded)
        own_curves[seed] = rule_curves(joint_states, task)
        matchers[seed] = saving_matcher({(alpha, seed): loaded[0].policy}, joint_states, task)
    at_savings = frontier_at_savings(lambda seed, setting, saving: matchers[seed](seed, setting, saving), [alpha],
                                     list(joints), SAVINGS)
    rows = with_own_heads_entropy(savings_rows(at_savings, curves), at_savings, own_curves)
    return {"checkpoints": {"stage1": stage1, **{str(k): v for k, v in joints.items()}}, "metric": task.metric,
            "full": {split: curves[split]["full"][0]["metric"] for split in HELD_OUT},
            "full_joint": {split: [own_curves[seed][split]["full"][0]["metric"] for seed in joints] for split in HELD_OUT},
            "at_savings": at_savings, "at_savings_rows": rows}


def with_own_heads_entropy(rows: list[dict], at_savings: list[dict], own_curves: dict[int, dict]) -> list[dict]:
    """`savings_rows` with, per split, "entropy_same_heads": entropy on each seed's own model (`own_curves`:
    {seed: {split: {rule: points}}}) at that seed's own saving (None where it lies outside the curve)."""
    for row, point in zip(rows, at_savings):
        for split in HELD_OUT:
            row[split]["entropy_same_heads"] = [value_at_saving(own_curves[seed["seed"]][split]["entropy"],
                                                                seed[split]["layer_saving"]) for seed in point["seeds"]]
    return rows


def joint_markdown(study: str, report: dict, alpha: float, weight: float, seconds: float, command: str) -> str:
    """The stage-4 models at set savings: test metric, gap to entropy on stage 1's heads (validation, test) and
    to entropy on each seed's own heads (test); mean ± 95% interval over the RL seeds."""
    metric, seeds = report["metric"], len(report["full_joint"]["test"])
    lines = [f"# {study}: ConsistentEE with stage 4 (the joint, consistent stage) at set layer savings", "",
             f"From one stage 1 (full model {report['full']['test']:.4f} test, {report['full']['validation']:.4f} "
             f"validation), per RL seed ({seeds}): the policy stage at alpha {alpha:g}, then stage 4 (one epoch: "
             f"heads and backbone trained at each instance's sampled exit, plus stage 1's loss over every head at "
             f"weight {weight:g}; `method.joint`). Each seed's policy runs at its own tau for each saving on "
             f"validation. Its model's own full depth: {', '.join(f'{v:.4f}' for v in report['full_joint']['test'])} "
             f"test. Entropy is read on stage 1's heads (each rule with its own training) and on each seed's own "
             f"stage-4 heads. Mean ± 95% t-interval over the seeds. Wall time {seconds / 60:.1f} min.", "",
             f"| set saving | policy test {metric} | its test saving | entropy (stage 1) | policy - entropy (stage 1), "
             f"validation | policy - entropy (stage 1), test | entropy (own heads) | policy - entropy (own heads), test |",
             "|---|---|---|---|---|---|---|---|"]
    for saving, point, row in zip(SAVINGS, report["at_savings"], report["at_savings_rows"]):
        policy = row["test"]["policy"]
        own = row["test"]["entropy_same_heads"]
        cells = [f"{100 * saving:.0f}%", _pm(*interval(policy)),
                 f"{100 * statistics.mean(s['test']['layer_saving'] for s in point['seeds']):.1f}%",
                 f"{row['test']['entropy']:.4f}" if row["test"]["entropy"] is not None else "-"]
        for split in HELD_OUT:
            gaps = row[split]["gap"]
            cells.append(_pm(*interval(gaps), 100, digits=2, signed=True) + " pt" if gaps else "-")
        if None in own:
            cells += ["-", "-"]
        else:
            cells += [f"{statistics.mean(own):.4f}",
                      _pm(*interval([p - e for p, e in zip(policy, own)]), 100, digits=2, signed=True) + " pt"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "## How it was run", "", f"`{command}`", ""])


def _chosen_rule(curves: dict, rule: str, full_val: float) -> dict | None:
    pick = best_within(curves["validation"][rule], full_val, TOLERANCE)
    if pick is None:
        return None
    test = next(p for p in curves["test"][rule] if p["value"] == pick["value"])
    return {"value": pick["value"], "val_metric": pick["metric"], "val_saving": pick["layer_saving"],
            "test_metric": test["metric"], "test_saving": test["layer_saving"]}


# --- reports --------------------------------------------------------------------------------------
def _pm(mean: float, half: float, scale: float = 1.0, digits: int = 4, signed: bool = False) -> str:
    """"mean ± half": a signed mean (a gap) keeps its sign, the half-width never has one."""
    sign = "+" if signed else ""
    return f"{scale * mean:{sign}.{digits}f} ± {scale * half:.{digits}f}"


def study_markdown(study: str, results: dict, alphas, rl_seeds, seconds: float) -> str:
    first = next(iter(results.values()))
    metric = first["metric"]
    lines = [f"# {study}: the policy's frontier against the exit rules", "",
             f"Stage-1 seeds {list(results)}; policies at alpha {alphas} x RL seeds {rl_seeds}. Every choice is made on "
             "validation and read on test; mean ± 95% t-interval over every (stage-1 seed, RL seed). The rules' "
             f"curves are their test curves (one knob, no choice). Wall time {seconds / 60:.1f} min.", ""]
    lines += savings_markdown(results, metric)
    header = f"| layer saving | policy {metric} | " + " | ".join(COMPARED) + " | policy - entropy |"
    lines += ["## Test metric at matched layer savings, on the tau grid", "",
              "Each seed's Pareto-optimal (alpha, tau) settings on validation, read on test and interpolated at each "
              "saving; '-' or a count of seeds where a seed's settings do not reach the saving.", "",
              header, "|" + "---|" * (len(COMPARED) + 3)]
    curves_total = sum(len({m["seed"] for m in r["members"]}) for r in results.values())
    for index, saving in enumerate(SAVINGS):
        policy_values, entropy_gap, rules = [], [], {rule: [] for rule in COMPARED}
        for seed_result in results.values():
            row = seed_result["matched_test"][index]
            for rule in COMPARED:
                if row[rule] is not None:
                    rules[rule].append(row[rule])
            for value in _per_seed(seed_result, index):
                policy_values.append(value)
                if row["entropy"] is not None:
                    entropy_gap.append(value - row["entropy"])
        # A mean over the seeds whose frontier reaches this saving: say when that is not all of them.
        reached = "" if len(policy_values) == curves_total else f" ({len(policy_values)} of {curves_total} seeds)"
        cells = [f"{100 * saving:.0f}%", _pm(*interval(policy_values)) + reached if policy_values else "-"]
        cells += [f"{statistics.mean(v):.4f}" if v else "-" for v in rules.values()]
        cells.append(_pm(*interval(entropy_gap), 100, digits=2, signed=True) + " pt" if entropy_gap else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Operating points chosen on validation (the most saving within 0.5 points of the full model's "
              "validation metric), measured on test", ""]
    for data_seed, seed_result in results.items():
        full = seed_result["full"]
        lines.append(f"Stage-1 seed {data_seed}: full model {full['test']:.4f} test, {full['validation']:.4f} "
                     f"validation; oracle {seed_result['oracle']['test']['metric']:.4f} at "
                     f"{100 * seed_result['oracle']['test']['layer_saving']:.1f}% (test).")
        lines += ["", f"| method | knob | test {metric} | test layer saving | spread over RL seeds |", "|---|---|---|---|---|"]
        for alpha, rows in seed_result["chosen"].items():
            if not rows:
                lines.append(f"| policy alpha {alpha} | - | no tau within the target | - | - |")
                continue
            acc = [r["test_metric"] for r in rows]
            sav = [r["test_saving"] for r in rows]
            lines.append(f"| policy alpha {alpha} | tau {', '.join(str(r['tau']) for r in rows)} | "
                         f"{statistics.mean(acc):.4f} | {100 * statistics.mean(sav):.1f}% | "
                         f"{100 * (max(acc) - min(acc)):.2f} pt accuracy, {100 * (max(sav) - min(sav)):.1f} pt saving |")
        for rule, chosen in seed_result["chosen_rules"].items():
            if chosen:
                lines.append(f"| {rule} | {chosen['value']} | {chosen['test_metric']:.4f} | "
                             f"{100 * chosen['test_saving']:.1f}% | - |")
        lines.append("")
    return "\n".join(lines) + "\n"


def savings_markdown(results: dict, metric: str) -> list[str]:
    """The frontier at set savings (`savings_rows`): per saving, the alpha chosen on validation, the policy's test
    metric and saving (mean ± 95% interval over every (stage-1 seed, RL seed)), each rule's test metric at the
    policy's mean test saving, and the gap to entropy on validation and on test."""
    rules = [rule for rule in COMPARED if rule != "static"]
    lines = ["## Test metric at set layer savings", "",
             "At each saving, every policy runs at its own tau for that saving on validation "
             "(`rules.tau_for_saving`); the alpha whose seeds' mean validation metric is best there stands for the "
             "policy. The gap to entropy is each seed's against entropy's curve at that seed's own saving, on "
             "validation (where the alpha was chosen) and on test.", "",
             f"| set saving | alpha | policy test {metric} | policy test saving | " + " | ".join(rules)
             + " | policy - entropy, validation | policy - entropy, test |", "|" + "---|" * (len(rules) + 6)]
    for index, saving in enumerate(SAVINGS):
        rows = [r["at_savings_rows"][index] for r in results.values()]
        points = [r["at_savings"][index] for r in results.values()]
        policy = [v for row in rows for v in row["test"]["policy"]]
        test_saving = [seed["test"]["layer_saving"] for point in points for seed in point["seeds"]]
        cells = [f"{100 * saving:.0f}%", ", ".join(f"{row['alpha']:g}" for row in rows), _pm(*interval(policy)),
                 f"{100 * statistics.mean(test_saving):.1f}%"]
        for rule in rules:
            values = [row["test"][rule] for row in rows if row["test"][rule] is not None]
            cells.append(f"{statistics.mean(values):.4f}" if values else "-")
        for split in ("validation", "test"):
            gaps = [g for row in rows if row[split]["gap"] is not None for g in row[split]["gap"]]
            cells.append(_pm(*interval(gaps), 100, digits=2, signed=True) + " pt" if gaps else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _per_seed(seed_result: dict, index: int) -> list[float]:
    """The policy frontier's test metric at SAVINGS[index], one value per RL seed (none if a seed does not reach)."""
    members = seed_result["members"]
    seeds = sorted({m["seed"] for m in members})
    values = [value_at_saving(seed_curve(members, seed, "test"), SAVINGS[index]) for seed in seeds]
    return [v for v in values if v is not None]


def plot(study: str, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rule in COMPARED:
        points = sorted((p["layer_saving"], p["metric"]) for p in first["curves"]["test"][rule])
        ax.plot([100 * s for s, _ in points], [m for _, m in points], linewidth=1.2, label=rule)
    xs, means, halves = [], [], []
    for index in range(len(SAVINGS)):
        points = [r["at_savings"][index] for r in results.values()]
        mean, half = interval([seed["test"]["metric"] for point in points for seed in point["seeds"]])
        xs.append(100 * statistics.mean(seed["test"]["layer_saving"] for point in points for seed in point["seeds"]))
        means.append(mean)
        halves.append(half)
    ax.errorbar(xs, means, yerr=halves, color="black", linewidth=2, capsize=2,
                label="policy at set savings (95% interval)")
    ax.scatter([100 * first["oracle"]["test"]["layer_saving"]], [first["oracle"]["test"]["metric"]], marker="*", s=120,
               color="gray", label="oracle")
    ax.axhline(first["full"]["test"], color="black", linestyle=":", linewidth=1, label="full model")
    ax.set_xlabel("layer saving (%)")
    ax.set_ylabel(f"test {first['metric']}")
    ax.set_title(f"{study}: policy frontier (chosen on validation) against the rules")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _jsonable(results: dict) -> dict:
    out = {}
    for seed, result in results.items():
        out[str(seed)] = {**result, "members": [{**m, "setting": list(m["setting"])} for m in result["members"]]}
    return out


# --- policy variants, on validation ------------------------------------------------------------
VARIANTS = {
    "shipped (the config's policy settings)": {},
    "4 epochs": {"epochs": 4},
    "16 epochs": {"epochs": 16},
    "8 epochs": {"epochs": 8},
    "REINFORCE (K=16)": {"rl": {"estimator": "reinforce"}},
    "REINFORCE, normalised advantages": {"rl": {"estimator": "reinforce", "normalize_advantages": True}},
    "REINFORCE, K=64 rollouts": {"rl": {"estimator": "reinforce", "k": 64}},
    "confidence inputs": {"use_confidence": True},
    "hidden 128": {"hidden": 128},
    "lr 3e-3": {"lr": 3e-3},
    "plain depth cost": {"rl": {"depth_term": "plain"}},
    "32 epochs": {"epochs": 32},
    "cosine lr decay": {"schedule": "cosine"},
    "cosine lr decay, 32 epochs": {"schedule": "cosine", "epochs": 32},
    "state read raw": {"normalize_state": False},
    "state normalised": {"normalize_state": True},
    "state normalised, confidence inputs": {"normalize_state": True, "use_confidence": True},
}


def variant_settings(overrides: dict) -> dict:
    return {**BASE, **{k: v for k, v in overrides.items() if k != "rl"}, "rl": {**BASE_RL, **overrides.get("rl", {})}}


def seed_group_choices(members: list[dict], full_val: float, groups: list[list[int]], match=None) -> list[dict]:
    """make train's choice made by each group of RL seeds on its own: {"seeds", "choice": `choose_setting`, "one_tau":
    the test spreads (max - min) of metric and saving had every seed of the group run at the mean's own tau}."""
    rows = []
    for seeds in groups:
        mine = [m for m in members if m["seed"] in seeds]
        choice = choose_setting(mine, full_val, TOLERANCE, match=match)
        at_tau = [m["test"] for m in mine if m["setting"] == choice["setting"]]
        rows.append({"seeds": seeds, "choice": choice,
                     "one_tau": {key: max(p[key] for p in at_tau) - min(p[key] for p in at_tau)
                                 for key in ("metric", "layer_saving")}})
    return rows


def variants(study: str, checkpoint: str, alphas, rl_seeds, names, results_dir: Path, group_size: int | None = None) -> None:
    states, task = split_states(checkpoint)
    curves = rule_curves(states, task)
    full_val = curves["validation"]["full"][0]["metric"]
    report = {}
    for name in names:
        started = time.perf_counter()
        members, match = train_grid(states, task, variant_settings(VARIANTS[name]), alphas, rl_seeds)
        rows = matched(members, curves, rl_seeds, "validation")
        gaps = [(r["saving"], r["policy"][0] - r["entropy"]) for r in rows if r["policy"] and r["entropy"] is not None]
        at_savings = savings_rows(frontier_at_savings(match, alphas, rl_seeds, SAVINGS), curves)
        set_gaps = [(r["saving"], statistics.mean(r["validation"]["gap"])) for r in at_savings
                    if r["validation"]["gap"] is not None]
        report[name] = {"matched_validation": rows, "gaps": gaps, "set_savings": at_savings, "set_gaps": set_gaps,
                        "chosen": chosen_by_alpha(members, full_val, alphas, rl_seeds),
                        "matched_test": matched(members, curves, rl_seeds, "test"),
                        # make train's check: alpha and validation saving chosen over the seeds' mean, each seed's tau set
                        # for that saving; each seed's test point
                        "per_seed": choose_setting(members, full_val, TOLERANCE, match=match),
                        "seconds": round(time.perf_counter() - started, 1)}
        if group_size:
            groups = [rl_seeds[i:i + group_size] for i in range(0, len(rl_seeds), group_size)]
            report[name]["seed_groups"] = seed_group_choices(members, full_val, groups, match)
        print(name, json.dumps({"gaps": [(s, round(100 * g, 2)) for s, g in gaps],
                                "set_gaps": [(s, round(100 * g, 2)) for s, g in set_gaps], "chosen": report[name]["chosen"],
                                "seconds": report[name]["seconds"]}), flush=True)
        (results_dir / f"frontier_variants_{study}.json").write_text(json.dumps(report, indent=1))
        (results_dir / f"frontier_variants_{study}.md").write_text(variants_markdown(study, report, alphas, rl_seeds))
    print(variants_markdown(study, report, alphas, rl_seeds))


def variants_markdown(study: str, report: dict, alphas, rl_seeds) -> str:
    lines = [f"# {study}: policy variants on the validation frontier", "",
             f"One stage-1 checkpoint; alphas {alphas}, RL seeds {rl_seeds}. Gap: the policy frontier's mean "
             "validation metric over seeds minus entropy's, in points, at each saving ('-': a seed's frontier does "
             "not reach it). Chosen: per alpha, the tau with the most validation saving within 0.5 points of the "
             "full model, its test point: mean, and half the range over RL seeds (alphas where every seed reached "
             "the target). make train's choice: the (alpha, tau) whose mean validation point over the seeds has the "
             "most saving within 0.5 points of the full model, then each seed's tau (in seed order) whose validation "
             "saving is nearest that mean's; the seeds' test points there: mean, and the range (max - min).", "",
             "| variant | " + " | ".join(f"{100 * s:.0f}%" for s in SAVINGS)
             + " | min gap | chosen (alpha: test acc, saving, ranges) | make train's choice: (alpha, each seed's tau), test acc, saving (ranges) | s |",
             "|---|" + "---|" * (len(SAVINGS) + 4)]
    for name, result in report.items():
        gaps = {s: g for s, g in result["gaps"]}
        cells = [f"{100 * gaps[s]:+.2f}" if s in gaps else "-" for s in SAVINGS]
        chosen = []
        for alpha, rows in result["chosen"].items():
            if len(rows) == len(rl_seeds):
                acc, sav = [r["test_metric"] for r in rows], [r["test_saving"] for r in rows]
                chosen.append(f"{alpha}: {statistics.mean(acc):.4f}, {100 * statistics.mean(sav):.1f}% "
                              f"(±{100 * (max(acc) - min(acc)) / 2:.2f}, ±{100 * (max(sav) - min(sav)) / 2:.1f})")
            else:
                chosen.append(f"{alpha}: {len(rows)} of {len(rl_seeds)} seeds reached the target")
        per_seed = result["per_seed"]["test"]
        alpha = result["per_seed"]["setting"][0]
        taus = "/".join(f"{row['setting'][-1]:.4g}" for row in result["per_seed"]["seeds"])
        spread = (f"({alpha:g}, {taus}), {per_seed['metric']:.4f}, {100 * per_seed['layer_saving']:.1f}% "
                  f"({100 * per_seed['metric_spread']:.2f}, {100 * per_seed['layer_saving_spread']:.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * min(gaps.values(), default=math.nan):+.2f} | "
                     + "; ".join(chosen) + f" | {spread} | {result['seconds']:.0f} |")
    set_savings = {name: result for name, result in report.items() if "set_gaps" in result}
    if set_savings:
        lines += ["", "## At set savings, on validation", "",
                  "Each policy at its own tau for each saving on validation, the alpha best there on validation "
                  "(`policy_grid.frontier_at_savings`); the gap: the seeds' mean validation metric minus entropy's at "
                  "each seed's saving, in points. The alpha is chosen on the same split, so every variant's gaps lean "
                  "the same way; compare variants with each other, and read test in the study proper.", "",
                  "| variant | " + " | ".join(f"{100 * s:.0f}%" for s in SAVINGS) + " | min gap |",
                  "|---|" + "---|" * (len(SAVINGS) + 1)]
        for name, result in set_savings.items():
            gaps = {s: g for s, g in result["set_gaps"]}
            lines.append(f"| {name} | " + " | ".join(f"{100 * gaps[s]:+.2f}" if s in gaps else "-" for s in SAVINGS)
                         + f" | {100 * min(gaps.values(), default=math.nan):+.2f} |")
    for name, result in report.items():
        if "seed_groups" in result:
            lines += ["", seed_groups_markdown(name, result["seed_groups"])]
    return "\n".join(lines) + "\n"


def seed_groups_markdown(name: str, groups: list[dict]) -> str:
    """make train's choice made by each group of RL seeds alone: does it hold the point on every group?"""
    lines = [f"## {name}: make train's choice, made by each group of RL seeds alone", "",
             "Test points of the group's seeds at the chosen alpha, each at its tau nearest the chosen validation "
             "saving: mean, and spread (max - min) in points; beside them, the spreads had every seed run at the "
             "mean's own tau.", "",
             "| RL seeds | alpha, taus | validation saving (mean) | test acc | test saving | acc spread | saving "
             "spread | at one tau: acc spread, saving spread |", "|---|---|---|---|---|---|---|---|"]
    for row in groups:
        choice, one = row["choice"], row["one_tau"]
        taus = "/".join(f"{r['setting'][-1]:.4g}" for r in choice["seeds"])
        test = choice["test"]
        lines.append(f"| {', '.join(map(str, row['seeds']))} | {choice['setting'][0]:g}, {taus} | "
                     f"{100 * choice['validation']['layer_saving']:.1f}% | {test['metric']:.4f} | "
                     f"{100 * test['layer_saving']:.1f}% | {100 * test['metric_spread']:.2f} | "
                     f"{100 * test['layer_saving_spread']:.1f} | {100 * one['metric']:.2f}, {100 * one['layer_saving']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=sorted(PRESETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="stage-1 (data) seeds")
    parser.add_argument("--rl-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.03, 0.04, 0.05, 0.06])  # make train's frontier
    parser.add_argument("--out", default=str(ROOT / "outputs" / "studies"))
    parser.add_argument("--stage1", help="reuse this stage-1 checkpoint (one seed), e.g. make train's")
    parser.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"),
                        help="sst2: the folder holding GLUE's SST-2/ (default: $GLUE_DIR)")
    parser.add_argument("--variants", nargs="*", help="compare policy variants on validation (no names: all)")
    parser.add_argument("--seed-groups", type=int, metavar="K",
                        help="with --variants: also make make train's choice within each group of K consecutive RL seeds")
    parser.add_argument("--results", default=str(RESULTS), help="where the reports go (a dry run: somewhere else)")
    parser.add_argument("--joint", type=float, metavar="ALPHA",
                        help="stage 4 instead of the grid: per RL seed, the policy stage at ALPHA then the joint stage "
                             "(ee-train from the study's stage 1), at set savings against entropy")
    parser.add_argument("--joint-weight", type=float, default=1.0,
                        help="with --joint: method.joint.layer_loss_weight (stage 1's loss over every head)")
    argv = sys.argv[1:]
    # After "--": ee-train overrides for stage 1 (subset sizes, epochs); the study reads them back from the checkpoint.
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.seed_groups is not None and (args.variants is None or args.seed_groups < 1):
        parser.error("--seed-groups K makes make train's choice within groups of K RL seeds of a --variants comparison: "
                     "give --variants too, and K >= 1")
    if args.joint is not None and (args.variants is not None or len(args.seeds) > 1):
        parser.error("--joint runs stage 4 from one stage 1: give it without --variants and with one --seeds")
    if extra and args.stage1:
        parser.error(f"stage-1 overrides {extra} do nothing with --stage1 (that checkpoint is already trained); "
                     "drop one of them")
    data_dir = []  # sst2's rows, for the runs this study starts (stage 1, the joint runs)
    if args.study == "sst2" and (not args.stage1 or args.joint is not None):
        if not args.glue_dir or not (Path(args.glue_dir) / "SST-2").is_dir():
            parser.error(f"sst2 needs GLUE's SST-2 folder: pass --glue-dir DIR (or set GLUE_DIR) with DIR/SST-2/"
                         f"{{train,dev,test}}.tsv; got {args.glue_dir!r}")
        data_dir = [f"data.data_dir={Path(args.glue_dir) / 'SST-2'}"]
    if not args.stage1:
        extra = [*data_dir, *extra]
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    out = Path(args.out) / args.study
    checkpoints = {seed: args.stage1 or stage_one(args.study, seed, extra, out) for seed in args.seeds}
    if args.joint is not None:
        stage1 = next(iter(checkpoints.values()))
        # the joint runs read the same rows as stage 1: its overrides when the study trained it, else sst2's folder
        joints = joint_runs(args.study, stage1, args.joint, args.joint_weight, args.rl_seeds,
                            data_dir if args.stage1 else extra, out)
        report = joint_study(stage1, joints, args.joint)
        name = f"frontier_joint_weight{args.joint_weight:g}_{args.study}"  # no with_suffix: a weight of 0.5 has a dot
        (results_dir / f"{name}.json").write_text(json.dumps({"alpha": args.joint, "weight": args.joint_weight,
                                                         "rl_seeds": args.rl_seeds, "report": report}, indent=1))
        markdown = joint_markdown(args.study, report, args.joint, args.joint_weight, time.perf_counter() - started,
                                  "python experiments/frontier_study.py " + " ".join(argv))
        (results_dir / f"{name}.md").write_text(markdown)
        print(markdown)
        return
    if args.variants is not None:
        variants(args.study, next(iter(checkpoints.values())), args.alphas, args.rl_seeds, args.variants or list(VARIANTS),
                 results_dir, args.seed_groups)
        return
    results = run_study(args.study, checkpoints, variant_settings(STUDY_VARIANT), args.alphas, args.rl_seeds)
    seconds = time.perf_counter() - started
    stem = results_dir / f"frontier_{args.study}"
    stem.with_suffix(".json").write_text(json.dumps({"alphas": args.alphas, "rl_seeds": args.rl_seeds,
                                                     "variant": STUDY_VARIANT, "seconds": seconds,
                                                     "results": _jsonable(results)}, indent=1))
    markdown = study_markdown(args.study, results, args.alphas, args.rl_seeds, seconds)
    stem.with_suffix(".md").write_text(markdown)
    plot(args.study, results, stem.with_suffix(".png"))
    print(markdown)


STUDY_VARIANT: dict = {}  # BASE is the shipped policy (conf/method/consistentee.yaml)

if __name__ == "__main__":
    main()
