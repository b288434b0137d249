"""Where a generated token's time goes: batch-1 decoding of SmolLM2 through our code, by part.

For each rule (full depth, a static exit, the trained policy at its tau) it decodes the same prompts
greedily at batch 1, the prompt pass excluded, and splits the wall clock per token into: the
decoder layers the token ran, the K/V fill of the layers it skipped, LM-head calls (exit adapter,
final norm and head), the policy's net, and the rest (our Python: the per-layer loop, the rule,
row bookkeeping, the attention mask and embeddings of each step). Beside it, transformers' own
`generate` at batch 1 on the same prompts (its prompt pass included, as it cannot leave it out;
the prompt pass's own time is measured and stated). Each part is timed by wrapping the method that
does it, so the parts add up to what the loop spends inside them.

    python experiments/decode_profile.py --run-dir <a finished aclsum_consistentee run> --prompts 8 --new 32

Writes experiments/results/decode_profile/{profile.json,profile.md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ee_lightning.evaluation.generation_eval import library_generate
from ee_lightning.exits.rules import FullRule, PolicyRule, StaticRule
from ee_lightning.files import atomic_write_text
from ee_lightning.inference.deferred import generate_deferred
from ee_lightning.inference.generate import generate_with_exits, prefill
from ee_lightning.modeling.export import load_decoder
from ee_lightning.progress import progress_enabled
from ee_lightning.training.lm_pipeline import generation_batches

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "decode_profile"


class PartTimer:
    """Wraps methods so each call's wall time is added to a named part (only the outermost call counts)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self._depth = 0
        self._undo = []

    def wrap(self, owner, name: str, part: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if self._depth:
                return original(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start
                self._depth -= 1

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--static", type=int, default=24, help="the static rule's exit layer")
    parser.add_argument("--tau", type=float, default=None, help="the policy's tau (default: the run's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--kv", nargs="+", default=["propagate", "defer"], choices=("propagate", "defer"))
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args(argv)


def profile_rule(decoder, parts, rule, batches, new, eos, pad, kv: str = "propagate") -> dict:
    """Decode every prompt at batch 1 under `rule`; the per-part seconds and the token count."""
    caches = [prefill(decoder, batch["input_ids"], batch["attention_mask"]) for batch in batches]  # not timed
    timer = PartTimer()
    # instance attributes shadow the methods, so only this decoder and these parts are timed
    timer.wrap(decoder, "run_layer", "layers")
    timer.wrap(decoder, "kv", "kv_fill")
    timer.wrap(parts.exits, "logits", "lm_head")
    if parts.policy is not None:
        timer.wrap(parts.policy, "logit", "policy")
    timer.wrap(decoder, "start", "step_start")
    timer.wrap(decoder, "fill_skipped_kv", "kv_fill")
    total, tokens, layers = 0.0, 0, []
    try:
        for batch, cache in tqdm(list(zip(batches, caches)), desc=f"profiling {rule.name}", unit="prompt",
                                 disable=not progress_enabled()):
            start = time.perf_counter()  # generate copies the prompt's cache: that copy is in "other"
            if kv == "defer":
                out = generate_deferred(decoder, parts.exits, rule, batch["input_ids"], None, new, eos_token_id=eos,
                                        policy=parts.policy, prompt_cache=cache)
            else:
                out = generate_with_exits(decoder, parts.exits, rule, batch["input_ids"], batch["attention_mask"], new,
                                          eos_token_id=eos, pad_token_id=pad, policy=parts.policy, prompt_cache=cache)
            total += time.perf_counter() - start
            tokens += int(out.token_mask.sum())
            layers.append(out.exit_layers[out.token_mask])
    finally:
        timer.restore()
    measured = dict(timer.seconds)
    measured["other"] = total - sum(measured.values())
    return {"rule": rule.name, "tokens": tokens, "seconds": total, "ms_per_token": 1000 * total / tokens,
            "ms_per_token_by_part": {k: 1000 * v / tokens for k, v in measured.items()},
            "avg_exit_layer": float(torch.cat(layers).float().mean())}


def main(argv=None):
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts, decoder, tokenizer, config = load_decoder(args.run_dir / "model")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    datamodule = instantiate(OmegaConf.create(config["data"]), tokenizer=tokenizer, _convert_="all")
    datamodule.setup()
    batches = generation_batches(datamodule, "test", 1, args.prompts)
    eos, pad = tokenizer.eos_token_id, datamodule.pad_id
    tau = float(config["generation"]["tau"])
    tau = args.tau if args.tau is not None else tau
    rules = [FullRule(), StaticRule(args.static)] + ([PolicyRule(tau)] if parts.policy is not None else [])
    rows = []
    with torch.no_grad():
        profile_rule(decoder, parts, FullRule(), batches[:1], 4, eos, pad)  # warm-up
        for rule in rules:
            for kv in args.kv:
                rows.append({**profile_rule(decoder, parts, rule, batches, args.new, eos, pad, kv), "kv": kv})
            print(json.dumps(rows[-1]), flush=True)
        # transformers' generate at batch 1, its prompt pass included; our prompt pass timed alone
        library, prompt_seconds, library_tokens = 0.0, 0.0, 0
        for batch in batches:
            start = time.perf_counter()
            prefill(decoder, batch["input_ids"], batch["attention_mask"])
            prompt_seconds += time.perf_counter() - start
            seconds, generated = library_generate(decoder, batch, args.new, eos, pad)
            library += seconds
            library_tokens += generated
    full = rows[0]["ms_per_token"]
    report = {"prompts": len(batches), "max_new_tokens": args.new, "threads": torch.get_num_threads(),
              "rules": rows, "transformers_generate": {
                  "tokens": library_tokens, "ms_per_token_with_prompt": 1000 * library / library_tokens,
                  "ms_per_token_without_our_prompt_pass": 1000 * (library - prompt_seconds) / library_tokens},
              "speed_vs_full": {f"{row['rule']} ({row['kv']})": full / row["ms_per_token"] for row in rows}}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "profile.json", json.dumps(report, indent=2))
    atomic_write_text(args.out / "profile.md", markdown(report))
    print(markdown(report))


def markdown(report) -> str:
    parts = sorted({part for row in report["rules"] for part in row["ms_per_token_by_part"]})
    lines = [f"# Batch-1 decoding, ms per generated token by part ({report['prompts']} prompts, "
             f"{report['max_new_tokens']} new tokens, {report['threads']} threads)", "",
             "| rule (skipped layers) | tokens | ms/token | " + " | ".join(parts) + " | speed vs full |",
             "|---|---|---|" + "---|" * len(parts) + "---|"]
    for row in report["rules"]:
        by = row["ms_per_token_by_part"]
        label = f"{row['rule']} ({row['kv']})"
        lines.append(f"| {label} | {row['tokens']} | {row['ms_per_token']:.1f} | "
                     + " | ".join(f"{by.get(p, 0.0):.1f}" for p in parts)
                     + f" | {report['speed_vs_full'][label]:.2f}x |")
    lib = report["transformers_generate"]
    lines += ["", f"transformers `generate`, batch 1: {lib['ms_per_token_with_prompt']:.1f} ms per token with its "
              f"prompt pass, {lib['ms_per_token_without_our_prompt_pass']:.1f} ms less our prompt pass's time."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
