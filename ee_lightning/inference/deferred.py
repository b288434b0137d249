"""Early-exit generation whose skipped layers run later, with the next token that needs them.

With state propagation (`inference.generate`) a token that exits at layer t gives the deeper layers
K/V computed from its exit state; later tokens then attend to K/V the full model never computes,
and the text drifts away from the full model's even where every exit agreed with it (on SmolLM2
one exit at layer 8 changes 42% of the later full-depth tokens). Here the skipped layers of an
exited token are not filled at all until a later token climbs past them: at each layer, the new
token runs together with every earlier token that layer has not seen yet, in one pass over a chunk
of consecutive positions (the synchronized parallel decoding of FREE, Bae et al. 2023). Every cached
K/V is then the full model's own for the tokens emitted, so each exit decides from exactly the
state the full model has at that layer: the text differs from the full model's only where an
exit's own token differs from it, and a policy trained on full-depth states sees at inference the
states it was trained on.

What it costs: a token's own step runs its exit layer's depth (a sequential pass per layer, wider
when earlier tokens catch up there); every layer of every token still runs once in the end (the
last tokens' skipped layers are never needed), so it saves sequential layer passes, not FLOPs. A
pass over 2-4 positions costs little more than over one where decoding is bound by reading the
weights (batch 1 on a GPU, and on this CPU: one token 53 ms, 4-8 tokens about 90 ms on SmolLM2).

Batch 1: the rows of a batch would need chunks of different widths at every layer; `generate_deferred_each`
runs a left-padded batch prompt by prompt. Rules that need the full model's token (the oracle) are refused.
"""
from __future__ import annotations

import copy

import torch

from ee_lightning.exits.rules import require_signals
from ee_lightning.exits.signals import GENERATION_SIGNALS
from ee_lightning.inference.generate import (GenerationResult, _as_list, exit_signals, prefill,
                                             require_confidence_tokens, unpadded_prompts)


def _cached(cache, index: int) -> int:
    layer = cache.layers[index]
    return int(layer.keys.shape[-2]) if layer.is_initialized else 0


@torch.no_grad()
def generate_deferred(decoder, exits, rule, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      max_new_tokens: int = 32, eos_token_id=None, policy=None, classifier=None,
                      prompt_cache=None) -> GenerationResult:
    """Greedy generation for one prompt [1, P] exiting per token by `rule`, the skipped layers deferred.

    Returns a `GenerationResult` whose `kv_fills` are 0 and whose `layers_after_exit` count, per token,
    the layers it ran in later tokens' steps (its exit layer plus those is how deep it got in the end).
    Its tokens and exits are those of `generate_with_exits(..., propagate_kv=False)` on this prompt.
    prompt_cache: `generate.prefill` of this prompt (copied, never changed)."""
    require_signals(rule, GENERATION_SIGNALS, "generation")
    rule.check(decoder.num_layers)
    if rule.needs_labels:
        raise ValueError(f"rule {rule.name!r} needs the full model's token at every step; deferred generation "
                         "does not compute it (use generate_with_exits)")
    if "exit_prob" in rule.needs and policy is None:
        raise ValueError(f"rule {rule.name!r} reads the token exit policy: pass policy=")
    if "classifier_prob" in rule.needs and classifier is None:
        raise ValueError(f"rule {rule.name!r} reads CALM's exit classifier: pass classifier=")
    require_confidence_tokens(rule, exits)
    if input_ids.shape[0] != 1:
        raise ValueError(f"deferred generation takes one prompt at a time, got a batch of {input_ids.shape[0]} "
                         "(generate_deferred_each runs a batch prompt by prompt)")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("a single prompt has no padding: pass it without its pad tokens")

    L, device = decoder.num_layers, input_ids.device
    eos = set(_as_list(eos_token_id))
    cache = copy.deepcopy(prompt_cache) if prompt_cache is not None else prefill(decoder, input_ids, torch.ones_like(input_ids))
    prompt_length = input_ids.shape[1]
    sequence = input_ids[0].tolist()
    exit_set = set(exits.exit_layers)
    states: dict[int, torch.Tensor] = {}  # position -> its state after the deepest layer it ran (not yet all L)
    records = {key: [] for key in ("exit", "lm", "policy", "classifier", "confidence")}
    for _ in range(max_new_tokens):
        new = len(sequence) - 1  # the position of this step's input (the last token)
        # per layer, the first position it has not seen: the chunk it runs is that position .. the new one
        starts = [_cached(cache, index) for index in range(L)]
        hidden = None
        state = rule.init_state(1, device)
        exit_layer, lm_calls, policy_calls, classifier_calls, confidence_reads, logits = L, 0, 0, 0, 0, None
        for index in range(L):
            layer, first = index + 1, starts[index]
            if index == 0 or first != starts[index - 1]:  # the chunk changes: its own positions and masks
                ids = torch.tensor([sequence[first:]], device=device)
                embedded, ctx = decoder.start(ids, torch.ones(1, new + 1, dtype=torch.long, device=device), cache,
                                              mask_layer=index)
                earlier = [states[p] for p in range(first, new)]
                if hidden is None:
                    previous = embedded[:, -1]  # the state at the previous exit (saturation), as generate_with_exits
                new_state = embedded[:, -1] if hidden is None else hidden[:, -1]
                hidden = torch.stack([*earlier, new_state[0]])[None] if earlier else new_state[:, None]
            hidden = decoder.run_layer(index, hidden, ctx, cache)
            for offset, position in enumerate(range(first, new + 1)):
                states[position] = hidden[0, offset]
            if layer not in exit_set:
                continue
            out = hidden[:, -1]
            if layer == L:
                break
            signals, exit_logits, calls = exit_signals(rule, layer, out, previous, exits, decoder, policy, classifier)
            lm_calls += calls["lm"]
            classifier_calls += calls["classifier"]
            policy_calls += calls["policy"]
            confidence_reads += int(torch.as_tensor(calls["confidence"]).sum())
            leave, state = rule.decide(layer, signals, state)
            previous = out
            if bool(leave.any()):
                exit_layer, logits = layer, exit_logits
                break
        if logits is None:
            logits = exits.logits(exit_layer, hidden[:, -1], decoder)
            lm_calls += 1
        for position in [p for p in states if _through(cache, p, L)]:
            del states[position]
        token = int(logits.argmax(-1))
        sequence.append(token)
        for key, value in zip(records, (exit_layer, lm_calls, policy_calls, classifier_calls, confidence_reads)):
            records[key].append(value)
        if token in eos:
            break
    steps = len(records["exit"])
    exit_layers = torch.tensor([records["exit"]], dtype=torch.long)
    # how deep each generated token got in the end, from every layer's cache length
    lengths = torch.tensor([_cached(cache, index) for index in range(L)])
    positions = torch.arange(prompt_length - 1, prompt_length - 1 + steps)
    reached = (lengths[None, :] > positions[:, None]).sum(1)
    deferred = (reached - exit_layers[0]).clamp(min=0)[None]

    def row(key):
        return torch.tensor([records[key]], dtype=torch.long)

    return GenerationResult(torch.tensor([sequence], device=device), prompt_length, exit_layers.to(device),
                            row("lm").to(device), torch.zeros_like(exit_layers).to(device), row("policy").to(device),
                            row("classifier").to(device), cache, layers_after_exit=deferred.to(device),
                            confidence_reads=row("confidence").to(device))


def _through(cache, position: int, num_layers: int) -> bool:
    """Has `position` run every layer (it is in the deepest layer's cache)?"""
    return _cached(cache, num_layers - 1) > position


def deferred_layers_after_exit(exit_layers: torch.Tensor) -> torch.Tensor:
    """[B, N] exit layers (0 after a row's end) -> [B, N] the layers each token runs in later tokens' steps under
    deferral: a later token that climbs to layer j takes every earlier token still below j along, so token i ends
    at the deepest exit among itself and the tokens after it (the last token's skipped layers never run)."""
    later = torch.zeros_like(exit_layers)
    deepest = torch.zeros_like(exit_layers[:, 0])
    for step in range(exit_layers.shape[1] - 1, -1, -1):
        later[:, step] = deepest
        deepest = torch.maximum(deepest, exit_layers[:, step])
    return (later - exit_layers).clamp(min=0).masked_fill(exit_layers == 0, 0)


def prefill_each(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list:
    """Each row's own prompt pass (`generate.prefill` of the unpadded prompt): for `generate_deferred_each`'s
    `prompt_caches`, so that a timing of it leaves the prompt pass out, as the batched paths' timings do."""
    return [prefill(decoder, ids, torch.ones_like(ids)) for ids in unpadded_prompts(input_ids, attention_mask)]


def generate_deferred_each(decoder, exits, rule, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           max_new_tokens: int, eos_token_id=None, pad_token_id=None, prompt_caches=None,
                           **options) -> GenerationResult:
    """`generate_deferred` on each row of a LEFT-padded batch [B, P], one prompt at a time, gathered into
    one `GenerationResult` (new tokens padded with `pad_token_id` after a row's EOS, counts 0 there).
    prompt_caches: `prefill_each` of the batch (else each row's prompt pass runs here)."""
    prompts = unpadded_prompts(input_ids, attention_mask)
    caches = prompt_caches if prompt_caches is not None else [None] * len(prompts)
    if len(caches) != len(prompts):
        raise ValueError(f"{len(caches)} prompt caches for a batch of {len(prompts)} prompts")
    pad = int(pad_token_id) if pad_token_id is not None else (_as_list(eos_token_id) or [0])[0]
    rows = [generate_deferred(decoder, exits, rule, ids, None, max_new_tokens, eos_token_id, prompt_cache=cache,
                              **options) for ids, cache in zip(prompts, caches)]
    steps = max(r.exit_layers.shape[1] for r in rows)

    def padded(tensors, fill):
        return torch.stack([torch.nn.functional.pad(t[0], (0, steps - t.shape[1]), value=fill) for t in tensors])

    new = padded([r.new_tokens for r in rows], pad)
    return GenerationResult(torch.cat([input_ids, new.to(input_ids.device)], dim=1), input_ids.shape[1],
                            padded([r.exit_layers for r in rows], 0), padded([r.lm_head_calls for r in rows], 0),
                            padded([r.kv_fills for r in rows], 0), padded([r.policy_calls for r in rows], 0),
                            padded([r.classifier_calls for r in rows], 0),
                            layers_after_exit=padded([r.layers_after_exit for r in rows], 0),
                            confidence_reads=padded([r.confidence_reads for r in rows], 0))
