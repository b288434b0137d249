"""Study: ConsistentEE's accuracy-versus-saving curve with hardness-guided, plain and no depth cost,
against the entropy and patience rules on the same heads.

One stage-1 fine-tuning per seed (`ee-train method=finetune`), then one Hydra multirun per seed
whose jobs share that checkpoint through `init_from`, so each job only trains the policy:

    python experiments/reward_study.py rotten_tomatoes          # study 1 (about 25 minutes on 2 CPU cores)
    python experiments/reward_study.py sst2 --seeds 1 2 3       # study 2: $GLUE_DIR/SST-2 (GLUE's own files), 8,000 sentences
    python experiments/reward_study.py bbc_news                 # study 3: 5 classes, long articles

Writes experiments/results/<study>.md (tables), <study>.png (curves) and <study>.json (every point).
Extra Hydra overrides after `--` go to every ee-train call (e.g. `-- data.max_train_samples=null`).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ee_lightning.results import RunResults

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"

PRESETS = {
    "rotten_tomatoes": {"data": ["data=rotten_tomatoes"], "finetune": ["method.finetune.epochs=2"]},
    # dev.tsv (6,735 rows) is the validation split: 1,000 of them are plenty to watch training.
    "sst2": {"data": ["data=glue", "data.task=sst2", "data.max_train_samples=8000", "data.max_eval_samples=1000"],
             "finetune": []},
    "bbc_news": {"data": ["data=bbc_news"], "finetune": ["method.finetune.epochs=3", "method.finetune.lr=1e-4"]},
}
ALPHAS = {"hardness": [0.05, 0.1, 0.15], "plain": [0.03, 0.06]}
QUIET = ["logger=csv", "trainer.enable_progress_bar=false"]


def ee_train(args: list[str]) -> None:
    command = [sys.executable, "-m", "ee_lightning.app.cli", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def stage_one(study: str, preset: dict, seed: int, extra: list[str], out: Path) -> str:
    run_dir = out / f"stage1-seed{seed}"
    stage_one_extra = [e for e in extra if not e.startswith(("method.policy.", "method.tau", "method.joint",
                                                             "method.hardness"))]
    if not (run_dir / "stages.json").is_file():
        ee_train(["method=finetune", *preset["data"], *preset["finetune"], f"seed={seed}", f"task_name={study}",
                  f"hydra.run.dir={run_dir}", *QUIET, *stage_one_extra])
    return json.loads((run_dir / "stages.json").read_text())["finetune"]["checkpoint"]


def policy_sweep(study: str, preset: dict, seed: int, checkpoint: str, extra: list[str], out: Path) -> list[dict]:
    """Hardness-guided and plain depth cost over alphas, and no depth cost, as one multirun each."""
    jobs = []
    sweeps = [(f"method.policy.depth_term={term}", "method.policy.alpha=" + ",".join(map(str, alphas)))
              for term, alphas in ALPHAS.items()] + [("method.policy.depth_term=none", "method.policy.alpha=0.0")]
    for term, alphas in sweeps:
        sweep_dir = out / f"seed{seed}-{term.split('=')[1]}"
        if not any(sweep_dir.glob("*/results.json")):
            ee_train(["-m", "method=consistentee", *preset["data"], f"init_from={checkpoint}", f"seed={seed}",
                      term, alphas, f"task_name={study}", f"hydra.sweep.dir={sweep_dir}",
                      "report.latency.enabled=false", *QUIET, *extra])
        for results_file in sorted(sweep_dir.glob("*/results.json")):
            results = RunResults.read(results_file.parent)
            overrides = (results_file.parent / ".hydra" / "overrides.yaml").read_text()
            jobs.append({"seed": seed, "depth_term": term.split("=")[1], "alpha": _alpha(overrides),
                         "dir": str(results_file.parent), **dataclasses.asdict(results.methods["consistentee"]),
                         "full": results.methods["full"].metric})
    return jobs


def _alpha(overrides: str) -> float:
    for line in overrides.splitlines():
        if "method.policy.alpha=" in line:
            return float(line.split("=")[1])
    return 0.0


def baseline_curves(job_dir: str) -> dict[str, list[tuple[float, float]]]:
    """Entropy and patience on the same heads: read from one job's pareto.csv (heads are shared)."""
    curves: dict[str, list[tuple[float, float]]] = {}
    with open(Path(job_dir) / "pareto.csv") as handle:
        for row in csv.DictReader(handle):
            if row["rule"] in ("entropy", "patience", "oracle"):
                curves.setdefault(row["rule"], []).append((float(row["layer_saving"]), float(row["metric"])))
    return {rule: sorted(points) for rule, points in curves.items()}


def write_outputs(study: str, jobs: list[dict], curves_by_seed: dict, seconds: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{study}.json").write_text(json.dumps({"jobs": jobs, "baselines": curves_by_seed,
                                                        "seconds": seconds}, indent=2))
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:
        groups.setdefault((job["depth_term"], job["alpha"]), []).append(job)
    seeds = sorted({job["seed"] for job in jobs})

    def mean_sd(values):
        return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)

    lines = [f"# {study}: ConsistentEE reward variants against entropy and patience", "",
             f"Seeds {seeds}; test split; mean ± sd over seeds where there are several. "
             f"Wall time of the whole study here: {seconds / 60:.0f} min.", "",
             "| depth term | alpha | accuracy | layer saving | entropy at that saving | full model |",
             "|---|---|---|---|---|---|"]
    for (term, alpha), members in sorted(groups.items()):
        acc, acc_sd = mean_sd([m["metric"] for m in members])
        saving, saving_sd = mean_sd([m["layer_saving"] for m in members])
        entropy, entropy_sd = mean_sd([m["entropy_at_same_saving"] for m in members])
        full, _ = mean_sd([m["full"] for m in members])
        lines.append(f"| {term} | {alpha} | {acc:.4f} ± {acc_sd:.4f} | {100 * saving:.1f}% ± {100 * saving_sd:.1f} "
                     f"| {entropy:.4f} ± {entropy_sd:.4f} | {full:.4f} |")
    first_seed = curves_by_seed[str(seeds[0])]
    lines += ["", f"Baseline curves on the heads of seed {seeds[0]} (layer saving, accuracy):", ""]
    for rule, points in first_seed.items():
        lines.append(f"- {rule}: " + ", ".join(f"({100 * s:.0f}%, {m:.4f})" for s, m in points[:: max(1, len(points) // 12)]))
    (RESULTS / f"{study}.md").write_text("\n".join(lines) + "\n")
    plot(study, jobs, first_seed, seeds[0])
    print("\n".join(lines))


def plot(study: str, jobs: list[dict], curves: dict, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rule, points in curves.items():
        xs, ys = zip(*points)
        if rule == "oracle":
            ax.scatter([100 * x for x in xs], ys, marker="*", s=120, label="oracle", color="gray")
        else:
            ax.plot([100 * x for x in xs], ys, label=f"{rule} (seed {seed} heads)", linewidth=1.2)
    for term, marker in (("hardness", "o"), ("plain", "s"), ("none", "^")):
        mine = [j for j in jobs if j["depth_term"] == term]
        if mine:
            ax.scatter([100 * j["layer_saving"] for j in mine], [j["metric"] for j in mine], marker=marker, s=40,
                       label=f"ConsistentEE, {term} depth cost", zorder=3)
    full = statistics.mean(j["full"] for j in jobs)
    ax.axhline(full, color="black", linestyle=":", linewidth=1, label="full model")
    ax.set_xlabel("layer saving (%)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{study}: accuracy versus layer saving")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{study}.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=sorted(PRESETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "studies"))
    parser.add_argument("--stage1", help="reuse this stage-1 checkpoint (one seed), e.g. make train's")
    parser.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"),
                        help="sst2: the folder holding GLUE's SST-2/ (default: $GLUE_DIR)")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    if args.study == "sst2":
        if not args.glue_dir or not (Path(args.glue_dir) / "SST-2").is_dir():
            parser.error(f"sst2 needs GLUE's SST-2 folder: pass --glue-dir DIR (or set GLUE_DIR) with DIR/SST-2/"
                         f"{{train,dev,test}}.tsv; got {args.glue_dir!r}")
        args.extra = [f"data.data_dir={Path(args.glue_dir) / 'SST-2'}", *args.extra]
    started = time.perf_counter()
    out = Path(args.out) / args.study
    jobs, curves = [], {}
    for seed in args.seeds:
        checkpoint = args.stage1 or stage_one(args.study, PRESETS[args.study], seed, args.extra, out)
        seed_jobs = policy_sweep(args.study, PRESETS[args.study], seed, checkpoint, args.extra, out)
        jobs += seed_jobs
        curves[str(seed)] = baseline_curves(seed_jobs[0]["dir"])
    write_outputs(args.study, jobs, curves, time.perf_counter() - started)


if __name__ == "__main__":
    main()
