"""Study: what reading an exit's confidence costs in generation, and what it keeps.

CALM's softmax margin keeps the most of the full model's text of every rule here, but it calls the LM head
(49,152 x 576 on SmolLM2, about eight layers) at every exit it tries, and runs at under half of full depth's
speed. This study asks whether a cheap view of the same confidence pays for itself: the margin of the softmax
over the head's rows of the `--frequent` tokens the model writes most often in the run's training responses,
read at every exit a token passes (or only from a given layer on), from the exit's adapted state or from the
raw state (no adapter). The emitted token still comes from the exit's full head, once, where the token leaves.

The reader sits where the token policy sits (`FrequentMarginReader.logit`, read by the policy rule: a token
leaves where margin > tau), so generation is the library's own, unchanged. Per reader and threshold, on the
run's first `--prompts` validation prompts with `--new` new tokens: layer saving, ROUGE-L against the full
output and against the reference, token agreement (skipped layers' K/V as deferral gives them, batched), and
batch-1 decoding speed with skipped layers deferred (the prompt pass excluded) over the first
`--speed-prompts`, beside full depth, a static exit and the margin over the whole vocabulary. It also times
each part of one read on its own (the weights cycled over the exits, as generation meets them).

    python experiments/confidence_reads.py --run-dir <a finished aclsum_consistentee_large run>

Writes confidence_reads.{md,json} to --out (default experiments/results/confidence_reads/).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from ee_lightning.evaluation.generation_cost import measure_generation_flops
from ee_lightning.evaluation.generation_eval import generate_batch, merge_runs, score_points
from ee_lightning.exits.rules import FullRule, PolicyRule, SoftmaxMarginRule, StaticRule
from ee_lightning.exits.signals import margin
from ee_lightning.files import atomic_write_text
from ee_lightning.inference.lm_cache import confidence_tokens
from ee_lightning.modeling.draft_head import RestrictedHead
from ee_lightning.modeling.export import load_decoder
from ee_lightning.progress import progress
from ee_lightning.training.lm_pipeline import generation_batches

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "confidence_reads"
# (threshold, first exit read, adapted state): every exit, adapted; the deep exits only; the raw state
READERS = [(0.9, 1, True), (0.85, 1, True), (0.8, 1, True), (0.9, 18, True), (0.8, 18, True), (0.7, 18, True),
           (0.9, 1, False), (0.7, 1, False)]
NEVER = -1e4  # a logit whose sigmoid is 0: below its first exit the reader never lets a token leave


class FrequentMarginReader:
    """A token policy that reads the exit's confidence instead of a trained net: its logit is logit(margin), the
    top-1 minus top-2 probability of the softmax over `head`'s rows, of the exit's adapted state (or the raw
    state, `adapted=False`) through the final norm. So the policy rule's `exit_prob > tau` is `margin > tau`."""

    def __init__(self, exits, decoder, head: RestrictedHead, first_exit: int = 1, adapted: bool = True):
        self.exits, self.decoder, self.head = exits, decoder, head
        self.first_exit, self.adapted = first_exit, adapted

    def logit(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if layer < self.first_exit:
            return torch.full(hidden.shape[:-1], NEVER, device=hidden.device)
        state = self.exits.adapt(layer, hidden) if self.adapted else hidden
        m = margin(self.head(self.decoder.final_norm(state))).double().clamp(1e-12, 1 - 1e-12)
        return torch.log(m / (1 - m)).float()


def reader_label(threshold: float, first_exit: int, adapted: bool) -> str:
    where = "every exit" if first_exit <= 1 else f"exits from layer {first_exit}"
    return f"margin over the frequent rows, {'adapted' if adapted else 'raw'} state, {where}, >= {threshold}"


def part_costs(decoder, exits, head: RestrictedHead, repeats: int = 200) -> dict:
    """ms of each part of one read at batch 1, each call on the next exit's weights in turn (as a token climbing the
    layers meets them), beside the full LM head."""
    layers = [layer for layer in exits.exit_layers if layer != decoder.num_layers]
    hidden = torch.randn(1, decoder.hidden_size) * 50

    def clock(fn) -> float:
        for layer in layers:
            fn(layer)
        start = time.perf_counter()
        for index in range(repeats):
            fn(layers[index % len(layers)])
        return 1000 * (time.perf_counter() - start) / repeats

    with torch.no_grad():
        normed = decoder.final_norm(hidden)
        return {"adapter": clock(lambda layer: exits.adapt(layer, hidden)),
                "final norm": clock(lambda layer: decoder.final_norm(hidden)),
                f"head over {head.rows} rows": clock(lambda layer: head(normed)),
                "whole read (adapter, norm, rows, margin)": clock(
                    lambda layer: margin(head(decoder.final_norm(exits.adapt(layer, hidden))))),
                "full LM head (49,152 rows)": clock(lambda layer: decoder.lm_head(normed))}


def generate_all(decoder, exits, rules, batches, new, eos, pad, flops, desc: str) -> list[dict]:
    """Every rule (label, name, value, rule, what sits in the policy's place) on every batch: its run over the batches,
    with the tokens and exits that deferred skipped layers give (the real layers, batched)."""
    return [merge_runs([generate_batch(decoder, exits, rule, batch, new, eos, pad, slot, flops=flops, kv="real")
                        for batch in batches]) for _, _, _, rule, slot in progress(rules, desc, unit="rule")]


def batch1_ms_per_token(decoder, exits, rules, singles, new, eos, pad) -> list[float]:
    """ms per generated token of every rule at batch 1 with deferred skipped layers, the prompt pass excluded. After a
    warm-up, prompt by prompt, every rule in turn: a machine that slows down for a while slows every rule alike."""
    generate_batch(decoder, exits, FullRule(), singles[0], 4, eos, pad, kv="defer")
    seconds, generated = [0.0] * len(rules), [0] * len(rules)
    for batch in progress(singles, "batch 1, deferred", unit="prompt"):
        for index, (_, _, _, rule, slot) in enumerate(rules):
            run = generate_batch(decoder, exits, rule, batch, new, eos, pad, slot, kv="defer")
            seconds[index] += run["seconds"]
            generated[index] += run["generated"]
    return [1000 * s / n for s, n in zip(seconds, generated)]


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished aclsum_consistentee run directory")
    parser.add_argument("--prompts", type=int, default=16, help="validation prompts scored")
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--speed-prompts", type=int, default=6, help="prompts timed at batch 1, skipped layers deferred")
    parser.add_argument("--frequent", type=int, default=4096, help="rows of the head: the most frequent training tokens")
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args(argv)


def run_confidence_tokens(run_dir: Path, frequent: int, eos: int) -> torch.Tensor:
    """The (at most) `frequent` tokens the full model writes most often over the run's training responses (its
    lm_cache_train stage), EOS always among them: what `method.lm_exits.confidence_tokens` gives a run trained now."""
    path = run_dir / "checkpoints" / "lm_cache_train" / "exit_states_train.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: --run-dir must be a finished aclsum_consistentee run "
                                "(its lm_cache_train stage holds the training responses' tokens)")
    return confidence_tokens(torch.load(path, map_location="cpu", weights_only=True)["tensors"], frequent, eos)


def frequent_head(run_dir: Path, decoder, frequent: int, eos: int) -> RestrictedHead:
    """The LM head's rows of `run_confidence_tokens`, sliced once."""
    return RestrictedHead(decoder.model.get_output_embeddings(), run_confidence_tokens(run_dir, frequent, eos))


def markdown(rows: list[dict], costs: dict, meta: dict) -> str:
    lines = [f"# {meta['title']}", "", meta["note"], "", "## One read's parts (ms, batch 1)", "",
             "| part | ms |", "|---|---|", *[f"| {name} | {ms:.2f} |" for name, ms in costs.items()], "",
             "## In generation", "",
             "| rule | layer saving | ROUGE-L (full) | ROUGE-L (ref) | token agreement | ms/token, batch 1 | vs full |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {100 * row['layer_saving']:.1f}% | {row['rougeL_vs_full']:.3f} | "
                     f"{row['rougeL']:.3f} | {row['token_agreement']:.3f} | {row['ms_per_token']:.1f} | "
                     f"{row['speed_vs_full']:.2f}x |")
    lines += ["", f"Seconds: {meta['seconds']:.0f}", "", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    started = time.time()
    parts, decoder, tokenizer, config = load_decoder(args.run_dir / "model")
    exits = parts.exits
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    head = frequent_head(args.run_dir, decoder, args.frequent, eos)
    data = {**config["data"], "max_eval_samples": None}
    datamodule = instantiate(data, tokenizer=tokenizer, _convert_="all")
    datamodule.setup()
    batches = generation_batches(datamodule, "validation", 8, args.prompts)
    singles = generation_batches(datamodule, "validation", 1, args.speed_prompts)
    references = [ref for batch in batches for ref in batch["references"]]
    rules = [("full depth", "full", None, FullRule(), None), ("static exit at layer 24", "static", 24, StaticRule(k=24), None),
             ("margin over the whole vocabulary, >= 0.9", "softmax_margin", 0.9, SoftmaxMarginRule(threshold=0.9), None)]
    for threshold, first, adapted in READERS:
        rules.append((reader_label(threshold, first, adapted), "policy", threshold, PolicyRule(tau=threshold),
                      FrequentMarginReader(exits, decoder, head, first, adapted)))
    flops = measure_generation_flops(decoder, exits)  # the scoring reads them; this study reports speed instead
    with torch.no_grad():
        runs = generate_all(decoder, exits, rules, batches, args.new, eos, pad, flops, "confidence reads: text")
        speed = batch1_ms_per_token(decoder, exits, rules, singles, args.new, eos, pad)
        points, _ = score_points([(name, value, rule) for _, name, value, rule, _ in rules], runs, tokenizer,
                                 references, decoder.num_layers, 1.0, {"seconds": 1.0, "generated": 1})
        costs = part_costs(decoder, exits, head)
    rows = [{"label": label, **{key: point[key] for key in ("layer_saving", "rougeL_vs_full", "rougeL",
                                                              "token_agreement")},
             "ms_per_token": ms, "speed_vs_full": speed[0] / ms}
            for (label, *_), point, ms in zip(rules, points, speed)]
    meta = {"title": f"Reading an exit's confidence in generation (run {args.run_dir.name})",
            "note": (f"{len(references)} validation prompts, {args.new} new tokens, greedy; the frequent rows: the "
                     f"{head.rows} tokens the model writes most often in the run's training responses (at most "
                     f"{args.frequent}, EOS included). Quality with the skipped layers' K/V as deferral gives them "
                     f"(the real layers, batched); speed at batch 1 with the skipped layers deferred, over the first "
                     f"{args.speed_prompts} prompts, the prompt pass excluded. Every reader emits the exit's "
                     "full-head token, once, where the token leaves."),
            "seconds": time.time() - started,
            "command": "python experiments/confidence_reads.py " + " ".join(argv or sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "confidence_reads.md", markdown(rows, costs, meta))
    atomic_write_text(args.out / "confidence_reads.json", json.dumps({"rows": rows, "costs": costs, **meta}, indent=1))
    print(markdown(rows, costs, meta))


if __name__ == "__main__":
    main()
