"""Progress bars for passes over data outside a Lightning Trainer (cache passes, latency, generation).

They look like Lightning's own (a count and a rate) and stay silent where nobody watches: when
stderr is not a terminal (CI, log files, tests) or EE_PROGRESS=0.
"""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_enabled() -> bool:
    return os.environ.get("EE_PROGRESS", "1") != "0" and sys.stderr.isatty()


def progress(iterable, desc: str, total: int | None = None, unit: str = "batch"):
    """Wrap `iterable` in a progress bar (count, rate, time left when `total` is known)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False,
                disable=not progress_enabled())
