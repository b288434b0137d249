"""Hardness: the memorized layer m(x) of each training instance, and its saved artefact.

m(x) is the smallest layer l (1-based) such that heads l, l+1, ..., L all predict the gold
label; if head L is wrong, m(x) = L. Small m = easy. The artefact is a per-instance table keyed
by the dataset row index, stored with the metadata of the checkpoint it came from so that a
stale table is detected and recomputed rather than silently reused.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from ee_lightning.files import load_artefact, save_artefact
from ee_lightning.tasks import TaskSpec, is_correct

BUCKET_NAMES = ("easy", "medium", "hard")
EASY, MEDIUM, HARD = 0, 1, 2
MISSING = 0  # value of a row that load_hardness's lookup table has no entry for (valid m are 1..L)
FORMAT_VERSION = 1


def memorized_layer(correct: torch.Tensor) -> torch.Tensor:
    """[L, N] bool (head l right on instance n) -> [N] long in 1..L.

    All right -> 1; all wrong, or only the last head wrong -> L.
    """
    if correct.dim() != 2 or correct.shape[0] < 1:
        raise ValueError(f"correct must be [L, N] with L >= 1, got {tuple(correct.shape)}")
    num_layers = correct.shape[0]
    # suffix_ok[l] = heads l..L all right; monotone in l, so its count gives the first true index
    suffix_ok = correct.bool().flip(0).long().cumprod(0).flip(0)
    count = suffix_ok.sum(0)
    # count == 0 (head L wrong) would give L + 1: the definition says L
    return (num_layers - count + 1).clamp(max=num_layers)


def correct_table(task: TaskSpec, logits: torch.Tensor, labels: torch.Tensor, tolerance: float = 0.5) -> torch.Tensor:
    """Head outputs [L, N, C] (C = 1 for regression) and labels [N] -> [L, N] bool.

    Regression counts a head as right when |prediction - label| <= tolerance.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [L, N, C], got {tuple(logits.shape)}")
    return is_correct(task, logits, labels.unsqueeze(0).expand(logits.shape[0], -1), tolerance)


def hardness_factor(memorized: torch.Tensor, num_layers: int) -> torch.Tensor:
    """1 - m/L: the share of the depth cost an instance pays (1 - 1/L for the easiest, 0 for the hardest)."""
    return 1.0 - memorized.float() / num_layers


def hardness_buckets(memorized: torch.Tensor, num_layers: int) -> torch.Tensor:
    """0 = easy (m <= L/3), 2 = hard (m > 2L/3), 1 = medium otherwise; see BUCKET_NAMES."""
    # integer comparisons: no float rounding at the thirds
    m3 = 3 * memorized.long()
    buckets = torch.full_like(m3, MEDIUM)
    buckets[m3 <= num_layers] = EASY
    buckets[m3 > 2 * num_layers] = HARD
    return buckets


def histogram(memorized: torch.Tensor, num_layers: int) -> torch.Tensor:
    """[L] long: how many instances have m = 1, ..., L."""
    m = memorized.long().flatten()
    if m.numel() and (m.min() < 1 or m.max() > num_layers):
        raise ValueError(f"memorized layers must lie in 1..{num_layers}")
    return torch.bincount(m - 1, minlength=num_layers)


# --------------------------------------------------------------------------- artefact I/O


def checkpoint_fingerprint(path: str | os.PathLike, hash_contents: bool = True) -> dict[str, Any]:
    """Identity of a checkpoint file or folder: resolved path, size, mtime_ns and (optionally) sha256.

    The sha catches a checkpoint overwritten in place with the same mtime granularity; skip it
    (hash_contents=False) for very large checkpoints where size + mtime is enough.
    """
    root = Path(path).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    digest = hashlib.sha256()
    size, mtime = 0, 0
    for file in files:
        stat = file.stat()
        size += stat.st_size
        mtime = max(mtime, stat.st_mtime_ns)
        if hash_contents:
            digest.update(str(file.relative_to(root) if root.is_dir() else file.name).encode())
            with open(file, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    out: dict[str, Any] = {"path": str(root), "size": size, "mtime_ns": mtime}
    if hash_contents:
        out["sha256"] = digest.hexdigest()
    return out


def hardness_meta(checkpoint: str | os.PathLike, num_layers: int, task: TaskSpec | str, split_size: int,
                  tolerance: float, hash_contents: bool = True, **extra: Any) -> dict[str, Any]:
    """The metadata a hardness table is valid for; pass the same to save_hardness and load_hardness."""
    return {
        "checkpoint": checkpoint_fingerprint(checkpoint, hash_contents=hash_contents),
        "num_layers": int(num_layers),
        "task": task.name if isinstance(task, TaskSpec) else str(task),
        "split_size": int(split_size),
        "tolerance": float(tolerance),
        **extra,
    }


def save_hardness(path: str | os.PathLike, memorized: torch.Tensor, idx: torch.Tensor, meta: dict) -> None:
    """Write m (1..L) for the dataset rows `idx` with `meta`, atomically (temp file + rename)."""
    memorized = memorized.detach().long().flatten().cpu()
    idx = idx.detach().long().flatten().cpu()
    if memorized.shape != idx.shape:
        raise ValueError(f"memorized {tuple(memorized.shape)} and idx {tuple(idx.shape)} differ in size")
    if idx.numel():
        if idx.min() < 0:
            raise ValueError("idx must be non-negative dataset row indices")
        if idx.unique().numel() != idx.numel():
            raise ValueError("idx has duplicate rows")
        if memorized.min() < 1 or ("num_layers" in meta and memorized.max() > int(meta["num_layers"])):
            raise ValueError("memorized layers must lie in 1..num_layers")
    save_artefact(Path(path), {"idx": idx, "memorized": memorized}, {**meta, "format_version": FORMAT_VERSION})


def load_hardness(path: str | os.PathLike, expected_meta: dict) -> torch.Tensor | None:
    """Lookup table [N] long with table[idx] = m, or None if missing, unreadable or stale.

    N = max(meta["split_size"], max idx + 1). Rows that were not saved hold MISSING (0).
    """
    saved = load_artefact(Path(path), {**expected_meta, "format_version": FORMAT_VERSION})
    if saved is None:
        return None
    idx, memorized = saved["idx"].long(), saved["memorized"].long()
    # cover the whole split, so indexing with any row of it works (unsaved rows read MISSING)
    size = max(int(idx.max()) + 1 if idx.numel() else 0, int(expected_meta.get("split_size", 0)))
    table = torch.full((size,), MISSING, dtype=torch.long)
    table[idx] = memorized
    return table
