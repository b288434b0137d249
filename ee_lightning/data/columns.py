"""Data options whose rows are named columns (local files, Hugging Face datasets): the shared part.

`ColumnDataModule` holds what such options have in common: which columns hold the text, the
optional second text and the label; the task kind and its headline metric; how labels become
ids; and how a missing validation / test split is carved from train with the split seed.
Labels:

* `task_kind: regression`: numbers (float);
* classification with label names (`label_names`, or those a subclass reads from the data,
  see `known_label_names`): a label is one of the names (its position is the id) or an
  integer id;
* classification without names: integers are ids (num_labels = the given one, or the
  largest id + 1); otherwise the distinct strings of the train split, sorted, are the label
  names (the mapping is logged).
"""
from __future__ import annotations

import logging
from typing import Any

from ee_lightning.data.base import (DataError, Examples, TextDataModule, check_labels, fraction_size,
                                    label_outside_head_message, row_location, split_rows, validate_metric)
from ee_lightning.tasks import CLASSIFICATION, REGRESSION, TaskSpec

log = logging.getLogger(__name__)


class ColumnDataModule(TextDataModule):
    """Text / pair / label columns, task kind and label ids, carving of missing splits."""

    train_source = "the train split"  # what the train rows are called in messages
    split_setting = "data.{split}_split"  # the setting that gives a split its own rows

    def __init__(self, tokenizer, text_column: str = "text", text_pair_column: str | None = None,
                 label_column: str = "label", task_kind: str = CLASSIFICATION, label_names: list | None = None,
                 num_labels: int | None = None, metric: str | None = None, validation_fraction: float = 0.1,
                 test_fraction: float = 0.1, **base_kwargs):
        super().__init__(tokenizer, **base_kwargs)
        if task_kind not in (CLASSIFICATION, REGRESSION):
            raise DataError(f"data.task_kind={task_kind!r}: use {CLASSIFICATION!r} or {REGRESSION!r}")
        self.task_kind = task_kind
        self.text_column = str(text_column)
        self.text_pair_column = str(text_pair_column) if text_pair_column else None
        self.label_column = str(label_column)
        self.label_names_cfg = None if label_names is None else tuple(str(x) for x in label_names)
        self.num_labels = None if num_labels is None else int(num_labels)
        self.metric = validate_metric(metric or ("pearson_spearman" if task_kind == REGRESSION else "acc"), task_kind)
        self.validation_fraction = float(validation_fraction)
        self.test_fraction = float(test_fraction)
        if task_kind == REGRESSION:
            if self.label_names_cfg or (self.num_labels not in (None, 1)):
                raise DataError("a regression task has one output: drop data.label_names and set data.num_labels=null")
            self._task = TaskSpec(self.name, REGRESSION, 1, self.metric)
        else:
            if self.num_labels is not None and self.num_labels < 2:
                raise DataError(f"data.num_labels={self.num_labels}: a classification task needs at least 2 labels")
            if self.label_names_cfg is not None:
                if len(set(self.label_names_cfg)) != len(self.label_names_cfg) or len(self.label_names_cfg) < 2:
                    raise DataError(f"data.label_names={list(self.label_names_cfg)} must be at least 2 distinct names")
                if self.num_labels is not None and self.num_labels != len(self.label_names_cfg):
                    raise DataError(f"data.num_labels={self.num_labels} but data.label_names has "
                                    f"{len(self.label_names_cfg)} names; make them agree (or set num_labels=null)")
                self._task = TaskSpec(self.name, CLASSIFICATION, len(self.label_names_cfg), self.metric,
                                      self.label_names_cfg)

    # the `label_names` setting is kept as label_names_cfg; `label_names` (base) is the task's names

    def column_settings(self) -> dict[str, str]:
        """Each configured column -> the setting that names it (for messages)."""
        settings = {self.text_column: "text_column", self.label_column: "label_column"}
        if self.text_pair_column:
            settings[self.text_pair_column] = "text_pair_column"
        return settings

    def column_identity(self) -> dict:
        """The column and label settings, for `data_identity`."""
        return {"columns": [self.text_column, self.text_pair_column, self.label_column], "task_kind": self.task_kind,
                "label_names": self.label_names_cfg, "num_labels": self.num_labels, "metric": self.metric,
                "name": self.name}

    def known_label_names(self) -> tuple[str, ...] | None:
        """The label names fixed before the labels are counted: the setting (subclasses may add the data's own)."""
        return self.label_names_cfg

    def carve_missing(self, splits: dict[str, Examples]) -> dict[str, Examples]:
        """Fill an absent validation / test split with a seeded fraction of train (train keeps the rest)."""
        train = splits["train"]
        carve = [s for s in ("test", "validation") if s not in splits]
        if not carve:
            return splits
        fractions = {"test": self.test_fraction, "validation": self.validation_fraction}
        sizes = [fraction_size(len(train), fractions[s], f"data.{s}_fraction") for s in carve]
        if sum(sizes) >= len(train):
            raise DataError(f"{train.origin}: {len(train)} rows are too few to carve {carve} from; "
                            f"set {' / '.join(self.split_setting.format(split=s) for s in carve)} or add rows")
        parts = split_rows(len(train), sizes, self.split_seed)
        splits = dict(splits)
        for split, rows in zip(carve, parts):
            splits[split] = train.select(rows)
        splits["train"] = train.select(parts[-1])
        log.info("data %s: carved %s from %s (seed %d): %s", self.name, carve, train.origin, self.split_seed,
                 {s: len(splits[s]) for s in carve + ["train"]})
        return splits

    def resolve_task(self, splits: dict[str, Examples]) -> tuple[TaskSpec, dict[str, list]]:
        if self.task_kind == REGRESSION:
            return self._task, {s: [as_number(v, ex, i) for i, v in enumerate(ex.labels)] for s, ex in splits.items()}
        names = self.known_label_names()
        if names is not None:
            if self.num_labels is not None and self.num_labels != len(names):
                raise DataError(f"data.num_labels={self.num_labels} but the labels are named {list(names)}; "
                                f"set data.num_labels={len(names)} (or null)")
            ids = {s: [named_id(v, ex, i, names) for i, v in enumerate(ex.labels)] for s, ex in splits.items()}
        else:
            train = splits["train"]
            as_ints = {s: [int_like(v) for v in ex.labels] for s, ex in splits.items()}
            if all(v is not None for v in as_ints["train"]):
                for s, ex in splits.items():
                    for i, v in enumerate(as_ints[s]):
                        if v is None:
                            raise DataError(f"{row_location(ex, i)}: label {ex.labels[i]!r} is not an integer like "
                                            f"the train labels; fix it or set data.label_names")
                num_labels = self.num_labels
                if num_labels is None:
                    num_labels = max(max(v for v in vals) for vals in as_ints.values()) + 1
                    num_labels = max(num_labels, 2)
                    log.info("data %s: integer labels, num_labels=%d inferred from the data", self.name, num_labels)
                names = tuple(str(i) for i in range(num_labels))
                ids = as_ints
            else:
                names = tuple(sorted({str(v) for v in train.labels}))
                if self.num_labels is not None and self.num_labels != len(names):
                    raise DataError(f"data.num_labels={self.num_labels} but {train.origin} has {len(names)} distinct "
                                    f"labels {list(names)}; set data.num_labels={len(names)} or data.label_names")
                if len(names) < 2:
                    raise DataError(f"{train.origin}: a single label {list(names)}; classification needs at least 2")
                log.info("data %s: label ids from the sorted train labels: %s", self.name,
                         {n: i for i, n in enumerate(names)})
                ids = {}
                for s, ex in splits.items():
                    ids[s] = []
                    for i, v in enumerate(ex.labels):
                        if str(v) not in names:
                            raise DataError(f"{row_location(ex, i)}: label {v!r} does not occur in {self.train_source} "
                                            f"(labels: {list(names)}); fix it or set data.label_names")
                        ids[s].append(names.index(str(v)))
        task = TaskSpec(self.name, CLASSIFICATION, len(names), self.metric, tuple(names))
        for s, ex in splits.items():
            check_labels(task, ex, ids[s])
        self._task = task
        return task, ids


def as_text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def int_like(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return int(str(value).strip())
    except ValueError:
        try:
            number = float(str(value).strip())
        except ValueError:
            return None
        return int(number) if number.is_integer() else None


def as_number(value: Any, ex: Examples, i: int) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{row_location(ex, i)}: regression label {value!r} is not a number") from None
    if number != number:  # NaN
        raise DataError(f"{row_location(ex, i)}: regression label {value!r} is not a number")
    return number


def named_id(value: Any, ex: Examples, i: int, names: tuple[str, ...]) -> int:
    if str(value) in names:
        return names.index(str(value))
    number = int_like(value)
    if number is None:
        raise DataError(f"{row_location(ex, i)}: label {value!r} is not in data.label_names {list(names)}; "
                        f"fix the label or add it to data.label_names")
    if not 0 <= number < len(names):
        raise DataError(label_outside_head_message(row_location(ex, i), number, len(names),
                                                   fix="fix the label, or extend data.label_names to cover it"))
    return number
