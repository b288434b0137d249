"""Benchmark: every exit rule at every knob, through real generation on many ACLSum test prompts.

It reads the trained exits, token policy and CALM classifier of a finished
`ee-train experiment=aclsum_consistentee` run (its saved model folder, `<run>/model/`) and generates greedily for the first
`--prompts` test prompts, `--new` new tokens each, under every rule point of the run's grid
(`method.generation.rules`, or `--grid` from a yaml file). Per point:

- ROUGE-1/2/L against the reference and ROUGE-L against the full model's own output, each the mean
  over prompts with a seeded percentile bootstrap 95% interval (`text_metrics.bootstrap_interval`);
- token agreement with the full output; average exit layer and layer saving;
- FLOPs per token (layers run, K/V fill of skipped layers, every LM-head / policy / classifier
  call) and the same in layer-equivalents (FLOPs over one layer's average; full depth is L plus
  the LM head's share, about 8 layers for SmolLM2);
- tokens/s at batch `--batch` over every prompt, and at batch 1 over the first `--speed-prompts`,
  decoding only (each batch's prompt pass runs once, shared by every rule, and is excluded), beside
  full depth through the same code and transformers' `generate` (prompt pass included on both
  sides, as `generate` cannot exclude it; stated in the report).

    python experiments/aclsum_benchmark.py --run-dir outputs/aclsum_consistentee/runs/<time>
    python experiments/aclsum_benchmark.py --run-dir ... --prompts 100 --new 48 --speed-prompts 8

Writes experiments/results/aclsum_benchmark/{benchmark.csv,benchmark.md,benchmark.png,benchmark.json}.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from confidence_reads import run_confidence_tokens
from ee_lightning.evaluation.calibration import calibrated_on
from ee_lightning.evaluation.generation_cost import measure_generation_flops, timed
from ee_lightning.evaluation.generation_eval import (calibration_note, calibration_section, generate_batch,
                                                     library_generate, merge_runs, rule_points_grid, score_points)
from ee_lightning.evaluation.pareto import plot_pareto
from ee_lightning.evaluation.text_metrics import bootstrap_interval, rouge_per_pair
from ee_lightning.exits.rules import FullRule
from ee_lightning.files import atomic_write_text
from ee_lightning.inference.generate import prefill
from ee_lightning.modeling.export import load_decoder
from ee_lightning.progress import progress_enabled
from ee_lightning.training.lm_pipeline import generation_batches

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "aclsum_benchmark"


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished aclsum_consistentee run directory")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--speed-prompts", type=int, default=8, help="prompts timed at batch 1 (0: none)")
    parser.add_argument("--grid", type=Path, default=None, help="yaml with method.generation.rules' keys")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--calibrate-prompts", type=int, default=0,
                        help="validation prompts on which each rule's knob is calibrated (0: none)")
    parser.add_argument("--level", type=float, default=0.6, help="calibration: ROUGE-L against the full output to keep")
    parser.add_argument("--kv", choices=("propagate", "defer"), default=None,
                        help="an exited token's skipped layers (default: the run's method.generation.kv). With defer the "
                             "batch runs score the same tokens through the batched real-deeper-states path, and speed "
                             "is the batch-1 deferred decoding of --speed-prompts")
    parser.add_argument("--confidence-tokens", type=int, default=0,
                        help="give the exits the head rows of the N tokens the model writes most often in the run's "
                             "training responses (rule confirmed_policy reads them), for a run trained without "
                             "method.lm_exits.confidence_tokens; 0: the run's own")
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args(argv)


def load_run(run_dir: Path):
    """(config, decoder, tokenizer, exits, policy, classifier) of a finished run: its saved model folder
    (<run>/model/, `ee_lightning.modeling.export`), which holds the trained parts, the rule grid, the
    policy's tau and the run's data config."""
    parts, decoder, tokenizer, config = load_decoder(run_dir / "model")
    return config, decoder, tokenizer, parts.exits, parts.policy, parts.classifier


def run_rules(decoder, exits, rules, batches, max_new, eos, pad, policy, classifier, flops, desc: str,
              library: bool = True, kv: str = "propagate") -> tuple[list[dict], float, dict]:
    """Every rule on every batch (prompt pass shared): merged runs per rule, prompt seconds, generate's speed."""
    from tqdm.auto import tqdm

    runs = [[] for _ in rules]
    prefill_seconds, lib = 0.0, {"seconds": 0.0, "generated": 0}
    generate_batch(decoder, exits, FullRule(), batches[0], 2, eos, pad)  # warm-up
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress_enabled()):
        cache, seconds = timed(prefill, decoder, batch["input_ids"], batch["attention_mask"])
        prefill_seconds += seconds
        shared = {**batch, "prompt_cache": cache}
        for index, (_, _, rule) in enumerate(rules):
            runs[index].append(generate_batch(decoder, exits, rule, shared, max_new, eos, pad, policy, classifier, flops,
                                              kv=kv))
        if library:
            seconds, generated = library_generate(decoder, batch, max_new, eos, pad)
            lib["seconds"] += seconds
            lib["generated"] += generated
        print(f"{desc}: batch done, {sum(len(b['references']) for b in batches[:len(runs[0])])} prompts", flush=True)
    return [merge_runs(r) for r in runs], prefill_seconds, lib


def with_intervals(points, runs, tokenizer, references, resamples) -> None:
    """Adds `<metric>_low` / `_high` (bootstrap 95%) for ROUGE-1/2/L and ROUGE-L against the full output."""
    texts = [[tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in run["tokens"]] for run in runs]
    for point, mine in zip(points, texts):
        scores = rouge_per_pair(mine, references)
        scores["rougeL_vs_full"] = rouge_per_pair(mine, texts[0])["rougeL"]
        for name, values in scores.items():
            _, point[f"{name}_low"], point[f"{name}_high"] = bootstrap_interval(values, resamples)


COLUMNS = ("rule", "value", "rouge1", "rouge1_low", "rouge1_high", "rouge2", "rouge2_low", "rouge2_high", "rougeL",
           "rougeL_low", "rougeL_high", "rougeL_vs_full", "rougeL_vs_full_low", "rougeL_vs_full_high",
           "token_agreement", "avg_exit_layer", "layer_saving", "flops", "flops_saving", "layer_equivalents",
           "tokens_per_s", "speedup_vs_full", "speedup_vs_generate", "tokens_per_s_b1", "speedup_vs_full_b1",
           "pareto_flops", "pareto_speed")


def pareto_by(points, key: str) -> None:
    """`pareto_<key>`: no other non-oracle point has ROUGE-L >= and `key` >= with one of them strictly."""
    for p in points:
        p[f"pareto_{key}"] = p["rule"] != "oracle" and not any(
            q is not p and q["rule"] != "oracle" and q["rougeL"] >= p["rougeL"] and q[key] >= p[key]
            and (q["rougeL"] > p["rougeL"] or q[key] > p[key]) for q in points)


def markdown(points, meta) -> str:
    lines = [f"# {meta['title']}", "", meta["note"], "",
             "| rule | knob | ROUGE-L (ref) [95% CI] | ROUGE-L (full) [95% CI] | ROUGE-1 | ROUGE-2 | agreement | avg exit | "
             f"layer saving | FLOPs saving | layer-equiv./token | tok/s b{meta['batch']} (vs full) | tok/s b1 (vs full) | vs generate | "
             "Pareto (FLOPs / speed) |", "|" + "---|" * 15]
    for p in points:
        b1 = "-" if p.get("tokens_per_s_b1") is None else f"{p['tokens_per_s_b1']:.1f} ({p['speedup_vs_full_b1']:.2f}x)"
        lines.append(
            f"| {p['rule']} | {'-' if p['value'] is None else p['value']} | "
            f"{p['rougeL']:.3f} [{p['rougeL_low']:.3f}, {p['rougeL_high']:.3f}] | "
            f"{p['rougeL_vs_full']:.3f} [{p['rougeL_vs_full_low']:.3f}, {p['rougeL_vs_full_high']:.3f}] | "
            f"{p['rouge1']:.3f} | {p['rouge2']:.3f} | {p['token_agreement']:.3f} | {p['avg_exit_layer']:.2f} | "
            f"{100 * p['layer_saving']:.1f}% | {100 * p['flops_saving']:.1f}% | {p['layer_equivalents']:.1f} | "
            f"{p['tokens_per_s']:.1f} ({p['speedup_vs_full']:.2f}x) | {b1} | {p['speedup_vs_generate']:.2f}x | "
            f"{'yes' if p['pareto_flops_saving'] else ''} / {'yes' if p['pareto_speed'] else ''} |")
    if meta.get("calibration"):
        lines += calibration_section(points, meta["calibration"])
    lines += ["", f"Seconds: {json.dumps(meta['seconds'])}", "", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    started = time.time()
    config, decoder, tokenizer, exits, policy, classifier = load_run(args.run_dir)
    if args.confidence_tokens:
        exits.set_confidence_tokens(run_confidence_tokens(args.run_dir, args.confidence_tokens, tokenizer.eos_token_id))
    torch.manual_seed(0)
    data = dict(config["data"])
    data["max_eval_samples"] = None
    datamodule = instantiate(data, tokenizer=tokenizer, _convert_="all")
    datamodule.setup()
    grids = OmegaConf.to_container(OmegaConf.load(args.grid)) if args.grid else config["generation"]["rules"]
    rules = rule_points_grid(grids, exits.exit_layers, policy is not None, classifier is not None, decoder.vocab_size,
                             tau=config["generation"]["tau"] if policy is not None else None)
    kv = args.kv or config["generation"].get("kv", "propagate")
    if kv == "defer" and not args.speed_prompts:  # before any generation: nothing is lost
        raise SystemExit("--kv defer measures speed at batch 1 only: give --speed-prompts > 0")
    batch_kv = "real" if kv == "defer" else kv  # the same tokens and exits as defer (tests/test_deferred.py), batched
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    flops = measure_generation_flops(decoder, exits, policy, classifier)
    batches = generation_batches(datamodule, "test", args.batch, args.prompts)
    references = [ref for batch in batches for ref in batch["references"]]
    print(f"{len(rules)} rule points, {len(references)} prompts, {args.new} new tokens", flush=True)
    seconds, calibration = {}, None
    if args.calibrate_prompts:
        clock = time.time()
        val_batches = generation_batches(datamodule, "validation", args.batch, args.calibrate_prompts)
        val_refs = [ref for batch in val_batches for ref in batch["references"]]
        val_runs, val_prefill, _ = run_rules(decoder, exits, rules, val_batches, args.new, eos, pad, policy, classifier,
                                             flops, "validation", library=False, kv=batch_kv)
        val_points, _ = score_points(rules, val_runs, tokenizer, val_refs, decoder.num_layers, val_prefill,
                                     {"seconds": 1.0, "generated": 1})
        calibration = calibration_note(args.level, len(val_refs), "validation")
        seconds["validation"] = time.time() - clock
    clock = time.time()
    runs, prefill_seconds, library = run_rules(decoder, exits, rules, batches, args.new, eos, pad, policy, classifier,
                                               flops, f"batch {args.batch}", kv=batch_kv)
    seconds[f"batch {args.batch}"] = time.time() - clock
    points, extras = score_points(rules, runs, tokenizer, references, decoder.num_layers, prefill_seconds, library)
    if calibration:
        calibrated_on(points, val_points, args.level)
    with_intervals(points, runs, tokenizer, references, args.resamples)
    unit = (extras["flops_full_depth_per_token"] - flops.exit_head) / decoder.num_layers  # one average layer
    for p in points:
        p["layer_equivalents"] = p["flops"] / unit
    if args.speed_prompts:
        clock = time.time()
        single = generation_batches(datamodule, "test", 1, args.speed_prompts)
        b1, _, _ = run_rules(decoder, exits, rules, single, args.new, eos, pad, policy, classifier, flops, "batch 1",
                             library=False, kv=kv)
        full_rate = b1[0]["generated"] / b1[0]["seconds"]
        for p, run in zip(points, b1):
            p["tokens_per_s_b1"] = run["generated"] / run["seconds"]
            p["speedup_vs_full_b1"] = p["tokens_per_s_b1"] / full_rate
        seconds["batch 1"] = time.time() - clock
    speed = "tokens_per_s_b1" if kv == "defer" else "tokens_per_s"
    pareto_by(points, "flops_saving")
    pareto_by(points, speed)
    for p in points:
        p["pareto_speed"] = p[f"pareto_{speed}"]
    seconds["total"] = time.time() - started
    title = (f"{config['backbone']['name']} on ACLSum test: {len(references)} prompts, {args.new} new tokens, greedy "
             f"(run {args.run_dir.name})")
    note = (f"Means over prompts with seeded bootstrap 95% intervals ({args.resamples} resamples). tokens/s: decoding "
            f"only, the prompt pass excluded (run once per batch and shared by every rule); batch {args.batch} over "
            f"every prompt, batch 1 over the first {args.speed_prompts}. 'vs generate' counts the prompt pass on both "
            f"sides, against transformers' greedy `generate` ({extras['transformers_generate']['tokens_per_s']:.1f} "
            f"tokens/s at batch {args.batch}). Layer-equivalents: FLOPs per token over one average layer's (full depth "
            f"= {decoder.num_layers} layers + the LM head's share). Pareto: ROUGE-L (ref) against FLOPs saving / "
            f"tokens/s at batch {1 if kv == 'defer' else args.batch}, oracle excluded. Skipped layers: {kv}"
            + (" (an exited token's skipped layers run when a later token climbs past them, so FLOPs are barely "
               "saved; the batch-" + str(args.batch) + " runs score the same tokens through the batched path that runs "
               "them at once, so their tokens/s are not this mode's; its speed is the batch-1 column)"
               if kv == "defer" else " (K/V of skipped layers from the exit state)") + ".")
    meta = {"title": title, "note": note, "batch": args.batch, "kv": kv, "calibration": calibration, "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "command": "python experiments/aclsum_benchmark.py " + " ".join(argv or sys.argv[1:])}
    if calibration:  # every knob's validation point, not only the chosen ones: how near the level each came
        meta["validation_points"] = [{k: p[k] for k in ("rule", "value", "rougeL_vs_full", "layer_saving", "rougeL")}
                                     for p in val_points]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "benchmark.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for p in points:
            writer.writerow({**{c: p.get(c, "") for c in COLUMNS}, "pareto_flops": p["pareto_flops_saving"],
                             "pareto_speed": p["pareto_speed"]})
    atomic_write_text(args.out / "benchmark.md", markdown(points, meta))
    atomic_write_text(args.out / "benchmark.json", json.dumps({"points": points, "extras": extras, **meta}, indent=1,
                                                              default=str))
    plot_pareto(points, args.out / "benchmark.png", "ROUGE-L (reference)", title)
    print(markdown(points, meta))


if __name__ == "__main__":
    main()
