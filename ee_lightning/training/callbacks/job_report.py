"""A Hydra callback at the end of every job (single run or one job of a multirun).

- A failed job writes its error into its run directory (error.txt, first line the error), which
  the sweep summary lists against the job.
- A wandb run that a failed job left open is finished (marked failed), so the next job of a
  multirun starts its own run instead of logging into it.
- When the job wrote results.json / pareto.png and logs to wandb, one more run of the job's group,
  job_type `report`, holds the Pareto plot (`report/pareto`, a wandb.Image), the Pareto table, the
  test metric of every layer, the policy's exit histogram on test, and the headline numbers in
  its summary. (The stage runs are closed by then: the report is written after the test stage.)
"""
from __future__ import annotations

import csv
import logging
import sys
import traceback
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ee_lightning.files import atomic_write_text
from ee_lightning.results import RunResults

log = logging.getLogger(__name__)

HEADLINE = ("metric", "layer_saving", "avg_exit_layer", "speedup", "entropy_at_same_saving")


class JobReport(Callback):
    def __init__(self, wandb_report: bool = True):
        self.wandb_report = wandb_report

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        failed = job_return.status != JobStatus.COMPLETED
        finish_open_wandb_run(failed)
        run_dir = Path(config.hydra.runtime.output_dir)
        record_error(run_dir, job_return._return_value if failed else None)
        if failed or not self.wandb_report or not config.get("logger"):
            return
        if (run_dir / "results.json").is_file() or (run_dir / "pareto.png").is_file():
            log_report(config, run_dir)


ERROR_FILE = "error.txt"


def record_error(run_dir: Path, error: BaseException | None) -> None:
    """A failed job leaves error.txt in its run directory: the error's one-line summary, then its
    traceback (the sweep summary shows the first line). A job that succeeds removes an earlier one."""
    path = run_dir / ERROR_FILE
    if error is None:
        path.unlink(missing_ok=True)
        return
    summary = " ".join(f"{type(error).__name__}: {error}".split())  # one line
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        atomic_write_text(path, f"{summary}\n\n{trace}")
    except OSError as write_error:  # e.g. the run directory is what failed: the error is still on stderr
        log.warning(f"could not record the job's error in {path}: {write_error}")


def error_line(run_dir: Path) -> str | None:
    """The one-line error a failed job recorded in its run directory, if any."""
    path = Path(run_dir) / ERROR_FILE
    return path.read_text().splitlines()[0] if path.is_file() else None


def finish_open_wandb_run(failed: bool) -> None:
    wandb = sys.modules.get("wandb")  # never imported: nothing to finish
    if wandb is not None and wandb.run is not None:
        wandb.run.finish(exit_code=1 if failed else 0)


def log_report(cfg: DictConfig, run_dir: Path) -> None:
    """The job's report as its own wandb run (job_type=report); nothing without a wandb logger."""
    from lightning.pytorch.loggers import WandbLogger

    from ee_lightning.training.trainers import build_loggers

    loggers = [logger for logger in build_loggers(cfg, "report") if isinstance(logger, WandbLogger)]
    if not loggers:
        return
    values, summary = report_values(run_dir)
    for logger in loggers:
        run = logger.experiment
        if values:
            run.log(values)
        run.summary.update(summary)
        run.finish()


def report_values(run_dir: Path) -> tuple[dict, dict]:
    import wandb

    values, summary = {}, {}
    results = RunResults.read(run_dir)
    metric = results.metric_name if results else "metric"
    pareto_png = run_dir / "pareto.png"
    if pareto_png.is_file():
        values["report/pareto"] = wandb.Image(str(pareto_png), caption=f"{metric} versus layer saving (test)")
    pareto_csv = run_dir / "pareto.csv"
    if pareto_csv.is_file():
        with open(pareto_csv, newline="") as handle:
            rows = list(csv.reader(handle))
        if len(rows) > 1:
            values["report/pareto_table"] = wandb.Table(columns=rows[0], data=rows[1:])
    if results is None:
        return values, summary
    if isinstance(results, RunResults):  # a decoder run has no per-layer test metric: its exits are rules' points
        table = wandb.Table(columns=["layer", metric],
                            data=[[layer, value] for layer, value in enumerate(results.layer_metrics, 1)])
        values["report/test_by_layer"] = wandb.plot.line(table, "layer", metric, title=f"test {metric} by exit layer")
    summary["full"] = results.full
    consistentee = results.methods.get("consistentee")
    if consistentee:
        summary.update({f"consistentee/{key}": getattr(consistentee, key) for key in HEADLINE
                        if getattr(consistentee, key) is not None})
        histogram = consistentee.exit_histogram
        if histogram:
            table = wandb.Table(columns=["layer", "count"], data=[[f"L{l}", c] for l, c in enumerate(histogram, 1)])
            values["report/consistentee_exits"] = wandb.plot.bar(table, "layer", "count",
                                                                 title="ConsistentEE exits per layer (test)")
    return values, summary
