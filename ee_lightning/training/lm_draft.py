"""Stage lm_draft_policy (`method.lm_exits.draft_policy`, off while its epochs are 0): verify mode's
learned stop rule, trained on the decoder run's exit-state cache.

Which text. The cache is teacher-forced on the training references, and at each position it holds
the full model's own next token there (`full_tokens`). A draft at a position is accepted in verify
mode exactly when the draft exit's token equals the full model's token given the same prefix, and
the layers 1..E of an accepted prefix are the full model's own (verify mode never keeps a wrong
token), so "exit token == full_tokens" is verify mode's acceptance test itself. Only the prefixes
differ from what generation sees: the reference's words instead of the full model's own greedy text.
The cache the other stages already use is taken for that reason: a cache of the full model's greedy
outputs would cost one generation over every training prompt, about as many sequential decoder
passes as response tokens, before the stage could start. Two more approximations, both in the
rounds' cost only: a round starts at every position (not only where the previous round ended), and
a decision after a rejected draft reads the teacher-forced state, where generation would read the
state of the wrong draft.
"""
from __future__ import annotations

import torch

from ee_lightning.exits.drafting import (draft_windows, full_depth_passes, projected_speedup, round_costs,
                                         round_layer_passes, simulate_rounds)
from ee_lightning.inference.verify import draft_cost, head_cost
from ee_lightning.modeling.draft_policy import DraftStopPolicy
from ee_lightning.training.systems.draft import DraftPolicySystem, DraftRounds

def draft_layer_of(setting: int | None, exit_layers: list[int], num_layers: int) -> int:
    """The configured draft layer, or (null) the deepest exit below the last layer; refused unless it has an exit."""
    below = [layer for layer in exit_layers if layer < num_layers]
    if not below:
        raise ValueError(f"method.lm_exits.draft_policy needs an exit below the last layer; the exits are {exit_layers}: "
                         "lower method.lm_exits.exit_every")
    layer = below[-1] if setting is None else int(setting)
    if layer not in below:
        raise ValueError(f"method.lm_exits.draft_policy.draft_layer={layer} has no exit below the last layer "
                         f"({num_layers}); choose one of {below}, or null for {below[-1]}")
    return layer


def make_draft_policy(cfg, exit_layers: list[int], num_layers: int, hidden_size: int) -> DraftStopPolicy | None:
    """The stage's policy (None while its epochs are 0), made before any stage runs (they reseed)."""
    if cfg.epochs <= 0:
        return None
    layer = draft_layer_of(cfg.draft_layer, exit_layers, num_layers)
    return DraftStopPolicy(hidden_size, layer, cfg.max_drafts, hidden=cfg.hidden, tau=cfg.tau)


def draft_agreement(cache: dict, exit_tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """[N] bool: the exit at `layer` names the full model's token (exit_tokens [E, N]: `exit_tables`' tokens)."""
    return exit_tokens[_exit_index(cache, layer)] == cache["full_tokens"]


def _exit_index(cache: dict, layer: int) -> int:
    layers = [int(x) for x in cache["exit_layers"]]
    if layer not in layers:
        raise ValueError(f"the cache holds exits {layers}, not the draft layer {layer}: rebuild it with that exit")
    return layers.index(layer)


def draft_policy_stage(policy: DraftStopPolicy, decoder, exits, cache: dict, exit_tokens: torch.Tensor, cfg,
                       draft_step_cost: float | None = None) -> tuple[DraftPolicySystem, DraftRounds]:
    """Stage lm_draft_policy's system and its round starts, to fit as the decoder's other stages are.
    cache: the train split's exit-state cache (`lm_pipeline.split_cache`); exit_tokens [E, N] its exits'
    tokens (`exit_tables`; or another draft head's); cfg: `method.lm_exits.draft_policy`;
    draft_step_cost: one draft's head in layer units (default the exit's own: `draft_cost`)."""
    layer = policy.draft_layer
    _, index, allowed = draft_windows(cache["rows"], policy.max_drafts)
    data = DraftRounds(cache["states"][:, _exit_index(cache, layer)], draft_agreement(cache, exit_tokens, layer),
                       index, allowed)
    step = draft_cost(decoder, exits, layer) if draft_step_cost is None else draft_step_cost
    costs = round_costs(layer, decoder.num_layers, policy.max_drafts, head_cost(decoder), step)
    return DraftPolicySystem(policy, costs, k=cfg.k, estimator=cfg.estimator, lr=cfg.lr), data


@torch.no_grad()
def draft_summary(policy: DraftStopPolicy, decoder, exits, cache: dict, exit_tokens: torch.Tensor) -> dict:
    """The rounds verify mode makes over the cached responses (teacher-forced, `simulate_rounds`: exact in
    the accepted drafts, an upper bound on the drafts of a round after its first rejection) with the
    policy's stops at its tau, and with every fixed draft length up to its max_drafts: acceptance rate,
    accepted drafts and tokens per round, layer passes per token and full depth's passes over them."""
    layer, L = policy.draft_layer, decoder.num_layers
    agree = draft_agreement(cache, exit_tokens, layer)
    device = next(policy.parameters()).device
    states = cache["states"][:, _exit_index(cache, layer)]
    stops = torch.cat([policy.stops(states[i:i + 4096].to(device, torch.float32)).cpu()
                       for i in range(0, len(states), 4096)]) if len(states) else torch.zeros(0, dtype=torch.bool)
    head, draft = head_cost(decoder), draft_cost(decoder, exits, layer)
    _, counts = torch.unique_consecutive(cache["rows"], return_counts=True)
    responses = list(zip(agree.split(counts.tolist()), stops.split(counts.tolist())))

    def rounds(length: int, stop: bool) -> dict:
        drafted, accepted, tokens = [], [], 0
        for row_agree, row_stops in responses:
            d, a = simulate_rounds(row_agree.tolist(), length, (~row_stops).tolist() if stop else None)
            drafted, accepted, tokens = drafted + d, accepted + a, tokens + len(row_agree)
        passes = sum(round_layer_passes(layer, L, k, head, draft) for k in drafted) / max(tokens, 1)
        return {"acceptance_rate": sum(accepted) / max(sum(drafted), 1), "mean_drafted": sum(drafted) / max(len(drafted), 1),
                "mean_accepted": sum(accepted) / max(len(drafted), 1), "tokens_per_round": tokens / max(len(drafted), 1),
                "passes_per_token": passes,
                "vs_full_depth": projected_speedup(full_depth_passes(L, head), passes) if passes else None}

    return {"draft_layer": layer, "tokens": int(agree.numel()), "agreement": float(agree.float().mean()) if len(agree) else None,
            "stop_fraction": float(stops.float().mean()) if len(stops) else None,
            "full_depth_passes_per_token": full_depth_passes(L, head), "policy": rounds(policy.max_drafts, True),
            "fixed": {str(k): rounds(k, False) for k in range(1, policy.max_drafts + 1)}}
