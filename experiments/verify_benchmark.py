"""Benchmark: verify mode (early exits draft, the remaining layers check) on SmolLM2-135M, batch 1.

Drafters are the UNTRAINED exits: the model's own final norm and tied LM head on the raw state of
layer E (`PlainExits`), or that state through the final norm and the LM head's rows for the 4,096
most frequent tokens of ACLSum's training text (`RestrictedHead`, about half a layer instead of
eight). Verification always uses the full model, so the output is greedy full depth's.

1. Acceptance, from teacher forcing. Each prompt is generated once at full depth through the
   project's own code (untimed, in left-padded batches of 8); one teacher-forced pass over prompt + output then gives
   every exit's greedy token and confidence at every position. `exits.drafting.simulate_rounds`
   turns those into the exact rounds verify mode makes at any draft length (the tests hold the
   driver to it), so every (draft layer, draft length, draft head, confidence stop) point gets
   its acceptance rate, mean accepted length and sequential layer passes per token at no
   generation cost.
2. Selection on VALIDATION prompts: the verify-mode point (any head, any confidence stop) and the
   fixed LayerSkip-style point (full LM head, fixed length) with the fewest layer passes per
   token; transformers' `generate(assistant_early_exit=E)` at the fastest of a few layers
   (timed). Never on test.
3. On TEST prompts, every method runs on every prompt and its output is compared with full depth's
   (this project's code at batch 1, with its logits: the full model's top-2 gap where an output first
   differs tells a float tie from a real change). The first `--timed` prompts are timed, the methods
   interleaved per prompt, prompt pass excluded on every side (the prompt's K/V are prefilled once
   and copied; transformers' `generate` gets them through `cache=`): plain greedy `model.generate`,
   full depth through the project's generate code, verify mode, the fixed point, and
   `assistant_early_exit` (on the bare prompt, its prompt pass timed with it: handed a prefilled cache,
   transformers' assisted decoding changes the output; it runs on the timed prompts only, being slow). Tokens/s,
   acceptance, mean accepted length, layer passes per token.
4. Where the time goes on this CPU: one layer over 1 and over k tokens, the LM head, the
   restricted head (median and quartiles of repeated, interleaved timings). And the projection where
   a pass costs its weight reads (batch 1 on a GPU): full depth's passes per token over verify
   mode's. A projection, not a measurement.

    python experiments/verify_benchmark.py                          # 100 test prompts (the benchmark's)
    python experiments/verify_benchmark.py --prompts 8 --timed 4 --select 4   # a quick look
    python experiments/verify_benchmark.py --run-dir outputs/aclsum_consistentee/runs/<time>   # a run's exits

With `--run-dir` (a finished `aclsum_consistentee` run) the drafters are that run's TRAINED exits
(`<run>/model`), and verify mode's learned stop rule joins the comparison: a `DraftStopPolicy` per
draft layer, trained here on the run's training cache (`<run>/checkpoints/lm_cache_train`) by the
stage's own code (`training.lm_draft.draft_policy_stage`), or the one the run's model folder carries
at its layer. Its point (draft layer, tau) is chosen on validation like every other point, against
the best fixed length and the best confidence stop of the same exits and head. Results then go to
experiments/results/verify_trained/.

Writes experiments/results/verify/{simulated.csv, measured.csv, agreement.csv, report.md, results.json}.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ee_lightning.data.generation import aclsum_dir, encode_item, read_aclsum
from ee_lightning.exits.drafting import (break_even_acceptance, full_depth_passes, head_cost_in_layers, projected_speedup,
                                         round_layer_passes, simulate_rounds)
from ee_lightning.exits.rules import FullRule
from ee_lightning.evaluation.generation_cost import timed
from ee_lightning.files import atomic_write_text
from ee_lightning.inference.generate import PlainExits, generate_with_exits, prefill
from ee_lightning.inference.verify import generate_verified, layer_parameters
from ee_lightning.modeling.draft_policy import DraftStopPolicy
from ee_lightning.modeling.export import load_decoder
from ee_lightning.modeling.backbones.decoder_build import build_decoder
from ee_lightning.modeling.draft_head import RestrictedHead, frequent_tokens
from ee_lightning.progress import progress

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "verify"
TIE_TOLERANCE = 1e-3  # a top-2 logit gap below this is a float tie (logits are O(10))
DRAFTING = ("verify", "fixed_draft", "confidence_stop", "draft_policy")  # the methods that run generate_verified


def log(*args):
    print(*args, flush=True)


def load_prompts(tokenizer, split: str, n: int) -> list[list[int]]:
    data = OmegaConf.load(ROOT / "conf" / "data" / "aclsum.yaml")
    items = read_aclsum(aclsum_dir(), split)[:n]
    return [encode_item(tokenizer, item, data.max_prompt_length, data.max_response_length)[0] for item in items]


def draft_vocabulary(tokenizer, size: int) -> torch.Tensor:
    """The `size` most frequent ids of ACLSum's training prompts and summaries, plus EOS."""
    texts = [text for item in read_aclsum(aclsum_dir(), "train") for text in (item.prompt, item.reference)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return frequent_tokens(ids, size, always=[tokenizer.eos_token_id])


# ----------------------------------------------------------------------------- 1. teacher forcing


@torch.no_grad()
def references(decoder, exits, prompts, new, eos, batch_size) -> list[list[int]]:
    """Full-depth greedy outputs through the project's code, in left-padded batches (cheaper per
    token on a CPU; the teacher-forced acceptance only needs the full model's continuation)."""
    outputs = []
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    for chunk in progress(chunks, "full-depth references", unit="batch"):
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[eos] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = generate_with_exits(decoder, exits, FullRule(), ids, mask, new, eos_token_id=eos, pad_token_id=eos)
        for row, keep in zip(out.new_tokens.tolist(), out.token_mask.tolist()):
            outputs.append([t for t, k in zip(row, keep) if k])
    return outputs


@torch.no_grad()
def agreement(decoder, exits, head, prompt, output, layers, policies=None):
    """Per draft layer: whether the full-head and the restricted-head drafts equal the full model's
    token at every output position (teacher-forced on the prompt and the output), and their confidence;
    with a stop policy of that layer, its stop probability after each draft."""
    sequence = torch.tensor([prompt + output])
    states = decoder(sequence[:, :-1], torch.ones_like(sequence[:, :-1]))
    target, P = torch.tensor(output), len(prompt)
    facts = {}
    for layer in layers:
        h = states[layer - 1][0, P - 1:]
        logits = exits.logits(layer, h, decoder).float()
        restricted = head(decoder.final_norm(exits.adapt(layer, h))).float()
        facts[layer] = {
            "full": ((logits.argmax(-1) == target).tolist(), torch.softmax(logits, -1).max(-1).values.tolist()),
            "frequent": ((head.ids(restricted.argmax(-1)) == target).tolist(),
                         torch.softmax(restricted, -1).max(-1).values.tolist()),
        }
        if policies and layer in policies:
            facts[layer]["stop"] = policies[layer].prob(h).tolist()
    return facts


def teacher_forced(decoder, exits, head, prompts, args, eos, what, policies=None):
    outputs = references(decoder, exits, prompts, args.new, eos, args.batch)
    return [agreement(decoder, exits, head, p, o, args.layers, policies)
            for p, o in zip(progress(prompts, f"{what}: teacher forcing", unit="prompt"), outputs)]


def simulate(facts_per_prompt, layer, length, head, confidence, L, head_cost, draft_head_cost, stop_tau=None):
    """A point's rounds from teacher forcing; `stop_tau`: the layer's stop policy ends a round after a
    draft whose stop probability exceeds it (as `min_confidence` does below its threshold)."""
    drafted = accepted = rounds = tokens = 0
    passes = 0.0
    for facts in facts_per_prompt:
        agree, conf = facts[layer][head]
        confident = None if confidence is None else [c >= confidence for c in conf]
        if stop_tau is not None:
            confident = [p <= stop_tau for p in facts[layer]["stop"]]
        d, a = simulate_rounds(agree, length, confident)
        drafted, accepted, rounds, tokens = drafted + sum(d), accepted + sum(a), rounds + len(d), tokens + len(agree)
        passes += sum(round_layer_passes(layer, L, k, head_cost, draft_head_cost if head == "frequent" else head_cost)
                      for k in d)
    return {"draft_layer": layer, "draft_length": length, "draft_head": head, "min_confidence": confidence,
            "stop_tau": stop_tau, "acceptance_rate": accepted / max(drafted, 1), "mean_drafted": drafted / max(rounds, 1),
            "mean_accepted": accepted / max(rounds, 1),
            "tokens_per_round": tokens / max(rounds, 1), "passes_per_token": passes / max(tokens, 1),
            "projected_speedup": projected_speedup(full_depth_passes(L, head_cost), passes / max(tokens, 1))}


def fewest(rows):
    """The point with the fewest layer passes per token."""
    return min(rows, key=lambda r: r["passes_per_token"])


# ----------------------------------------------------------------------------- 3. measured runs


def shown(path: Path | None) -> str | None:
    """A path as the report names it: relative to the repository when inside it, else its folder name
    (a run's absolute or temporary location says nothing to a reader of the results)."""
    if path is None:
        return None
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def median_spread(samples: list[float]) -> dict:
    """Median, quartiles and count of timing samples (the quartiles show how noisy the clock was)."""
    if not samples:
        raise ValueError("no timing samples")
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [samples[0]] * 3
    return {"median": median, "q1": q1, "q3": q3, "n": len(samples)}


def same_run(spec: dict, other: dict) -> bool:
    """Whether two drafting points make the same computation: with one draft per round a stop rule
    (confidence or policy) can only end drafting after that draft, where it ends anyway."""
    def effective(point):
        keys = ("draft_layer", "draft_length", "draft_head") if point["draft_length"] == 1 else \
            ("draft_layer", "draft_length", "draft_head", "min_confidence", "stop_tau")
        return {k: point.get(k) for k in keys}
    return effective(spec) == effective(other)


def difference(output: list[int], reference: list[int], reference_logits: torch.Tensor) -> tuple[int, float | None] | None:
    """(first position where `output` leaves the full-depth `reference`, the full model's top-2 logit
    gap there) or None when they are equal; the gap is None past the reference's end."""
    position = first_difference(output, reference)
    if position is None:
        return None
    return position, (top2_gap(reference_logits[position]) if position < reference_logits.shape[0] else None)


def first_difference(output: list[int], reference: list[int]) -> int | None:
    for position, (a, b) in enumerate(zip(output, reference)):
        if a != b:
            return position
    return None if len(output) == len(reference) else min(len(output), len(reference))


def top2_gap(logits: torch.Tensor) -> float:
    top = logits.float().topk(2).values
    return float(top[0] - top[1])


@torch.no_grad()
def run_method(name, spec, decoder, model, exits, head, ids, mask, cache, new, eos, policies=None):
    """(new tokens, seconds, verify result or None) of one method on one prompt, prompt pass excluded."""
    if name == "generate":
        out, seconds = timed(model.generate, input_ids=ids, attention_mask=mask, cache=copy.deepcopy(cache),
                             max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        return out[0, ids.shape[1]:].tolist(), seconds, None
    if name == "assistant_early_exit":
        # on the bare prompt, its prompt pass timed with it: handed a prefilled cache through `cache=`,
        # transformers' assisted decoding changes the output (on SmolLM2 from the first token)
        out, seconds = timed(model.generate, input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos, assistant_early_exit=spec["draft_layer"])
        return out[0, ids.shape[1]:].tolist(), seconds, None
    if name == "full_depth":
        out, seconds = timed(generate_with_exits, decoder, exits, FullRule(), ids, mask, new, eos_token_id=eos,
                             prompt_cache=cache)
        return out.new_tokens[0].tolist(), seconds, None
    out, seconds = timed(generate_verified, decoder, exits, ids, mask, new, draft_layer=spec["draft_layer"],
                         draft_length=spec["draft_length"], eos_token_id=eos,
                         draft_head=head if spec["draft_head"] == "frequent" else None,
                         min_confidence=spec["min_confidence"], stop=stop_policy(policies, spec), prompt_cache=cache)
    return out.new_tokens[0].tolist(), seconds, out


def stop_policy(policies, spec) -> DraftStopPolicy | None:
    """The point's stop policy at its tau, or None for a point without one."""
    if spec.get("stop_tau") is None:
        return None
    policy = policies[spec["draft_layer"]]
    policy.tau = spec["stop_tau"]
    return policy


# ----------------------------------------------------------------------------- the run's exits and stop policies


def run_model(run_dir: Path):
    """(decoder, tokenizer, trained exits, the model folder's draft policy or None) of a finished run."""
    parts, decoder, tokenizer, _ = load_decoder(run_dir / "model")
    return decoder, tokenizer, parts.exits, parts.draft_policy


def train_stop_policies(decoder, exits, run_dir: Path, layers, args, head=None) -> dict[int, DraftStopPolicy]:
    """A stop policy per draft layer, trained on the run's training cache by the stage's own code
    (the exits' tokens there from the run's trained exits; with `head`, a `RestrictedHead`, that head's
    tokens under the exit's adapter, and its cost)."""
    import lightning as L
    from omegaconf import OmegaConf as Conf

    from ee_lightning.inference.lm_cache import exit_tables
    from ee_lightning.training.lm_draft import draft_policy_stage
    from ee_lightning.training.lm_pipeline import stage_loader

    path = run_dir / "checkpoints" / "lm_cache_train" / "exit_states_train.pt"
    cache = torch.load(path, map_location="cpu", weights_only=True)["tensors"]  # safe: tensors and strings only
    if [int(x) for x in cache["exit_layers"]] != list(exits.exit_layers):
        raise ValueError(f"{path} holds exits {cache['exit_layers'].tolist()}, the model {exits.exit_layers}")
    if head is None:
        tokens, step_cost = exit_tables(cache, exits, decoder, batch_size=256)["tokens"], None
    else:
        index = {layer: e for e, layer in enumerate(exits.exit_layers)}
        tokens = torch.zeros(len(exits.exit_layers), len(cache["full_tokens"]), dtype=torch.long)
        with torch.no_grad():
            for layer in layers:
                states = cache["states"][:, index[layer]].float()
                tokens[index[layer]] = head.ids(head(decoder.final_norm(exits.adapt(layer, states))).argmax(-1))
        step_cost = head_cost_in_layers(head.rows, decoder.hidden_size, layer_parameters(decoder))
    settings = Conf.create({"k": 16, "estimator": "expected", "lr": args.policy_lr})
    policies = {}
    for layer in layers:
        L.seed_everything(0)
        policy = DraftStopPolicy(decoder.hidden_size, layer, args.policy_max_drafts)
        system, data = draft_policy_stage(policy, decoder, exits, cache, tokens, settings, step_cost)
        trainer = L.Trainer(max_epochs=args.policy_epochs, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        trainer.fit(system, stage_loader(data, 256, seed=0))
        policies[layer] = policy.eval()
        log(f"stop policy at layer {layer}: rate {float(trainer.callback_metrics['draft/rate']):.4f} tokens per pass "
            f"in its last step")
    return policies


# ----------------------------------------------------------------------------- 4. where the time goes


@torch.no_grad()
def cost_profile(decoder, head, prompt, repeats: int = 31) -> dict:
    """Milliseconds (median, quartiles) of one layer over 1, 2, 4 and 8 new tokens (with the prompt
    cached; a pass over all layers, divided by their number), the LM head and the restricted head on
    one state. The measures take turns within each repeat, so a busy spell of the machine spreads
    over all of them instead of landing on one."""
    ids = torch.tensor([prompt])
    cache = prefill(decoder, ids, torch.ones_like(ids))
    state = torch.randn(1, decoder.hidden_size)
    samples = {f"layer_ms_{k}_tokens": [] for k in (1, 2, 4, 8)}
    samples.update(lm_head_ms=[], restricted_head_ms=[])
    for repeat in progress(range(repeats + 1), "cost profile", unit="repeat"):
        times = {}
        for k in (1, 2, 4, 8):
            c = copy.deepcopy(cache)
            hidden, ctx = decoder.start(ids[:, -k:], torch.ones(1, ids.shape[1] - 1 + k, dtype=torch.long), c)
            start = time.perf_counter()
            for index in range(decoder.num_layers):
                hidden = decoder.step(index, hidden, ctx)
            times[f"layer_ms_{k}_tokens"] = (time.perf_counter() - start) / decoder.num_layers
        for name, fn in (("lm_head_ms", decoder.lm_head), ("restricted_head_ms", head)):
            start = time.perf_counter()
            fn(state)
            times[name] = time.perf_counter() - start
        if repeat > 0:  # the first repeat warms up
            for name, seconds in times.items():
                samples[name].append(1e3 * seconds)
    return {name: median_spread(values) for name, values in samples.items()}


def agreement_table(facts_per_prompt, layers, lengths, L, head_cost, draft_head_cost) -> list[dict]:
    """Per draft layer: the exits' teacher-forced agreement with the full model's token, and the
    per-draft acceptance that rounds with the restricted head would need for 1.0x and 1.1x fewer
    layer passes per token than full depth (at their best draft length; independent drafts)."""
    rows = []
    for layer in layers:
        row = {"draft_layer": layer}
        for which in ("full", "frequent"):
            agree = [a for facts in facts_per_prompt for a in facts[layer][which][0]]
            row[f"agreement_{which}_head"] = sum(agree) / max(len(agree), 1)
        for speedup in (1.0, 1.1):
            needed = [break_even_acceptance(layer, L, k, head_cost, draft_head_cost, speedup) for k in lengths]
            needed = [n for n in needed if n is not None]
            row[f"needed_for_{speedup:.1f}x"] = min(needed) if needed else None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- reports


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def fmt(value, spec="{:.3f}"):
    if value is None or value == "":
        return "-"
    return spec.format(value) if isinstance(value, float) else str(value)


def markdown(args, measured, simulated_best, agreement, profile, selection, L, head_cost, draft_head_cost,
             vocab_size, on_chosen, command, wall) -> str:
    drafters = ("Untrained exits as drafters (final norm + tied LM head at layer E" if args.run_dir is None else
                f"The trained exits of the run `{shown(args.run_dir)}` as drafters (adapter, final norm and tied LM "
                f"head at layer E; stop policies trained {args.policy_epochs} epochs on its training cache")
    full = full_depth_passes(L, head_cost)
    lines = [f"# Verify mode on SmolLM2-135M (batch 1, {args.threads} threads)", "",
             f"{drafters}; `frequent`: the head's rows for the "
             f"{vocab_size} most frequent ACLSum training tokens). {args.new} new tokens, greedy. Points chosen on "
             f"{args.select} validation prompts. LM head = {head_cost:.2f} layers, restricted head = "
             f"{draft_head_cost:.2f} layers (parameter ratio). Layer passes per token count each pass over a layer's "
             f"weights once, however many tokens it carries; full depth = {full:.2f}. GPU projection: where a pass "
             f"costs its weight reads (batch 1 on a GPU), full depth's passes per token over the method's "
             f"({full:.2f} / passes), from the rounds the method made; a projection, not a measurement.", "",
             f"Command: `{command}`; wall time {wall / 60:.1f} min.", "",
             f"## Every method on {args.prompts} test prompts; timed on the first {args.timed}", "",
             f"Every method ran on every test prompt and its output was compared with full depth's (this project's "
             f"code at batch 1, whose logits give the full model's top-2 gap where an output first differs). Timed "
             f"on the first {args.timed} prompts, interleaved per prompt, prompt pass excluded; "
             f"`assistant_early_exit` ran on the first {args.assistant_prompts} only (its ratio is against full depth "
             f"on those; its time includes its own prompt pass). Acceptance, accepted drafts per round and layer passes per token are over every prompt the "
             f"method ran. On untimed prompts a point that makes the same computation as another (one draft per "
             f"round: a stop rule cannot act) reuses that point's output (`reused`).", "",
             "| method | point | tokens/s | vs full depth | prompts | reused | acceptance | accepted / round | "
             "tokens / round | layer passes / token | GPU projection | outputs differing from full depth | "
             f"of which top-2 gap < {TIE_TOLERANCE:g} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in measured:
        lines.append("| " + " | ".join([row["method"], row["point"], fmt(row["tokens_per_s"], "{:.2f}"),
                                         fmt(row["vs_full_depth"], "{:.2f}x"), str(row["prompts"]),
                                         str(row["reused_prompts"]), fmt(row["acceptance_rate"]),
                                         fmt(row["mean_accepted"], "{:.2f}"), fmt(row["tokens_per_round"], "{:.2f}"),
                                         fmt(row["passes_per_token"], "{:.2f}"),
                                         fmt(row["projected_speedup"], "{:.2f}x"),
                                         "reference" if row["differing_prompts"] is None else str(row["differing_prompts"]),
                                         fmt(row["differing_ties"])]) + " |")
    differing = [(row["method"], d) for row in measured for d in row["differences"]]
    if differing:
        lines += ["", "Where outputs first differ from full depth (prompt index, new-token position, the full model's "
                  "top-2 logit gap there):", ""]
        lines += [f"- {name}: prompt {d['prompt']}, position {d['position']}, gap {fmt(d['top2_gap'], '{:.5f}')}"
                  for name, d in differing]
    lines += ["", f"## The chosen drafting points on all {args.prompts} test prompts (teacher-forced)", "",
              "`simulate_rounds` on the teacher-forced facts; beside the rounds the methods made above, a check of the "
              "simulation.", "",
              "| method | acceptance | drafts / round | accepted / round | tokens / round | layer passes / token | "
              "GPU projection |", "|---|---|---|---|---|---|---|"]
    for name, row in on_chosen.items():
        lines.append("| " + " | ".join([name, fmt(row["acceptance_rate"]), fmt(row["mean_drafted"], "{:.2f}"),
                                         fmt(row["mean_accepted"], "{:.2f}"), fmt(row["tokens_per_round"], "{:.2f}"),
                                         fmt(row["passes_per_token"], "{:.2f}"),
                                         fmt(row["projected_speedup"], "{:.2f}x")]) + " |")
    lines += ["", f"## Simulated from teacher forcing on {args.prompts} test prompts (exact for fixed lengths)", "",
              "Best point per draft layer by layer passes per token (the GPU projection); the whole grid is in "
              "`simulated.csv`.", "",
              "| draft layer | length | head | min confidence | acceptance | accepted / round | tokens / round | "
              "layer passes / token | GPU projection |", "|---|---|---|---|---|---|---|---|---|"]
    for row in simulated_best:
        lines.append("| " + " | ".join([str(row["draft_layer"]), str(row["draft_length"]), row["draft_head"],
                                         fmt(row["min_confidence"], "{}") if row["stop_tau"] is None
                                         else f"stop policy, tau {row['stop_tau']}", fmt(row["acceptance_rate"]),
                                         fmt(row["mean_accepted"], "{:.2f}"), fmt(row["tokens_per_round"], "{:.2f}"),
                                         fmt(row["passes_per_token"], "{:.2f}"),
                                         fmt(row["projected_speedup"], "{:.2f}x")]) + " |")
    lines += ["", "## What the drafters would need", "",
              f"Teacher-forced agreement of each {'untrained' if args.run_dir is None else 'trained'} exit with the "
              "full model's token on the test prompts, beside the per-draft acceptance that would give 1.0x and 1.1x "
              "fewer layer passes per token than full depth with the restricted draft head (best draft length, "
              "drafts independent; `-`: out of reach).", "",
              "| draft layer | agreement (full head) | agreement (restricted head) | needed for 1.0x | needed for 1.1x |",
              "|---|---|---|---|---|"]
    for row in agreement:
        lines.append("| " + " | ".join([str(row["draft_layer"]), fmt(row["agreement_full_head"]),
                                         fmt(row["agreement_frequent_head"]), fmt(row["needed_for_1.0x"]),
                                         fmt(row["needed_for_1.1x"])]) + " |")
    keys = ("layer_ms_1_tokens", "layer_ms_2_tokens", "layer_ms_4_tokens", "layer_ms_8_tokens", "lm_head_ms",
            "restricted_head_ms")
    lines += ["", f"## Where the time goes on this CPU (ms: median [quartiles] of {profile[keys[0]]['n']} repeats)", "",
              "One layer: a pass over all layers with the prompt cached, divided by their number.", "",
              "| one layer, 1 token | one layer, 2 tokens | one layer, 4 tokens | one layer, 8 tokens | LM head | "
              "restricted head |", "|---|---|---|---|---|---|",
              "| " + " | ".join(f"{profile[k]['median']:.2f} [{profile[k]['q1']:.2f}-{profile[k]['q3']:.2f}]"
                                for k in keys) + " |", "",
              "Selection (validation): " + json.dumps(selection), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=100,
                        help="test prompts: every method runs on each and its output is compared with full depth's")
    parser.add_argument("--timed", type=int, default=20, help="of those, the first N are timed (interleaved per prompt)")
    parser.add_argument("--select", type=int, default=12, help="validation prompts for choosing the points")
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="draft layers (default: 8 12 16 20 22 24 25 26 27 28 29; with --run-dir its exits "
                             "from layer 12 below the last)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--confidences", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--assistant-layers", type=int, nargs="+", default=[20, 26, 28])
    parser.add_argument("--assistant-prompts", type=int, default=None,
                        help="of the timed prompts, the first N also run assistant_early_exit (default: all timed; "
                             "it is slow: its drafts start at 20 tokens per round)")
    parser.add_argument("--assistant-select", type=int, default=1,
                        help="validation prompts timed per --assistant-layers layer to choose the fastest")
    parser.add_argument("--profile-repeats", type=int, default=31, help="repeats of each cost-profile timing")
    parser.add_argument("--vocab", type=int, default=4096, help="rows of the restricted draft head")
    parser.add_argument("--batch", type=int, default=8, help="batch of the untimed full-depth references")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="default experiments/results/verify (untrained "
                                                                    "exits) or verify_trained (--run-dir)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="a finished aclsum_consistentee run: its trained exits draft, and stop policies join")
    parser.add_argument("--policy-epochs", type=int, default=20, help="epochs of each stop policy (--run-dir)")
    parser.add_argument("--policy-lr", type=float, default=1e-3)
    parser.add_argument("--policy-max-drafts", type=int, default=4, help="the stop policies' drafts per round at most")
    parser.add_argument("--policy-taus", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--policy-head", choices=("full", "frequent"), default="full",
                        help="the head the stop policies are trained (and evaluated) with: the exit's own, or the "
                             "restricted one")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    policies = {}
    if args.run_dir is None:
        decoder, tokenizer = build_decoder(OmegaConf.load(ROOT / "conf" / "backbone" / "smollm2_135m.yaml"))
        exits = PlainExits(decoder.num_layers)
        args.layers = args.layers or [8, 12, 16, 20, 22, 24, 25, 26, 27, 28, 29]
    else:
        decoder, tokenizer, exits, saved_policy = run_model(args.run_dir)
        args.layers = args.layers or [layer for layer in exits.exit_layers[:-1] if layer >= 12]
    args.out = args.out or (OUT if args.run_dir is None else OUT.parent / "verify_trained")
    model, L, eos = decoder.model, decoder.num_layers, tokenizer.eos_token_id
    head = RestrictedHead(model.lm_head, draft_vocabulary(tokenizer, args.vocab))
    if args.run_dir is not None:
        policies = train_stop_policies(decoder, exits, args.run_dir, args.layers, args,
                                       head if args.policy_head == "frequent" else None)
        if saved_policy is not None and args.policy_head == "full":  # the run's own: it replaces ours at its layer
            policies[saved_policy.draft_layer] = saved_policy
    per_layer = layer_parameters(decoder)
    head_cost = head_cost_in_layers(decoder.vocab_size, decoder.hidden_size, per_layer)
    draft_head_cost = head_cost_in_layers(head.rows, decoder.hidden_size, per_layer)
    log(f"SmolLM2: {L} layers; LM head {head_cost:.2f} layers, restricted head ({head.rows} rows) {draft_head_cost:.2f}")

    def grid(facts):
        rows = []
        for layer in args.layers:
            for length in args.lengths:
                for which in ("full", "frequent"):
                    for confidence in [None, *args.confidences]:
                        rows.append(simulate(facts, layer, length, which, confidence, L, head_cost, draft_head_cost))
            if layer in policies:  # the stop policy drafts with the head it was trained with, up to its max_drafts
                for tau in args.policy_taus:
                    rows.append(simulate(facts, layer, policies[layer].max_drafts, args.policy_head, None, L,
                                         head_cost, draft_head_cost, stop_tau=tau))
        return rows

    # 2. selection on validation prompts
    val = load_prompts(tokenizer, "validation", args.select)
    val_facts = teacher_forced(decoder, exits, head, val, args, eos, "validation", policies)
    val_grid = grid(val_facts)
    verify_point = fewest(r for r in val_grid if r["stop_tau"] is None)
    fixed_point = fewest(r for r in val_grid if r["draft_head"] == "full" and r["min_confidence"] is None
                         and r["stop_tau"] is None)
    confidence_point = fewest(r for r in val_grid if r["draft_head"] == "full" and r["min_confidence"] is not None)
    policy_point = fewest(r for r in val_grid if r["stop_tau"] is not None) if policies else None
    log("verify point (validation):", verify_point)
    log("fixed point (validation):", fixed_point)
    log("confidence point (validation):", confidence_point)
    log("stop policy point (validation):", policy_point)
    warm = torch.tensor([val[0]])
    generate_with_exits(decoder, exits, FullRule(), warm, torch.ones_like(warm), 2)  # one-off allocations
    model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, do_sample=False,
                   pad_token_id=eos)
    assistant_times = {}
    for layer in args.assistant_layers if len(args.assistant_layers) > 1 else []:  # one layer: nothing to choose
        seconds = tokens = 0
        for prompt in val[:args.assistant_select]:
            ids = torch.tensor([prompt])
            mask = torch.ones_like(ids)
            cache = prefill(decoder, ids, mask)
            out, s, _ = run_method("assistant_early_exit", {"draft_layer": layer}, decoder, model, exits, head, ids,
                                   mask, cache, args.new, eos, policies)
            seconds, tokens = seconds + s, tokens + len(out)
        assistant_times[layer] = tokens / seconds
        log(f"assistant_early_exit={layer}: {tokens / seconds:.2f} tokens/s on {args.assistant_select} validation "
            "prompt(s)")
    assistant_layer = max(assistant_times, key=assistant_times.get) if assistant_times else args.assistant_layers[0]
    point_keys = (*("draft_layer", "draft_length", "draft_head", "min_confidence"), "stop_tau")
    selection = {"verify": {k: verify_point[k] for k in point_keys},
                 "fixed": {k: fixed_point[k] for k in point_keys},
                 "confidence_stop": {k: confidence_point[k] for k in point_keys},
                 "draft_policy": None if policy_point is None else {k: policy_point[k] for k in point_keys},
                 "assistant_early_exit": assistant_layer,
                 "assistant_tokens_per_s_validation": {str(k): round(v, 3) for k, v in assistant_times.items()}}

    # 1 + 3. test prompts: teacher-forced acceptance; every method on every prompt, timed on the first `timed`
    test = load_prompts(tokenizer, "test", args.prompts)
    args.timed = min(args.timed, len(test))
    args.assistant_prompts = args.timed if args.assistant_prompts is None else min(args.assistant_prompts, args.timed)
    methods = [("generate", "greedy", None), ("full_depth", "ee_lightning", None),
               ("verify", "E{draft_layer} k{draft_length} {draft_head} head, stop {min_confidence}".format(**verify_point),
                verify_point),
               ("fixed_draft", "E{draft_layer} k{draft_length} (LayerSkip-style)".format(**fixed_point), fixed_point),
               ("confidence_stop", "E{draft_layer} k{draft_length} stop below {min_confidence}".format(**confidence_point),
                confidence_point)]
    if policy_point is not None:
        methods.append(("draft_policy", "E{draft_layer} up to k{draft_length}, stop policy tau {stop_tau}".format(
            **policy_point), policy_point))
    if args.assistant_prompts > 0:
        methods.append(("assistant_early_exit", f"E{assistant_layer}", {"draft_layer": assistant_layer}))
    totals = {name: {"seconds": 0.0, "timed_tokens": 0, "assistant_seconds": 0.0, "assistant_tokens": 0, "prompts": 0,
                     "tokens": 0, "reused": 0, "drafted": 0, "accepted": 0, "rounds": 0, "passes": 0.0,
                     "differences": []}
              for name, _, _ in methods}
    test_facts = teacher_forced(decoder, exits, head, test, args, eos, "test", policies)
    log("test acceptance from teacher forcing: done")
    for index, prompt in enumerate(progress(test, "test prompts, every method", unit="prompt")):
        is_timed = index < args.timed
        ids = torch.tensor([prompt])
        mask = torch.ones_like(ids)
        cache = prefill(decoder, ids, mask)
        runs = {}  # name -> (spec, output, verify result)
        for name, _, spec in methods:
            if name == "assistant_early_exit" and index >= args.assistant_prompts:
                continue
            total = totals[name]
            # untimed, a drafting point that makes the same computation as one already run reuses its output
            twin = None if is_timed or name not in DRAFTING else next(
                (other for other, (other_spec, _, _) in runs.items() if other in DRAFTING and same_run(spec, other_spec)),
                None)
            if twin is not None:
                output, result = runs[twin][1], runs[twin][2]
                total["reused"] += 1
            elif name == "full_depth":  # the reference: its logits give the top-2 gap where another output differs
                full, seconds = timed(generate_with_exits, decoder, exits, FullRule(), ids, mask, args.new,
                                      eos_token_id=eos, output_logits=True, prompt_cache=cache)
                output, result = full.new_tokens[0].tolist(), None
                reference, reference_logits = output, full.logits[0]
            else:
                output, seconds, result = run_method(name, spec, decoder, model, exits, head, ids, mask, cache, args.new,
                                                     eos, policies)
            runs[name] = (spec, output, result)
            if is_timed and twin is None:
                total["seconds"] += seconds
                total["timed_tokens"] += len(output)
                if index < args.assistant_prompts:  # full depth on the assistant's prompts, for its ratio
                    total["assistant_seconds"] += seconds
                    total["assistant_tokens"] += len(output)
            total["prompts"] += 1
            total["tokens"] += len(output)
            if result is not None:
                total["drafted"] += sum(result.drafted)
                total["accepted"] += sum(result.accepted)
                total["rounds"] += result.rounds
                total["passes"] += result.layer_passes(head_cost, draft_head_cost if spec["draft_head"] == "frequent"
                                                       else None)
        for name, (_, output, _) in runs.items():
            found = difference(output, reference, reference_logits)
            if found is not None and name != "full_depth":
                totals[name]["differences"].append({"prompt": index, "position": found[0],
                                                    "top2_gap": None if found[1] is None else round(found[1], 6)})
        if is_timed:
            log(f"prompt {index + 1} (timed): " + ", ".join(
                f"{name} {totals[name]['timed_tokens'] / totals[name]['seconds']:.2f} tok/s" for name, _, _ in methods
                if totals[name]["seconds"]))

    full_speed = totals["full_depth"]["timed_tokens"] / totals["full_depth"]["seconds"]
    full_speed_assistant = totals["full_depth"]["assistant_tokens"] / max(totals["full_depth"]["assistant_seconds"], 1e-9)
    measured = []
    for name, point, spec in methods:
        total = totals[name]
        speed = total["timed_tokens"] / total["seconds"]
        is_verify = name in DRAFTING
        passes = (total["passes"] / total["tokens"] if is_verify else
                  full_depth_passes(L, head_cost) if name in ("generate", "full_depth") else None)
        gaps = [d["top2_gap"] for d in total["differences"]]
        measured.append({
            "method": name, "point": point,
            "timed_prompts": args.assistant_prompts if name == "assistant_early_exit" else args.timed,
            "timed_tokens": total["timed_tokens"], "seconds": round(total["seconds"], 2), "tokens_per_s": speed,
            "vs_full_depth": speed / (full_speed_assistant if name == "assistant_early_exit" else full_speed),
            "prompts": total["prompts"], "tokens": total["tokens"], "reused_prompts": total["reused"],
            "acceptance_rate": total["accepted"] / max(total["drafted"], 1) if is_verify else None,
            "mean_accepted": total["accepted"] / max(total["rounds"], 1) if is_verify else None,
            "tokens_per_round": total["tokens"] / max(total["rounds"], 1) if is_verify else None,
            "passes_per_token": passes,
            "projected_speedup": projected_speedup(full_depth_passes(L, head_cost), passes) if passes else None,
            "differing_prompts": None if name == "full_depth" else len(total["differences"]),
            "differing_ties": None if name == "full_depth" else sum(g is not None and g < TIE_TOLERANCE for g in gaps),
            "differences": total["differences"],
        })
    test_grid = grid(test_facts)
    best_per_layer = [min((r for r in test_grid if r["draft_layer"] == layer), key=lambda r: r["passes_per_token"])
                      for layer in args.layers]
    on_chosen = {name: simulate(test_facts, spec["draft_layer"], spec["draft_length"], spec["draft_head"],
                                spec["min_confidence"], L, head_cost, draft_head_cost, spec.get("stop_tau"))
                 for name, _, spec in methods if name in DRAFTING}
    for name, row in on_chosen.items():
        log(f"{name} on all {len(test)} test prompts (simulated):", row)
    profile = cost_profile(decoder, head, test[0], args.profile_repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "simulated.csv", test_grid)
    write_csv(args.out / "measured.csv", [{k: v for k, v in row.items() if k != "differences"} for row in measured])
    agreement = agreement_table(test_facts, args.layers, args.lengths, L, head_cost, draft_head_cost)
    write_csv(args.out / "agreement.csv", agreement)
    wall = time.time() - started
    command = " ".join(["python", "experiments/verify_benchmark.py",
                        *(shown(a) if args.run_dir is not None and Path(a) == args.run_dir else a
                          for a in (sys.argv[1:] if argv is None else argv))])
    report = markdown(args, measured, best_per_layer, agreement, profile, selection, L, head_cost, draft_head_cost,
                      head.rows, on_chosen, command, wall)
    atomic_write_text(args.out / "report.md", report)
    atomic_write_text(args.out / "results.json", json.dumps({
        "command": command,
        "args": {k: shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "head_cost_layers": head_cost, "draft_head_cost_layers": draft_head_cost, "selection": selection,
        "measured": measured, "simulated_test_on_chosen": on_chosen,
        "simulated_best_per_layer": best_per_layer, "agreement": agreement, "cost_profile_ms": profile,
        "wall_seconds": round(wall, 1)}, indent=2))
    log(report)
    log(f"wrote {shown(args.out)} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
