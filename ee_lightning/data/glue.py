"""GLUE tasks read from a folder in the original GLUE distribution format.

`data_dir` is the GLUE root (holding CoLA/, SST-2/, MRPC/, STS-B/, QQP/, MNLI/, QNLI/, RTE/,
WNLI/) or the task's own folder. Files per split default to train.tsv / dev.tsv / test.tsv
(MNLI: dev_matched.tsv / test_matched.tsv, or the mismatched ones with `mnli_eval: mismatched`).
Official GLUE test files carry no labels: when the test file is absent or unlabelled, dev
becomes the test split and a seeded `validation_fraction` of train becomes validation.

Each task's columns are read exactly as GLUE ships them: by header name where the file has a
header, by position for CoLA (no header: source, label, original_mark, sentence). Files are
read with the csv module, tab-delimited, quoting=csv.QUOTE_NONE (GLUE rows contain stray quotes).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ee_lightning.tasks import CLASSIFICATION, REGRESSION, TaskSpec
from ee_lightning.data.base import (DataError, Examples, TextDataModule, file_identity, fraction_size, label_outside_head_message,
                   split_rows)
from ee_lightning.data.sources import read_delimited

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str
    text: str  # header name, or position (as a str of an int) for headerless files
    pair: str | None
    label: str
    metric: str
    kind: str = CLASSIFICATION
    label_names: tuple[str, ...] = ()
    label_values: tuple[str, ...] = ()  # the strings the files use for each label id
    header: bool = True
    num_fields: int | None = None  # headerless files: the exact field count

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == REGRESSION else len(self.label_names)

    def spec(self) -> TaskSpec:
        return TaskSpec(self.name, self.kind, self.num_labels, self.metric, self.label_names)


GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", "CoLA", "3", None, "1", "mcc", label_names=("unacceptable", "acceptable"),
             label_values=("0", "1"), header=False, num_fields=4),
    GlueTask("sst2", "SST-2", "sentence", None, "label", "acc", label_names=("negative", "positive"),
             label_values=("0", "1")),
    GlueTask("mrpc", "MRPC", "#1 String", "#2 String", "Quality", "f1",
             label_names=("not_equivalent", "equivalent"), label_values=("0", "1")),
    GlueTask("stsb", "STS-B", "sentence1", "sentence2", "score", "pearson_spearman", kind=REGRESSION),
    GlueTask("qqp", "QQP", "question1", "question2", "is_duplicate", "f1",
             label_names=("not_duplicate", "duplicate"), label_values=("0", "1")),
    GlueTask("mnli", "MNLI", "sentence1", "sentence2", "gold_label", "acc",
             label_names=("contradiction", "entailment", "neutral"),
             label_values=("contradiction", "entailment", "neutral")),
    GlueTask("qnli", "QNLI", "question", "sentence", "label", "acc",
             label_names=("entailment", "not_entailment"), label_values=("entailment", "not_entailment")),
    GlueTask("rte", "RTE", "sentence1", "sentence2", "label", "acc",
             label_names=("entailment", "not_entailment"), label_values=("entailment", "not_entailment")),
    GlueTask("wnli", "WNLI", "sentence1", "sentence2", "label", "acc",
             label_names=("not_entailment", "entailment"), label_values=("0", "1")),
)}

MNLI_EVAL = ("matched", "mismatched")  # which MNLI validation and test split to use


def glue_task(task: str | None) -> GlueTask:
    key = str(task or "").lower().replace("-", "").replace("_", "")
    aliases = {"sst": "sst2", "sts": "stsb", "mnlim": "mnli", "mnlimm": "mnli"}
    key = aliases.get(key, key)
    if key not in GLUE_TASKS:
        raise DataError(f"unknown GLUE task {task!r}; set data.task to one of: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


class GlueDataModule(TextDataModule):
    option = "glue"

    def __init__(self, tokenizer, task: str = "sst2", data_dir: str | None = None, max_length: int | None = None,
                 batch_size: int = 32, eval_batch_size: int = 128, num_workers: int = 0, cache_dir: str | None = None,
                 max_train_samples: int | None = None, max_eval_samples: int | None = None, split_seed: int = 1234,
                 train_file: str | None = None, validation_file: str | None = None, test_file: str | None = None,
                 mnli_eval: str = "matched", validation_fraction: float = 0.1, skip_malformed: bool = False,
                 name: str | None = None, bucket_by_length: bool = True):
        self.glue = glue_task(task)
        if max_length is None:  # pair tasks need room for two texts
            max_length = 128 if self.glue.pair else 64
        super().__init__(tokenizer, max_length=max_length, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, cache_dir=cache_dir, max_train_samples=max_train_samples,
                         max_eval_samples=max_eval_samples, split_seed=split_seed, bucket_by_length=bucket_by_length,
                         name=f"glue_{self.glue.name}" if name in (None, "glue") else name)
        if mnli_eval not in MNLI_EVAL:
            raise DataError(f"data.mnli_eval={mnli_eval!r}: use 'matched' or 'mismatched'")
        self.mnli_eval = mnli_eval
        self.validation_fraction = float(validation_fraction)
        fraction_size(100, self.validation_fraction, "data.validation_fraction")
        self.skip_malformed = bool(skip_malformed)
        suffix = f"_{mnli_eval}" if self.glue.name == "mnli" else ""
        self.task_dir = self.find_task_dir(data_dir, train_file or "train.tsv")
        self.files = {
            "train": self.task_dir / (train_file or "train.tsv"),
            "validation": self.task_dir / (validation_file or f"dev{suffix}.tsv"),
            "test": self.task_dir / (test_file or f"test{suffix}.tsv"),
        }
        for split, key in (("train", "train_file"), ("validation", "validation_file")):
            if not self.files[split].is_file():
                raise DataError(f"GLUE {self.glue.name}: the {split} file {self.files[split]} does not exist; "
                                f"put it there or set data.{key}=NAME (a file in {self.task_dir})")
        self._task = self.glue.spec()

    def find_task_dir(self, data_dir: str | None, train_name: str) -> Path:
        if not data_dir:
            raise DataError(
                f"GLUE {self.glue.name}: data.data_dir is not set; set data.data_dir=DIR to the GLUE root "
                f"(holding {self.glue.folder}/) or to the {self.glue.folder} folder itself"
            )
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"GLUE {self.glue.name}: data.data_dir={data_dir} does not exist or is not a directory; "
                            f"set data.data_dir to the GLUE root (holding {self.glue.folder}/) or to the task folder")
        for candidate in (self.glue.folder, self.glue.name, self.glue.folder.lower(), self.glue.folder.replace("-", "")):
            if (root / candidate).is_dir():
                return root / candidate
        if (root / train_name).is_file():
            return root
        raise DataError(
            f"GLUE {self.glue.name}: data.data_dir={data_dir} holds neither a {self.glue.folder}/ folder nor "
            f"{train_name}; point data.data_dir at the GLUE root or at the {self.glue.folder} folder"
        )

    def data_identity(self) -> dict:
        files = {split: file_identity(path) for split, path in self.files.items() if path.is_file()}
        return {"dataset": "glue", "task": self.glue.name, "mnli_eval": self.mnli_eval, "files": files,
                "skip_malformed": self.skip_malformed}

    def split_settings(self) -> dict:
        return {"validation_fraction": self.validation_fraction}

    # ---- reading

    def test_is_labelled(self) -> bool:
        path = self.files["test"]
        if not path.is_file():
            return False
        for _, fields in read_delimited(path, "\t", quote_none=True):
            if self.glue.header:
                return self.glue.label in [f.strip() for f in fields]
            return len(fields) == self.glue.num_fields and fields[1].strip() in self.glue.label_values
        return False

    def read_split(self, path: Path) -> Examples:
        g = self.glue
        rows = read_delimited(path, "\t", quote_none=True)
        if g.header:
            try:
                _, header = next(rows)
            except StopIteration:
                raise DataError(f"{path}: the file is empty; GLUE {g.name} files start with a header line") from None
            header = [h.strip() for h in header]
            need = [c for c in (g.text, g.pair, g.label) if c]
            missing = [c for c in need if c not in header]
            if missing:
                raise DataError(f"{path}, line 1: header {header} lacks column(s) {missing}; a GLUE {g.name} file "
                                f"needs {need} (is data.task={g.name} the right task for this folder?)")
            n_fields = len(header)
            text_i, label_i = header.index(g.text), header.index(g.label)
            pair_i = header.index(g.pair) if g.pair else None
        else:
            n_fields, text_i, label_i, pair_i = g.num_fields, int(g.text), int(g.label), None
        texts, pairs, labels, lines, skipped = [], [] if g.pair else None, [], [], 0
        for line, fields in rows:
            try:
                if len(fields) != n_fields:
                    raise DataError(f"{path}, line {line}: expected {n_fields} tab-separated fields "
                                    f"(GLUE {g.name} format), found {len(fields)}")
                text = fields[text_i].strip()
                pair = fields[pair_i].strip() if pair_i is not None else None
                if not text or (pair_i is not None and not pair):
                    raise DataError(f"{path}, line {line}: empty text")
                label = self.parse_label(fields[label_i].strip(), path, line)
            except DataError as err:
                if not self.skip_malformed:
                    raise DataError(f"{err} (set data.skip_malformed=true to skip such rows)") from None
                skipped += 1
                if skipped <= 5:
                    log.warning("skipping malformed row: %s", err)
                continue
            texts.append(text)
            labels.append(label)
            lines.append(line)
            if pairs is not None:
                pairs.append(pair)
        if skipped:
            log.warning("%s: skipped %d malformed row(s)", path, skipped)
        return Examples(texts, labels, pairs, origin=str(path), lines=lines)

    def parse_label(self, value: str, path: Path, line: int):
        g = self.glue
        if g.kind == REGRESSION:
            try:
                return float(value)
            except ValueError:
                raise DataError(f"{path}, line {line}: regression label {value!r} is not a number") from None
        if value in g.label_values:
            return g.label_values.index(value)
        try:
            number = int(value)
        except ValueError:
            raise DataError(f"{path}, line {line}: label {value!r} is not one of GLUE {g.name}'s labels "
                            f"{list(g.label_values)}") from None
        if g.label_values[0].isdigit():  # an integer label the head cannot hold
            raise DataError(label_outside_head_message(
                f"{path}, line {line}", number, g.num_labels,
                fix=f"GLUE {g.name} labels are {list(g.label_values)}: fix the label, or load the file with "
                    "data=csv and set data.num_labels / data.label_names"))
        raise DataError(f"{path}, line {line}: label {value!r} is not one of GLUE {g.name}'s labels "
                        f"{list(g.label_values)}")

    def load_splits(self) -> dict[str, Examples]:
        train = self.read_split(self.files["train"])
        dev = self.read_split(self.files["validation"])
        if self.test_is_labelled():
            test = self.read_split(self.files["test"])
            log.info("GLUE %s: train %s (%d), validation %s (%d), test %s (%d)", self.glue.name,
                     self.files["train"].name, len(train), self.files["validation"].name, len(dev),
                     self.files["test"].name, len(test))
            return {"train": train, "validation": dev, "test": test}
        why = "is absent" if not self.files["test"].is_file() else "has no labels (official GLUE test set)"
        size = fraction_size(len(train), self.validation_fraction, "data.validation_fraction")
        if size >= len(train):
            raise DataError(f"{self.files['train']}: {len(train)} rows are too few to carve a validation split")
        val_rows, train_rows = split_rows(len(train), [size], self.split_seed)
        log.info("GLUE %s: %s %s, so %s (%d rows) is the test split and a seeded %.0f%% of %s (%d of %d rows) "
                 "is the validation split", self.glue.name, self.files["test"].name, why,
                 self.files["validation"].name, len(dev), 100 * self.validation_fraction,
                 self.files["train"].name, size, len(train))
        return {"train": train.select(train_rows), "validation": train.select(val_rows), "test": dev}
