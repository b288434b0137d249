"""The accuracy-versus-cost comparison of exit rules on one model: pareto.csv, pareto.md, pareto.png.

Every rule is replayed over one cached all-layers pass (`inference.layer_cache.collect_signals`), at every
point of its knob grid. Cost is reported three ways, each labelled: layers (average exit layer,
layer saving, speed-up ratio), FLOPs per instance, and wall clock of the real batched runner.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ee_lightning.evaluation.cost import measure_flops
from ee_lightning.evaluation.frontier import best_within, choose_points, gaps_at_savings, mean_sd, pareto_optimal
from ee_lightning.evaluation.rule_points import evaluate_rule
from ee_lightning.files import atomic_write_text
from ee_lightning.inference.runner import EarlyExitRunner
from ee_lightning.progress import progress
from ee_lightning.exits.rules import build_rule, ENCODER_RULES, GRID_KNOBS, RULES, default_grid, rule_from_grid
from ee_lightning.tasks import TaskSpec

log = logging.getLogger(__name__)

ALL_RULES = ("policy", "entropy", "maxprob", "softmax_margin", "patience", "pcee", "static", "oracle", "full")
COLUMNS = ("rule", "knob", "value", "metric", "avg_exit_layer", "layer_saving", "speedup", "flops", "pareto")
LATENCY_COLUMNS = ("latency_b1_ms", "latency_b32_ms", "wallclock_speedup_b1", "wallclock_speedup_b32")
FRONTIER_COLUMNS = ("metric_sd", "layer_saving_sd", "seeds", "chosen_on")


def applicable_rules(is_regression: bool) -> list[str]:
    """Every rule that can run on the task: a regression head has no class probabilities."""
    return [name for name in ALL_RULES if not (is_regression and RULES[name].classification_only)]


def rule_grids(rules, grids: dict | None, num_layers: int, num_classes: int,
               is_regression: bool = False) -> dict[str, list]:
    """Each rule's knob grid: the user's where given, else the default spanning no to maximal saving.
    rules=None: every rule that applies to the task."""
    grids = dict(grids or {})
    rules = applicable_rules(is_regression) if rules is None else list(rules)
    unknown = [name for name in rules + list(grids) if name not in ENCODER_RULES]
    if unknown:
        generation_only = [name for name in unknown if name in RULES]
        what = (f"exit rule(s) {generation_only} read signals that only generation computes" if generation_only
                else f"unknown exit rule(s) {unknown}")
        raise ValueError(f"{what}; valid rules: {', '.join(ENCODER_RULES)}")
    if not rules:
        raise ValueError("no rules to compare: set rules=[policy,entropy,...]")
    if is_regression:
        unfit = [name for name in rules if RULES[name].classification_only]
        if unfit:
            raise ValueError(f"report.rules has {unfit}, which need class probabilities; a regression task has "
                             f"none. Drop them, or set report.rules=null for every rule that applies")
    chosen = {}
    for name in rules:
        grid = grids.get(name)
        if grid is not None and len(grid) == 0:
            raise ValueError(f"grids.{name} is empty: give at least one knob value, or drop it to use the default grid")
        chosen[name] = list(grid) if grid is not None else default_grid(name, num_layers, num_classes)
    return chosen


def replay_points(task: TaskSpec, cache: dict, grids: dict[str, list]) -> list[dict]:
    """Every rule at every knob over a cached split: metric, layer cost and exit histogram."""
    num_layers = cache["prediction"].shape[0]
    points = []
    for name, grid in grids.items():
        for value in grid:
            point = evaluate_rule(task, cache, rule_from_grid(name, value, num_layers))
            points.append({"rule": name, "knob": ",".join(GRID_KNOBS[name]), "value": _value_text(value), **point})
    return points


def pareto_points(model, task: TaskSpec, cache: dict, grids: dict[str, list]) -> list[dict]:
    """Every rule at every knob: metric, layer cost and FLOPs per instance (mean over the split)."""
    num_layers = cache["prediction"].shape[0]
    seq_len = max(1, round(float(cache["lengths"].float().mean())))
    flops = measure_flops(model, seq_len)
    per_exit = {with_policy: flops.per_row(torch.arange(1, num_layers + 1), with_policy=with_policy)
                for with_policy in (False, True)}
    points = replay_points(task, cache, grids)
    for point in points:
        histogram = torch.tensor(point.pop("exit_histogram"), dtype=torch.float64)
        point["flops"] = float((histogram * per_exit[point["rule"] == "policy"]).sum() / histogram.sum())
    mark_pareto(points)
    return points


def _value_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def mark_pareto(points: list[dict]) -> None:
    """pareto = no other realisable point dominates this one. The oracle needs the labels, so it is
    a bound, not a competitor: never marked, never dominating."""
    real = [(p["metric"], p["layer_saving"]) for p in points if p["rule"] != "oracle"]
    for point in points:
        point["pareto"] = point["rule"] != "oracle" and pareto_optimal((point["metric"], point["layer_saving"]), real)


# --- wall clock ---------------------------------------------------------------------------------
def _batches(dataloader, limit: int) -> list[dict]:
    batches, seen = [], 0
    for batch in dataloader:
        batches.append({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
        seen += batch["input_ids"].shape[0]
        if seen >= limit:
            break
    return batches


def _median_seconds(fn, batches, repeats: int, warmup: int, desc: str) -> float:
    for batch in batches[:warmup]:
        fn(batch)
    times = []
    for _ in progress(range(repeats), desc, unit="repeat"):  # the bar updates between timed passes
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_latency(model, rule, dataloader_for, batch_sizes=(1, 32), num_examples: int = 256,
                    repeats: int = 5, warmup: int = 3) -> dict:
    """Per-instance milliseconds of the real runner at `rule`, and of the plain transformers model's
    full forward on the same batches in the same process, warmed up, median of `repeats`."""
    model.eval()
    runner = EarlyExitRunner(model)
    plain = model.backbone.model
    measured = {}
    for batch_size in batch_sizes:
        batches = _batches(dataloader_for(batch_size), num_examples)
        count = sum(b["input_ids"].shape[0] for b in batches)

        def plain_forward(batch):
            with torch.inference_mode():
                kwargs = dict(batch)
                if not model.backbone.takes_token_types:
                    kwargs.pop("token_type_ids", None)
                plain(**kwargs)

        ours = _median_seconds(lambda batch: runner.run(batch, rule), batches, repeats, warmup,
                               f"latency, batch {batch_size}: early-exit runner")
        baseline = _median_seconds(plain_forward, batches, repeats, warmup, f"latency, batch {batch_size}: plain model")
        measured[f"latency_b{batch_size}_ms"] = 1000 * ours / count
        measured[f"plain_b{batch_size}_ms"] = 1000 * baseline / count
        measured[f"wallclock_speedup_b{batch_size}"] = baseline / ours
    return measured


# --- files ---------------------------------------------------------------------------------------
def csv_text(points: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for point in points:
        writer.writerow({c: point.get(c, "") for c in columns})
    return buffer.getvalue()


def markdown_table(points: list[dict], metric_name: str) -> str:
    latency = [c for c in LATENCY_COLUMNS if any(c in p for p in points)]
    header = ["rule", "knob", "value", metric_name, "avg exit layer", "layer saving", "speed-up (layers)",
              "GFLOPs / instance", *latency, "Pareto"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in points:
        cells = [p["rule"], p["knob"] or "-", p["value"] or "-", f"{p['metric']:.4f}", f"{p['avg_exit_layer']:.2f}",
                 f"{100 * p['layer_saving']:.1f}%", f"{p['speedup']:.2f}x", f"{p['flops'] / 1e9:.3f}",
                 *[f"{p[c]:.2f}" if c in p else "" for c in latency], "**yes**" if p["pareto"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chosen_table(chosen: list[dict], metric_name: str) -> str:
    """The operating points chosen on one split and measured on another (`frontier.choose_points`)."""
    set_rules = [row["rule"] for row in chosen if row.get("set")]
    also = (f" The {', '.join(set_rules)} row is the run's own point, chosen over its RL seeds (\"The chosen policy\" "
            "below)." if set_rules else "")
    lines = [f"Each rule's knob is chosen on {chosen[0]['chosen_on']} for {chosen[0]['target']}, then measured on "
             f"the reported split.{also}", "",
             f"| rule | knob | {metric_name} | layer saving | {chosen[0]['chosen_on']} {metric_name} | "
             f"{chosen[0]['chosen_on']} layer saving |", "|---|---|---|---|---|---|"]
    for row in chosen:
        lines.append(f"| {row['rule']} | {row['knob'] or '-'}={row['value']} | {row['metric']:.4f} | "
                     f"{100 * row['layer_saving']:.1f}% | {row['chosen_metric']:.4f} | "
                     f"{100 * row['chosen_layer_saving']:.1f}% |")
    return "\n".join(lines)


def frontier_table(rows: list[dict], metric_name: str, split: str = "test") -> str:
    """The policy's frontier over seeds (`frontier.frontier` rows of `policy_grid`): mean ± sd."""
    seeds = sorted({s for row in rows for s in row["seeds"]})
    lines = [f"Policies trained from the same stage 1 at every alpha, RL seeds {seeds}, each replayed at every tau. "
             "A setting is on the frontier when no other setting's mean validation point is as good on both metric and "
             f"saving; its {split} point is the mean ± sd over seeds.", "",
             f"| alpha | tau | {metric_name} | layer saving | validation {metric_name} | validation layer saving |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        alpha, tau = row["setting"]
        point, val = row[split], row["validation"]
        lines.append(f"| {alpha:g} | {tau:g} | {point['metric']:.4f} ± {point['metric_sd']:.4f} | "
                     f"{100 * point['layer_saving']:.1f}% ± {100 * point['layer_saving_sd']:.1f} | "
                     f"{val['metric']:.4f} | {100 * val['layer_saving']:.1f}% |")
    return "\n".join(lines)


AT_SAVINGS_RULES = ("entropy", "maxprob", "pcee", "patience")  # the confidence rules the policy is set beside


def at_savings_table(at_savings: list[dict], points: list[dict], metric_name: str, split: str = "test") -> str:
    """The policy at set savings (`policy_grid.frontier_at_savings`: each seed's tau set for the saving on validation,
    the alpha best there on validation) on `split`: mean and sd over the seeds, beside each confidence rule among
    `points` at the policy's mean saving, and the seeds' mean gap to entropy, each at its own saving."""
    curves = {rule: [p for p in points if p["rule"] == rule] for rule in AT_SAVINGS_RULES}
    curves = {rule: curve for rule, curve in curves.items() if curve}
    lines = ["Every policy of the frontier runs at its own tau for each saving on validation; the alpha whose seeds' "
             f"mean validation {metric_name} is best there stands for the policy. Its seeds on {split}: mean ± sd, and "
             "the gap to entropy, each seed against entropy at its own saving.", "",
             f"| set saving | alpha | {metric_name} | layer saving | " + "".join(f"{rule} | " for rule in curves)
             + "policy - entropy |", "|---|---|---|---|" + "---|" * (len(curves) + 1)]
    for point, row in zip(at_savings, gaps_at_savings(at_savings, {split: curves})):
        metric, metric_sd = mean_sd(row[split]["policy"])
        gap = row[split]["gap"]
        lines.append("| " + " | ".join([f"{100 * point['saving']:.0f}%", f"{point['alpha']:g}",
                                        f"{metric:.4f} ± {metric_sd:.4f}", f"{100 * point[split]['layer_saving']:.1f}%",
                                        *(f"{row[split][rule]:.4f}" if row[split][rule] is not None else "-"
                                          for rule in curves),
                                        f"{100 * statistics.mean(gap):+.2f} pt" if gap is not None else "-"]) + " |")
    return "\n".join(lines)


def chosen_policy_text(choice: dict, metric_name: str, split: str = "test") -> str:
    """The alpha and validation saving chosen over the RL seeds' mean, each seed's tau for that saving, the run's
    policy, and every seed's point (`policy_grid.choose_in_grid`)."""
    pick, per_seed = choice["chosen"], choice["per_seed"]
    mean = pick["mean"]["validation"]
    missed = "" if pick["within_target"] else " No setting reached that target, so the one of the best validation metric is reported."
    lines = [f"The run's policy is chosen on {pick['chosen_on']}: the (alpha, tau) whose mean over the RL seeds' policies has "
             f"{pick['target']}.{missed} Chosen: alpha {pick['alpha']:g} at {100 * mean['layer_saving']:.1f}% validation "
             f"layer saving (the seeds' mean at tau {pick['mean']['tau']:g}: {mean['metric']:.4f}). Each seed's tau is "
             f"the one whose validation saving is nearest it: the saving reads no label, and one tau would save "
             f"different amounts with different policies. The run's policy, RL seed {pick['seed']}, tau {pick['tau']:g}: "
             f"{split} {metric_name} {pick[split]['metric']:.4f} at {100 * pick[split]['layer_saving']:.1f}% layer saving "
             f"(validation {pick['validation']['metric']:.4f} at {100 * pick['validation']['layer_saving']:.1f}%).", "",
             "Every RL seed's policy at that saving (does the point hold across seeds?):", "",
             f"| RL seed | tau | {metric_name} | layer saving | validation {metric_name} | validation layer saving |",
             "|---|---|---|---|---|---|"]
    for row in per_seed["seeds"]:
        lines.append(f"| {row['seed']} | {row['tau']:g} | {row[split]['metric']:.4f} | {100 * row[split]['layer_saving']:.1f}% | "
                     f"{row['validation']['metric']:.4f} | {100 * row['validation']['layer_saving']:.1f}% |")
    summary = per_seed[split]
    lines.append(f"| mean (spread: max - min) | | {summary['metric']:.4f} ({100 * summary['metric_spread']:.2f} points) | "
                 f"{100 * summary['layer_saving']:.1f}% ({100 * summary['layer_saving_spread']:.1f} points) | | |")
    return "\n".join(lines)


def encoder_markdown(points: list[dict], metric_name: str, title: str = "", chosen: list[dict] | None = None,
                     frontier_rows: list[dict] | None = None, policy_choice: dict | None = None,
                     at_savings: list[dict] | None = None) -> str:
    parts = [f"# {title}\n" if title else ""]
    if chosen:
        parts.append("## Operating points\n\n" + chosen_table(chosen, metric_name) + "\n")
    if policy_choice:
        parts.append("## The chosen policy\n\n" + chosen_policy_text(policy_choice, metric_name) + "\n")
    if at_savings:
        parts.append("## The policy at set savings\n\n" + at_savings_table(at_savings, points, metric_name) + "\n")
    if frontier_rows:
        parts.append("## The policy's frontier\n\n" + frontier_table(frontier_rows, metric_name) + "\n")
    parts.append("## Every rule at every knob\n\n" if chosen or frontier_rows else "")
    parts.append("Pareto-optimal points (no other rule is as good on both metric and saving) are marked **yes**; the "
                 "oracle is a bound and never marked. Knob units: entropy threshold in nats; pcee threshold in "
                 "normalised entropy (entropy / ln C, 0..1, as in PCEE-BERT); patience 0 would mean full depth (as in "
                 "PABEE).\n\n" + markdown_table(points, metric_name) + "\n")
    return "\n".join(part for part in parts if part)


def plot_pareto(points: list[dict], path: Path, metric_name: str, title: str = "",
                frontier_rows: list[dict] | None = None, split: str = "test") -> None:
    """metric against layer saving: one curve per rule, the policy's frontier over seeds with its spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rule in dict.fromkeys(p["rule"] for p in points):
        mine = sorted((p for p in points if p["rule"] == rule), key=lambda p: p["layer_saving"])
        x = [100 * p["layer_saving"] for p in mine]
        y = [p["metric"] for p in mine]
        if rule in ("oracle", "full"):
            ax.scatter(x, y, marker="*" if rule == "oracle" else "s", s=120, label=rule, zorder=3)
        else:
            ax.plot(x, y, marker="o", markersize=3, label=rule, linewidth=2.2 if rule == "policy" else 1.2)
    if frontier_rows:
        seeds = len({s for row in frontier_rows for s in row["seeds"]})
        ax.errorbar([100 * r[split]["layer_saving"] for r in frontier_rows], [r[split]["metric"] for r in frontier_rows],
                    xerr=[100 * r[split]["layer_saving_sd"] for r in frontier_rows],
                    yerr=[r[split]["metric_sd"] for r in frontier_rows], color="black", linewidth=2, capsize=2,
                    label=f"policy frontier ({seeds} seeds, mean ± sd)", zorder=4)
    ax.set_xlabel("layer saving (%)")
    ax.set_ylabel(metric_name)
    ax.set_title(title or "accuracy versus layer saving")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(points: list[dict], out_dir: Path, *, columns: list[str], markdown: str, metric_label: str,
                 title: str = "", frontier_rows: list[dict] | None = None) -> dict[str, Path]:
    """The report of every comparison of exit rules, encoders' and generation's alike: pareto.csv (`columns`
    of every point, then the frontier's rows), pareto.md (`markdown`) and pareto.png (`metric_label` against
    layer saving), each written atomically."""
    out_dir = Path(out_dir)
    paths = {"csv": out_dir / "pareto.csv", "md": out_dir / "pareto.md", "png": out_dir / "pareto.png"}
    atomic_write_text(paths["csv"], csv_text(points + frontier_points(frontier_rows or []), columns))
    atomic_write_text(paths["md"], markdown)
    plot_pareto(points, paths["png"], metric_label, title, frontier_rows)
    return paths


def frontier_points(frontier_rows: list[dict], split: str = "test") -> list[dict]:
    """The frontier's rows as pareto.csv rows (rule `policy_frontier`, knob alpha,tau): mean and sd over seeds."""
    return [{"rule": "policy_frontier", "knob": "alpha,tau", "value": f"{row['setting'][0]:g},{row['setting'][1]:g}",
             "metric": row[split]["metric"], "metric_sd": row[split]["metric_sd"],
             "layer_saving": row[split]["layer_saving"], "layer_saving_sd": row[split]["layer_saving_sd"],
             "seeds": " ".join(map(str, row["seeds"])), "chosen_on": "validation"} for row in frontier_rows]


def encoder_columns(points: list[dict], with_frontier: bool = False) -> list[str]:
    latency = [c for c in LATENCY_COLUMNS if any(c in p for p in points)]
    return list(COLUMNS) + latency + (list(FRONTIER_COLUMNS) if with_frontier else [])


def summary_rows(points: list[dict], tolerance: float = 0.01) -> list[dict]:
    """Per rule, its best point within `tolerance` of the full model's metric (the headline table)."""
    full = next(p["metric"] for p in points if p["rule"] == "full")
    rows = []
    for rule in dict.fromkeys(p["rule"] for p in points):
        best = best_within([p for p in points if p["rule"] == rule], full, tolerance)
        if best is None:
            rows.append({"rule": rule, "value": None, "metric": math.nan, "layer_saving": math.nan})
        else:
            rows.append({k: best[k] for k in ("rule", "value", "metric", "layer_saving", "speedup", "flops")})
    return rows


# --- the whole comparison -----------------------------------------------------------------------
def compare_rules(model, task, cache: dict, datamodule, split: str, out_dir: Path, report_cfg,
                  tau: float | None = None, title: str = "", choose_on: dict | None = None, tolerance: float | None = None,
                  frontier_rows: list[dict] | None = None, policy_choice: dict | None = None,
                  at_savings: list[dict] | None = None) -> dict:
    """Replay every rule over `cache` (all-layer signals of `split`), time the real runner at
    ConsistentEE's setting, write pareto.csv / .md / .png into `out_dir`.

    choose_on: the validation split's signal cache; each rule's knob is then chosen on it (the most
    saving within `tolerance` of the full model's metric there) and measured on `split`.
    frontier_rows: the policy's frontier over seeds (`training.policy_grid`), reported beside the rules;
    policy_choice: its operating point chosen on validation, overall and per seed (`policy_grid.choose_in_grid`);
    at_savings: the policy at set savings (`policy_grid.frontier_at_savings`)."""
    model = model.eval()
    rules = list(report_cfg.rules) if report_cfg.rules is not None else None
    grids, latency = OmegaConf.to_container(report_cfg.grids), report_cfg.latency
    grids = rule_grids(rules, grids, model.num_layers, task.output_size, task.is_regression)
    if tau is not None and "policy" in grids and tau not in grids["policy"]:
        grids["policy"] = sorted(set(grids["policy"]) | {tau}, reverse=True)
    points = pareto_points(model, task, cache, grids)
    chosen = []
    if choose_on is not None:
        grids_with_full = {**grids, "full": [None]}
        validation = replay_points(task, choose_on, grids_with_full)
        full_val = next(p["metric"] for p in validation if p["rule"] == "full")
        # the policy's tau, where the frontier chose it over the RL seeds, is the run's: not this policy's own pick
        set_knobs = {"policy": _value_text(tau)} if policy_choice and tau is not None and "policy" in grids else None
        chosen = choose_points(validation, points, full_val, tolerance, set_knobs=set_knobs)
    if latency and latency.get("enabled", True) and "policy" in grids and tau is not None:
        measured = measure_latency(model, build_rule("policy", tau=tau),
                                   lambda bs: datamodule.dataloader(split, batch_size=bs),
                                   batch_sizes=tuple(latency.batch_sizes), num_examples=latency.num_examples,
                                   repeats=latency.repeats, warmup=latency.warmup)
        for point in points:
            if point["rule"] == "policy" and point["value"] == _value_text(tau):
                point.update(measured)
    markdown = encoder_markdown(points, task.metric, title, chosen, frontier_rows, policy_choice, at_savings)
    paths = write_report(points, out_dir, columns=encoder_columns(points, bool(frontier_rows)), markdown=markdown,
                         metric_label=task.metric, title=title, frontier_rows=frontier_rows)
    print(markdown)
    return {"points": points, "chosen": chosen, "summary_within_1pt": summary_rows(points, 0.01),
            "files": {k: str(v) for k, v in paths.items()}}
