"""Study: how much do propagated K/V (instead of real deeper states) move later tokens?

A token that exits at layer t owes keys/values to layers t+1..L. We fill them from its exit
state through each deeper layer's input norm and K/V projections (CALM's state propagation).
The alternative, "real deeper states", keeps running the exited token through the deeper layers
for its K/V only (no saving; the reference). Propagation can only change a LATER token that
goes deeper than an earlier one's exit, so the study mixes depths: every token exits at layer t
with probability 1/2 (seeded, the same draws in both runs), else runs all L layers.

1. Teacher-forced: both runs are fed the full model's greedy continuation, so they differ only
   in the K/V of earlier exited tokens. Over the full-depth tokens that follow an early exit:
   top-1 agreement of the two runs, agreement of each with the full model's token, the mean
   largest |logit difference| and KL(real || propagated) of the next-token distributions.
2. Free-running with the oracle rule (each token exits at the first layer whose token equals
   the full model's, given the cache so far): token agreement of the two generations with each
   other and with the full model's output.

Exits are untrained (the model's final norm and tied LM head on the raw state, every layer);
only the K/V matter in (1). SmolLM2-135M-Instruct, greedy, chat-template prompts:

    python experiments/kv_propagation.py                     # about 10 minutes on a busy 2-core machine
    python experiments/kv_propagation.py --layers 10 20 --new 16

Writes experiments/results/kv_propagation.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from ee_lightning.exits.rules import ExitRule, FullRule, OracleRule, row_state
from ee_lightning.files import atomic_write_text
from ee_lightning.inference.generate import PlainExits, generate_with_exits
from ee_lightning.modeling.backbones.decoder_build import build_decoder

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Summarize in one sentence why the sky is blue.",
    "Write a short email to a colleague asking to move our meeting to Friday.",
    "Explain what a hash table is to a beginner programmer.",
    "Give three tips for growing tomatoes on a balcony.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle in simple terms.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How does a vaccine train the immune system?",
]


@dataclass(frozen=True)
class CoinExit(ExitRule):
    """Exit at `layer` with probability `p` (seeded draws), else run to the last layer."""

    layer: int = 1
    p: float = 0.5
    seed: int = 0
    name: ClassVar[str] = "coin"

    def __post_init__(self):  # the draws' generator: state outside the knobs (a frozen dataclass)
        object.__setattr__(self, "_generator", torch.Generator().manual_seed(self.seed))

    def init_state(self, batch_size, device=None):
        return row_state(batch_size, device)

    def decide(self, layer, signals, state, labels=None, is_regression=False):
        rows = state["rows"]
        if layer != self.layer:
            return torch.zeros_like(rows), state
        return torch.rand(rows.shape, generator=self._generator).to(rows.device) < self.p, state


def teacher_forced(decoder, exits, ids, mask, reference, layer, p, seed):
    runs = {}
    for propagate in (True, False):
        runs[propagate] = generate_with_exits(decoder, exits, CoinExit(layer, p, seed), ids, mask, reference.shape[1],
                                              force_tokens=reference, output_logits=True, propagate_kv=propagate)
    prop, real = runs[True], runs[False]
    assert torch.equal(prop.exit_layers, real.exit_layers)
    early = (prop.exit_layers < decoder.num_layers) & prop.token_mask
    after_early = early.long().cumsum(1) - early.long() > 0  # an earlier token of the row exited early
    affected = after_early & ~early & prop.token_mask
    lp, lr = prop.logits[affected].log_softmax(-1), real.logits[affected].log_softmax(-1)
    top_p, top_r = lp.argmax(-1), lr.argmax(-1)
    target = reference[affected]
    return {
        "exit_layer": layer,
        "early_fraction": float(early.sum() / prop.token_mask.sum()),
        "tokens_compared": int(affected.sum()),
        "top1_agreement_propagated_vs_real": float((top_p == top_r).float().mean()),
        "full_token_agreement_propagated": float((top_p == target).float().mean()),
        "full_token_agreement_real": float((top_r == target).float().mean()),
        "mean_max_abs_logit_diff": float((prop.logits[affected] - real.logits[affected]).abs().amax(-1).mean()),
        "mean_kl_real_to_propagated": float((lr.exp() * (lr - lp)).sum(-1).mean()),
    }


def agreement(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a == b) & mask).sum() / mask.sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 15, 22, 27])
    parser.add_argument("--new", type=int, default=24, help="new tokens per prompt")
    parser.add_argument("--p", type=float, default=0.5, help="probability that a token exits early")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "kv_propagation"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()

    decoder, tokenizer = build_decoder(OmegaConf.load(ROOT / "conf" / "backbone" / "smollm2_135m.yaml"))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    exits = PlainExits(decoder.num_layers)
    eos = tokenizer.eos_token_id
    full = generate_with_exits(decoder, exits, FullRule(), ids, mask, args.new, eos_token_id=eos, pad_token_id=eos)
    reference = full.new_tokens

    forced = []
    jobs = [(layer, seed) for layer in args.layers for seed in args.seeds]
    for layer, seed in tqdm(jobs, desc="teacher-forced pairs", disable=not sys.stderr.isatty()):
        forced.append({"seed": seed, **teacher_forced(decoder, exits, ids, mask, reference, layer, args.p, seed)})

    free = {}
    for propagate in (True, False):
        free[propagate] = generate_with_exits(decoder, exits, OracleRule(), ids, mask, args.new, eos_token_id=eos,
                                              pad_token_id=eos, propagate_kv=propagate)
    width = min(out.new_tokens.shape[1] for out in (*free.values(), full))
    both = full.token_mask[:, :width]
    prop_tokens, real_tokens = free[True].new_tokens[:, :width], free[False].new_tokens[:, :width]
    oracle = {
        "new_tokens": int(both.sum()),
        "agreement_propagated_vs_real": agreement(prop_tokens, real_tokens, both),
        "agreement_propagated_vs_full": agreement(prop_tokens, reference[:, :width], both),
        "agreement_real_vs_full": agreement(real_tokens, reference[:, :width], both),
        "mean_exit_layer_propagated": float(free[True].exit_layers[free[True].token_mask].float().mean()),
        "mean_exit_layer_real": float(free[False].exit_layers[free[False].token_mask].float().mean()),
    }
    result = {"model": "SmolLM2-135M-Instruct", "layers": decoder.num_layers, "prompts": len(PROMPTS), "new_tokens": args.new,
              "p_early": args.p, "teacher_forced": forced, "oracle_free_running": oracle,
              "example": {"prompt": PROMPTS[0], "full": tokenizer.decode(reference[0], skip_special_tokens=True),
                          "oracle_propagated": tokenizer.decode(prop_tokens[0], skip_special_tokens=True),
                          "oracle_real": tokenizer.decode(real_tokens[0], skip_special_tokens=True)},
              "seconds": round(time.time() - started, 1),
              "command": "python experiments/kv_propagation.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2))
    atomic_write_text(out.with_suffix(".md"), report(result))
    print(report(result))


def report(r) -> str:
    lines = [
        "# Propagated K/V versus real deeper states (SmolLM2-135M-Instruct)",
        "",
        f"{r['prompts']} chat prompts, {r['new_tokens']} new tokens each, greedy; untrained exits (final norm + tied LM head).",
        f"Command: `{r['command'].strip()}` ({r['seconds']} s).",
        "",
        f"## 1. Teacher-forced on the full model's output; each token exits at layer t with p = {r['p_early']}, else at {r['layers']}",
        "",
        "Compared: full-depth tokens that follow an early-exited one (they read its propagated K/V at layers > t).",
        "",
        "| t | seed | tokens | top-1 agree (prop. vs real) | = full token (prop.) | = full token (real) | mean max abs logit diff | KL(real, prop.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in r["teacher_forced"]:
        lines.append(f"| {f['exit_layer']} | {f['seed']} | {f['tokens_compared']} | {f['top1_agreement_propagated_vs_real']:.3f} | "
                     f"{f['full_token_agreement_propagated']:.3f} | {f['full_token_agreement_real']:.3f} | "
                     f"{f['mean_max_abs_logit_diff']:.3f} | {f['mean_kl_real_to_propagated']:.4f} |")
    o = r["oracle_free_running"]
    lines += [
        "",
        "## 2. Free-running with the oracle rule",
        "",
        f"Over {o['new_tokens']} generated tokens: propagated vs real agree on {o['agreement_propagated_vs_real']:.3f}; "
        f"propagated vs full model {o['agreement_propagated_vs_full']:.3f}; real vs full model {o['agreement_real_vs_full']:.3f}. "
        f"Mean exit layer: {o['mean_exit_layer_propagated']:.2f} (propagated), {o['mean_exit_layer_real']:.2f} (real).",
        "",
        f"Example ({r['example']['prompt']!r}):",
        f"- full: {r['example']['full']!r}",
        f"- oracle, propagated K/V: {r['example']['oracle_propagated']!r}",
        f"- oracle, real deeper states: {r['example']['oracle_real']!r}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
