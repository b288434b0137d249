"""Atomic writes: a temporary file in the same folder, then a rename. An interrupted run never
leaves half a file, and a reader never sees one.

Artefacts (tensors saved beside a checkpoint and reused by later runs: the training set's layer
outputs, the memorized layers) are stored with the metadata they are valid for; `load_artefact`
returns None for a missing, unreadable or stale one, so the caller recomputes it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make artefacts unreadable to the user's group
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno is not None:
            # A full disk or a read-only folder: say which file, and that nothing half-written was left.
            raise type(error)(error.errno, f"{error.strerror}: could not write {path} (nothing half-written was "
                                           "left; an earlier version of the file, if any, is unchanged)") from error
        raise


def check_writable(folder: Path, what: str = "output directory") -> None:
    """Fail now, naming the folder, when it cannot be created or written (not hours later at a checkpoint)."""
    folder = Path(folder)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        if probe.parent.is_dir():
            probe.unlink(missing_ok=True)
        raise type(error)(error.errno, f"the {what} {folder} is not writable ({error.strerror}); free space there, "
                                       "fix its permissions or choose another with hydra.run.dir=<dir>") from error


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


def load_or_build(path: Path, meta: dict, build, save: bool = True) -> dict:
    """The tensors saved at `path` for `meta`, else `build()`, saved there (by one process of several:
    `save`). A missing, unreadable or stale file is rebuilt, never half-written."""
    tensors = load_artefact(path, meta)
    if tensors is not None:
        log.info("%s reused", path)
        return tensors
    tensors = build()
    if save:
        save_artefact(path, tensors, meta)
        log.info("%s written", path)
    return tensors


def load_artefact(path: Path, meta: dict) -> dict | None:
    """The tensors saved at `path`, or None when the file is missing, unreadable, or saved for other metadata."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        stored = json.loads(payload["meta_json"])
        tensors = payload["tensors"]
    except Exception:  # a truncated or foreign file: torch raises many kinds (IndexError among them)
        return None
    return tensors if stored == _normalize_meta(meta) else None
