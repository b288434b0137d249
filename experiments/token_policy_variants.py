"""Study: the decoder's token policy trained other ways, on a finished run's own caches, scored teacher-forced
on its held-out responses. How much layer saving does each keep at which agreement with the full model?

A run of `ee-train experiment=aclsum_consistentee` leaves its training cache (every exit's state on every
response token), every exit's scores and memorized exit there, and a held-out cache of the validation
responses. Each variant trains the run's policy stage again (`lm_pipeline.policy_stage`: the same system,
loader and settings, with some settings changed) per alpha and seed, then replays it at every tau on the
held-out cache (`lm_pipeline.policy_points`). About 10 seconds per policy on 2 cores: this is where a
depth cost is chosen before any generation.

    python experiments/token_policy_variants.py --run-dir <run> --alphas 0.05 0.1 0.15 0.2 0.25
    python experiments/token_policy_variants.py --run-dir <run> --alphas 0.15 --variants "exact expected reward"
    python experiments/token_policy_variants.py --run-dir <run> --alphas 0.1 0.15 --cross-fit 2

The run's exits learned its training tokens, and its policy learns where to exit from their scores on those
same tokens, which flatter them. With `--cross-fit K` the policy learns instead from out-of-fold scores: the
training responses fall into K folds, and each fold's tokens are scored by exits trained (the run's adapter
stage, its settings) on the other folds only. The held-out evaluation still uses the run's own exits.

The variant "confidence of the frequent rows as input" gives the policy what CALM's best measure reads, at a
fraction of its cost: beside each exit's state, that exit's top-1 probability and softmax margin over the head's
rows of the `--frequent` tokens the model writes most often (a head of 4,096 rows costs about half a layer of
SmolLM2, the tied head of 49,152 about eight), computed by the exits that score the tokens (out of fold under
--cross-fit). It asks whether the policy, given that view, decides better than the margin alone.

Beside the policies, reference rules on the same held-out tokens: the run's CALM classifier, and CALM's softmax
margin of each exit's own softmax, over the whole vocabulary and over the `--frequent` tokens the model writes
most often in the training responses (what a cheap head of those rows would tell a rule).

Writes token_policy_variants.{md,json} to --out (default experiments/results/token_policy_variants/).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import nn

from ee_lightning import load
from ee_lightning.app.validate import lm_exits_config
from ee_lightning.exits.rules import SoftmaxMarginRule, replay
from ee_lightning.files import atomic_write_text
from ee_lightning.inference.lm_cache import exit_tables, response_only
from ee_lightning.modeling.lm_exits import TokenExitPolicy
from ee_lightning.progress import progress
from ee_lightning.training import lm_cross_fit
from ee_lightning.training.lm_pipeline import (make_exits, policy_points, policy_stage, stage_loader,
                                              teacher_forced_point)
from ee_lightning.training.resume import seed_stage

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "token_policy_variants"
TAUS = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
LEVELS = [0.99, 0.97, 0.95, 0.9]  # agreement with the full model's token to keep
CLASSIFIER_THRESHOLDS = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99]
MARGIN_THRESHOLDS = [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99]
# Each variant changes some keys of method.lm_exits.policy (alpha is set per member).
VARIANTS = {
    "run's settings": {},
    "exact expected reward": {"estimator": "expected"},
    "plain depth cost (alpha x t)": {"depth_term": "plain"},
    "cross-entropy task term": {"task_term": "ce"},
    "normalised advantages": {"normalize_advantages": True},
}
# The policy reads, beside each exit's state, that exit's top-1 probability and softmax margin over the head's
# rows of the `--frequent` most frequent training tokens (training tokens: out of fold under --cross-fit).
CONFIDENCE = "confidence of the frequent rows as input"
VARIANTS[CONFIDENCE] = {}
CONFIDENCE_FEATURES = 2  # exit_tables' confidence: top-1 probability, margin


class ConfidenceHead(nn.Module):
    """One exit's policy head on [state, confidence]: LayerNorm of the state (as `TokenExitPolicy`'s heads) beside
    the confidence, then Linear -> GELU -> Linear."""

    def __init__(self, hidden_size: int, hidden: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.norm = nn.LayerNorm(hidden_size)
        self.net = nn.Sequential(nn.Linear(hidden_size + CONFIDENCE_FEATURES, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([self.norm(x[..., :self.hidden_size]), x[..., self.hidden_size:]], -1))


class ConfidencePolicy(TokenExitPolicy):
    """`TokenExitPolicy` whose heads also read the exit's confidence, appended to its state (`with_confidence`)."""

    def __init__(self, num_layers: int, hidden_size: int, hidden: int, exit_layers: list[int]):
        super().__init__(num_layers, hidden_size, hidden=hidden, exit_layers=exit_layers)
        self.heads = nn.ModuleDict({key: ConfidenceHead(hidden_size, hidden) for key in self.heads})


def with_confidence(states: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """Cached states [N, E, H] with each exit's confidence [E, N, 2] appended: [N, E, H + 2] (float32)."""
    return torch.cat([states.float(), confidence.transpose(0, 1).float()], -1)


def frequent_rows(parts: dict, frequent: int) -> torch.Tensor:
    """The ids of the `frequent` tokens the full model writes most often in the training responses."""
    counts = torch.bincount(parts["train"]["full_tokens"], minlength=parts["model"].decoder.vocab_size)
    return counts.topk(min(frequent, len(counts))).indices


def read_tensors(path: Path) -> dict:
    """A run's cached artefact (`files.save_artefact`): its tensors, whatever settings it was made for."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pass the directory of a finished aclsum_consistentee run "
                                "(its lm_cache_train, lm_scores and lm_cache_<held-out split> stages)")
    return torch.load(path, map_location="cpu", weights_only=True)["tensors"]


def run_parts(run_dir: Path) -> dict:
    """What the study reads from a finished run: its policy settings, model, caches and exit scores."""
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing: --run-dir must be an ee-train run directory")
    cfg = lm_exits_config(OmegaConf.load(config).method.lm_exits)
    split = cfg.evaluate_split
    if not split:
        raise ValueError(f"{run_dir}: the run held nothing out (method.lm_exits.evaluate_split=null); rerun it with "
                         "a held-out split")
    model = load(run_dir / "model")
    checkpoints = run_dir / "checkpoints"
    train = response_only(read_tensors(checkpoints / "lm_cache_train" / "exit_states_train.pt"))
    held_out = response_only(read_tensors(checkpoints / f"lm_cache_{split}" / f"exit_states_{split}.pt"))
    scores = read_tensors(checkpoints / "lm_scores" / "scores.pt")
    if scores["tokens"].shape[1] != len(train["targets"]):
        raise ValueError(f"{run_dir}: lm_scores holds {scores['tokens'].shape[1]} tokens, the training cache "
                         f"{len(train['targets'])}: the run's stages do not belong together")
    return {"cfg": cfg, "split": split, "model": model, "train": train, "held_out": held_out, "scores": scores,
            "held_out_tables": exit_tables(held_out, model.parts.exits, model.decoder,
                                           batch_size=cfg.adapters.batch_size)}


def quiet_trainer(epochs: int) -> L.Trainer:
    """A plain CPU Trainer for one of the study's small fits: no logger, checkpoints or progress bar."""
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     use_distributed_sampler=False)


def cross_fitted_scores(parts: dict, folds: int, seed: int, confidence_rows: torch.Tensor | None = None) -> dict:
    """The lm_scores stage's tables (tokens, ce, ce_full [E, N]) and memorized exits [N] over the training
    cache, every token scored by exits trained by the run's adapter stage on the other folds' responses (the
    pipeline's own `lm_cross_fit.cross_fitted_scores`, with this study's quiet Trainers)."""
    cfg, decoder = parts["cfg"], parts["model"].decoder
    fold_exits = []
    for k in range(folds):
        seed_stage(seed + k, "lm_adapters")
        fold_exits.append(make_exits(cfg, decoder))

    def fit_fold(k: int, system, dataset) -> None:
        seed_stage(seed + k, "lm_adapters")
        quiet_trainer(cfg.adapters.epochs).fit(system, train_dataloaders=stage_loader(dataset, cfg.adapters.batch_size,
                                                                                      seed + k))

    return lm_cross_fit.cross_fitted_scores(parts["train"], decoder, fold_exits, fit_fold, cfg.adapters,
                                            cfg.hardness.target, seed, confidence_rows)


def train_member(parts: dict, changes: dict, seed: int, scores: dict | None = None,
                 confidence: torch.Tensor | None = None) -> TokenExitPolicy:
    """The run's policy stage with `changes` to method.lm_exits.policy, trained from `seed` on `scores` (default:
    the run's own lm_scores); with the training tokens' `confidence` [E, N, 2], a `ConfidencePolicy` reading it."""
    cfg, decoder, exits = parts["cfg"], parts["model"].decoder, parts["model"].parts.exits
    policy_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg.policy), changes))
    torch.manual_seed(seed)
    kind = TokenExitPolicy if confidence is None else ConfidencePolicy
    policy = kind(decoder.num_layers, decoder.hidden_size, hidden=policy_cfg.hidden, exit_layers=list(exits.exit_layers))
    scores = parts["scores"] if scores is None else scores
    tables = {key: scores[key] for key in ("tokens", "ce", "ce_full")}
    train = parts["train"] if confidence is None else {**parts["train"],
                                                       "states": with_confidence(parts["train"]["states"], confidence)}
    system, data = policy_stage(policy, policy_cfg, train, tables, scores["memorized"], seed)
    seed_stage(seed, "lm_policy")
    quiet_trainer(policy_cfg.epochs).fit(system, train_dataloaders=stage_loader(data, policy_cfg.batch_size, seed))
    return policy.eval()


def most_saving(points: list[dict], level: float) -> dict | None:
    """The point with the most layer saving whose agreement with the full model is at least `level`."""
    kept = [p for p in points if p["agreement_with_full"] >= level]
    return max(kept, key=lambda p: p["layer_saving"]) if kept else None


def study(parts: dict, names: list[str], alphas: list[float], seeds: list[int], cross_fit: int = 0,
          frequent: int = 4096) -> dict:
    """Per variant, alpha and seed: the policy's teacher-forced points on the held-out cache. With `cross_fit`
    folds, each seed's policies learn from that seed's out-of-fold scores (`cross_fitted_scores`)."""
    members = [(name, alpha, seed) for name in names for alpha in alphas for seed in seeds]
    model, cfg = parts["model"], parts["cfg"]
    rows = frequent_rows(parts, frequent) if CONFIDENCE in names else None
    scores = ({seed: cross_fitted_scores(parts, cross_fit, seed, rows)
               for seed in progress(seeds, f"cross-fitted exit scores ({cross_fit} folds)", unit="seed")}
              if cross_fit else dict.fromkeys(seeds))
    held_out, own_confidence = parts["held_out"], None
    if rows is not None:  # the run's exits' confidence on the held-out tokens (and on the training tokens, unfolded)
        def confidence_of(cache: dict) -> torch.Tensor:
            return exit_tables(cache, model.parts.exits, model.decoder, batch_size=cfg.adapters.batch_size,
                               confidence_rows=rows)["confidence"]

        held_out = {**held_out, "states": with_confidence(held_out["states"], confidence_of(held_out))}
        own_confidence = None if cross_fit else confidence_of(parts["train"])
    report = {}
    for name, alpha, seed in progress(members, "token policy (variant, alpha, seed)", unit="policy"):
        started = time.perf_counter()
        confidence = None if name != CONFIDENCE else scores[seed]["confidence"] if cross_fit else own_confidence
        policy = train_member(parts, {**VARIANTS[name], "alpha": alpha}, seed, scores[seed], confidence)
        points = policy_points(policy, held_out if confidence is not None else parts["held_out"],
                               parts["held_out_tables"], TAUS, model.decoder.num_layers)
        report.setdefault(name, []).append({"alpha": alpha, "seed": seed, "points": points,
                                            "seconds": round(time.perf_counter() - started, 1)})
    return report


def classifier_points(parts: dict) -> list[dict] | None:
    """The run's own CALM classifier (trained on the same states to predict "this exit's token is the last
    exit's") as an exit rule at every threshold, on the same held-out cache: what those states tell of an
    exit's agreement without any reward. None when the run trained none."""
    classifier = parts["model"].parts.classifier
    if classifier is None:
        return None
    return policy_points(classifier, parts["held_out"], parts["held_out_tables"], CLASSIFIER_THRESHOLDS,
                         parts["model"].decoder.num_layers)


def margin_points(parts: dict, frequent: int) -> dict[str, list[dict]]:
    """CALM's softmax margin (top-1 minus top-2 probability of the exit's softmax) as the exit rule at every
    threshold, on the same held-out cache: once over the whole vocabulary, once over the `frequent` tokens the
    full model writes most often in the training responses (a head of those rows is far cheaper than the tied LM
    head). Either way the token is the exit's argmax over the whole vocabulary: the margin only decides. The
    margins are `exit_tables`' confidence, on the states in the decoder's own dtype as the exits' scores are."""
    model, held_out = parts["model"], parts["held_out"]
    exits, decoder = model.parts.exits, model.decoder
    rows = {"softmax margin (threshold as tau)": torch.arange(decoder.vocab_size)}
    frequent_ids = frequent_rows(parts, frequent)
    rows[f"softmax margin over the {len(frequent_ids)} most frequent training tokens (threshold as tau)"] = frequent_ids
    points = {}
    for name, ids in rows.items():
        margins = exit_tables(held_out, exits, decoder, batch_size=parts["cfg"].adapters.batch_size,
                              confidence_rows=ids)["confidence"][..., 1]
        points[name] = [teacher_forced_point(replay(SoftmaxMarginRule(threshold=t), {"margin": margins}) - 1, held_out,
                                             parts["held_out_tables"], exits.exit_layers, decoder.num_layers, tau=t)
                        for t in MARGIN_THRESHOLDS]
    return points


def _level_cells(points: list[dict]) -> list[str]:
    cells = []
    for level in LEVELS:
        point = most_saving(points, level)
        cells.append(f"{point['layer_saving']:.1%} (tau {point['tau']})" if point else "-")
    return cells


def markdown(report: dict, run_dir: Path, parts: dict, command: str, cross_fit: int = 0,
             classifier: list[dict] | None = None, margins: dict[str, list[dict]] | None = None) -> str:
    held_out = parts["held_out"]
    scores = (f"Each policy learned from out-of-fold exit scores ({cross_fit} folds of the training responses, "
              "exits retrained on the other folds); the held-out tokens are scored by the run's exits. "
              if cross_fit else "")
    lines = [f"# The token policy's variants on {run_dir.name}'s caches, teacher-forced on {parts['split']}", "",
             f"{len(held_out['targets'])} held-out response tokens (the full model's own responses where the run "
             f"cached them: responses={parts['cfg'].responses}). {scores}Per variant, alpha and seed: the most layer "
             f"saving over taus {TAUS} at which the policy's exit keeps the full model's token on at least each "
             "share of the tokens ('-': no tau does), and at tau 0.5 the saving, the agreement and the tokens per "
             "exit. The last row, where the run trained one: its CALM classifier as the exit rule (the first exit "
             f"whose P(exit token = last exit's token) exceeds the threshold, over {CLASSIFIER_THRESHOLDS}), trained "
             "on the same states without a reward. Then CALM's softmax margin of each exit's own softmax, over "
             "the whole vocabulary and over the most frequent training tokens, at thresholds "
             f"{MARGIN_THRESHOLDS} (the token is the exit's argmax over the whole vocabulary either way). The "
             f"variant '{CONFIDENCE}' reads, beside each exit's state, its top-1 probability and margin over the "
             "head's rows of the most frequent training tokens.", "",
             "| variant | alpha | seed | " + " | ".join(f"saving at >= {level:.0%}" for level in LEVELS)
             + " | tau 0.5: saving, agreement | tokens per exit at tau 0.5 |",
             "|---|---|---|" + "---|" * (len(LEVELS) + 2)]
    for name, members in report.items():
        for member in members:
            cells = _level_cells(member["points"])
            half = next(p for p in member["points"] if p["tau"] == 0.5)
            lines.append(f"| {name} | {member['alpha']} | {member['seed']} | " + " | ".join(cells)
                         + f" | {half['layer_saving']:.1%}, {half['agreement_with_full']:.3f} | {half['exits']} |")
    rules = {**({"the run's CALM classifier (threshold as tau)": classifier} if classifier is not None else {}),
             **(margins or {})}
    for name, points in rules.items():
        half = next(p for p in points if p["tau"] == 0.5)
        lines.append(f"| {name} | - | - | " + " | ".join(_level_cells(points))
                     + f" | {half['layer_saving']:.1%}, {half['agreement_with_full']:.3f} | {half['exits']} |")
    lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished aclsum_consistentee run directory")
    parser.add_argument("--alphas", type=float, nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), default=["run's settings"])
    parser.add_argument("--cross-fit", type=int, default=0, metavar="K",
                        help="train the policies on out-of-fold exit scores from K folds of the training responses "
                             "(0: the run's own scores)")
    parser.add_argument("--frequent", type=int, default=4096,
                        help="the softmax margin's cheap variant reads the head's rows of this many of the most "
                             "frequent tokens of the training responses")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # a Trainer per policy: no banner each time
    parts = run_parts(args.run_dir)
    report = study(parts, args.variants, args.alphas, args.seeds, args.cross_fit, args.frequent)
    classifier = classifier_points(parts)
    margins = margin_points(parts, args.frequent)
    command = "python experiments/token_policy_variants.py " + " ".join(
        f'"{a}"' if " " in a else a for a in sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "token_policy_variants.json",
                      json.dumps({"run": str(args.run_dir), "split": parts["split"], "taus": TAUS, "levels": LEVELS,
                                  "cross_fit": args.cross_fit, "variants": report, "classifier": classifier,
                                  "margins": margins, "command": command}, indent=1))
    text = markdown(report, args.run_dir, parts, command, args.cross_fit, classifier, margins)
    atomic_write_text(args.out / "token_policy_variants.md", text)
    print(text)


if __name__ == "__main__":
    main()
