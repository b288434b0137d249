"""What a dataset asks of the model: classification or regression, how many labels, which metric."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.classification import Accuracy, F1Score, MatthewsCorrCoef
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef
from torchmetrics.utilities import dim_zero_cat


CLASSIFICATION = "classification"
REGRESSION = "regression"
TASK_KINDS = (CLASSIFICATION, REGRESSION)
METRICS = ("acc", "f1", "mcc", "pearson_spearman")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str = CLASSIFICATION
    num_labels: int = 2
    metric: str = "acc"  # the task's headline metric, one of METRICS
    label_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.kind not in (CLASSIFICATION, REGRESSION):
            raise ValueError(f"task kind {self.kind!r}: use {CLASSIFICATION!r} or {REGRESSION!r}")
        if self.metric not in METRICS:
            raise ValueError(f"task metric {self.metric!r}: use one of {METRICS}")
        if self.kind == REGRESSION and self.num_labels != 1:
            raise ValueError("a regression task has num_labels=1")

    @property
    def is_regression(self) -> bool:
        return self.kind == REGRESSION

    @property
    def output_size(self) -> int:
        return 1 if self.is_regression else self.num_labels

    def to_dict(self) -> dict:
        return {**self.__dict__, "label_names": list(self.label_names)}

    @classmethod
    def from_dict(cls, task: dict | "TaskSpec") -> "TaskSpec":
        if isinstance(task, TaskSpec):
            return task
        return cls(**{**task, "label_names": tuple(task.get("label_names") or ())})


class PearsonSpearmanMean(Metric):
    """GLUE's STS-B score: the mean of Pearson and Spearman correlation.

    A single `Metric` (not a MetricCollection) so that `LightningModule.log` accepts it; the
    predictions and targets are kept whole (synced by concatenation) because a rank
    correlation cannot be accumulated batch by batch."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **metric_kwargs):
        super().__init__(**metric_kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.preds.append(preds.detach().float().reshape(-1))
        self.target.append(target.detach().float().reshape(-1))

    def compute(self) -> torch.Tensor:
        preds, target = dim_zero_cat(self.preds), dim_zero_cat(self.target)
        return (pearson_corrcoef(preds, target) + spearman_corrcoef(preds, target)) / 2


def make_metric(task: TaskSpec, **metric_kwargs) -> Metric:
    """A fresh torchmetrics object for the task's headline metric. It syncs across processes at
    compute; `sync_on_compute=False` for a value one process computes alone (e.g. on a replay cache)."""
    if task.metric == "pearson_spearman":
        return PearsonSpearmanMean(**metric_kwargs)
    kind = "binary" if task.num_labels == 2 else "multiclass"
    if task.metric == "acc":
        return Accuracy(task=kind, num_classes=task.num_labels, **metric_kwargs)
    if task.metric == "f1":
        return F1Score(task=kind, num_classes=task.num_labels, **metric_kwargs)
    return MatthewsCorrCoef(task=kind, num_classes=task.num_labels, **metric_kwargs)


def prediction(logits: torch.Tensor, is_regression: bool) -> torch.Tensor:
    """Head outputs [..., C] -> class ids (int64), or the regression value (float32) of a 1-output head."""
    return logits.float().squeeze(-1) if is_regression else logits.argmax(-1)


def predictions(task: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    """Head outputs [..., C] -> what a metric consumes: class ids, or the regression value."""
    return prediction(logits, task.is_regression)


def task_loss(task: TaskSpec, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy for classification, squared error for regression."""
    if task.is_regression:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype), reduction=reduction)
    return F.cross_entropy(logits, labels, reduction=reduction)


def is_right(prediction: torch.Tensor, labels: torch.Tensor, is_regression: bool, tolerance: float = 0.5) -> torch.Tensor:
    """Per row: the class is right, or the regression value is within `tolerance` of the label."""
    if is_regression:
        return (prediction.float() - labels.float()).abs() <= tolerance
    return prediction == labels


def is_correct(task: TaskSpec, logits: torch.Tensor, labels: torch.Tensor, tolerance: float = 0.5) -> torch.Tensor:
    """Per-instance bool from head outputs [..., C]: see `is_right`."""
    return is_right(predictions(task, logits), labels, task.is_regression, tolerance)
