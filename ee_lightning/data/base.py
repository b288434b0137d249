"""The shared data layer: tokenize once, cache on disk, serve dynamically padded batches.

A data option subclasses `TextDataModule` and implements two hooks:

* `data_identity()` -> a JSON-able dict naming the data exactly (dataset name and version,
  pinned checksums, or file paths with sizes and mtimes) without reading it;
* `load_splits()` -> `{"train": Examples, "validation": Examples, "test": Examples}`, the raw
  text and labels of the three full splits (before any `max_*_samples` subsetting).

Everything else lives here: the cache key (a hash of the data identity, the split settings,
the subset sizes, the tokenizer and `max_length`), seeded subsetting, tokenization, atomic
cache writes, loading, and the dataloaders. Batches are dicts of tensors:
`input_ids`, `attention_mask`, `token_type_ids` (only when the tokenizer produces them),
`labels` (long for classification, float for regression) and `idx` (long: the row's position
within its split as served, 0..split_size-1, the same on every run with the same config).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
import torch
from torch.utils.data import DataLoader, Dataset

from ee_lightning.files import atomic_torch_save
from ee_lightning.data.batching import LengthGroupedBatches
from ee_lightning.data.resumable import EpochShuffle, ResumableLoader
from ee_lightning.tasks import METRICS, REGRESSION, TaskSpec

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
                 "dev": "validation", "test": "test"}
CACHE_FORMAT = 1
DEFAULT_CACHE_DIR = "~/.cache/ee_lightning/data"
TOKENIZE_CHUNK = 2048


class DataError(ValueError):
    """A data config, file or row that cannot be used; the message says what is wrong and how to fix it."""


@dataclass
class Examples:
    """Raw rows of one split: texts, optional second texts, labels, and each row's index in its source."""

    texts: list[str]
    labels: list[Any]
    pairs: list[str] | None = None
    source_index: list[int] | None = None
    origin: str = ""  # where the rows came from (a file path), for messages
    lines: list[int] | None = None  # 1-based line of each row in `origin`, for messages

    def __post_init__(self):
        if self.source_index is None:
            self.source_index = list(range(len(self.texts)))
        if len(self.labels) != len(self.texts) or (self.pairs is not None and len(self.pairs) != len(self.texts)):
            raise ValueError("texts, pairs and labels must have the same length")

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, rows: Sequence[int], origin: str | None = None) -> "Examples":
        return Examples(
            texts=[self.texts[i] for i in rows],
            labels=[self.labels[i] for i in rows],
            pairs=None if self.pairs is None else [self.pairs[i] for i in rows],
            source_index=[self.source_index[i] for i in rows],
            origin=self.origin if origin is None else origin,
            lines=None if self.lines is None else [self.lines[i] for i in rows],
        )


# ----------------------------------------------------------------------------- helpers


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_identity(path: str | Path) -> dict:
    """Path, size and mtime: enough to notice that a local data file changed."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def tokenizer_identity(tokenizer) -> dict:
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "do_lower_case": getattr(tokenizer, "do_lower_case", None),
        "model_input_names": list(getattr(tokenizer, "model_input_names", [])),
    }


def seeded_permutation(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def split_rows(n: int, sizes: Sequence[int], seed: int, strata: Sequence[Any] | None = None) -> list[list[int]]:
    """Seeded disjoint index sets of the given sizes plus a last set with the rest; each set sorted.

    With `strata`, every stratum is split in proportion (sizes are then apportioned per stratum
    by largest remainder, so the totals match `sizes` exactly).
    """
    if sum(sizes) > n:
        raise DataError(f"cannot carve splits of sizes {list(sizes)} from {n} rows")
    if strata is None:
        order = seeded_permutation(n, seed)
        parts, start = [], 0
        for size in sizes:
            parts.append(sorted(order[start:start + size]))
            start += size
        parts.append(sorted(order[start:]))
        return parts
    groups: dict[Any, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    keys = sorted(groups, key=str)
    # apportion each requested size across strata (largest remainder)
    alloc = {k: [0] * len(sizes) for k in keys}
    for j, size in enumerate(sizes):
        quotas = {k: size * len(groups[k]) / n for k in keys}
        floors = {k: int(q) for k, q in quotas.items()}
        left = size - sum(floors.values())
        for k in sorted(keys, key=lambda k: (-(quotas[k] - floors[k]), str(k)))[:left]:
            floors[k] += 1
        for k in keys:
            alloc[k][j] = floors[k]
    parts: list[list[int]] = [[] for _ in range(len(sizes) + 1)]
    for g, k in enumerate(keys):
        members = groups[k]
        order = [members[i] for i in seeded_permutation(len(members), seed + 7919 * (g + 1))]
        start = 0
        for j, size in enumerate(alloc[k]):
            parts[j].extend(order[start:start + size])
            start += size
        parts[-1].extend(order[start:])
    return [sorted(p) for p in parts]


def fraction_size(n: int, fraction: float, what: str) -> int:
    if not 0 < fraction < 1:
        raise DataError(f"{what}={fraction} must be a fraction strictly between 0 and 1")
    return max(1, int(round(n * fraction)))


def encode_texts(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int,
                 with_token_type_ids: bool) -> dict[str, list[list[int]]]:
    """Tokenize (truncating to max_length, no padding); the one place that calls the tokenizer."""
    out: dict[str, list[list[int]]] = {"input_ids": []}
    if with_token_type_ids:
        out["token_type_ids"] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[start:start + TOKENIZE_CHUNK]
        pair_chunk = None if pairs is None else pairs[start:start + TOKENIZE_CHUNK]
        enc = tokenizer(chunk, pair_chunk, truncation=True, max_length=max_length, padding=False,
                        return_attention_mask=False, return_token_type_ids=with_token_type_ids)
        out["input_ids"].extend(enc["input_ids"])
        if with_token_type_ids:
            out["token_type_ids"].extend(enc["token_type_ids"])
    return out


def _flatten(seqs: list[list[int]], dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    flat = torch.tensor([t for s in seqs for t in s], dtype=dtype)
    return flat, offsets


# ----------------------------------------------------------------------------- dataset + collate


class TokenizedSplit(Dataset):
    """One tokenized split, stored as flat token tensors plus offsets."""

    def __init__(self, data: dict):
        self.input_ids: torch.Tensor = data["input_ids"]
        self.offsets: torch.Tensor = data["offsets"]
        self.token_type_ids: torch.Tensor | None = data.get("token_type_ids")
        self.labels: torch.Tensor = data["labels"]
        self.source_index: torch.Tensor = data["source_index"]
        self.texts: list[str] = data.get("texts") or []
        self.pairs: list[str] | None = data.get("pairs")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> dict:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        item = {"input_ids": self.input_ids[start:end], "labels": self.labels[i], "idx": i}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[start:end]
        return item

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


class PadCollator:
    """Pads a list of items to the longest in the batch (picklable, for worker processes)."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side

    def _pad(self, seqs: list[torch.Tensor], value: int, width: int) -> torch.Tensor:
        out = torch.full((len(seqs), width), value, dtype=torch.long)
        for row, seq in enumerate(seqs):
            if self.padding_side == "left":
                out[row, width - len(seq):] = seq
            else:
                out[row, :len(seq)] = seq
        return out

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        ids = [item["input_ids"] for item in items]
        batch = {
            "input_ids": self._pad(ids, self.pad_token_id, width),
            "attention_mask": self._pad([torch.ones(len(s), dtype=torch.long) for s in ids], 0, width),
        }
        if "token_type_ids" in items[0]:
            batch["token_type_ids"] = self._pad([item["token_type_ids"] for item in items], 0, width)
        batch["labels"] = torch.stack([item["labels"] for item in items])
        batch["idx"] = torch.tensor([item["idx"] for item in items], dtype=torch.long)
        return batch


# ----------------------------------------------------------------------------- the datamodule


class TextDataModule(L.LightningDataModule):
    """Base class of every data option (see the module docstring).

    `task` is available right after construction when the config fixes it (rotten_tomatoes,
    bbc_news, glue, and csv with `task_kind: regression` or `label_names`); otherwise (csv whose
    labels must be read to be counted) after `prepare_data()` + `setup()`.
    """

    option = "text"  # the conf/data option name, used in messages and cache file names

    def __init__(self, tokenizer, max_length: int = 128, batch_size: int = 32, eval_batch_size: int = 128,
                 num_workers: int = 0, cache_dir: str | None = DEFAULT_CACHE_DIR,
                 max_train_samples: int | None = None, max_eval_samples: int | None = None,
                 split_seed: int = 1234, name: str | None = None, bucket_by_length: bool = True):
        super().__init__()
        # every constructor argument but the tokenizer (subclasses' included); not sent to loggers,
        # so the data settings never clash with the model's hyperparameters when Lightning merges them
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        if tokenizer is None:
            raise DataError(f"data option {self.option!r} needs a tokenizer (build_datamodule(cfg.data, tokenizer))")
        for key, value in (("max_length", max_length), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise DataError(f"data.{key}={value!r} must be a positive integer")
        for key, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise DataError(f"data.{key}={value!r} must be a positive integer or null (all rows)")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.split_seed = int(split_seed)
        self.bucket_by_length = bool(bucket_by_length)
        self.name = name or self.option
        self._task: TaskSpec | None = None
        self._splits: dict[str, TokenizedSplit] | None = None
        self._cache_path: Path | None = None
        self.with_token_type_ids = "token_type_ids" in getattr(tokenizer, "model_input_names", [])
        pad = getattr(tokenizer, "pad_token_id", None)
        self.collator = PadCollator(0 if pad is None else pad, getattr(tokenizer, "padding_side", "right") or "right")

    # ---- hooks for subclasses

    def data_identity(self) -> dict:
        raise NotImplementedError

    def split_settings(self) -> dict:
        """Settings (besides split_seed and subset sizes) that change which rows land in which split."""
        return {}

    def load_splits(self) -> dict[str, Examples]:
        raise NotImplementedError

    def resolve_task(self, splits: dict[str, Examples]) -> tuple[TaskSpec, dict[str, list]]:
        """Called with the raw splits; returns the task and the splits' labels as ids/floats.

        The default: labels already are ids (or floats for regression) and `self._task` is set.
        """
        task = self.task
        for ex in splits.values():
            check_labels(task, ex)
        return task, {split: ex.labels for split, ex in splits.items()}

    # ---- task

    @property
    def task(self) -> TaskSpec:
        if self._task is None:
            raise DataError(
                f"the task of data option {self.name!r} is known only once its labels were read: "
                "call prepare_data() and setup() first"
            )
        return self._task

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.task.label_names

    # ---- caching

    def cache_key_parts(self) -> dict:
        return {
            "format": CACHE_FORMAT,
            "datamodule": f"{type(self).__module__}.{type(self).__qualname__}",
            "data": self.data_identity(),
            "split_seed": self.split_seed,
            "split": self.split_settings(),
            "max_train_samples": self.max_train_samples,
            "max_eval_samples": self.max_eval_samples,
            "tokenizer": tokenizer_identity(self.tokenizer),
            "max_length": self.max_length,
            "token_type_ids": self.with_token_type_ids,
        }

    @property
    def cache_path(self) -> Path:
        if self._cache_path is None:
            blob = json.dumps(self.cache_key_parts(), sort_keys=True, default=str)
            key = hashlib.sha256(blob.encode()).hexdigest()[:20]
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.name)
            self._cache_path = self.cache_dir / "tokenized" / f"{safe}-{key}.pt"
        return self._cache_path

    def prepare_data(self) -> None:
        """Fetch, parse, split, tokenize and write the cache; does nothing when the cache exists."""
        path = self.cache_path
        if path.is_file():
            return
        splits = self.load_splits()
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise DataError(f"data option {self.name!r} produced no {missing} split(s)")
        task, labels = self.resolve_task(splits)
        payload = {"format": CACHE_FORMAT, "key": self.cache_key_parts(), "task": _task_to_dict(task), "splits": {}}
        for split in SPLITS:
            ex = splits[split]
            ex = Examples(ex.texts, labels[split], ex.pairs, ex.source_index, ex.origin, ex.lines)
            limit = self.max_train_samples if split == "train" else self.max_eval_samples
            if limit is not None and limit < len(ex):
                rows = sorted(seeded_permutation(len(ex), self.split_seed + 1 + SPLITS.index(split))[:limit])
                ex = ex.select(rows)
            if len(ex) == 0:
                raise DataError(f"the {split} split of data option {self.name!r} is empty ({ex.origin or 'no rows'})")
            payload["splits"][split] = self._tokenize_split(ex, task)
        atomic_torch_save(payload, path)
        sizes = {s: len(payload["splits"][s]["labels"]) for s in SPLITS}
        log.info("data %s: tokenized %s and cached them in %s", self.name, sizes, path)

    def _tokenize_split(self, ex: Examples, task: TaskSpec) -> dict:
        enc = encode_texts(self.tokenizer, ex.texts, ex.pairs, self.max_length, self.with_token_type_ids)
        ids, offsets = _flatten(enc["input_ids"], torch.int32)
        out = {
            "input_ids": ids,
            "offsets": offsets,
            "labels": torch.tensor(ex.labels, dtype=torch.float32 if task.is_regression else torch.long),
            "source_index": torch.tensor(ex.source_index, dtype=torch.long),
            "texts": list(ex.texts),
            "pairs": None if ex.pairs is None else list(ex.pairs),
        }
        if self.with_token_type_ids:
            out["token_type_ids"], _ = _flatten(enc["token_type_ids"], torch.int8)
        return out

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenized splits from the cache (running prepare_data first if there is none)."""
        if self._splits is not None:
            return
        path = self.cache_path
        if not path.is_file():
            self.prepare_data()
        try:
            payload = torch.load(path, weights_only=True)
        except Exception as err:  # a truncated/foreign file: rebuild it rather than fail
            log.warning("data cache %s is unreadable (%s); rebuilding it", path, err)
            path.unlink(missing_ok=True)
            self.prepare_data()
            payload = torch.load(path, weights_only=True)
        task = TaskSpec(**{k: tuple(v) if k == "label_names" else v for k, v in payload["task"].items()})
        if self._task is not None and self._task != task:
            log.warning("data %s: cached task %s differs from the configured %s; using the cached one",
                        self.name, task, self._task)
        self._task = task
        splits = {}
        for split in SPLITS:
            data = dict(payload["splits"][split])
            for key in ("input_ids", "token_type_ids"):
                if data.get(key) is not None:
                    data[key] = data[key].long()
            splits[split] = TokenizedSplit(data)
        self._splits = splits

    # ---- access

    @staticmethod
    def canonical_split(split: str) -> str:
        try:
            return SPLIT_ALIASES[split]
        except KeyError:
            raise DataError(f"unknown split {split!r}; use one of {SPLITS}") from None

    def dataset(self, split: str) -> TokenizedSplit:
        split = self.canonical_split(split)
        if self._splits is None:
            self.setup()
        return self._splits[split]

    def split_size(self, split: str) -> int:
        return len(self.dataset(split))

    def texts(self, split: str) -> list[str]:
        """The raw (first) texts of a split, in `idx` order."""
        return self.dataset(split).texts

    def dataloader(self, split: str, shuffle: bool = False, batch_size: int | None = None,
                   sampler=None, by_length: bool = False) -> DataLoader:
        """A loader over any split. batch_size=None: `batch_size` when shuffling, else `eval_batch_size`.
        by_length: batches of similar length (see `batching.LengthGroupedBatches`)."""
        dataset = self.dataset(split)
        if batch_size is None:
            batch_size = self.batch_size if shuffle else self.eval_batch_size
        # Its own generator: a loader's pass then draws nothing from the global random state, so a
        # resumed fit's extra passes (sanity check) leave dropout's stream as the uninterrupted fit had it.
        workers = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0,
                   "generator": torch.Generator().manual_seed(self.split_seed)}
        # A training loader resumes mid-epoch (data.resumable): its order is a function of the epoch.
        loader = ResumableLoader if shuffle else DataLoader
        if by_length and sampler is None:
            batches = LengthGroupedBatches(dataset.lengths(), batch_size, shuffle, seed=self.split_seed)
            return loader(dataset, batch_sampler=batches, collate_fn=self.collator, **workers)
        if shuffle and sampler is None and not self._distributed():  # under DDP Lightning shards a seeded order
            sampler, shuffle = EpochShuffle(len(dataset), seed=self.split_seed), False
        return loader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collator, sampler=sampler,
                      **workers)

    @staticmethod
    def _distributed() -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1

    def _evaluation_loader(self, split: str) -> DataLoader:
        # Under DDP each process evaluates its own rows, none twice (Lightning's default sampler pads
        # the last shard with repeats), so the synced metrics cover exactly the whole split.
        sampler = UnrepeatedDistributedSampler(self.dataset(split), shuffle=False) if self._distributed() else None
        return self.dataloader(split, batch_size=self.eval_batch_size, sampler=sampler,
                               by_length=self.bucket_by_length)

    def train_dataloader(self) -> DataLoader:
        # Under DDP, Lightning shards a plain shuffled loader; length grouping is for one process.
        by_length = self.bucket_by_length and not self._distributed()
        return self.dataloader("train", shuffle=True, batch_size=self.batch_size, by_length=by_length)

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, max_length={self.max_length}, cache={self.cache_dir})"


def _task_to_dict(task: TaskSpec) -> dict:
    return {"name": task.name, "kind": task.kind, "num_labels": task.num_labels, "metric": task.metric,
            "label_names": list(task.label_names)}


# ----------------------------------------------------------------------------- label checks


def row_location(ex: Examples, i: int) -> str:
    """'file, line N' for row i of `ex` when line numbers are known, else 'origin, row N'."""
    if ex.lines is not None:
        return f"{ex.origin}, line {ex.lines[i]}"
    return f"{ex.origin or 'data'}, row {i + 1}"


def check_labels(task: TaskSpec, ex: Examples, labels: Sequence | None = None) -> None:
    """Raise DataError for a class id outside [0, num_labels), naming the file and line."""
    if task.is_regression:
        return
    for i, label in enumerate(ex.labels if labels is None else labels):
        if isinstance(label, bool) or not isinstance(label, int) or label < 0 or label >= task.num_labels:
            raise DataError(label_outside_head_message(row_location(ex, i), label, task.num_labels))


def label_outside_head_message(at: str, label, num_labels: int,
                               fix: str = "fix the label, or set data.num_labels (or data.label_names) to cover it") -> str:
    return (
        f"{at}: label {label!r} is outside the classifier head: labels must be integers in "
        f"[0, {num_labels - 1}] for num_labels={num_labels}; {fix}"
    )


def validate_metric(metric: str, kind: str) -> str:
    if metric not in METRICS:
        raise DataError(f"metric {metric!r} is unknown; use one of {METRICS}")
    if kind == REGRESSION and metric != "pearson_spearman":
        raise DataError(f"metric {metric!r} does not suit a regression task; use 'pearson_spearman'")
    if kind != REGRESSION and metric == "pearson_spearman":
        raise DataError("metric 'pearson_spearman' is for regression tasks; use acc, f1 or mcc")
    return metric
