"""The study scripts under experiments/ run (on a tiny backbone) and write what they promise."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_rollout_benchmark_writes_timings_and_matching_exit_distributions(tmp_path):
    out = tmp_path / "bench"
    subprocess.run([sys.executable, "experiments/bench_rollouts.py", "--backbone", "tiny_bert", "--steps", "20",
                    "--warmup", "1", "--batch-size", "16", "--seq-len", "16", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["seconds_per_step"]["cached"] > 0 and result["seconds_per_step"]["repeated"] > 0
    assert result["total_variation"] < 0.1  # one policy, one law of exits, either way
    assert "speed-up" in out.with_suffix(".md").read_text()
