"""Exact resume: a run killed with SIGKILL at any step of any stage, rerun with the same command
into the same run directory, ends with the numbers of the run that was never interrupted.

The end-to-end test kills a real `python -m ee_lightning.app.cli` process; the unit tests pin the
pieces (the loader's position, the random states, atomic checkpoint writes)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ee_lightning.data.batching import LengthGroupedBatches
from ee_lightning.data.resumable import EpochShuffle, ResumableLoader
from ee_lightning.training.resume import AtomicCheckpointIO, rng_state, set_loader_epoch, set_rng_state
from tests.conftest import ROOT, write_sentiment_files


# --- the pieces ------------------------------------------------------------------------------------
def _idx_batches(loader) -> list[list[int]]:
    return [batch.tolist() for batch in loader]


def test_loader_resumes_its_pass_past_the_batches_served():
    loader = ResumableLoader(torch.arange(20), batch_size=3, sampler=EpochShuffle(20, seed=5))
    loader.sampler.set_epoch(2)
    whole = _idx_batches(loader)
    iterator = iter(loader)
    first = [next(iterator).tolist() for _ in range(3)]
    state = loader.state_dict()
    assert state == {"served": 3, "epoch": 2}

    again = ResumableLoader(torch.arange(20), batch_size=3, sampler=EpochShuffle(20, seed=5))
    again.sampler.set_epoch(2)
    again.load_state_dict(state)
    assert first + _idx_batches(again) == whole
    assert _idx_batches(again) == whole  # only the one pass resumes


def test_loader_state_of_another_epoch_is_not_applied():
    """A checkpoint taken in epoch 0 resumes into epoch 1 from its start (no batches skipped)."""
    lengths = torch.tensor([5, 3, 8, 1, 9, 2, 7, 4])
    loader = ResumableLoader(torch.arange(8), batch_sampler=LengthGroupedBatches(lengths, 2, shuffle=True))
    set_loader_epoch(loader, 1)
    whole = _idx_batches(loader)
    loader.load_state_dict({"served": 2, "epoch": 0})
    set_loader_epoch(loader, 1)
    assert _idx_batches(loader) == whole


def test_batch_order_depends_only_on_seed_and_epoch():
    a, b = EpochShuffle(30, seed=1), EpochShuffle(30, seed=1)
    b.set_epoch(3)
    a.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)


def test_every_process_takes_its_share_of_the_one_batch_order_with_loss_weights():
    from ee_lightning.data.resumable import GlobalBatches, WeightedRows, process_share

    # 7 rows in batches of 3: [a b c] [d e f] [g]; 2 processes take rows 0, 2 and row 1 of each
    assert process_share([5, 6, 7], 0, 2) == [(5, 1 / 3), (7, 1 / 3)]
    assert process_share([5, 6, 7], 1, 2) == [(6, 1 / 3)]
    assert process_share([9], 0, 2) == [(9, 1.0)]
    assert process_share([9], 1, 2) == [(9, 0.0)]  # nothing left to take: a stand-in that weighs nothing
    # a process's loss is sum(weight * row loss) * 2; DDP averages the two: the batch's mean
    losses = {5: 1.0, 6: 4.0, 7: 7.0}
    shares = [sum(w * losses[row] for row, w in process_share([5, 6, 7], rank, 2)) * 2 for rank in (0, 1)]
    assert sum(shares) / 2 == pytest.approx(4.0)
    # in one process: the batches of EpochShuffle, whole, each row weighing 1 / its batch's rows
    batches = GlobalBatches(EpochShuffle(7, seed=3), batch_size=3)
    batches.set_epoch(2)
    shuffle = EpochShuffle(7, seed=3)
    shuffle.set_epoch(2)
    rows = list(shuffle)
    assert len(batches) == 3 and batches.epoch == 2
    assert list(batches) == [[(r, 1 / 3) for r in rows[:3]], [(r, 1 / 3) for r in rows[3:6]], [(rows[6], 1.0)]]
    loader = ResumableLoader(WeightedRows([{"x": torch.tensor(float(i))} for i in range(7)]), batch_sampler=batches)
    first = next(iter(loader))
    assert first["row"].tolist() == rows[:3] and first["x"].tolist() == [float(r) for r in rows[:3]]
    assert first["weight"].dtype == torch.float32 and first["weight"].tolist() == pytest.approx([1 / 3] * 3)


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    path = tmp_path / "state.pt"
    torch.save(rng_state(), path)
    expected = (torch.rand(4), np.random.rand(4), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(torch.load(path, weights_only=True))  # what Lightning uses to read a checkpoint
    got = (torch.rand(4), np.random.rand(4), random.random())
    assert torch.equal(got[0], expected[0]) and (got[1] == expected[1]).all() and got[2] == expected[2]


def test_a_checkpoint_write_that_fails_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left either


# --- end to end: SIGKILL a real run ----------------------------------------------------------------
def tiny_run(tmp_path: Path, run_dir: Path) -> list[str]:
    folder = tmp_path / "SST-2"
    if not folder.is_dir():
        write_sentiment_files(folder, n_train=48, n_eval=16)
    # 48 rows in batches of 8: 6 optimizer steps per epoch, 2 epochs per stage, last.ckpt every 2 steps.
    return [sys.executable, "-m", "ee_lightning.app.cli", "method=consistentee", "backbone=tiny_bert", "data=glue",
            "data.task=sst2", f"data.data_dir={folder}", "data.batch_size=8", "method.finetune.epochs=2",
            "method.policy.epochs=2", "method.policy.batch_size=8", "callbacks.step_checkpoint.every_n_train_steps=2",
            "report.latency.enabled=false", "trainer.enable_progress_bar=false", "logger=many",
            f"hydra.run.dir={run_dir}"]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "EE_ROOT": str(tmp_path)}


def run_to_end(command: list[str], tmp_path: Path) -> None:
    out = subprocess.run(command, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def run_and_kill(command: list[str], tmp_path: Path, run_dir: Path, stage: str, step: int) -> int:
    """Start the run and SIGKILL it as soon as the stage's last.ckpt holds global step >= `step`.

    The run is stopped (SIGSTOP) while its checkpoint is read: a busy machine could otherwise let it train on
    past the stage's end between the read and the kill."""
    checkpoint = run_dir / "checkpoints" / stage / "last.ckpt"
    process = subprocess.Popen(command, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    seen, deadline = None, time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"the run ended before {stage} reached step {step}"
            if checkpoint.exists() and checkpoint.stat().st_mtime_ns != seen:
                process.send_signal(signal.SIGSTOP)
                seen = checkpoint.stat().st_mtime_ns  # the file as the stopped run left it
                saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
                if saved >= step:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    return saved
                process.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        raise AssertionError(f"{stage} did not reach step {step} in time")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def metrics(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    return {k: v for k, v in results.items() if k not in ("seconds", "checkpoints", "pareto")}


def wandb_run_ids(run_dir: Path) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_sigkill_at_several_points_of_both_stages_resumes_to_the_same_results(tmp_path):
    reference = tmp_path / "uninterrupted"
    run_to_end(tiny_run(tmp_path, reference), tmp_path)

    run_dir = tmp_path / "killed"
    command = tiny_run(tmp_path, run_dir)
    killed_at = [
        ("finetune", run_and_kill(command, tmp_path, run_dir, "finetune", 3)),  # mid epoch 0
        ("finetune", run_and_kill(command, tmp_path, run_dir, "finetune", 6)),  # epoch 0's end
        ("policy", run_and_kill(command, tmp_path, run_dir, "policy", 8)),      # mid epoch 1
    ]
    assert all(step < 12 for _, step in killed_at), killed_at  # each stage killed before its end (12 steps)
    run_to_end(command, tmp_path)

    assert metrics(run_dir) == metrics(reference)
    for stage in ("finetune", "policy"):  # the final weights too, bit for bit on a CPU
        ours = torch.load(run_dir / "checkpoints" / stage / "last.ckpt", weights_only=False)["state_dict"]
        theirs = torch.load(reference / "checkpoints" / stage / "last.ckpt", weights_only=False)["state_dict"]
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), stage
    # Every start of a stage continued that stage's wandb run (same id, one per stage); a finished
    # stage never starts again: stage 1 started 3 times (twice killed), the policy twice (once killed).
    ids = json.loads((run_dir / "wandb_ids.json").read_text())
    runs = wandb_run_ids(run_dir)
    assert runs.count(ids["finetune"]) == 3 and runs.count(ids["policy"]) == 2, (ids, runs)
    assert len(set(runs)) == len(ids) == 4


@pytest.mark.slow
def test_sigkill_in_the_joint_stage_with_the_epsilon_greedy_sampler_resumes_to_the_same_results(tmp_path):
    """The joint stage (manual optimization, two optimizers) and the authors' sampler, whose epsilon
    decays with the global step: killed mid-stage, rerun, the same numbers as a run never stopped."""
    joint = ["method.joint.enabled=true", "method.joint.epochs=2", "method.policy.sampler=epsilon_greedy",
             "method.policy.eps_decay_steps=10"]
    reference = tmp_path / "uninterrupted"
    run_to_end(tiny_run(tmp_path, reference)[:-1] + joint + [f"hydra.run.dir={reference}"], tmp_path)

    run_dir = tmp_path / "killed"
    command = tiny_run(tmp_path, run_dir)[:-1] + joint + [f"hydra.run.dir={run_dir}"]
    killed = run_and_kill(command, tmp_path, run_dir, "joint", 3)
    reference_steps = torch.load(reference / "checkpoints" / "joint" / "last.ckpt", weights_only=False)["global_step"]
    assert killed < reference_steps, (killed, reference_steps)  # killed before the stage's end
    run_to_end(command, tmp_path)

    assert metrics(run_dir) == metrics(reference)
    ours = torch.load(run_dir / "checkpoints" / "joint" / "last.ckpt", weights_only=False)["state_dict"]
    theirs = torch.load(reference / "checkpoints" / "joint" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # Resumed, not restarted: the steps the killed process had written up to its checkpoint (reward_curve.csv
    # appends one row per step) are not trained, nor written, a second time.
    with open(run_dir / "reward_curve.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row["stage"] == "joint"]
    assert [step for step in steps if step <= killed] == sorted({step for step in steps if step <= killed}), steps
    assert min(steps) <= killed, steps  # the killed process had written its first steps


# --- a decoder run: every stage ledgered, a stage killed mid-fit resumes -----------------------------
def tiny_decoder_run(run_dir: Path) -> list[str]:
    # 8 ACLSum pairs (a few hundred response tokens) in batches of 16: tens of optimizer steps per stage,
    # last.ckpt every 2 steps.
    return [sys.executable, "-m", "ee_lightning.app.cli", "experiment=aclsum_consistentee", "backbone=tiny_llama",
            "logger=csv", "data.max_train_samples=8", "data.max_eval_samples=2", "data.max_prompt_length=64",
            "method.lm_exits.exit_every=1", "method.lm_exits.adapters.epochs=2", "method.lm_exits.adapters.batch_size=16",
            "method.lm_exits.policy.epochs=2", "method.lm_exits.policy.batch_size=16",
            "method.lm_exits.policy.propagated.epochs=2", "method.lm_exits.policy.propagated.batch_size=2",
            "method.lm_exits.classifier.epochs=1", "method.generation.max_prompts=2", "method.generation.batch_size=1",
            "method.generation.max_new_tokens=3", "method.generation.rules.static=null",
            "method.generation.rules.policy=[0.5]", "method.generation.rules.softmax_margin=[0.5]",
            "method.generation.rules.saturation=null", "method.generation.rules.classifier=[0.5]",
            "callbacks.step_checkpoint.every_n_train_steps=2", "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}"]


# Wall-clock measurements differ between any two runs; everything else must not.
TIMED = ("seconds", "tokens_per_s", "tokens_per_s_with_prompt", "speedup_vs_full", "speedup_vs_generate",
         "policy_speedup_vs_full", "transformers_generate", "prefill_seconds", "report")


def untimed(value):
    """results.json less its wall-clock measurements, at any depth."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMED}
    return [untimed(v) for v in value] if isinstance(value, list) else value


def decoder_results(run_dir: Path) -> dict:
    return untimed(json.loads((run_dir / "results.json").read_text()))


@pytest.mark.slow
def test_a_decoder_run_killed_mid_stage_resumes_that_stage_to_the_same_results(tmp_path):
    reference = tmp_path / "uninterrupted"
    run_to_end(tiny_decoder_run(reference), tmp_path)
    steps = {stage: torch.load(reference / "checkpoints" / stage / "last.ckpt", weights_only=False)["global_step"]
             for stage in ("lm_adapters", "lm_policy", "lm_policy_propagated")}

    run_dir = tmp_path / "killed"
    command = tiny_decoder_run(run_dir)
    killed = {"lm_adapters": run_and_kill(command, tmp_path, run_dir, "lm_adapters", 4),
              "lm_policy": run_and_kill(command, tmp_path, run_dir, "lm_policy", 4),
              "lm_policy_propagated": run_and_kill(command, tmp_path, run_dir, "lm_policy_propagated", 4)}
    assert all(killed[stage] < steps[stage] for stage in killed), (killed, steps)  # each killed before its end
    ledger = json.loads((run_dir / "stages.json").read_text())
    assert "lm_policy" in ledger and "lm_policy_propagated" not in ledger  # each start read the earlier stages back
    run_to_end(command, tmp_path)

    assert decoder_results(run_dir) == decoder_results(reference)
    for stage in ("lm_adapters", "lm_policy", "lm_policy_propagated", "lm_classifier"):  # bit for bit on a CPU
        ours = torch.load(run_dir / "checkpoints" / stage / "last.ckpt", weights_only=False)["state_dict"]
        theirs = torch.load(reference / "checkpoints" / stage / "last.ckpt", weights_only=False)["state_dict"]
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), stage
    # Resumed, not restarted: the policy steps the killed process wrote (one reward_curve.csv row per step)
    # are not trained, nor written, a second time.
    with open(run_dir / "reward_curve.csv", newline="") as handle:
        policy_steps = [int(row["step"]) for row in csv.DictReader(handle) if row["stage"] == "lm_policy"]
    before_kill = [step for step in policy_steps if step <= killed["lm_policy"]]
    assert before_kill and before_kill == sorted(set(before_kill)), policy_steps
    with open(run_dir / "reward_curve.csv", newline="") as handle:  # the rollouts' steps too
        rollout_steps = [int(row["step"]) for row in csv.DictReader(handle) if row["stage"] == "lm_policy_propagated"]
    assert rollout_steps == sorted(set(rollout_steps)) and len(rollout_steps) == steps["lm_policy_propagated"]
