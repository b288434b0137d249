"""Out-of-fold exit scores: what the policy learns from, measured by exits that never saw the token.

The exits' adapters learn the training tokens, and scored on those same tokens they look better than they
are: on `experiment=aclsum_consistentee_large` the exit at layer 24 agrees with the full model on 83% of its
training tokens and on 67% of held-out ones. A policy that learns where to exit from those scores trusts the
exits where they will not hold. With K folds of the training responses (`method.lm_exits.cross_fit`), each
fold's tokens are scored by exits trained, with the lm_adapters stage's settings, on the other folds only.
The policy, CALM's classifier and the draft policy learn from these scores; the run keeps its own exits
(trained on every token) for generation.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Subset

from ee_lightning.exits.lm_targets import hardness_targets, token_memorized_exit
from ee_lightning.inference.lm_cache import exit_tables
from ee_lightning.modeling.lm_exits import LMExitHeads
from ee_lightning.training.systems.lm import ExitAdapterSystem, TokenStateDataset

# fit(k, system, dataset): trains fold k's exits (its `ExitAdapterSystem`) on the other folds' tokens
FitFold = Callable[[int, ExitAdapterSystem, torch.utils.data.Dataset], None]


def response_folds(rows: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Each cached token's fold (0..folds-1), whole responses together: a response's tokens share its prefix,
    so splitting them would let an exit see most of a held-out token's context in training."""
    if folds < 2:
        raise ValueError(f"cross-fitting with {folds} fold(s): it needs at least 2 folds")
    responses = rows.unique()
    if len(responses) < folds:
        raise ValueError(f"cross-fitting with {folds} folds: the training cache holds only {len(responses)} "
                         f"responses; use at most {len(responses)} folds")
    order = responses[torch.randperm(len(responses), generator=torch.Generator().manual_seed(seed))]
    fold_of = torch.empty(int(responses.max()) + 1, dtype=torch.long)
    fold_of[order] = torch.arange(len(order)) % folds
    return fold_of[rows]


def cross_fitted_scores(cache: dict, decoder, fold_exits: list[LMExitHeads], fit_fold: FitFold, adapters,
                        hardness_target: str, seed: int, confidence_rows: torch.Tensor | None = None) -> dict:
    """The lm_scores stage's tables (tokens, ce, ce_full [E, N]) and memorized exits [N] over the training
    `cache`, every token scored by one of `fold_exits` (fresh exits, one per fold) trained by `fit_fold` on the
    other folds' responses. `adapters`: the lm_adapters stage's settings (target, lr, weights, batch_size);
    `confidence_rows`: `exit_tables`' confidence over those rows too."""
    fold = response_folds(cache["rows"], len(fold_exits), seed)
    dataset = TokenStateDataset(cache["states"], targets=hardness_targets(adapters.target, cache["targets"],
                                                                          cache["full_tokens"]))
    tables: dict[str, torch.Tensor] = {}
    for k, exits in enumerate(fold_exits):
        fit_fold(k, ExitAdapterSystem(exits, decoder, lr=adapters.lr, weights=adapters.weights),
                 Subset(dataset, (fold != k).nonzero().squeeze(1).tolist()))
        scored = fold == k
        held = {key: cache[key][scored] for key in ("states", "targets", "full_tokens")}
        part = exit_tables({**held, "exit_layers": cache["exit_layers"]}, exits.eval(), decoder,
                           batch_size=adapters.batch_size, confidence_rows=confidence_rows)
        for key, values in part.items():
            shape = (values.shape[0], len(fold), *values.shape[2:])
            tables.setdefault(key, torch.empty(shape, dtype=values.dtype))[:, scored] = values
    memorized = token_memorized_exit(tables["tokens"], hardness_targets(hardness_target, cache["targets"],
                                                                        cache["full_tokens"]))
    return {**tables, "memorized": memorized}
