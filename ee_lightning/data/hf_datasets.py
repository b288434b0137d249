"""Any dataset the Hugging Face `datasets` library can load, by `data.path`:

* a folder written by `save_to_disk` (a DatasetDict, or one Dataset, which is then the train
  split) is opened with `load_from_disk`;
* a builder name, `csv`, `json` (also .jsonl) or `parquet`, with `data.data_files`: a path or
  glob, a list of them, or a mapping split -> path(s);
* any other existing folder is opened with `load_dataset(folder)` (a folder of data files);
* anything else is a dataset name on the Hugging Face Hub (with `data.config_name`,
  `data.revision`). Offline (`HF_DATASETS_OFFLINE=1` or `HF_HUB_OFFLINE=1`) only what the
  datasets cache already holds loads.

`train_split`, `validation_split` and `test_split` name the dataset's splits; a null
validation / test split is carved from train with the split seed. Columns, task kinds, labels
and metrics are those of `columns.ColumnDataModule`; a `ClassLabel` label column brings its
own label names (unless `data.label_names` is set), and its -1 (an unlabelled row, as in the
official GLUE test sets) is an error naming the split.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import sys
from pathlib import Path

from ee_lightning.data.base import DataError, Examples, file_identity
from ee_lightning.data.columns import ColumnDataModule, as_text
from ee_lightning.tasks import CLASSIFICATION, REGRESSION

log = logging.getLogger(__name__)

BUILDERS = ("csv", "json", "parquet")
SPLIT_KEYS = {"train": "train_split", "validation": "validation_split", "test": "test_split"}
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes at a folder's top


class HfDataModule(ColumnDataModule):
    option = "hf"
    split_setting = "data.{split}_split"

    def __init__(self, tokenizer, path: str | None = None, config_name: str | None = None,
                 data_files: str | list | dict | None = None, revision: str | None = None,
                 hf_cache_dir: str | None = None, train_split: str = "train",
                 validation_split: str | None = "validation", test_split: str | None = "test",
                 text_column: str = "text", text_pair_column: str | None = None, label_column: str = "label",
                 task_kind: str = CLASSIFICATION, label_names: list | None = None, num_labels: int | None = None,
                 metric: str | None = None, max_length: int = 128, batch_size: int = 32, eval_batch_size: int = 128,
                 num_workers: int = 0, cache_dir: str | None = None, max_train_samples: int | None = None,
                 max_eval_samples: int | None = None, split_seed: int = 1234, validation_fraction: float = 0.1,
                 test_fraction: float = 0.1, name: str | None = None, bucket_by_length: bool = True):
        super().__init__(tokenizer, text_column=text_column, text_pair_column=text_pair_column,
                         label_column=label_column, task_kind=task_kind, label_names=label_names,
                         num_labels=num_labels, metric=metric, validation_fraction=validation_fraction,
                         test_fraction=test_fraction, max_length=max_length, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, cache_dir=cache_dir,
                         max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
                         split_seed=split_seed, name=name, bucket_by_length=bucket_by_length)
        if not path:
            raise DataError("data option hf: data.path is not set; set it to a folder written by save_to_disk, "
                            f"to a builder ({', '.join(BUILDERS)}) with data.data_files=FILE(S), or to a "
                            "dataset name on the Hugging Face Hub")
        if not train_split:
            raise DataError("data.train_split is not set; name the dataset's training split (usually 'train')")
        self.path = str(path)
        self.config_name = config_name
        self.data_files = data_files
        self.revision = revision
        self.hf_cache_dir = str(Path(hf_cache_dir).expanduser()) if hf_cache_dir else None
        self.split_names = {"train": str(train_split), "validation": validation_split, "test": test_split}
        self.kind = self._kind()
        self.class_label_names: tuple[str, ...] | None = None  # a ClassLabel column's names, once read

    # ---- what data.path names

    def _kind(self) -> str:
        """'disk' (save_to_disk folder), 'builder' (csv/json/parquet files), 'folder' or 'hub'."""
        if self.path in BUILDERS:
            if not self.data_files:
                raise DataError(f"data.path={self.path} is a file builder: set data.data_files to the file(s) "
                                "(a path or glob, a list, or {train: ..., validation: ..., test: ...})")
            for pattern in self._data_file_patterns():
                if "://" not in pattern and not glob.glob(str(Path(pattern).expanduser())):
                    raise DataError(f"data.data_files: {pattern} matches no file; set data.data_files to existing "
                                    f"{self.path} file(s)")
            return "builder"
        local = Path(self.path).expanduser()
        if local.is_dir():
            return "disk" if any((local / marker).is_file() for marker in SAVED_MARKERS) else "folder"
        if local.exists():
            raise DataError(f"data.path={self.path} is a file; set data.path={_builder_for(local)} and "
                            f"data.data_files={self.path}")
        if self.path.startswith(("/", "./", "../", "~")) or self.path.count("/") > 1:
            raise DataError(f"data.path={self.path}: no such folder; set data.path to a folder written by "
                            "save_to_disk, a builder with data.data_files, or a Hugging Face Hub dataset name")
        return "hub"

    def _data_file_patterns(self) -> list[str]:
        files = self.data_files
        if isinstance(files, dict):
            files = [f for value in files.values() for f in ([value] if isinstance(value, str) else value)]
        elif isinstance(files, str):
            files = [files]
        return [str(f) for f in files]

    def data_identity(self) -> dict:
        identity = {"dataset": "hf", "kind": self.kind, "path": self.path, "config_name": self.config_name,
                    "revision": self.revision, "data_files": self.data_files, "splits": self.split_names,
                    **self.column_identity()}
        if self.kind in ("disk", "folder"):
            folder = Path(self.path).expanduser()
            identity["files"] = [file_identity(p) for p in sorted(folder.rglob("*")) if p.is_file()]
        elif self.kind == "builder":
            identity["files"] = [file_identity(p) for pattern in self._data_file_patterns() if "://" not in pattern
                                 for p in sorted(glob.glob(str(Path(pattern).expanduser())))]
        # a hub dataset is named by path, config and revision: pin data.revision to freeze it
        return identity

    def split_settings(self) -> dict:
        return {"validation_fraction": self.validation_fraction if self.split_names["validation"] is None else None,
                "test_fraction": self.test_fraction if self.split_names["test"] is None else None}

    def known_label_names(self) -> tuple[str, ...] | None:
        return self.label_names_cfg or self.class_label_names

    # ---- loading

    def load_dataset_dict(self) -> dict:
        """The dataset's splits: name -> datasets.Dataset."""
        import datasets

        with _progress_bars(sys.stderr.isatty()):
            try:
                if self.kind == "disk":
                    loaded = datasets.load_from_disk(str(Path(self.path).expanduser()))
                elif self.kind == "builder":
                    loaded = datasets.load_dataset(self.path, data_files=self.data_files, cache_dir=self.hf_cache_dir)
                else:
                    loaded = datasets.load_dataset(str(Path(self.path).expanduser()) if self.kind == "folder"
                                                   else self.path, name=self.config_name, data_files=self.data_files,
                                                   revision=self.revision, cache_dir=self.hf_cache_dir)
            except DataError:
                raise
            except Exception as err:
                raise DataError(self._load_error(err)) from err
        if isinstance(loaded, datasets.Dataset):  # one saved Dataset: its rows are the train split
            return {self.split_names["train"]: loaded}
        return dict(loaded)

    def _load_error(self, err: Exception) -> str:
        import datasets

        what = f"data.path={self.path}" + (f" (config {self.config_name})" if self.config_name else "")
        if self.kind == "hub" and isinstance(err, (ConnectionError, FileNotFoundError)):
            if datasets.config.HF_HUB_OFFLINE:
                return (f"{what}: offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set) and the dataset is not in the "
                        f"datasets cache ({self.hf_cache_dir or datasets.config.HF_DATASETS_CACHE}). Load it once on a "
                        "machine that is online, or save it there with save_to_disk and set data.path=FOLDER")
            return (f"{what}: the Hugging Face Hub did not answer ({err}). On a machine without network, save the "
                    "dataset with save_to_disk elsewhere and set data.path=FOLDER (or HF_DATASETS_OFFLINE=1 to use "
                    "the datasets cache)")
        if self.kind == "hub" and "config" in str(err).lower():
            return f"{what}: {err}. Set data.config_name to one of the dataset's configs"
        return f"{what}: the datasets library could not load it: {type(err).__name__}: {err}"

    def load_splits(self) -> dict[str, Examples]:
        loaded = self.load_dataset_dict()
        available = sorted(loaded)
        splits = {}
        for split, key in SPLIT_KEYS.items():
            chosen = self.split_names[split]
            if chosen is None:
                continue
            if chosen not in loaded:
                fix = "" if split == "train" else f", or data.{key}=null to carve it from train"
                raise DataError(f"data.path={self.path} has no split {chosen!r} (its splits: {available}); "
                                f"set data.{key} to one of them{fix}")
            splits[split] = self.read_split(loaded[chosen], chosen)
        return self.carve_missing(splits)

    def read_split(self, dataset, split_name: str) -> Examples:
        from datasets import ClassLabel, Value

        origin = f"{self.path} [{split_name}]"
        settings = self.column_settings()
        for column, setting in settings.items():
            if column not in dataset.column_names:
                raise DataError(f"{origin}: no column {column!r} (columns: {dataset.column_names}); "
                                f"set data.{setting} to one of them")
        for column in filter(None, (self.text_column, self.text_pair_column)):
            feature = dataset.features[column]
            if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
                raise DataError(f"{origin}: column {column!r} holds {feature}, not text; set "
                                f"data.{settings[column]} to a text column")
        label_feature = dataset.features[self.label_column]
        columns = dataset.select_columns(list(settings)).to_dict()
        labels = columns[self.label_column]
        if isinstance(label_feature, ClassLabel):
            if self.task_kind == REGRESSION:
                raise DataError(f"{origin}: label column {self.label_column!r} holds class labels "
                                f"{label_feature.names}; set data.task_kind={CLASSIFICATION}")
            if self.class_label_names is None:
                self.class_label_names = tuple(label_feature.names)
            unlabelled = [i for i, label in enumerate(labels) if label is None or label < 0]
            if unlabelled:
                everything = " (every row: an unlabelled split, as the official GLUE test sets)" \
                    if len(unlabelled) == len(labels) else ""
                raise DataError(f"{origin}, row {unlabelled[0] + 1}: no label (-1) in {len(unlabelled)} row(s)"
                                f"{everything}; name a labelled split instead, e.g. data.test_split=validation "
                                "data.validation_split=null")
            labels = [label_feature.int2str(label) for label in labels]
        texts = [as_text(t) for t in columns[self.text_column]]
        pairs = [as_text(t) for t in columns[self.text_pair_column]] if self.text_pair_column else None
        for column, values in ((self.text_column, texts), (self.text_pair_column, pairs)):
            if values is not None and "" in values:
                raise DataError(f"{origin}, row {values.index('') + 1}: empty text in column {column!r}")
        for i, label in enumerate(labels):
            if label is None or (isinstance(label, str) and not label.strip()):
                raise DataError(f"{origin}, row {i + 1}: empty label in column {self.label_column!r}")
        labels = [label.strip() if isinstance(label, str) else label for label in labels]
        if not texts:
            raise DataError(f"{origin} has no rows")
        # rows numbered from 1 as `lines`, so that messages about a carved subset still name the source row
        return Examples(texts, labels, pairs, origin=origin, lines=list(range(1, len(texts) + 1)))


def _builder_for(path: Path) -> str:
    suffixes = "".join(path.suffixes).lower()
    if ".parquet" in suffixes:
        return "parquet"
    if ".json" in suffixes:
        return "json"
    return "csv"


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """datasets' own progress bars only on a terminal; restored afterwards."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    if enabled:
        ds_logging.enable_progress_bar()
    else:
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        (ds_logging.enable_progress_bar if was_enabled else ds_logging.disable_progress_bar)()
