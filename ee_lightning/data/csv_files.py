"""Any local .csv / .tsv / .jsonl file(s) (optionally .gz/.bz2 compressed).

`train_file` is required; `validation_file` and `test_file` are optional, and a missing one is
carved from train with the split seed (`validation_fraction`, `test_fraction`). Columns are
named by `text_column`, `text_pair_column` (optional) and `label_column`; csv/tsv files need a
header line. Labels as in `columns.ColumnDataModule`.

The task is available at construction when `task_kind: regression` or `label_names` is set,
otherwise after `prepare_data()` + `setup()`.
"""
from __future__ import annotations

from pathlib import Path

from ee_lightning.data.base import DataError, Examples, file_identity
from ee_lightning.data.columns import ColumnDataModule, as_text
from ee_lightning.data.sources import file_format, read_delimited, read_jsonl
from ee_lightning.tasks import CLASSIFICATION

FILE_KEYS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}


class CsvDataModule(ColumnDataModule):
    option = "csv"
    train_source = "the train file"
    split_setting = "data.{split}_file"

    def __init__(self, tokenizer, train_file: str | None = None, validation_file: str | None = None,
                 test_file: str | None = None, text_column: str = "text", text_pair_column: str | None = None,
                 label_column: str = "label", task_kind: str = CLASSIFICATION, label_names: list | None = None,
                 num_labels: int | None = None, metric: str | None = None, max_length: int = 128,
                 batch_size: int = 32, eval_batch_size: int = 128, num_workers: int = 0, cache_dir: str | None = None,
                 max_train_samples: int | None = None, max_eval_samples: int | None = None, split_seed: int = 1234,
                 validation_fraction: float = 0.1, test_fraction: float = 0.1, tsv_quote_none: bool = True,
                 name: str | None = None, bucket_by_length: bool = True):
        super().__init__(tokenizer, text_column=text_column, text_pair_column=text_pair_column,
                         label_column=label_column, task_kind=task_kind, label_names=label_names,
                         num_labels=num_labels, metric=metric, validation_fraction=validation_fraction,
                         test_fraction=test_fraction, max_length=max_length, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, cache_dir=cache_dir,
                         max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
                         split_seed=split_seed, name=name, bucket_by_length=bucket_by_length)
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
        self.tsv_quote_none = bool(tsv_quote_none)

    def data_identity(self) -> dict:
        return {"dataset": "csv", "files": {s: file_identity(p) if p else None for s, p in self.files.items()},
                **self.column_identity(), "tsv_quote_none": self.tsv_quote_none}

    def split_settings(self) -> dict:
        return {"validation_fraction": self.validation_fraction if self.files["validation"] is None else None,
                "test_fraction": self.test_fraction if self.files["test"] is None else None}

    # ---- reading

    def read_file(self, path: Path, key: str) -> Examples:
        fmt = file_format(path)
        columns = [c for c in (self.text_column, self.text_pair_column, self.label_column) if c]
        setting = self.column_settings()
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
            text = as_text(row[self.text_column])
            if not text:
                raise DataError(f"{path}, line {line}: empty text in column {self.text_column!r}")
            if self.text_pair_column:
                pair = as_text(row[self.text_pair_column])
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
        splits = {"train": self.read_file(self.files["train"], "train_file")}
        for split in ("validation", "test"):
            if self.files[split] is not None:
                splits[split] = self.read_file(self.files[split], FILE_KEYS[split])
        return self.carve_missing(splits)
