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
    # 8 ACLSum pairs, every stage, 3 prompts generated one per batch (an odd count: the processes' shares differ);
    # the random model's responses run to max_response_length: 37 tokens leave a short last batch of 16
    return [sys.executable, "-m", "ee_lightning.app.cli", "experiment=aclsum_consistentee", "backbone=tiny_llama",
            "logger=csv", "data.max_train_samples=8", "data.max_eval_samples=3", "data.max_prompt_length=64",
            "data.max_response_length=37",
            "method.lm_exits.exit_every=1", "method.lm_exits.adapters.epochs=1", "method.lm_exits.adapters.batch_size=16",
            "method.lm_exits.policy.epochs=1", "method.lm_exits.policy.batch_size=16",
            "method.lm_exits.classifier.epochs=1", "method.lm_exits.classifier.batch_size=16",
            "method.lm_exits.cache.batch_size=2", "method.generation.max_prompts=3", "method.generation.batch_size=1",
            "method.generation.max_new_tokens=4", "method.generation.rules.static=null",
            "method.generation.rules.policy=[0.3,0.5]", "method.generation.rules.softmax_margin=[0.5]",
            "method.generation.rules.saturation=[0.9]", "method.generation.rules.classifier=[0.5]",
            "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", *extra]


from tests.test_resume import untimed  # noqa: E402  results.json less its wall-clock measurements


# The trained weights of 2 processes against 1: DDP all-reduces the processes' gradients, each the sum over
# half of a batch, where one process sums the batch at once; the same sum in another order differs in the
# last bits, and the Adam steps carry that into the weights (measured: at most 3e-8 after 15 steps). What
# the run decides from them (tokens, exits, accuracies) is then equal.
WEIGHT_TOLERANCE = 1e-6


@pytest.mark.slow
def test_a_decoder_run_on_two_cpu_processes_gives_one_process_results(tmp_path):
    """Every decoder stage under trainer=ddp (2 gloo processes), against the same command in one process.

    - the exit-state caches: equal, exactly (each process caches whole batches of the one batch order);
    - the trained stages (adapters, policy, classifier): the same number of steps, over the same batches
      (each process takes half of every batch, its loss weighted so that DDP's gradient average is the
      batch mean's), the policy's rollouts drawn per token from a stream seeded by (seed, epoch, token);
      their weights within WEIGHT_TOLERANCE;
    - results.json (wall clock aside), generations.jsonl and the generation's exit histogram: equal.
    Not covered: `policy.normalize_advantages=true` (each process divides by its own rows' spread), the
    propagated policy stage (its loss is a mean over its process's tokens, its rollouts drawn per step) and
    the LoRA stage (its batches are whole sequences, split by Lightning's distributed sampler)."""
    import torch

    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    runs = {"two": tmp_path / "two", "one": tmp_path / "one"}
    for name, extra in (("two", ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")), ("one", ())):
        out = subprocess.run(decoder_command(runs[name], *extra), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    two, one = runs["two"], runs["one"]
    ledger = json.loads((two / "stages.json").read_text())
    assert list(ledger) == list(json.loads((one / "stages.json").read_text())) == [
        "lm_responses_train", "lm_responses_validation", "lm_cache_train", "lm_adapters", "lm_scores", "lm_policy",
        "lm_classifier", "lm_cache_validation", "lm_calibration", "lm_generation"]

    for split in ("train", "validation"):
        path = f"checkpoints/lm_cache_{split}/exit_states_{split}.pt"
        ours, theirs = (torch.load(run / path, weights_only=True)["tensors"] for run in (two, one))
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (split, key)
    tokens = len(torch.load(two / "checkpoints/lm_cache_train/exit_states_train.pt", weights_only=True)["tensors"]["targets"])
    assert tokens % 16  # a short last batch: its rows weigh 1 / its size
    for stage in ("lm_adapters", "lm_policy", "lm_classifier"):
        ours, theirs = (torch.load(run / "checkpoints" / stage / "last.ckpt", weights_only=False) for run in (two, one))
        assert ours["global_step"] == theirs["global_step"] == -(-tokens // 16), stage  # the batches of one process
        assert ours["state_dict"].keys() == theirs["state_dict"].keys()
        for key, value in ours["state_dict"].items():
            assert torch.allclose(value, theirs["state_dict"][key], rtol=0, atol=WEIGHT_TOLERANCE), (stage, key)

    two_results, one_results = (untimed(json.loads((run / "results.json").read_text())) for run in (two, one))
    assert two_results["prompts"] == 3 and all(p["rule"] for p in two_results["points"])
    assert two_results == one_results
    assert (two / "generations.jsonl").read_text() == (one / "generations.jsonl").read_text()
    histograms = {name: [json.loads(line) for line in (run / "exit_histograms.jsonl").read_text().splitlines()]
                  for name, run in runs.items()}
    generated = {name: [h for h in rows if h["stage"] == "lm_generation"] for name, rows in histograms.items()}
    assert len(generated["two"]) == 1 and generated["two"] == generated["one"]  # written once, by rank 0
    (at_tau,) = [p for p in two_results["points"] if p["rule"] == "policy" and p["value"] == 0.5]
    assert generated["two"][0]["counts"] == at_tau["exit_histogram"]  # summed over the processes' prompts
