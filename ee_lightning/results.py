"""results.json: what a run measured, in one file in its run directory."""
from __future__ import annotations

import json
from pathlib import Path

from ee_lightning.files import atomic_write_text

RESULTS_FILE = "results.json"


def write_results(run_dir: Path, results: dict) -> Path:
    """Write atomically, so an interrupted run never leaves half a file."""
    path = Path(run_dir) / RESULTS_FILE
    atomic_write_text(path, json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path


def format_layer_table(metric_name: str, layer_metrics: list[float], val_metrics: list[float] | None = None) -> str:
    lines = [f"layer  test {metric_name}" + (f"  val {metric_name}" if val_metrics else "")]
    for layer, value in enumerate(layer_metrics, start=1):
        extra = f"  {val_metrics[layer - 1]:.4f}" if val_metrics else ""
        lines.append(f"L{layer:<5} {value:.4f}{extra}")
    return "\n".join(lines)
