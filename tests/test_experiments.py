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


def test_policy_seeds_reads_runs_and_reports_each_taus_spread_and_the_calibrated_points(tmp_path):
    def run(name, seed, savings, chosen):
        folder = tmp_path / name
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml").write_text(f"seed: {seed}\n")
        points = [{"rule": "full", "value": None, "rougeL": 0.2, "rougeL_vs_full": 1.0, "layer_saving": 0.0}]
        points += [{"rule": "policy", "value": tau, "rougeL": 0.1, "rougeL_vs_full": 0.5, "layer_saving": s}
                   for tau, s in savings.items()]
        calibration = {"level": 0.6, "chosen": {"policy": {"value": chosen, "validation": 0.7}} if chosen else {}}
        (folder / "results.json").write_text(json.dumps({
            "method": "consistentee_lm", "backbone": "tiny", "data": "d", "prompts": 4, "split": "test",
            "max_new_tokens": 8, "points": points, "calibration": calibration}))
        return folder

    first = run("a", 42, {0.1: 0.20, 0.5: 0.10, 0.9: 0.01}, 0.5)
    second = run("b", 1, {0.1: 0.15, 0.5: 0.11}, None)  # no 0.9 point, nothing reached the level
    out = tmp_path / "out"
    subprocess.run([sys.executable, "experiments/policy_seeds.py", "--runs", str(first), str(second), "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    result = json.loads((out / "policy_seeds.json").read_text())
    assert result["seeds"] == [42, 1] and [row["tau"] for row in result["taus"]] == [0.1, 0.5]  # taus both have
    assert [row["saving_spread"] for row in result["taus"]] == pytest.approx([0.05, 0.01])
    assert [c["tau"] for c in result["calibrated"]] == [0.5, None]
    assert result["calibrated"][0]["layer_saving"] == 0.10
    text = (out / "policy_seeds.md").read_text()
    assert "| 0.1 | 20.0%, 0.100 / 0.500 | 15.0%, 0.100 / 0.500 | 5.0 points |" in text
    assert "| b | none reached the level |" in text
    bad = subprocess.run([sys.executable, "experiments/policy_seeds.py", "--runs", str(tmp_path / "missing")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "does not exist" in bad.stderr
