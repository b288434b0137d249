"""Sweeps: the value a job returns to a Hydra sweeper, and the summary of a multirun.

`ee-train -m <key>=a,b ...` runs one job per combination in `<sweep dir>/<job num>/`; at the end
`SweepSummary` (a Hydra callback, see conf/hydra/default.yaml) reads each job's results.json and
writes into the sweep directory:
  sweep.csv  one row per job: its swept overrides, ConsistentEE's metric / layer saving / speed-up
             at tau, the full model's metric, and whether the job's point is Pareto-optimal
  sweep.md   the same as a table
  sweep.png  metric versus layer saving: each job's ConsistentEE point (circle) and its full model (square)
`python -m ee_lightning.app.sweep <sweep dir>` writes them again (e.g. for a sweep that was interrupted).

An Optuna search (hparams_search=consistentee_optuna) optimises what `train_main` returns:
`sweep_return(results, cfg.optimized_metrics)`, one float or a list of floats (multi-objective).
"""
from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ee_lightning.evaluation.pareto import pareto_optimal
from ee_lightning.results import RunResults

log = logging.getLogger(__name__)

# Names for optimized_metrics; any other name is a dotted path into results.json.
OBJECTIVES = {
    "consistentee_metric": ("methods", "consistentee", "metric"),
    "consistentee_layer_saving": ("methods", "consistentee", "layer_saving"),
    "consistentee_speedup": ("methods", "consistentee", "speedup"),
    "consistentee_avg_exit_layer": ("methods", "consistentee", "avg_exit_layer"),
    "full": ("full",),
    "objective": ("objective",),
}

COLUMNS = ("job", "status", "swept", "metric_name", "consistentee_metric", "consistentee_layer_saving",
           "consistentee_avg_exit_layer", "consistentee_speedup", "full", "entropy_at_same_saving", "pareto",
           "run_dir", "overrides")


# --- what a job returns to the sweeper --------------------------------------------------------
def objective_value(results: dict, name: str) -> float:
    value: Any = results
    for key in OBJECTIVES.get(name, tuple(name.split("."))):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"optimized_metrics: {name!r} is not in this run's results.json (ConsistentEE's values "
                           f"need method=consistentee); names: {', '.join(OBJECTIVES)}, or a dotted path")
        value = value[key]
    return float(value)


def sweep_return(results: dict, optimized_metrics=None) -> float | list[float] | None:
    """The run's objective (ConsistentEE's metric, or the last layer's), or the named values:
    a float for one name, a list for several (a multi-objective Optuna search)."""
    if not optimized_metrics:
        value = results.get("objective", results.get("full"))
        return None if value is None else float(value)
    if isinstance(optimized_metrics, str):
        return objective_value(results, optimized_metrics)
    values = [objective_value(results, name) for name in optimized_metrics]
    return values[0] if len(values) == 1 else values


# --- the summary of a multirun ----------------------------------------------------------------
class SweepSummary(Callback):
    """Writes sweep.csv / sweep.md / sweep.png into the sweep directory when a multirun ends.

    Also, before the sweep starts, creates the folder of an Optuna sqlite storage, which sqlite
    would not create itself.
    """

    def __init__(self, plot: bool = True):
        self.plot = plot

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        storage = _select(config, "hydra.sweeper.storage")
        if isinstance(storage, str) and storage.startswith("sqlite:///"):
            Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        # After every job of a multirun too: a sweep that fails or is interrupted still has its summary.
        if str(_select(config, "hydra.mode")) == "RunMode.MULTIRUN":
            write_summary(Path(str(_select(config, "hydra.sweep.dir"))), plot=self.plot)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(_select(config, "hydra.sweep.dir")))
        study = optuna_study_info(config)
        paths = write_summary(sweep_dir, plot=self.plot, study=study)
        if paths:
            log.info(f"sweep summary: {paths['md']}")


def _select(config: DictConfig, key: str):
    try:
        return OmegaConf.select(config, key, throw_on_resolution_failure=True)
    except Exception as error:  # an interpolation that cannot resolve here (e.g. an env var)
        log.warning(f"{key}: {error}")
        return None


def optuna_study_info(config: DictConfig) -> dict | None:
    """The whole Optuna study behind this search (it may span several invocations), if any."""
    storage, name = _select(config, "hydra.sweeper.storage"), _select(config, "hydra.sweeper.study_name")
    if not storage or not name:
        return None
    try:
        import optuna

        study = optuna.load_study(study_name=name, storage=storage)
        states = [trial.state.name for trial in study.trials]
        return {"study_name": name, "storage": storage, "trials": len(states), "complete": states.count("COMPLETE")}
    except Exception as error:
        log.warning(f"could not read the Optuna study {name} in {storage}: {error}")
        return None


def job_dirs(sweep_dir: Path) -> list[Path]:
    found = set()
    for pattern in ("*/.hydra/overrides.yaml", "*/*/.hydra/overrides.yaml"):
        found.update(path.parent.parent for path in sweep_dir.glob(pattern))
    for pattern in ("*/results.json", "*/*/results.json"):
        found.update(path.parent for path in sweep_dir.glob(pattern))
    return sorted(found, key=lambda p: [int(part) if part.isdigit() else math.inf for part in
                                        p.relative_to(sweep_dir).parts] + [str(p)])


def collect_jobs(sweep_dir: Path) -> list[dict]:
    jobs = []
    for job_dir in job_dirs(sweep_dir):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
        results = RunResults.read(job_dir)
        row = {"job": str(job_dir.relative_to(sweep_dir)), "status": "done" if results else "no results",
               "run_dir": str(job_dir), "overrides": overrides}
        if results:
            row.update(metric_name=results.metric_name, full=results.full)
            consistentee = results.methods.get("consistentee")
            if consistentee:
                row.update(consistentee_metric=consistentee.metric, consistentee_layer_saving=consistentee.layer_saving,
                           consistentee_avg_exit_layer=consistentee.avg_exit_layer,
                           consistentee_speedup=consistentee.speedup,
                           entropy_at_same_saving=consistentee.entropy_at_same_saving)
        jobs.append(row)
    mark_swept(jobs)
    mark_pareto(jobs)
    return jobs


def mark_swept(jobs: list[dict]) -> None:
    """`swept`: the overrides that differ between jobs (what distinguishes this job)."""
    parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in job["overrides"]) for job in jobs]
    keys = dict.fromkeys(k for p in parsed for k in p)
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    for job, p in zip(jobs, parsed):
        job["swept"] = ",".join(f"{k}={_short(p[k])}" for k in varying if k in p)


def _short(value: str) -> str:
    """A sampled float as 4 significant digits (0.010952683915341111 -> 0.01095); anything else as is."""
    try:
        return f"{float(value):.4g}" if "." in value and len(value) > 8 else value
    except ValueError:
        return value


def mark_pareto(jobs: list[dict]) -> None:
    """A job's ConsistentEE point is Pareto-optimal when no other job's is as good on metric and
    layer saving and better on one."""
    points = [(j["consistentee_metric"], j["consistentee_layer_saving"]) for j in jobs
              if j.get("consistentee_metric") is not None]
    for job in jobs:
        if job.get("consistentee_metric") is None:
            job["pareto"] = ""
        else:
            job["pareto"] = pareto_optimal((job["consistentee_metric"], job["consistentee_layer_saving"]), points)


def write_summary(sweep_dir: Path, plot: bool = True, study: dict | None = None) -> dict[str, Path] | None:
    sweep_dir = Path(sweep_dir)
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        log.warning(f"no jobs found in {sweep_dir}: no sweep summary")
        return None
    paths = {"csv": sweep_dir / "sweep.csv", "md": sweep_dir / "sweep.md"}
    # Written whole and then renamed: jobs of a parallel launcher may finish at the same time.
    with _replacing(paths["csv"]) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for job in jobs:
            writer.writerow({**{c: job.get(c, "") for c in COLUMNS}, "overrides": " ".join(job["overrides"])})
    with _replacing(paths["md"]) as tmp:
        tmp.write_text(markdown(jobs, sweep_dir, study))
    if plot and any(j.get("full") is not None for j in jobs):
        paths["png"] = sweep_dir / "sweep.png"
        with _replacing(paths["png"]) as tmp:
            plot_sweep(jobs, tmp, title=f"sweep {sweep_dir.name}")
    return paths


@contextlib.contextmanager
def _replacing(path: Path):
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fmt(value, percent: bool = False, suffix: str = "") -> str:
    if value is None or value == "":
        return "-"
    if percent:
        return f"{100 * value:.1f}%"
    return f"{value:.2f}{suffix}" if suffix else f"{value:.4f}"


def markdown(jobs: list[dict], sweep_dir: Path, study: dict | None = None) -> str:
    metric = next((j["metric_name"] for j in jobs if j.get("metric_name")), "metric")
    done = sum(j["status"] == "done" for j in jobs)
    lines = [f"# Sweep {sweep_dir.name}", "", f"{len(jobs)} jobs, {done} with results, in `{sweep_dir}`.", ""]
    if study:
        lines += [f"Optuna study `{study['study_name']}` ({study['storage']}): {study['trials']} trials in all, "
                  f"{study['complete']} complete.", ""]
    header = ["job", "swept", f"ConsistentEE {metric}", "layer saving", "speed-up (layers)", f"full {metric}",
              "Pareto", "status"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for j in jobs:
        cells = [j["job"], j.get("swept") or "-", _fmt(j.get("consistentee_metric")),
                 _fmt(j.get("consistentee_layer_saving"), percent=True), _fmt(j.get("consistentee_speedup"), suffix="x"),
                 _fmt(j.get("full")), "**yes**" if j.get("pareto") is True else "", j["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(jobs: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next((j["metric_name"] for j in jobs if j.get("metric_name")), "metric")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = plt.get_cmap("tab10" if len(jobs) <= 10 else "tab20")
    for i, job in enumerate(j for j in jobs if j.get("full") is not None):
        color = colors(i % colors.N)
        label = f"#{job['job']} {job.get('swept') or ''}".strip()
        ax.scatter([0.0], [job["full"]], marker="s", s=40, color=color, alpha=0.6)
        if job.get("consistentee_metric") is not None:
            x, y = 100 * job["consistentee_layer_saving"], job["consistentee_metric"]
            ax.plot([0.0, x], [job["full"], y], color=color, linewidth=0.8, alpha=0.5, linestyle="--")
            ax.scatter([x], [y], marker="o", s=70 if job.get("pareto") is True else 40, color=color,
                       edgecolors="black" if job.get("pareto") is True else "none", label=label, zorder=3)
        else:
            ax.scatter([], [], marker="s", color=color, label=label)
    front = sorted({(100 * j["consistentee_layer_saving"], j["consistentee_metric"]) for j in jobs
                    if j.get("pareto") is True})
    if len(front) > 1:
        ax.plot(*zip(*front), color="black", linewidth=1.2, alpha=0.7, label="Pareto front")
    ax.set_xlabel("layer saving (%)")
    ax.set_ylabel(metric)
    ax.set_title((title or "sweep") + ": ConsistentEE (o) and full model (s) per job")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m ee_lightning.app.sweep <sweep dir>")
    paths = write_summary(Path(argv[0]))
    if not paths:
        raise SystemExit(f"no jobs in {argv[0]}")
    print(Path(paths["md"]).read_text())


if __name__ == "__main__":
    main()
