"""Benchmark: one policy-training step with cached rollouts versus the authors' way.

Ours: with backbone and heads frozen, the backbone runs ONCE per batch; the K rollouts are
Bernoulli draws over the cached pooled states, head losses and policy probabilities.
Authors': the batch is repeated K times and each copy goes through the backbone, one rollout each.
Both then take the same REINFORCE step (per-instance mean baseline over the K rollouts).

Same result distribution: with one fixed policy, the exit layer of a rollout has the same law
either way; we compare the exit-layer histograms of many steps (total variation distance).

    python experiments/bench_rollouts.py                 # MiniLM-L6, batch 32, 64 tokens, K = 8
    python experiments/bench_rollouts.py --backbone tiny_bert --steps 3

Writes experiments/results/bench_rollouts.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ee_lightning.modeling.backbones import build_backbone
from ee_lightning.modeling.heads import ExitHeads
from ee_lightning.modeling.model import EarlyExitModel
from ee_lightning.modeling.exit_policy import ExitPolicy
from ee_lightning.exits.rl import advantages, policy_loss, reinforce_objective, rewards, rollout
from ee_lightning.training.systems.policy import layer_losses_and_correct
from ee_lightning.tasks import TaskSpec

ROOT = Path(__file__).resolve().parents[1]
TASK = TaskSpec("bench", "classification", 2, "acc")


def policy_logits(model: EarlyExitModel, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return torch.stack([model.policy.logit(layer, pooled[layer], logits[layer]) for layer in range(model.num_layers)])


def frozen_pass(model: EarlyExitModel, batch: dict):
    """Backbone and heads without gradients (they are frozen in the policy stage)."""
    with torch.no_grad():
        outputs = model(batch)
    return outputs.pooled, outputs.logits


def step_cached(model, optimizer, batch, labels, k, settings):
    pooled, logits = frozen_pass(model, batch)
    losses, correct = layer_losses_and_correct(TASK, logits, labels, 0.5)
    step = reinforce_objective(policy_logits(model, pooled, logits), losses, correct, None, k=k, **settings)
    optimizer.zero_grad()
    step.loss.backward()
    optimizer.step()
    return step.exits


def step_repeated(model, optimizer, batch, labels, k, settings):
    """The authors' way: K copies of the batch through the backbone, one rollout per copy."""
    repeated = {name: value.repeat(k, *([1] * (value.dim() - 1))) for name, value in batch.items()}
    pooled, logits = frozen_pass(model, repeated)
    losses, correct = layer_losses_and_correct(TASK, logits, labels.repeat(k), 0.5)
    exit_logits = policy_logits(model, pooled, logits)  # [L, K*B]
    size = labels.shape[0]
    exits, log_probs = rollout(1, logits=exit_logits)  # [1, K*B]: one rollout per copy
    parts = rewards(exits, losses, correct, None, model.num_layers, settings["alpha"], settings["task_term"],
                    settings["depth_term"])
    # The K copies of an instance form its baseline group.
    exits, log_probs, reward = exits.view(k, size), log_probs.view(k, size), parts.reward.view(k, size)
    loss = policy_loss(advantages(reward), log_probs)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return exits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm_l6")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench_rollouts"))
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone, tokenizer = build_backbone(OmegaConf.load(ROOT / "conf" / "backbone" / f"{args.backbone}.yaml"))
    model = EarlyExitModel(backbone, ExitHeads(backbone.num_layers, backbone.hidden_size, 2, pooling="mean"),
                           policy=ExitPolicy(backbone.num_layers, backbone.hidden_size, 2)).eval()
    model.backbone.requires_grad_(False)
    model.heads.requires_grad_(False)
    vocab = len(tokenizer)
    batch = {
        "input_ids": torch.randint(1000, vocab, (args.batch_size, args.seq_len)),
        "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
        "token_type_ids": torch.zeros(args.batch_size, args.seq_len, dtype=torch.long),
    }
    labels = torch.randint(0, 2, (args.batch_size,))
    settings = {"alpha": 0.05, "task_term": "correct", "depth_term": "plain"}
    optimizer = torch.optim.SGD(model.policy.parameters(), lr=0.0)  # lr 0: the policy stays fixed, so
    # both ways sample from the same distribution at every step.

    timings, histograms = {}, {}
    for name, step in (("cached", step_cached), ("repeated", step_repeated)):
        times, exits = [], []
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            exit_layers = step(model, optimizer, batch, labels, args.k, settings)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
                exits.append(exit_layers.flatten())
        timings[name] = statistics.median(times)
        histograms[name] = (torch.bincount(torch.cat(exits) - 1, minlength=model.num_layers).float()
                            / torch.cat(exits).numel()).tolist()
    tv = 0.5 * sum(abs(a - b) for a, b in zip(histograms["cached"], histograms["repeated"]))
    result = {
        "backbone": args.backbone, "batch_size": args.batch_size, "seq_len": args.seq_len, "k": args.k,
        "steps": args.steps, "threads": torch.get_num_threads(),
        "seconds_per_step": timings, "speedup": timings["repeated"] / timings["cached"],
        "exit_distribution": histograms, "total_variation": tv,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    table = (f"# Policy-training step: cached rollouts vs the batch repeated K times\n\n"
             f"{args.backbone}, batch {args.batch_size} x {args.seq_len} tokens, K = {args.k}, "
             f"median of {args.steps} steps, {torch.get_num_threads()} threads\n\n"
             f"| way | seconds / step |\n|---|---|\n"
             f"| cached (backbone once per batch) | {timings['cached']:.3f} |\n"
             f"| authors' (batch repeated K times) | {timings['repeated']:.3f} |\n\n"
             f"**speed-up: {result['speedup']:.1f}x**; exit-layer distributions: "
             f"cached {[round(x, 3) for x in histograms['cached']]}, repeated "
             f"{[round(x, 3) for x in histograms['repeated']]} (total variation {tv:.3f})\n")
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
