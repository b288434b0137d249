"""Study: ConsistentEE's token policy proposes an exit, the exit's margin over the frequent rows confirms it.

`confidence_reads.py` found that CALM's softmax margin over the head's rows of the most frequent training tokens
keeps nearly what the whole head's margin keeps, but that reading it at every exit costs about a layer each time,
so it never runs faster than full depth. Here a run's trained token policy says where a token could leave (p >
tau), and the margin is read only there (the package's rule `confirmed_policy`, `exits.rules.ConfirmedPolicyRule`):
the token leaves where the margin is at least m too. Every (tau, m) of the grid generates on `--calibrate-prompts`
validation prompts; the point chosen there (the most layer saving whose ROUGE-L against the full output is at least
`--level`, CALM's calibration) is then measured on the first `--prompts` test prompts beside full depth, the policy
alone at the same tau, the margin over the frequent rows at every exit at the same m, and a static exit, with
seeded bootstrap 95% intervals, and timed at batch 1 with the skipped layers deferred (every rule in turn, prompt
by prompt, the prompt pass excluded).

    python experiments/confirmed_policy.py --run-dir <a finished aclsum_consistentee run>

Writes confirmed_policy.{md,json} to --out (default experiments/results/confirmed_policy/).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from aclsum_benchmark import with_intervals
from confidence_reads import FrequentMarginReader, batch1_ms_per_token, frequent_head, generate_all
from ee_lightning.evaluation.generation_cost import measure_generation_flops
from ee_lightning.evaluation.generation_eval import score_points
from ee_lightning.exits.rules import ConfirmedPolicyRule, FullRule, PolicyRule, StaticRule
from ee_lightning.files import atomic_write_text
from ee_lightning.modeling.export import load_decoder
from ee_lightning.training.lm_pipeline import generation_batches

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "confirmed_policy"


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished aclsum_consistentee run directory")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.02, 0.05, 0.1], help="the policy's proposal taus")
    parser.add_argument("--margins", type=float, nargs="+", default=[0.25, 0.3, 0.35, 0.4], help="confirming margins")
    parser.add_argument("--calibrate-prompts", type=int, default=16, help="validation prompts that choose (tau, m)")
    parser.add_argument("--level", type=float, default=0.6, help="ROUGE-L against the full output to keep on validation")
    parser.add_argument("--prompts", type=int, default=100, help="test prompts")
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--speed-prompts", type=int, default=8, help="test prompts timed at batch 1")
    parser.add_argument("--frequent", type=int, default=4096, help="rows of the head: the most frequent training tokens")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args(argv)


def choose(points: list[dict], level: float) -> int | None:
    """Index of the confirmed point with the most layer saving whose ROUGE-L against the full output is >= level."""
    kept = [i for i, p in enumerate(points) if p["label"].startswith("confirmed") and p["rougeL_vs_full"] >= level]
    return max(kept, key=lambda i: (points[i]["layer_saving"], points[i]["rougeL_vs_full"])) if kept else None


def markdown(validation: list[dict], test: list[dict], meta: dict) -> str:
    lines = [f"# {meta['title']}", "", meta["note"], "", f"## Validation ({meta['calibrate_prompts']} prompts)", "",
             "| rule | layer saving | ROUGE-L (full) | ROUGE-L (ref) |", "|---|---|---|---|"]
    lines += [f"| {p['label']} | {100 * p['layer_saving']:.1f}% | {p['rougeL_vs_full']:.3f} | {p['rougeL']:.3f} |"
              for p in validation]
    lines += ["", f"Chosen: {meta['chosen'] or 'none reaches the level'}", "", f"## Test ({meta['prompts']} prompts)", "",
              "| rule | layer saving | ROUGE-L (ref) [95% CI] | ROUGE-L (full) [95% CI] | agreement | ms/token, batch 1 | "
              "vs full |", "|---|---|---|---|---|---|---|"]
    for p in test:
        lines.append(f"| {p['label']} | {100 * p['layer_saving']:.1f}% | {p['rougeL']:.3f} [{p['rougeL_low']:.3f}, "
                     f"{p['rougeL_high']:.3f}] | {p['rougeL_vs_full']:.3f} [{p['rougeL_vs_full_low']:.3f}, "
                     f"{p['rougeL_vs_full_high']:.3f}] | {p['token_agreement']:.3f} | {p['ms_per_token']:.1f} | "
                     f"{p['speed_vs_full']:.2f}x |")
    lines += ["", f"Seconds: {json.dumps(meta['seconds'])}", "", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    started, seconds = time.time(), {}
    parts, decoder, tokenizer, config = load_decoder(args.run_dir / "model")
    exits, policy = parts.exits, parts.policy
    if policy is None:
        raise SystemExit(f"{args.run_dir}: the run trained no token policy (method.lm_exits.policy.epochs=0)")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    head = frequent_head(args.run_dir, decoder, args.frequent, eos)
    exits.set_confidence_tokens(head.token_ids)  # a run trained with lm_exits.confidence_tokens has them already
    reader = FrequentMarginReader(exits, decoder, head)
    datamodule = instantiate({**config["data"], "max_eval_samples": None}, tokenizer=tokenizer, _convert_="all")
    datamodule.setup()
    flops = measure_generation_flops(decoder, exits)  # the scoring reads them; this study reports speed instead

    def confirmed(tau: float, m: float) -> tuple:
        return (f"confirmed: policy > {tau}, margin >= {m}", "confirmed_policy", [tau, m],
                ConfirmedPolicyRule(tau=tau, margin=m), policy)

    def scored(rules, runs, references):
        points, _ = score_points([(name, value, rule) for _, name, value, rule, _ in rules], runs, tokenizer,
                                 references, decoder.num_layers, 1.0, {"seconds": 1.0, "generated": 1})
        for point, (label, *_) in zip(points, rules):
            point["label"] = label
        return points

    full = ("full depth", "full", None, FullRule(), None)
    clock = time.time()
    val_batches = generation_batches(datamodule, "validation", 8, args.calibrate_prompts)
    val_rules = [full, *[confirmed(tau, m) for tau in args.taus for m in args.margins],
                 *[(f"policy alone, tau {tau}", "policy", tau, PolicyRule(tau=tau), policy) for tau in args.taus]]
    with torch.no_grad():
        val_runs = generate_all(decoder, exits, val_rules, val_batches, args.new, eos, pad, flops, "validation")
    validation = scored(val_rules, val_runs, [ref for batch in val_batches for ref in batch["references"]])
    pick = choose(validation, args.level)
    seconds["validation"] = time.time() - clock
    test_rules = [full, ("static exit at layer 24", "static", 24, StaticRule(k=24), None)]
    if pick is not None:
        tau, m = validation[pick]["value"]
        test_rules += [confirmed(tau, m), (f"policy alone, tau {tau}", "policy", tau, PolicyRule(tau=tau), policy),
                       (f"margin over the frequent rows at every exit, > {m}", "policy", m, PolicyRule(tau=m), reader)]
    clock = time.time()
    batches = generation_batches(datamodule, "test", 8, args.prompts)
    references = [ref for batch in batches for ref in batch["references"]]
    with torch.no_grad():
        runs = generate_all(decoder, exits, test_rules, batches, args.new, eos, pad, flops, "test")
        test = scored(test_rules, runs, references)
        with_intervals(test, runs, tokenizer, references, args.resamples)
        seconds["test"] = time.time() - clock
        clock = time.time()
        speed = batch1_ms_per_token(decoder, exits, test_rules, generation_batches(datamodule, "test", 1,
                                                                                 args.speed_prompts),
                                    args.new, eos, pad)
        seconds["batch 1"] = time.time() - clock
    for point, ms in zip(test, speed):
        point["ms_per_token"], point["speed_vs_full"] = ms, speed[0] / ms
    seconds["total"] = time.time() - started
    keys = ("label", "value", "layer_saving", "avg_exit_layer", "rougeL", "rougeL_low", "rougeL_high", "rouge1",
            "rouge2", "rougeL_vs_full", "rougeL_vs_full_low", "rougeL_vs_full_high", "token_agreement",
            "ms_per_token", "speed_vs_full")
    meta = {"title": f"The policy proposes, the margin over the frequent rows confirms (run {args.run_dir.name})",
            "note": (f"{head.rows} frequent rows (the tokens the model writes most often in the run's training "
                     f"responses, at most {args.frequent}, EOS included); {args.new} new tokens, greedy; tokens as "
                     f"deferred skipped layers give them (the real layers, batched); (tau, m) chosen on validation: "
                     f"the most layer saving with ROUGE-L against the full output >= {args.level}. Test: seeded "
                     f"bootstrap 95% intervals ({args.resamples} resamples); batch-1 speed with deferred skipped "
                     f"layers over the first {args.speed_prompts} test prompts, the prompt pass excluded."),
            "calibrate_prompts": args.calibrate_prompts, "prompts": len(references),
            "chosen": None if pick is None else validation[pick]["label"],
            "seconds": {key: round(value, 1) for key, value in seconds.items()},
            "command": "python experiments/confirmed_policy.py " + " ".join(argv or sys.argv[1:])}
    validation = [{key: p[key] for key in ("label", "value", "layer_saving", "rougeL_vs_full", "rougeL")}
                  for p in validation]
    test = [{key: p[key] for key in keys} for p in test]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "confirmed_policy.md", markdown(validation, test, meta))
    atomic_write_text(args.out / "confirmed_policy.json",
                      json.dumps({"validation": validation, "test": test, **meta}, indent=1, default=str))
    print(markdown(validation, test, meta))


if __name__ == "__main__":
    main()
