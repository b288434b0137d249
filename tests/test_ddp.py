"""trainer=ddp: stage 1 with 2 CPU processes; metrics cover the whole validation set, once."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, write_sentiment_files


@pytest.mark.slow
def test_ddp_two_cpu_processes_sync_metrics_over_the_whole_split(tmp_path):
    data = write_sentiment_files(tmp_path / "SST-2", n_train=40, n_eval=21)  # odd: shards are unequal
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "EE_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "ee_lightning.app.cli", "method=finetune", "backbone=tiny_bert", "data=glue",
               "data.task=sst2", f"data.data_dir={data}", "data.batch_size=4", "data.eval_batch_size=4",
               "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv",
               "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["layer_metrics"]) == 4
    rows = list(csv.DictReader(open(run_dir / "csv" / "finetune" / "metrics.csv")))
    val_counts = [float(r["val/num_examples"]) for r in rows if r.get("val/num_examples")]
    assert val_counts and all(count == 21 for count in val_counts), val_counts
    test_rows = list(csv.DictReader(open(run_dir / "csv" / "finetune-test" / "metrics.csv")))
    assert [float(r["test/num_examples"]) for r in test_rows if r.get("test/num_examples")] == [21]


def decoder_command(run_dir, *extra) -> list[str]:
    # 8 ACLSum pairs, every stage, 3 prompts generated one per batch (an odd count: the processes' shares differ)
    return [sys.executable, "-m", "ee_lightning.app.cli", "experiment=aclsum_consistentee", "backbone=tiny_llama",
            "logger=csv", "data.max_train_samples=8", "data.max_eval_samples=3", "data.max_prompt_length=64",
            "method.lm_exits.exit_every=1", "method.lm_exits.adapters.epochs=1", "method.lm_exits.adapters.batch_size=16",
            "method.lm_exits.policy.epochs=1", "method.lm_exits.policy.batch_size=16",
            "method.lm_exits.classifier.epochs=1", "method.lm_exits.classifier.batch_size=16",
            "method.lm_exits.cache.batch_size=2", "method.generation.max_prompts=3", "method.generation.batch_size=1",
            "method.generation.max_new_tokens=4", "method.generation.rules.static=null",
            "method.generation.rules.policy=[0.3,0.5]", "method.generation.rules.softmax_margin=[0.5]",
            "method.generation.rules.saturation=[0.9]", "method.generation.rules.classifier=[0.5]",
            "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", *extra]


from tests.test_resume import untimed  # noqa: E402  results.json less its wall-clock measurements


@pytest.mark.slow
def test_a_decoder_run_on_two_cpu_processes_gives_one_process_results(tmp_path):
    """Every decoder stage under trainer=ddp (2 gloo processes), against one process.

    The trained stages are data-parallel (each process a shard of every batch order, gradients
    averaged); one process would draw other batches and other REINFORCE rollouts, so they are compared
    through the ledger: a copy of the 2-process run directory without its cache passes and generation
    is finished by one process, which reads the trained stages back and redoes the rest. Then:
    - the exit-state caches: the same tokens, targets and full-model tokens exactly; the states within
      1e-5, because the processes' batches pad the prompts differently and attention sums in another order;
    - results.json: equal, wall clock aside. The generation is exact (a prompt batch is generated whole
      by one process, then gathered); the training summary reads the cache, so within 1e-6.
    """
    import shutil

    import torch

    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    out = subprocess.run(decoder_command(two, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ledger = json.loads((two / "stages.json").read_text())
    assert list(ledger) == ["lm_cache_train", "lm_adapters", "lm_scores", "lm_policy", "lm_classifier",
                            "lm_cache_validation", "lm_generation"]
    cache_file = "checkpoints/lm_cache_train/exit_states_train.pt"
    tokens = len(torch.load(two / cache_file, weights_only=True)["tensors"]["targets"])
    for stage in ("lm_adapters", "lm_policy", "lm_classifier"):  # each process trained on half the tokens
        steps = torch.load(two / "checkpoints" / stage / "last.ckpt", weights_only=False)["global_step"]
        assert steps == -(-(-(-tokens // 2)) // 16), (stage, steps, tokens)
    two_results = json.loads((two / "results.json").read_text())
    assert two_results["prompts"] == 3 and all(p["rule"] for p in two_results["points"])
    histograms = [json.loads(line) for line in (two / "exit_histograms.jsonl").read_text().splitlines()]
    (generated,) = [h for h in histograms if h["stage"] == "lm_generation"]  # written once, by rank 0
    (at_tau,) = [p for p in two_results["points"] if p["rule"] == "policy" and p["value"] == 0.5]
    assert generated["counts"] == at_tau["exit_histogram"]  # summed over the processes' prompts

    one = tmp_path / "one"
    shutil.copytree(two, one)
    kept = {stage: info for stage, info in ledger.items() if not stage.startswith(("lm_cache", "lm_generation"))}
    (one / "stages.json").write_text(json.dumps(kept))
    for folder in ("lm_cache_train", "lm_cache_validation", "lm_generation"):
        shutil.rmtree(one / "checkpoints" / folder)
    (one / "results.json").unlink()
    out = subprocess.run(decoder_command(one), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    for split in ("train", "validation"):
        path = f"checkpoints/lm_cache_{split}/exit_states_{split}.pt"
        ours, theirs = (torch.load(run / path, weights_only=True)["tensors"] for run in (two, one))
        for key in ("targets", "full_tokens", "rows", "positions", "exit_layers"):
            assert torch.equal(ours[key], theirs[key]), (split, key)
        assert torch.allclose(ours["states"], theirs["states"], atol=1e-5), split
    one_results = untimed(json.loads((one / "results.json").read_text()))
    two_results = untimed(two_results)
    assert close(one_results.pop("training_summary"), two_results.pop("training_summary"), 1e-6)
    assert one_results == two_results


def close(a, b, tolerance: float) -> bool:
    """Nested dicts / lists equal, floats within `tolerance`."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= tolerance
    return a == b
