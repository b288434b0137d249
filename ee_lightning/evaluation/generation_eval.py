"""Every exit rule at every knob, through real early-exit generation on held-out prompts.

One point per (rule, knob): generate greedily for every prompt of the split with that rule, then
score the text and count the cost:
    rouge1/2/L          against the reference (ROUGE F1, rouge-score), metric = rougeL
    rougeL_vs_full      against the full model's own greedy output (same code, rule `full`)
    token_agreement     with the full model's greedy tokens (per-pair mean; micro in the csv)
    avg_exit_layer      per generated token; layer_saving = 1 - avg / L
    flops_per_token     layers run + K/V fills of skipped layers + every LM-head / policy /
                        classifier call (evaluation/generation_cost.py); flops_saving vs full depth
    tokens_per_s        generated tokens over the wall time of the decoding steps (the prompts'
                        pass is run once and shared by every rule); speedup_vs_full divides by the
                        full-depth pass through the same code
    speedup_vs_generate tokens per second with the prompts' pass included, over transformers' own
                        `generate` (greedy, prompts included) on the same prompts, same process
The oracle needs the full model's token at every step: a bound, never a competitor.
The pass itself is a Lightning test (`training.systems.generation.GenerationEvalSystem`): each
test step generates one prompt batch under every point (`generate_batch`); `score_points` then
scores the merged runs.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ee_lightning.evaluation.generation_cost import timed
from ee_lightning.evaluation.frontier import value_at_saving
from ee_lightning.evaluation.pareto import mark_pareto, write_report
from ee_lightning.evaluation.text_metrics import corpus_token_agreement, rouge_f1, trim_generation
from ee_lightning.files import atomic_write_text
from ee_lightning.exits.rules import GRID_KNOBS, RULES, FullRule, default_grid, rule_from_grid
from ee_lightning.inference.deferred import deferred_layers_after_exit, generate_deferred_each, prefill_each
from ee_lightning.inference.generate import generate_with_exits, unpadded_prompts

log = logging.getLogger(__name__)

# The report's order; every rule of `exits.rules` runs in generation.
RULE_ORDER = ("full", "policy", "confirmed_policy", "softmax_margin", "saturation", "classifier", "entropy", "maxprob",
              "patience", "pcee", "static", "oracle")


def rule_points_grid(grids: dict, exit_layers: list[int], has_policy: bool, has_classifier: bool,
                     vocab_size: int = 2, tau: float | None = None) -> list:
    """(name, knob value, rule) for every rule at every knob in `grids` (name -> a list of knob values,
    as `method.generation.rules`: a missing name, null, [] or false leave a rule out, but `static: null`
    is every exit layer below the last; true is the rule's default grid, the oracle's one point).
    `full` always comes first. Rules whose module was not trained are left out. `tau`, the policy's
    trained threshold, is always one of the policy's points when the policy is evaluated."""
    unknown = sorted(set(grids) - set(RULES))
    if unknown:
        raise ValueError(f"method.generation.rules has unknown rule(s) {unknown}; rules: {', '.join(RULE_ORDER)}")
    num_layers = exit_layers[-1]
    points = [("full", None, FullRule())]
    for name in RULE_ORDER[1:]:
        if name not in grids:
            continue
        values = grids[name]
        if name == "static" and values is None:
            values = exit_layers[:-1]
        elif values is True:
            # patience counts decisions, and a rule decides at exit layers only: its default counts exits
            values = exit_layers[:-1] if name == "static" else default_grid(name, len(exit_layers), vocab_size)
        needs = RULES[name].needs  # a rule whose trained module the run lacks is left out
        if not values or ("exit_prob" in needs and not has_policy) or ("classifier_prob" in needs and not has_classifier):
            continue
        if name == "policy" and tau is not None and tau not in values:
            values = [*values, tau]
        for value in values:
            try:
                points.append((name, value, rule_from_grid(name, value, num_layers)))
            except ValueError as err:
                raise ValueError(f"method.generation.rules.{name}={list(values)}: {err}") from None
    return points


def policy_at(rules: list, tau: float) -> int | None:
    """The position of the policy's point at `tau` in `rules` (`rule_points_grid`), None without one."""
    return next((i for i, (name, value, _) in enumerate(rules) if name == "policy" and value == tau), None)


def knob_name(rule: str) -> str | None:
    """The name of a rule's knob in the report's rows (`tau`, `threshold`, `patience,threshold`), None for none."""
    return ",".join(GRID_KNOBS[rule]) or None


def _texts(tokenizer, sequences: list[list[int]]) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in sequences]


def per_prompt(out, eos) -> tuple[list[list[int]], list[list[int]]]:
    """Per prompt of a `GenerationResult`: its tokens before the first EOS, and the exit layer (1..L) of
    every token it generated, the EOS included (padding after a row's EOS has none)."""
    tokens = [trim_generation(row.tolist(), eos) for row in out.new_tokens.cpu()]
    exit_layers = [row[row > 0].tolist() for row in out.exit_layers.cpu()]
    return tokens, exit_layers


def flat_exit_layers(run: dict) -> torch.Tensor:
    """Every generated token's exit layer in a run (`generate_batch`, `merge_runs`), prompt after prompt."""
    return torch.tensor([layer for layers in run["exit_layers"] for layer in layers], dtype=torch.long)


GENERATION_KV = ("propagate", "defer")  # method.generation.kv and the saved model's generate(kv=)
KV_MODES = (*GENERATION_KV, "real")      # and the batched path that scores defer's tokens


def generate_batch(decoder, exits, rule, batch, max_new_tokens, eos, pad, policy=None, classifier=None,
                   flops=None, kv: str = "propagate", timed_rows: int | None = None,
                   deferred_costs: bool = False) -> dict:
    """One prompt batch with `rule`: per prompt its trimmed tokens and its tokens' exit layers
    (`per_prompt`), the costs of every generated token (prompt after prompt) and the decoding's wall
    seconds (the prompt pass left out). `batch["prompt_cache"]` (optional) is the prompts' shared pass.

    kv: what an exited token gives the layers it skipped. "propagate": K/V from its exit state, at once
    (CALM; batched). "defer": nothing until a later token climbs past them, then the real layers run on it
    (`inference.deferred`; one prompt at a time, each with its own prompt pass). "real": the real layers
    at once, keeping the exited token running for its K/V only: defer's tokens and exits, batched, with
    no saving in time (how the oracle runs under defer, and a fast way to score defer's text).
    timed_rows (with kv="defer"): every prompt's tokens come from "real", batched, and only the batch's first
    `timed_rows` prompts run deferred, one at a time, for the clock: the run's "timed" ({"seconds",
    "generated", "prompt_seconds"}) is theirs, and the FLOPs are deferral's (`deferred_costs`: a kv="real" run's
    tokens charged the layers deferral runs, not every layer)."""
    if kv not in KV_MODES:
        raise ValueError(f"kv={kv!r}: use one of {KV_MODES}")
    if kv == "defer" and timed_rows is not None:
        run = generate_batch(decoder, exits, rule, batch, max_new_tokens, eos, pad, policy, classifier, flops,
                             "real", deferred_costs=not rule.needs_labels)  # the oracle runs every layer
        if not rule.needs_labels:  # the oracle has no deferred run: its speed is not measured
            run["timed"] = deferred_timing(decoder, exits, rule, batch, timed_rows, max_new_tokens, eos, pad, policy,
                                           classifier)
        return run
    if kv == "defer" and not rule.needs_labels:
        out, seconds, _ = deferred_run(decoder, exits, rule, batch["input_ids"], batch["attention_mask"],
                                       max_new_tokens, eos, pad, policy, classifier)
    else:
        out, seconds = timed(generate_with_exits, decoder, exits, rule, batch["input_ids"], batch["attention_mask"],
                             max_new_tokens, eos_token_id=eos, pad_token_id=pad, policy=policy, classifier=classifier,
                             prompt_cache=batch.get("prompt_cache"), propagate_kv=kv == "propagate")
    if deferred_costs and out.layers_after_exit is not None:
        out.layers_after_exit = deferred_layers_after_exit(out.exit_layers)
    mask = out.token_mask
    tokens, exit_layers = per_prompt(out, eos)
    run = {"tokens": tokens, "exit_layers": exit_layers, "seconds": seconds, "generated": int(mask.sum())}
    if flops is not None:
        run["flops"] = flops.per_token(out, batch["attention_mask"])[mask.cpu()]
        run["full_flops"] = flops.full_depth_per_token(out, batch["attention_mask"])[mask.cpu()]
    return run


def deferred_run(decoder, exits, rule, input_ids, attention_mask, max_new_tokens, eos, pad, policy=None,
                 classifier=None):
    """(`generate_deferred_each`'s result, its decoding's wall seconds, the prompts' own passes' seconds): each
    prompt's pass runs first and apart, so the clock leaves it out, as the batched paths' clocks do."""
    caches, prompt_seconds = timed(prefill_each, decoder, input_ids, attention_mask)
    out, seconds = timed(generate_deferred_each, decoder, exits, rule, input_ids, attention_mask, max_new_tokens,
                         eos_token_id=eos, pad_token_id=pad, policy=policy, classifier=classifier, prompt_caches=caches)
    return out, seconds, prompt_seconds


def deferred_timing(decoder, exits, rule, batch, rows: int, max_new_tokens, eos, pad, policy=None,
                    classifier=None) -> dict:
    """The batch's first `rows` prompts generated one at a time with deferred skipped layers (`deferred_run`):
    decoding's wall seconds, the prompts' passes' ("prompt_seconds") and the tokens generated."""
    ids, mask = batch["input_ids"][:rows], batch["attention_mask"][:rows]
    if not len(ids):
        return {"seconds": 0.0, "generated": 0, "prompt_seconds": 0.0}
    out, seconds, prompt_seconds = deferred_run(decoder, exits, rule, ids, mask, max_new_tokens, eos, pad, policy,
                                                classifier)
    return {"seconds": seconds, "generated": int(out.token_mask.sum()), "prompt_seconds": prompt_seconds}


def merge_runs(runs: list[dict]) -> dict:
    """One rule's batches (`generate_batch`), in order, as one run over the split."""
    merged = {key: [row for run in runs for row in run[key]] for key in ("tokens", "exit_layers")}
    merged.update(seconds=sum(run["seconds"] for run in runs), generated=sum(run["generated"] for run in runs))
    if all("timed" in run for run in runs):
        merged["timed"] = {key: sum(run["timed"][key] for run in runs) for key in runs[0]["timed"]}
    for key in ("flops", "full_flops"):
        if key in runs[0]:
            merged[key] = torch.cat([run[key] for run in runs])
    return merged


def generation_rows(rules: list, runs: list[dict]) -> list[dict]:
    """One row per rule point and prompt (`runs` in the order of `rules`, each over the split in prompt
    order): rule, knob (its name), value, prompt (its index in the split), tokens (before the first EOS)
    and exit_layers (1-based, one per generated token, the EOS included)."""
    return [{"rule": name, "knob": knob_name(name), "value": value, "prompt": prompt,
             "tokens": tokens, "exit_layers": layers}
            for (name, value, _), run in zip(rules, runs)
            for prompt, (tokens, layers) in enumerate(zip(run["tokens"], run["exit_layers"]))]


def library_generate(decoder, batch, max_new_tokens, eos, pad, rows: int | None = None) -> tuple[float, int]:
    """(wall seconds, generated tokens) of the library's own greedy `generate` on one prompt batch, its prompts'
    pass included; with `rows`, on the batch's first `rows` prompts one at a time (as deferral's clock runs)."""
    if rows is not None:
        seconds = generated = 0
        for ids in unpadded_prompts(batch["input_ids"][:rows], batch["attention_mask"][:rows]):
            part = library_generate(decoder, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, max_new_tokens,
                                    eos, pad)
            seconds, generated = seconds + part[0], generated + part[1]
        return seconds, generated
    out, seconds = timed(decoder.model.generate, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    new = out[:, batch["input_ids"].shape[1]:]
    return seconds, sum(len(trim_generation(row.tolist(), eos)) + int(eos in row.tolist()) for row in new)


def decoding_rates(run: dict, prefill_seconds: float, timed_subset: bool = False) -> tuple[float, float]:
    """(tokens/s of decoding, tokens/s with the prompts' pass) of a run; from its "timed" prompts where the
    runs were timed on a subset (`generate_batch(timed_rows=)`), NaN for a run without one (the oracle)."""
    nan = float("nan")
    if timed_subset:
        timing = run.get("timed")
        if not timing or not timing["seconds"]:
            return nan, nan
        return (timing["generated"] / timing["seconds"],
                timing["generated"] / (timing["seconds"] + timing["prompt_seconds"]))
    if not run["seconds"]:
        return nan, nan
    return run["generated"] / run["seconds"], run["generated"] / (run["seconds"] + prefill_seconds)


def score_points(rules: list, runs: list[dict], tokenizer, references: list[str], num_layers: int,
                 prefill_seconds: float, library: dict) -> tuple[list[dict], dict]:
    """Points (one per rule and knob; `runs` in the order of `rules`, `full` first) and extras (the
    library's generate speed, example outputs). library: {"seconds", "generated"} of `library_generate`."""
    L = num_layers
    library = {**library, "tokens_per_s": library["generated"] / library["seconds"] if library["seconds"] else float("nan")}
    full, points, examples = None, [], {}
    for (name, value, _), run in zip(rules, runs):
        texts = _texts(tokenizer, run["tokens"])
        if full is None:
            full = {**run, "texts": texts}
        rouge = rouge_f1(texts, references)
        agree = corpus_token_agreement(list(zip(run["tokens"], full["tokens"])))
        exit_layers = flat_exit_layers(run)
        avg = float(exit_layers.float().mean()) if run["generated"] else float("nan")
        flops_per_token = float(run["flops"].mean()) if run["generated"] else float("nan")
        tokens_per_s, with_prompts = decoding_rates(run, prefill_seconds, timed_subset="timed" in full)
        point = {
            "rule": name, "knob": knob_name(name), "value": value,
            "metric": rouge["rougeL"], **rouge, "rougeL_vs_full": rouge_f1(texts, full["texts"])["rougeL"],
            "token_agreement": agree["mean"], "token_agreement_micro": agree["micro"],
            "avg_exit_layer": avg, "layer_saving": 1 - avg / L, "speedup": L / avg,
            "flops": flops_per_token, "flops_saving": 1 - flops_per_token / float(run["full_flops"].mean()),
            "tokens": run["generated"], "tokens_per_s": tokens_per_s, "tokens_per_s_with_prompt": with_prompts,
            "speedup_vs_full": tokens_per_s / decoding_rates(full, prefill_seconds, "timed" in full)[0],
            "speedup_vs_generate": with_prompts / library["tokens_per_s"],
            "exit_histogram": torch.bincount(exit_layers, minlength=L + 1)[1:].tolist(),
        }
        points.append(point)
        examples.setdefault(name, texts[0])
        log.info("%s %s: rougeL %.4f, avg exit %.2f, %.1f tok/s", name, value, point["metric"], avg, tokens_per_s)
    mark_pareto(points)
    extras = {"transformers_generate": library, "prefill_seconds": prefill_seconds, "examples": examples,
              "reference_example": references[0], "flops_full_depth_per_token": float(full["full_flops"].mean())}
    return points, extras


# --- report -------------------------------------------------------------------------------------
CSV_COLUMNS = ("rule", "knob", "value", "rouge1", "rouge2", "rougeL", "rougeL_vs_full", "token_agreement",
               "token_agreement_micro", "avg_exit_layer", "layer_saving", "flops", "flops_saving", "tokens",
               "tokens_per_s", "tokens_per_s_with_prompt", "speedup_vs_full", "speedup_vs_generate", "pareto", "calibrated")
CALM_RULES = ("softmax_margin", "saturation", "classifier")


def comparison_rows(points: list[dict]) -> list[dict]:
    """Each policy point beside every CALM measure (and the static layer) at the same layer saving."""
    rows = []
    for p in (p for p in points if p["rule"] == "policy"):
        row = {"tau": p["value"], "layer_saving": p["layer_saving"], "policy_rougeL": p["metric"],
               "policy_rougeL_vs_full": p["rougeL_vs_full"], "policy_avg_exit_layer": p["avg_exit_layer"],
               "policy_speedup_vs_full": p["speedup_vs_full"]}
        for rule in (*CALM_RULES, "static"):
            curve = [q for q in points if q["rule"] == rule]
            row[f"{rule}_rougeL"] = value_at_saving(curve, p["layer_saving"])
            row[f"{rule}_rougeL_vs_full"] = value_at_saving(curve, p["layer_saving"], "rougeL_vs_full")
        rows.append(row)
    return rows


def _cell(value, fmt="{:.4f}"):
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return fmt.format(value) if isinstance(value, float) else str(value)


def calibration_note(level: float, prompts: int, split: str) -> str:
    return (f"Each rule's knob with the most layer saving whose ROUGE-L against the full output on {prompts} {split} "
            f"prompts is at least {level}, then measured on the test prompts. A rule missing here reached {level} at "
            "none of its knobs.")


def calibration_section(points: list[dict], note: str) -> list[str]:
    """Markdown lines: the knobs chosen on validation (the points `calibration.calibrated_on` marked)
    with their test numbers."""
    lines = ["", "## Calibrated on validation (CALM-style)", "", note, "",
             "| rule | knob (chosen on validation) | validation ROUGE-L (full) | test ROUGE-L (ref) | test ROUGE-L (full) | "
             "test layer saving | test FLOPs saving |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['rule']} | {p['value']} | {p['calibrated']:.3f} | {p['rougeL']:.3f} | {p['rougeL_vs_full']:.3f} | "
              f"{100 * p['layer_saving']:.1f}% | {100 * p['flops_saving']:.1f}% |"
              for p in points if p.get("calibrated") is not None]
    return lines


def deferred_timing_note(rows: int) -> str:
    return (f"Skipped layers deferred: each prompt's text comes from a batched pass that gives deferral's tokens and "
            f"exits; tokens/s from the first {rows} prompt(s) of each batch decoded one at a time with the layers "
            "deferred (each prompt's pass left out), and 'vs generate' against transformers' `generate` on the same "
            "prompts one at a time (the prompt's pass included on both sides). The oracle is not timed.")


def markdown_report(points: list[dict], extras: dict, title: str, calibration: dict | None = None) -> str:
    """`calibration`: results.json's (split, prompts, level), when the run chose its knobs on validation."""
    header = ["rule", "knob", "ROUGE-L (ref)", "ROUGE-L (full)", "ROUGE-1", "ROUGE-2", "token agreement", "avg exit layer",
              "layer saving", "FLOPs saving", "GFLOPs / token", "tokens/s", "vs full (same code)", "vs generate", "Pareto"]
    lines = [f"# {title}", "",
             "Greedy generation on held-out prompts; one row per rule and knob. ROUGE-L (full) compares with the full "
             "model's own output; FLOPs include the K/V fill of skipped layers and every LM-head call a rule makes; "
             "tokens/s are wall-clock decoding in one process (the prompts' pass is shared by all rules), against full depth "
             "through the same code; 'vs generate' includes the prompts' pass on both sides, against transformers' `generate` "
             f"({extras['transformers_generate']['tokens_per_s']:.1f} tokens/s with prompts). The oracle is a bound (never Pareto)."
             + (f" {extras['timing']}" if extras.get("timing") else ""), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in points:
        lines.append("| " + " | ".join([
            p["rule"], "-" if p["value"] is None else f"{p['knob']}={p['value']}", _cell(p["rougeL"]), _cell(p["rougeL_vs_full"]),
            _cell(p["rouge1"]), _cell(p["rouge2"]), _cell(p["token_agreement"]), _cell(p["avg_exit_layer"], "{:.2f}"),
            _cell(100 * p["layer_saving"], "{:.1f}%"), _cell(100 * p["flops_saving"], "{:.1f}%"), _cell(p["flops"] / 1e9, "{:.4f}"),
            _cell(p["tokens_per_s"], "{:.1f}"), _cell(p["speedup_vs_full"], "{:.2f}x"), _cell(p["speedup_vs_generate"], "{:.2f}x"),
            "**yes**" if p["pareto"] else ""]) + " |")
    rows = comparison_rows(points)
    if rows:
        lines += ["", "## ConsistentEE beside CALM's measures at the same layer saving", "",
                  "ROUGE-L against the reference (against the full model's output in brackets); the other rules are "
                  "interpolated between their two nearest knobs, '-' where their knobs do not reach that saving.", "",
                  "| tau | layer saving | avg exit | ConsistentEE | softmax margin | saturation | classifier | static |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            cells = [str(r["tau"]), f"{100 * r['layer_saving']:.1f}%", f"{r['policy_avg_exit_layer']:.2f}",
                     f"{r['policy_rougeL']:.4f} ({r['policy_rougeL_vs_full']:.4f})"]
            for rule in (*CALM_RULES, "static"):
                a, b = r[f"{rule}_rougeL"], r[f"{rule}_rougeL_vs_full"]
                cells.append("-" if a is None else f"{a:.4f} ({b:.4f})")
            lines.append("| " + " | ".join(cells) + " |")
    if calibration is not None:
        lines += calibration_section(points, calibration_note(calibration["level"], calibration["prompts"],
                                                              calibration["split"]))
    lines += ["", "## First test output per rule (first knob)", "", f"- reference: {extras['reference_example']!r}"]
    lines += [f"- {rule}: {text!r}" for rule, text in extras["examples"].items()]
    return "\n".join(lines) + "\n"


def write_generations(rows: list[dict], path) -> None:
    """`generation_rows` as JSON lines (generations.jsonl)."""
    atomic_write_text(Path(path), "".join(json.dumps(row) + "\n" for row in rows))


def write_generation_report(points: list[dict], extras: dict, out_dir, title: str,
                            calibration: dict | None = None) -> dict:
    return write_report(points, out_dir, columns=list(CSV_COLUMNS),
                        markdown=markdown_report(points, extras, title, calibration),
                        metric_label="ROUGE-L (reference)", title=title)
