"""Study: how often does each exit agree with the full model's greedy token, before and after
distilling the exits from the full model?

SmolLM2-135M-Instruct, exits every `--exit-every` layers. The frozen model runs once, teacher-forced,
over ACLSum's training text (every (paper, aspect) prompt in the chat template plus its reference
summary: the abstracts and the summaries), and the cache keeps, at every position, each exit's
state and the full model's top-k next tokens (log-probs normalised over the whole vocabulary).
Each adapter kind is then distilled on it (`training.lm_distill.distill_exits`) and scored on
held-out text, the validation split, by the same pass: at every position, does the exit's argmax
over the WHOLE vocabulary equal the full model's? Reported over the response tokens (what
generation emits) and over every position.

    python experiments/exit_agreement.py                           # every training row
    python experiments/exit_agreement.py --train-rows 96 --epochs 1   # a quick look

Writes experiments/results/exit_agreement/{exit_agreement.csv,exit_agreement.md,exit_agreement.json}.
The caches go to $EE_CACHE_DIR/distill (default .cache/distill), keyed by model, rows and settings.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from ee_lightning.data.generation import ACLSumDataModule
from ee_lightning.exits.lm_targets import exit_correct
from ee_lightning.files import atomic_write_text, load_or_build
from ee_lightning.inference.lm_cache import collect_exit_states, exit_tables, source_meta
from ee_lightning.modeling.backbones.decoder_build import build_decoder, cache_dir
from ee_lightning.modeling.lm_exits import LMExitHeads
from ee_lightning.training.lm_distill import distill_exits

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "exit_agreement"


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-rows", type=int, default=None, help="ACLSum training pairs (default: all 300)")
    parser.add_argument("--val-rows", type=int, default=45, help="validation pairs scored (default 45 of 150)")
    parser.add_argument("--exit-every", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--vocabulary", choices=("restricted", "full"), default="restricted")
    parser.add_argument("--adapters", nargs="+", default=["lowrank", "block"], choices=("lowrank", "block"))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args(argv)


def cached(decoder, datamodule, split: str, exit_layers, top_k: int, folder: Path) -> dict:
    meta = {**source_meta(decoder, datamodule, split, {"backbone": "smollm2_135m"}), "exit_layers": exit_layers,
            "positions": "all", "top_k": top_k, "dtype": "float16"}
    loader = datamodule.dataloader(split, "train", batch_size=4)
    name = f"aclsum_{split}_{meta['rows'][:12]}_k{top_k}_e{len(exit_layers)}.pt"
    return load_or_build(folder / name, meta, lambda: collect_exit_states(
        decoder, loader, exit_layers, dtype="float16", positions="all", top_k=top_k))


UNTRAINED = "untrained (final norm + LM head)"
# Settings that do not change what a report's rows measure.
NOT_MEASURED = ("adapters", "out")


def distilled(exits: LMExitHeads, kind: str, args, decoder, train: dict, folder: Path) -> dict:
    """Distil `exits` on `train`, or read back the weights an earlier run distilled with the same settings
    (saved beside the caches for later studies); returns distillation's info."""
    settings = {k: v for k, v in vars(args).items() if k not in NOT_MEASURED + ("val_rows",)}
    meta = {"adapter": kind, "settings": settings, "train_positions": len(train["targets"])}
    path = folder / f"exits_{kind}_{len(train['targets'])}pos_e{args.epochs}_r{args.rank}_k{args.top_k}.pt"

    def build() -> dict:
        info = distill_exits(exits, decoder, train, trainer(args.epochs), vocabulary=args.vocabulary, lr=args.lr,
                             batch_size=args.batch_size)
        return {**exits.state_dict(), "vocabulary_size": torch.tensor(info["vocabulary_size"])}

    tensors = load_or_build(path, meta, build)
    vocabulary_size = int(tensors.pop("vocabulary_size"))
    exits.load_state_dict(tensors)
    return {"vocabulary_size": vocabulary_size}


def earlier_report(args, train: dict, held_out: dict) -> dict:
    """The report already at `args.out` when it measured the same thing (every setting but the adapter kinds
    asked for, the same positions), else {}."""
    path = args.out / "exit_agreement.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    mine = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in NOT_MEASURED}
    theirs = {k: v for k, v in report.get("settings", {}).items() if k not in NOT_MEASURED}
    same_text = (report.get("train_positions"), report.get("val_positions")) == (len(train["targets"]),
                                                                                  len(held_out["targets"]))
    return report if mine == theirs and same_text else {}


def agreement(cache: dict, exits, decoder) -> dict:
    """Per exit: agreement with the full model's token over response tokens and over all positions, and
    the mean cross-entropy of the full model's token at the exit (whole vocabulary)."""
    tables = exit_tables(cache, exits, decoder, batch_size=512)
    agree = exit_correct(tables["tokens"], cache["full_tokens"]).float()
    response = cache["response"]
    return {"agreement_response": agree[:, response].mean(1).tolist(), "agreement_all": agree.mean(1).tolist(),
            "ce_full_response": tables["ce_full"][:, response].mean(1).tolist()}


def trainer(epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_model_summary=False,
                     enable_progress_bar=sys.stderr.isatty(), accelerator="cpu", devices=1)


def markdown(report: dict) -> str:
    layers = report["exit_layers"]
    s = report["settings"]
    lines = ["# Exit agreement with the full model, before and after distillation", "",
             f"SmolLM2-135M-Instruct, ACLSum. Distilled on {report['train_positions']:,} teacher-forced positions "
             f"({s['train_rows'] or 300} training pairs: prompts with their abstracts, and reference summaries), top-{s['top_k']} "
             f"targets, {s['vocabulary']} vocabulary ({report['vocabulary_size']:,} tokens), {s['epochs']} epochs, "
             f"AdamW lr {s['lr']}, batch {s['batch_size']}. Scored on {report['val_positions']:,} positions of "
             f"{s['val_rows']} validation pairs ({report['val_response_tokens']:,} of them response tokens): "
             "the exit's argmax over the whole vocabulary against the full model's.", "",
             "Agreement on response tokens (on every position in brackets):", "",
             "| exit | " + " | ".join(f"L{layer}" for layer in layers) + " |", "|---|" + "---|" * len(layers)]
    for name, row in report["exits"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * a:.1f}% ({100 * b:.1f}%)" for a, b in
                                                 zip(row["agreement_response"], row["agreement_all"])) + " |")
    lines += ["", "Cross-entropy of the full model's token at the exit (response tokens, nats):", "",
              "| exit | " + " | ".join(f"L{layer}" for layer in layers) + " |", "|---|" + "---|" * len(layers)]
    for name, row in report["exits"].items():
        lines.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in row["ce_full_response"]) + " |")
    lines += ["", f"Parameters per exit: " + ", ".join(f"{k} {v:,}" for k, v in report["parameters_per_exit"].items()),
              "", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()),
              "", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse(argv)
    torch.manual_seed(args.seed)
    times, started = {}, time.time()
    decoder, tokenizer = build_decoder(OmegaConf.load(ROOT / "conf" / "backbone" / "smollm2_135m.yaml"))
    datamodule = ACLSumDataModule(tokenizer, max_prompt_length=args.max_prompt_length, max_response_length=64,
                                  max_train_samples=args.train_rows, max_eval_samples=args.val_rows)
    datamodule.setup()
    exit_layers = LMExitHeads(decoder.num_layers, decoder.hidden_size, args.exit_every).exit_layers
    folder = cache_dir() / "distill"
    train = cached(decoder, datamodule, "train", exit_layers, args.top_k, folder)
    times["train cache"] = time.time() - started
    held_out = cached(decoder, datamodule, "validation", exit_layers, args.top_k, folder)
    times["validation cache"] = time.time() - started - times["train cache"]
    print(f"cached {len(train['targets'])} training and {len(held_out['targets'])} validation positions", flush=True)

    # A study too long for one sitting is run again with the same settings: what the report already holds for
    # them is kept, and exits already distilled for them are read back instead of trained again.
    earlier = earlier_report(args, train, held_out)
    results, params = dict(earlier.get("exits", {})), dict(earlier.get("parameters_per_exit", {}))
    info = {"vocabulary_size": earlier.get("vocabulary_size")}
    times.update({k: v for k, v in earlier.get("seconds", {}).items() if k.startswith(("scoring", "distilling"))})
    if UNTRAINED not in results:
        clock = time.time()
        untrained = LMExitHeads(decoder.num_layers, decoder.hidden_size, args.exit_every, rank=1)
        results[UNTRAINED] = agreement(held_out, untrained, decoder)
        times["scoring untrained"] = time.time() - clock
    print("untrained:", results[UNTRAINED], flush=True)
    for kind in args.adapters:
        name = f"distilled {kind}" + (f" (rank {args.rank})" if kind == "lowrank" else " (norm + MLP block)")
        if name in results:
            print(f"{name}: kept from the earlier report", flush=True)
            continue
        torch.manual_seed(args.seed)
        exits = LMExitHeads(decoder.num_layers, decoder.hidden_size, args.exit_every, rank=args.rank, adapter=kind,
                            layers=decoder.layers())
        params[kind] = sum(p.numel() for p in exits.adapters[str(exit_layers[0])].parameters())
        clock = time.time()
        info = distilled(exits, kind, args, decoder, train, folder)
        times[f"distilling {kind}"] = time.time() - clock
        clock = time.time()
        results[name] = agreement(held_out, exits.eval(), decoder)
        times[f"scoring {kind}"] = time.time() - clock
        print(name, results[name], flush=True)
        write(args, argv, exit_layers, train, held_out, info, results, params, times, started)
    report = write(args, argv, exit_layers, train, held_out, info, results, params, times, started)
    print(markdown(report))
    return report


def write(args, argv, exit_layers, train, held_out, info, results, params, times, started) -> dict:
    """The report so far (rewritten after each adapter kind: a long run keeps what it finished)."""
    times = {**times, "total": time.time() - started}
    report = {"exit_layers": exit_layers, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "train_positions": len(train["targets"]), "train_response_tokens": int(train["response"].sum()),
              "val_positions": len(held_out["targets"]), "val_response_tokens": int(held_out["response"].sum()),
              "vocabulary_size": info.get("vocabulary_size"), "exits": results, "parameters_per_exit": params,
              "seconds": times, "command": "python experiments/exit_agreement.py " + " ".join(argv or sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "exit_agreement.json", json.dumps(report, indent=2))
    atomic_write_text(args.out / "exit_agreement.md", markdown(report))
    with open(args.out / "exit_agreement.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["exits", "layer", "agreement_response", "agreement_all", "ce_full_response"])
        for name, row in results.items():
            for e, layer in enumerate(exit_layers):
                writer.writerow([name, layer, row["agreement_response"][e], row["agreement_all"][e],
                                 row["ce_full_response"][e]])
    return report


if __name__ == "__main__":
    main()
