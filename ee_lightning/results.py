"""results.json: what a run measured, one schema written by every method and read by every consumer
(the ee-train summary, the sweep summary, the wandb job report, the study scripts)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ee_lightning.files import atomic_write_text

RESULTS_FILE = "results.json"


@dataclass
class MethodResult:
    """One exit method on the test split: its metric and its layer cost."""

    metric: float
    avg_exit_layer: float
    layer_saving: float  # 1 - avg_exit_layer / L
    speedup: float  # L / avg_exit_layer
    exit_histogram: list[int] = field(default_factory=list)  # exits per layer 1..L
    tau: float | None = None  # ConsistentEE's exit threshold
    entropy_at_same_saving: float | None = None  # the entropy rule's metric at this layer saving
    wallclock: dict | None = None  # measured runner latency against the plain model


@dataclass
class RunResults:
    task: str
    metric_name: str
    num_layers: int
    layer_metrics: list[float]  # test metric of every exit head
    full: float  # the last layer's: the full model
    backbone: str
    data: str
    seed: int
    val_layer_metrics: list[float] | None = None
    methods: dict[str, MethodResult] = field(default_factory=dict)  # consistentee, full
    entropy_curve: list[dict] = field(default_factory=list)  # value, metric, layer_saving
    consistentee_exits_by_bucket: dict = field(default_factory=dict)
    hardness_histogram: list[int] | None = None  # training rows per memorized layer
    pareto: dict | None = None  # report files and the best point of each rule within 1 point
    checkpoints: dict[str, str | None] = field(default_factory=dict)
    seconds: dict[str, float | None] = field(default_factory=dict)
    objective: float | None = None  # what a sweeper optimises by default

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunResults":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"results have unknown fields {unknown}; fields: {sorted(known)}")
        methods = {name: MethodResult(**method) for name, method in (values.get("methods") or {}).items()}
        return cls(**{**values, "methods": methods})

    def write(self, run_dir: Path) -> Path:
        """Write atomically, so an interrupted run never leaves half a file."""
        path = Path(run_dir) / RESULTS_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, run_dir: Path) -> "RunResults | None":
        """The results a run directory holds, or None when it has none (a job that did not finish)."""
        path = Path(run_dir) / RESULTS_FILE
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else None


def format_layer_table(metric_name: str, layer_metrics: list[float], val_metrics: list[float] | None = None) -> str:
    lines = [f"layer  test {metric_name}" + (f"  val {metric_name}" if val_metrics else "")]
    for layer, value in enumerate(layer_metrics, start=1):
        extra = f"  {val_metrics[layer - 1]:.4f}" if val_metrics else ""
        lines.append(f"L{layer:<5} {value:.4f}{extra}")
    return "\n".join(lines)
