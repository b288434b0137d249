"""Atomic writes: a temporary file in the same folder, then a rename. An interrupted run never
leaves half a file, and a reader never sees one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def _atomic(path: Path, write) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
