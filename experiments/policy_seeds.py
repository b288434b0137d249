"""How far a decoder run's policy points move with the seed: finished runs of one experiment
(`ee-train experiment=aclsum_consistentee seed=S`), read from their results.json.

For every tau of the policy's grid: each run's layer saving, ROUGE-L against the reference and
against the full model's own output, and the spread (max - min) over runs; then each run's point
calibrated on validation. Nothing is run again: the figures are the runs' own test numbers.

    python experiments/policy_seeds.py --runs <run seed 42> <run seed 1> <run seed 2> \
        --out experiments/results/aclsum_seeds
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ee_lightning.files import atomic_write_text


def read_run(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: give the directories of finished decoder runs")
    results = json.loads(path.read_text())
    if results.get("method") != "consistentee_lm":
        raise SystemExit(f"{path} is a {results.get('method')!r} run: give consistentee_lm runs")
    config = run_dir / ".hydra" / "config.yaml"
    seed = None
    if config.is_file():
        from omegaconf import OmegaConf

        seed = OmegaConf.load(config).get("seed")
    return {"run": run_dir.name, "seed": seed, "results": results}


def policy_points(results: dict) -> dict[float, dict]:
    return {p["value"]: p for p in results["points"] if p["rule"] == "policy"}


def table(runs: list[dict]) -> list[dict]:
    """One row per tau that every run has: each run's point and the spread over runs."""
    taus = sorted(set.intersection(*(set(policy_points(r["results"])) for r in runs)))
    rows = []
    for tau in taus:
        points = [policy_points(r["results"])[tau] for r in runs]
        savings = [p["layer_saving"] for p in points]
        rows.append({"tau": tau, "layer_saving": savings, "rougeL": [p["rougeL"] for p in points],
                     "rougeL_vs_full": [p["rougeL_vs_full"] for p in points],
                     "saving_spread": max(savings) - min(savings)})
    return rows


def calibrated(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        chosen = ((r["results"].get("calibration") or {}).get("chosen") or {}).get("policy")
        point = policy_points(r["results"]).get(chosen["value"]) if chosen else None
        rows.append({"run": r["run"], "seed": r["seed"], "tau": chosen and chosen["value"],
                     "validation_rougeL_vs_full": chosen and chosen["validation"],
                     "layer_saving": point and point["layer_saving"], "rougeL": point and point["rougeL"],
                     "rougeL_vs_full": point and point["rougeL_vs_full"]})
    return rows


def markdown(runs: list[dict], rows: list[dict], chosen: list[dict], command: str) -> str:
    first = runs[0]["results"]
    names = [f"{r['run']} (seed {r['seed']})" for r in runs]
    lines = [f"# The policy's points over seeds: {first['backbone']} on {first['data']}", "",
             f"{len(runs)} runs of the same experiment with different seeds; {first['prompts']} {first['split']} "
             f"prompts, {first['max_new_tokens']} new tokens. Each cell: layer saving, ROUGE-L against the reference "
             "/ against the full output.", "",
             "| tau | " + " | ".join(names) + " | saving spread (max - min) |", "|---|" + "---|" * (len(runs) + 1)]
    for row in rows:
        cells = [f"{100 * s:.1f}%, {a:.3f} / {b:.3f}"
                 for s, a, b in zip(row["layer_saving"], row["rougeL"], row["rougeL_vs_full"])]
        lines.append(f"| {row['tau']} | " + " | ".join(cells) + f" | {100 * row['saving_spread']:.1f} points |")
    lines += ["", "Full depth: " + ", ".join(
        f"{next(p['rougeL'] for p in r['results']['points'] if p['rule'] == 'full'):.3f}" for r in runs), ""]
    if any(c["tau"] is not None for c in chosen):
        level = (first.get("calibration") or {}).get("level")
        lines += [f"## The tau calibrated on validation (ROUGE-L against the full output >= {level}), on test", "",
                  "| run | tau | validation ROUGE-L (full) | test layer saving | test ROUGE-L (ref) | test ROUGE-L (full) |",
                  "|---|---|---|---|---|---|"]
        for c in chosen:
            if c["tau"] is None:
                lines.append(f"| {c['run']} | none reached the level | - | - | - | - |")
            else:
                lines.append(f"| {c['run']} | {c['tau']} | {c['validation_rougeL_vs_full']:.3f} | "
                             f"{100 * c['layer_saving']:.1f}% | {c['rougeL']:.3f} | {c['rougeL_vs_full']:.3f} |")
        savings = [c["layer_saving"] for c in chosen if c["layer_saving"] is not None]
        if len(savings) > 1:
            lines += ["", f"Calibrated points' saving spread: {100 * (max(savings) - min(savings)):.1f} points."]
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="finished run directories")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/aclsum_seeds"))
    args = parser.parse_args(argv)
    runs = [read_run(path) for path in args.runs]
    rows, chosen = table(runs), calibrated(runs)
    command = "python experiments/policy_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(runs, rows, chosen, command)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "policy_seeds.md", text)
    atomic_write_text(args.out / "policy_seeds.json",
                      json.dumps({"runs": [r["run"] for r in runs], "seeds": [r["seed"] for r in runs],
                                  "taus": rows, "calibrated": chosen}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
