"""The accuracy-versus-cost comparison of exit rules on one model: pareto.csv, pareto.md, pareto.png.

Every rule is replayed over one cached all-layers pass (`inference.layer_cache.collect_signals`), at every
point of its knob grid. Cost is reported three ways, each labelled: layers (average exit layer,
layer saving, speed-up ratio), FLOPs per instance, and wall clock of the real batched runner.
"""
from __future__ import annotations

import csv
import logging
import math
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ee_lightning.evaluation.cost import measure_flops
from ee_lightning.evaluation.rule_points import evaluate_rule
from ee_lightning.inference.runner import EarlyExitRunner
from ee_lightning.progress import progress
from ee_lightning.exits.rules import build_rule, ENCODER_RULES, GRID_KNOBS, RULES, default_grid, rule_from_grid
from ee_lightning.tasks import TaskSpec

log = logging.getLogger(__name__)

ALL_RULES = ("policy", "entropy", "maxprob", "softmax_margin", "patience", "pcee", "static", "oracle", "full")
COLUMNS = ("rule", "knob", "value", "metric", "avg_exit_layer", "layer_saving", "speedup", "flops", "pareto")
LATENCY_COLUMNS = ("latency_b1_ms", "latency_b32_ms", "wallclock_speedup_b1", "wallclock_speedup_b32")


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


def pareto_points(model, task: TaskSpec, cache: dict, grids: dict[str, list]) -> list[dict]:
    """Every rule at every knob: metric, layer cost and FLOPs per instance (mean over the split)."""
    num_layers = cache["prediction"].shape[0]
    seq_len = max(1, round(float(cache["lengths"].float().mean())))
    flops = measure_flops(model, seq_len)
    per_exit = {with_policy: flops.per_row(torch.arange(1, num_layers + 1), with_policy=with_policy)
                for with_policy in (False, True)}
    points = []
    for name, grid in grids.items():
        for value in grid:
            point = evaluate_rule(task, cache, rule_from_grid(name, value, num_layers))
            histogram = torch.tensor(point.pop("exit_histogram"), dtype=torch.float64)
            point["flops"] = float((histogram * per_exit[name == "policy"]).sum() / histogram.sum())
            knob = ",".join(GRID_KNOBS[name])
            points.append({"rule": name, "knob": knob, "value": _value_text(value), **point})
    mark_pareto(points)
    return points


def _value_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def pareto_optimal(point: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    """(metric, saving): no other point is at least as good on both and better on one."""
    return not any(o[0] >= point[0] and o[1] >= point[1] and (o[0] > point[0] or o[1] > point[1]) for o in others)


def mark_pareto(points: list[dict]) -> None:
    """pareto = no other realisable point dominates this one. The oracle needs the labels, so it is
    a bound, not a competitor: never marked, never dominating."""
    real = [(p["metric"], p["layer_saving"]) for p in points if p["rule"] != "oracle"]
    for point in points:
        point["pareto"] = point["rule"] != "oracle" and pareto_optimal((point["metric"], point["layer_saving"]), real)


def best_within(points: list[dict], rule: str, reference: float, tolerance: float) -> dict | None:
    """The rule's point with the largest saving whose metric is within `tolerance` of `reference`."""
    candidates = [p for p in points if p["rule"] == rule and p["metric"] >= reference - tolerance]
    return max(candidates, key=lambda p: (p["layer_saving"], p["metric"])) if candidates else None


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


# --- files --------------------------------------------------------------------------------------
def write_csv(points: list[dict], path: Path) -> None:
    columns = list(COLUMNS) + [c for c in LATENCY_COLUMNS if any(c in p for p in points)]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for point in points:
            writer.writerow({c: point.get(c, "") for c in columns})


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


def plot_pareto(points: list[dict], path: Path, metric_name: str, title: str = "") -> None:
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
    ax.set_xlabel("layer saving (%)")
    ax.set_ylabel(metric_name)
    ax.set_title(title or "accuracy versus layer saving")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(points: list[dict], out_dir: Path, metric_name: str, title: str = "") -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"csv": out_dir / "pareto.csv", "md": out_dir / "pareto.md", "png": out_dir / "pareto.png"}
    write_csv(points, paths["csv"])
    heading = f"# {title}\n\n" if title else ""
    paths["md"].write_text(heading + "Pareto-optimal points (no other rule is as good on both metric and saving) "
                           "are marked **yes**; the oracle is a bound and never marked. Knob units: entropy "
                           "threshold in nats; pcee threshold in normalised entropy (entropy / ln C, 0..1, as in "
                           "PCEE-BERT); patience 0 would mean full depth (as in PABEE).\n\n"
                           + markdown_table(points, metric_name) + "\n")
    plot_pareto(points, paths["png"], metric_name, title)
    return paths


def summary_rows(points: list[dict], tolerance: float = 0.01) -> list[dict]:
    """Per rule, its best point within `tolerance` of the full model's metric (the headline table)."""
    full = next(p["metric"] for p in points if p["rule"] == "full")
    rows = []
    for rule in dict.fromkeys(p["rule"] for p in points):
        best = best_within(points, rule, full, tolerance)
        if best is None:
            rows.append({"rule": rule, "value": None, "metric": math.nan, "layer_saving": math.nan})
        else:
            rows.append({k: best[k] for k in ("rule", "value", "metric", "layer_saving", "speedup", "flops")})
    return rows


# --- the whole comparison -----------------------------------------------------------------------
def compare_rules(model, task, cache: dict, datamodule, split: str, out_dir: Path, report_cfg,
                  tau: float | None = None, title: str = "") -> dict:
    """Replay every rule over `cache` (all-layer signals of `split`), time the real runner at
    ConsistentEE's setting, write pareto.csv / .md / .png into `out_dir`."""
    model = model.eval()
    rules = list(report_cfg.rules) if report_cfg.rules is not None else None
    grids, latency = OmegaConf.to_container(report_cfg.grids), report_cfg.latency
    grids = rule_grids(rules, grids, model.num_layers, task.output_size, task.is_regression)
    if tau is not None and "policy" in grids and tau not in grids["policy"]:
        grids["policy"] = sorted(set(grids["policy"]) | {tau}, reverse=True)
    points = pareto_points(model, task, cache, grids)
    if latency and latency.get("enabled", True) and "policy" in grids and tau is not None:
        measured = measure_latency(model, build_rule("policy", tau=tau),
                                   lambda bs: datamodule.dataloader(split, batch_size=bs),
                                   batch_sizes=tuple(latency.batch_sizes), num_examples=latency.num_examples,
                                   repeats=latency.repeats, warmup=latency.warmup)
        for point in points:
            if point["rule"] == "policy" and point["value"] == str(tau):
                point.update(measured)
    paths = write_report(points, out_dir, task.metric, title)
    print((out_dir / "pareto.md").read_text())
    return {"points": points, "summary_within_1pt": summary_rows(points, 0.01),
            "files": {k: str(v) for k, v in paths.items()}}
