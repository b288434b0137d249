"""Atomic writes: a temporary file in the same folder, then a rename. An interrupted run never
leaves half a file, and a reader never sees one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path: Path) -> None:
    _atomic(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda handle: handle.write(text.encode("utf-8")))
