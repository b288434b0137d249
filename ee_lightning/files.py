"""Atomic writes: a temporary file in the same folder, then a rename. An interrupted run never
leaves half a file, and a reader never sees one.

Artefacts (tensors saved beside a checkpoint and reused by later runs: the training set's layer
outputs, the memorized layers) are stored with the metadata they are valid for; `load_artefact`
returns None for a missing, unreadable or stale one, so the caller recomputes it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

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


def _normalize_meta(meta: dict) -> Any:
    """JSON round trip, so tuples/lists, dataclasses, paths and key order compare equal after save/load."""
    def default(obj):
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        if isinstance(obj, torch.Tensor):
            return obj.tolist()
        return str(obj)

    return json.loads(json.dumps(meta, sort_keys=True, default=default))


def save_artefact(path: Path, tensors: dict, meta: dict) -> None:
    """Write `tensors` (a dict of tensors) with the metadata they are valid for, atomically."""
    atomic_torch_save({"meta_json": json.dumps(_normalize_meta(meta), sort_keys=True), "tensors": tensors}, Path(path))


def load_artefact(path: Path, meta: dict) -> dict | None:
    """The tensors saved at `path`, or None when the file is missing, unreadable, or saved for other metadata."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        stored = json.loads(payload["meta_json"])
        tensors = payload["tensors"]
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, AttributeError, ValueError, pickle.UnpicklingError):
        return None
    return tensors if stored == _normalize_meta(meta) else None
