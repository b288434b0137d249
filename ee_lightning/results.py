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
    alpha: float | None = None  # ConsistentEE: the depth cost its policy was trained at
    seed: int | None = None  # ConsistentEE: the RL seed its policy was trained from
    chosen_on: str | None = None  # the split that chose the knob (validation), None: set in the config
    target: str | None = None  # what the knob was chosen for
    chosen_point: dict | None = None  # metric and layer_saving on the choosing split
    entropy_at_same_saving: float | None = None  # the entropy rule's metric at this layer saving
    wallclock: dict | None = None  # measured runner latency against the plain model


class ResultsFile:
    """What both results schemas share: a dict form, a checked reading of one, an atomic write."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def checked(cls, values: dict) -> dict:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{RESULTS_FILE} has fields unknown to {cls.__name__}: {unknown}; fields: {sorted(known)}")
        return values

    def write(self, run_dir: Path) -> Path:
        """Write atomically, so an interrupted run never leaves half a file."""
        path = Path(run_dir) / RESULTS_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path


@dataclass
class RunResults(ResultsFile):
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
    chosen_points: list[dict] = field(default_factory=list)  # every rule's knob chosen on validation, measured on test
    policy_frontier: dict | None = None  # policies over alpha x RL seeds: every setting's mean ± sd, the frontier
    checkpoints: dict[str, str | None] = field(default_factory=dict)
    seconds: dict[str, float | None] = field(default_factory=dict)
    objective: float | None = None  # what a sweeper optimises by default

    @classmethod
    def from_dict(cls, values: dict) -> "RunResults":
        methods = {name: MethodResult(**method) for name, method in (values.get("methods") or {}).items()}
        return cls(**{**cls.checked(values), "methods": methods})

    @classmethod
    def read(cls, run_dir: Path) -> "RunResults | LMRunResults | None":
        """The results a run directory holds (of either method kind), or None when it has none (a job
        that did not finish)."""
        path = Path(run_dir) / RESULTS_FILE
        if not path.is_file():
            return None
        values = json.loads(path.read_text())
        return (LMRunResults if values.get("method") == LMRunResults.METHOD else cls).from_dict(values)


@dataclass
class LMRunResults(ResultsFile):
    """method=consistentee_lm: every token exit rule at every knob, through real generation.
    `points` holds one row per rule and knob (metric = ROUGE-L against the reference, rougeL_vs_full,
    token agreement, avg_exit_layer, layer_saving, speedup, flops, tokens_per_s, exit_histogram ...)."""

    METHOD = "consistentee_lm"

    method: str
    backbone: str
    data: str
    num_layers: int
    exit_layers: list[int]  # the layers with an exit (1-based)
    split: str
    prompts: int
    max_new_tokens: int
    metric_name: str
    points: list[dict]
    consistentee_vs_calm: list[dict]  # each policy point beside every CALM measure at the same saving
    training_summary: dict
    transformers_generate: dict  # the library's own generate on the same prompts (tokens/s)
    prefill_seconds: float
    examples: dict  # the first test output of each rule
    reference_example: str
    flops_full_depth_per_token: float
    seconds: dict
    report: dict  # pareto file paths
    policy_tau: float | None = None  # the policy's point: its calibrated tau, else method.lm_exits.policy.tau
    # method.generation.calibration: {split, prompts, level, key, chosen: {rule: {value, validation,
    # validation_layer_saving}}}; None when the run calibrated nothing
    calibration: dict | None = None
    timing: str | None = None  # how tokens/s were clocked, where not over every prompt (kv=defer with timed_per_batch)

    @property
    def full(self) -> float:
        return next(p["metric"] for p in self.points if p["rule"] == "full")

    @property
    def methods(self) -> dict[str, MethodResult]:
        """The full model, and ConsistentEE at policy_tau (else its middle knob), in the encoders' terms."""
        def method(point: dict) -> MethodResult:
            calibrated = point.get("calibrated") is not None
            return MethodResult(metric=point["metric"], avg_exit_layer=point["avg_exit_layer"],
                                layer_saving=point["layer_saving"], speedup=point["speedup"],
                                exit_histogram=point.get("exit_histogram", []),
                                tau=point["value"] if point["rule"] == "policy" else None,
                                chosen_on=self.calibration["split"] if calibrated else None,
                                target=(f"rougeL_vs_full >= {self.calibration['level']}" if calibrated else None))

        policy = [p for p in self.points if p["rule"] == "policy"]
        out = {"full": method(next(p for p in self.points if p["rule"] == "full"))}
        if policy:
            at_tau = [p for p in policy if self.policy_tau is not None and p["value"] == self.policy_tau]
            out["consistentee"] = method(at_tau[0] if at_tau else policy[len(policy) // 2])
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "LMRunResults":
        return cls(**cls.checked(values))


def format_layer_table(metric_name: str, layer_metrics: list[float], val_metrics: list[float] | None = None) -> str:
    lines = [f"layer  test {metric_name}" + (f"  val {metric_name}" if val_metrics else "")]
    for layer, value in enumerate(layer_metrics, start=1):
        extra = f"  {val_metrics[layer - 1]:.4f}" if val_metrics else ""
        lines.append(f"L{layer:<5} {value:.4f}{extra}")
    return "\n".join(lines)
