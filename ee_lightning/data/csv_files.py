"""Any local .csv / .tsv / .jsonl file(s) (optionally .gz/.bz2 compressed).

`train_file` is required; `validation_file` and `test_file` are optional, and a missing one is
carved from train with the split seed (`validation_fraction`, `test_fraction`). Columns are
named by `text_column`, `text_pair_column` (optional) and `label_column`; csv/tsv files need a
header line. Labels:

* `task_kind: regression`: numbers (float);
* classification with `label_names`: a label is one of the names (its position is the id) or
  an integer id;
* classification without `label_names`: integers are ids (num_labels = the given one, or the
  largest id + 1); otherwise the distinct strings of the train file, sorted, are the label
  names (the mapping is logged).

The task is available at construction when `task_kind: regression` or `label_names` is set,
otherwise after `prepare_data()` + `setup()`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ee_lightning.tasks import CLASSIFICATION, REGRESSION, TaskSpec
from ee_lightning.data.base import (DataError, Examples, TextDataModule, check_labels, file_identity, fraction_size,
                   label_outside_head_message, row_location, split_rows, validate_metric)
from ee_lightning.data.sources import file_format, read_delimited, read_jsonl

log = logging.getLogger(__name__)

FILE_KEYS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}


class CsvDataModule(TextDataModule):
    option = "csv"

    def __init__(self, tokenizer, train_file: str | None = None, validation_file: str | None = None,
                 test_file: str | None = None, text_column: str = "text", text_pair_column: str | None = None,
                 label_column: str = "label", task_kind: str = CLASSIFICATION, label_names: list | None = None,
                 num_labels: int | None = None, metric: str | None = None, max_length: int = 128,
                 batch_size: int = 32, eval_batch_size: int = 128, num_workers: int = 0, cache_dir: str | None = None,
                 max_train_samples: int | None = None, max_eval_samples: int | None = None, split_seed: int = 1234,
                 validation_fraction: float = 0.1, test_fraction: float = 0.1, tsv_quote_none: bool = True,
                 name: str | None = None, bucket_by_length: bool = True):
        super().__init__(tokenizer, max_length=max_length, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, cache_dir=cache_dir, max_train_samples=max_train_samples,
                         max_eval_samples=max_eval_samples, split_seed=split_seed, name=name,
                         bucket_by_length=bucket_by_length)
        if not train_file:
            raise DataError("data option csv: data.train_file is not set; set data.train_file=PATH to a "
                            ".csv, .tsv or .jsonl file (validation_file/test_file are optional)")
        self.files: dict[str, Path | None] = {}
        for split, key in FILE_KEYS.items():
            value = {"train": train_file, "validation": validation_file, "test": test_file}[split]
            if not value:
                self.files[split] = None
                continue
            path = Path(value).expanduser()
            if not path.is_file():
                raise DataError(f"data.{key}={value}: the file does not exist; set data.{key} to an existing "
                                f"file{'' if split == 'train' else ' (or to null to carve it from train)'}")
            file_format(path)  # unknown extension -> error now
            self.files[split] = path
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
        self.tsv_quote_none = bool(tsv_quote_none)
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
                self._task = TaskSpec(self.name, CLASSIFICATION, len(self.label_names_cfg), self.metric, self.label_names_cfg)

    # the `label_names` setting is kept as label_names_cfg; `label_names` (base) is the task's names

    def data_identity(self) -> dict:
        return {"dataset": "csv", "files": {s: file_identity(p) if p else None for s, p in self.files.items()},
                "columns": [self.text_column, self.text_pair_column, self.label_column],
                "task_kind": self.task_kind, "label_names": self.label_names_cfg, "num_labels": self.num_labels,
                "metric": self.metric, "tsv_quote_none": self.tsv_quote_none, "name": self.name}

    def split_settings(self) -> dict:
        return {"validation_fraction": self.validation_fraction if self.files["validation"] is None else None,
                "test_fraction": self.test_fraction if self.files["test"] is None else None}

    # ---- reading

    def read_file(self, path: Path, key: str) -> Examples:
        fmt = file_format(path)
        columns = [c for c in (self.text_column, self.text_pair_column, self.label_column) if c]
        setting = {self.text_column: "text_column", self.text_pair_column: "text_pair_column",
                   self.label_column: "label_column"}
        texts, pairs, labels, lines = [], [] if self.text_pair_column else None, [], []
        if fmt == "jsonl":
            rows = ((line, row) for line, row in read_jsonl(path))
        else:
            reader = read_delimited(path, "," if fmt == "csv" else "\t", quote_none=fmt == "tsv" and self.tsv_quote_none)
            try:
                header_line, header = next(reader)
            except StopIteration:
                raise DataError(f"data.{key}={path}: the file is empty; it needs a header line naming "
                                f"its columns ({columns})") from None
            header = [h.strip() for h in header]
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataError(f"{path}, line {header_line}: no column {missing[0]!r} in the header {header}; set "
                                f"data.{setting[missing[0]]} to one of the columns (csv/tsv files need a header line)")

            def as_dicts():
                for line, fields in reader:
                    if len(fields) != len(header):
                        raise DataError(f"{path}, line {line}: expected {len(header)} fields (as in the header), "
                                        f"found {len(fields)}")
                    yield line, dict(zip(header, fields))

            rows = as_dicts()
        for line, row in rows:
            for col in columns:
                if col not in row:
                    raise DataError(f"{path}, line {line}: no {col!r} field; set data.{setting[col]} to the "
                                    f"right key (this row has {sorted(row)})")
            text = _text(row[self.text_column])
            if not text:
                raise DataError(f"{path}, line {line}: empty text in column {self.text_column!r}")
            if self.text_pair_column:
                pair = _text(row[self.text_pair_column])
                if not pair:
                    raise DataError(f"{path}, line {line}: empty text in column {self.text_pair_column!r}")
                pairs.append(pair)
            label = row[self.label_column]
            if label is None or (isinstance(label, str) and not label.strip()):
                raise DataError(f"{path}, line {line}: empty label in column {self.label_column!r}")
            texts.append(text)
            labels.append(label.strip() if isinstance(label, str) else label)
            lines.append(line)
        if not texts:
            raise DataError(f"data.{key}={path} has no rows")
        return Examples(texts, labels, pairs, origin=str(path), lines=lines)

    def load_splits(self) -> dict[str, Examples]:
        train = self.read_file(self.files["train"], "train_file")
        splits = {"train": train}
        for split in ("validation", "test"):
            if self.files[split] is not None:
                splits[split] = self.read_file(self.files[split], FILE_KEYS[split])
        carve = [s for s in ("test", "validation") if s not in splits]
        if carve:
            fractions = {"test": self.test_fraction, "validation": self.validation_fraction}
            sizes = [fraction_size(len(train), fractions[s], f"data.{s}_fraction") for s in carve]
            if sum(sizes) >= len(train):
                raise DataError(f"{train.origin}: {len(train)} rows are too few to carve {carve} from; "
                                f"add data.validation_file/test_file or more rows")
            parts = split_rows(len(train), sizes, self.split_seed)
            for split, rows in zip(carve, parts):
                splits[split] = train.select(rows)
            splits["train"] = train.select(parts[-1])
            log.info("data %s: carved %s from %s (seed %d): %s", self.name, carve, train.origin, self.split_seed,
                     {s: len(splits[s]) for s in carve + ["train"]})
        return splits

    def resolve_task(self, splits: dict[str, Examples]) -> tuple[TaskSpec, dict[str, list]]:
        if self.task_kind == REGRESSION:
            return self._task, {s: [_number(v, ex, i) for i, v in enumerate(ex.labels)] for s, ex in splits.items()}
        if self.label_names_cfg is not None:
            task = self._task
            ids = {s: [_named_id(v, ex, i, self.label_names_cfg) for i, v in enumerate(ex.labels)]
                   for s, ex in splits.items()}
        else:
            train = splits["train"]
            as_ints = {s: [_int_like(v) for v in ex.labels] for s, ex in splits.items()}
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
                            raise DataError(f"{row_location(ex, i)}: label {v!r} does not occur in the train file "
                                            f"(labels: {list(names)}); fix it or set data.label_names")
                        ids[s].append(names.index(str(v)))
            task = TaskSpec(self.name, CLASSIFICATION, len(names), self.metric, names)
        for s, ex in splits.items():
            check_labels(task, ex, ids[s])
        self._task = task
        return task, ids


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _int_like(value: Any) -> int | None:
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


def _number(value: Any, ex: Examples, i: int) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{row_location(ex, i)}: regression label {value!r} is not a number") from None
    if number != number:  # NaN
        raise DataError(f"{row_location(ex, i)}: regression label {value!r} is not a number")
    return number


def _named_id(value: Any, ex: Examples, i: int, names: tuple[str, ...]) -> int:
    if str(value) in names:
        return names.index(str(value))
    number = _int_like(value)
    if number is None:
        raise DataError(f"{row_location(ex, i)}: label {value!r} is not in data.label_names {list(names)}; "
                        f"fix the label or add it to data.label_names")
    if not 0 <= number < len(names):
        raise DataError(label_outside_head_message(row_location(ex, i), number, len(names),
                                                   fix="fix the label, or extend data.label_names to cover it"))
    return number
