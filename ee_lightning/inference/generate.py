"""Batched generation with per-token early exit and a KV cache.

Each new token goes through the layers one at a time. At every exit layer an exit rule
(ee_lightning.exits.rules, the same rules as the encoders' runner and replay) decides, from the
signals it needs, which of the tokens still running leave; the driver computes only those
signals, so a rule that reads no softmax (policy, saturation, classifier, static) makes no
LM-head call before its exit. A rule's state follows the running tokens as in the runner. A token
that leaves at layer t takes its next-token logits from that exit, and its keys/values for the
deeper layers t+1..L are filled from its exit state through each of those layers' input norm and
K/V projections (CALM's state propagation; `LayerwiseDecoder.advance`). Every row stays in the
cache for the whole generation: rows that exited early, or finished with EOS, still get K/V at
every layer, so the cache is rectangular and no row is ever dropped.

The prompt (all but its last token) runs at full depth; its last token is the input of the
first generation step, so every generated token's state passes through the exit rule.
With the `full` rule this is exactly greedy/sampled `generate` of the same model: same layers,
same cache, same logits processors, same EOS padding.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ee_lightning.exits.rules import require_signals, select_state
from ee_lightning.exits.signals import GENERATION_SIGNALS, LOGIT_SIGNALS, layer_signals, margin, saturation


class PlainExits:
    """Exits without trained parts: the model's own final norm and LM head on the raw state of
    every `exit_every`-th layer (and the last). The stand-in for trained LM exit heads, which
    have the same two members."""

    def __init__(self, num_layers: int, exit_every: int = 1):
        self.exit_layers = sorted({*range(exit_every, num_layers + 1, exit_every), num_layers})

    def adapt(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The state the final norm reads (trained exits add their adapter here; these add nothing)."""
        return hidden

    def logits(self, layer: int, hidden: torch.Tensor, decoder) -> torch.Tensor:
        return decoder.lm_head(decoder.final_norm(self.adapt(layer, hidden)))


@dataclass
class GenerationResult:
    """sequences [B, P + N] (prompt, then new tokens; pad after EOS). Per new token [B, N]
    (0 for padding after a row finished): the exit layer (1..L), LM-head calls, K/V fills of
    skipped layers, policy and classifier net calls, and reads of the frequent rows' confidence."""

    sequences: torch.Tensor
    prompt_length: int
    exit_layers: torch.Tensor
    lm_head_calls: torch.Tensor
    kv_fills: torch.Tensor
    policy_calls: torch.Tensor
    classifier_calls: torch.Tensor
    cache: object = None  # the KV cache at the end (every row, every layer)
    logits: torch.Tensor | None = None  # [B, N, V] each token's exit logits, with output_logits=True
    # [B, N] layers a token ran past its exit for later tokens' K/V: in later steps (`inference.deferred`)
    # or at once (propagate_kv=False); None: none (propagation fills K/V instead, counted in kv_fills)
    layers_after_exit: torch.Tensor | None = None
    # [B, N] reads of an exit's confidence over the frequent rows (`frequent_margin`); None: a result built without them
    confidence_reads: torch.Tensor | None = None

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]

    @property
    def token_mask(self) -> torch.Tensor:
        """True for generated tokens (EOS included), False for padding after EOS."""
        return self.exit_layers > 0


class _PeekCache:
    """A cache view for a look-ahead pass: attention sees the cached K/V plus the new ones, and
    nothing is stored (the oracle's full-depth token must not change the cache)."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.cache.layers[layer_idx]
        if not layer.is_initialized:
            return key_states, value_states
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


def _full_depth_tokens(decoder, hidden, ctx) -> torch.Tensor:
    """The full model's greedy token for every row, computed without touching the cache."""
    peek = _PeekCache(ctx.cache)
    for index in range(decoder.num_layers):
        hidden = decoder.run_layer(index, hidden, ctx, peek)
    return decoder.lm_head(decoder.final_norm(hidden[:, -1])).argmax(-1)


@torch.no_grad()
def prefill(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The cache of every prompt token but the last, at full depth (the last one starts generation)."""
    cache = decoder.new_cache()
    if input_ids.shape[1] > 1:
        hidden, ctx = decoder.start(input_ids[:, :-1], attention_mask[:, :-1].long(), cache)
        for index in range(decoder.num_layers):
            hidden = decoder.step(index, hidden, ctx)
    return cache


def unpadded_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row of a LEFT-padded batch [B, P] without its padding, as [1, P_b]."""
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    rows = []
    for ids, mask in zip(input_ids, attention_mask.bool()):
        if not bool(mask[-1]):
            raise ValueError("prompts must be LEFT-padded (every row's last column a real token)")
        rows.append(ids[mask][None])
    return rows


def has_confidence_tokens(exits) -> bool:
    """Do `exits` carry head rows to read the frequent_margin signal over (`LMExitHeads.set_confidence_tokens`)?"""
    tokens = getattr(exits, "confidence_tokens", None)
    return tokens is not None and tokens.numel() >= 2


def require_confidence_tokens(rule, exits) -> None:
    """Raise before generating if `rule` reads the frequent rows' margin and `exits` carry no such rows."""
    if "frequent_margin" in rule.needs and not has_confidence_tokens(exits):
        raise ValueError(f"rule {rule.name!r} reads the exits' margin over the frequent tokens, and these exits have "
                         "none: set method.lm_exits.confidence_tokens (e.g. 4096) and train again")


def _as_list(ids):
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


@torch.no_grad()
def generate_with_exits(decoder, exits, rule, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                        eos_token_id=None, pad_token_id=None, do_sample: bool = False, logits_processor=None,
                        policy=None, classifier=None, generator: torch.Generator | None = None,
                        propagate_kv: bool = True, force_tokens: torch.Tensor | None = None,
                        output_logits: bool = False, prompt_cache=None) -> GenerationResult:
    """Generate up to `max_new_tokens` per row from left-padded prompts, exiting per token by `rule`
    (an `exits.rules.ExitRule`: its `prediction` signal is an exit's greedy token, the oracle's labels
    the full model's token, `exit_prob` the token policy's and `classifier_prob` CALM's classifier's).

    eos_token_id: an id or a list; a row stops at its first EOS (later positions get
        `pad_token_id`, default the first EOS id); generation stops when every row has.
    logits_processor: a transformers LogitsProcessorList (temperature, top-k/p, penalties...),
        applied to the exit's logits before the greedy argmax or sampling.
    generator: the torch.Generator for sampling (None: torch's global one, as `generate` uses).
    propagate_kv: False makes exited tokens keep running the deeper layers for their K/V only
        (their output token still comes from the exit): the "real deeper states" reference that
        measures what state propagation changes.
    force_tokens: [B, N] teacher forcing: these tokens are emitted and fed back whatever the
        exits predict (the exit decisions and logits are still computed), up to N steps.
    output_logits: keep every step's exit logits (before the processors) in `result.logits`.
    prompt_cache: `prefill(decoder, input_ids, attention_mask)` computed once for these prompts
        (copied, never changed): rules compared on the same prompts share the prompt pass.
    """
    require_signals(rule, GENERATION_SIGNALS, "generation")
    rule.check(decoder.num_layers)
    if "exit_prob" in rule.needs and policy is None:
        raise ValueError(f"rule {rule.name!r} reads the token exit policy: pass policy=")
    if "classifier_prob" in rule.needs and classifier is None:
        raise ValueError(f"rule {rule.name!r} reads CALM's exit classifier: pass classifier=")
    require_confidence_tokens(rule, exits)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0 or not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be non-empty and LEFT-padded (every row's last column a real token)")
    eos = _as_list(eos_token_id)
    pad = int(pad_token_id) if pad_token_id is not None else (eos[0] if eos else 0)
    batch, prompt_length = input_ids.shape
    mask = attention_mask.long()
    cache = copy.deepcopy(prompt_cache) if prompt_cache is not None else prefill(decoder, input_ids, attention_mask)

    sequences, next_input = input_ids, input_ids[:, -1:]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    records = {key: [] for key in ("exit", "lm", "kv", "policy", "classifier", "confidence")}
    kept_logits = []
    if force_tokens is not None:
        max_new_tokens = min(max_new_tokens, force_tokens.shape[1])
    eos_ids = torch.tensor(eos, device=input_ids.device) if eos else None
    for step in range(max_new_tokens):
        hidden, ctx = decoder.start(next_input, mask, cache)
        logits, counts = _token_step(decoder, exits, rule, hidden, ctx, finished, policy, classifier, propagate_kv)
        scores = logits_processor(sequences, logits) if logits_processor is not None else logits
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            next_tokens = scores.argmax(-1)
        if force_tokens is not None:
            next_tokens = force_tokens[:, step].to(next_tokens.device)
        if output_logits:
            kept_logits.append(logits)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad), next_tokens)
        for key, value in counts.items():
            records[key].append(value.masked_fill(finished, 0))
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        if eos_ids is not None:
            finished = finished | torch.isin(next_tokens, eos_ids)
        if bool(finished.all()):
            break
        next_input = next_tokens[:, None]

    def stack(key):
        return torch.stack(records[key], dim=1) if records[key] else torch.zeros(batch, 0, dtype=torch.long)

    exit_layers = stack("exit")
    after = None if propagate_kv else (decoder.num_layers - exit_layers).masked_fill(exit_layers == 0, 0)
    return GenerationResult(sequences, prompt_length, exit_layers, stack("lm"), stack("kv"), stack("policy"),
                            stack("classifier"), cache, torch.stack(kept_logits, dim=1) if output_logits and kept_logits
                            else None, layers_after_exit=after, confidence_reads=stack("confidence"))


def exit_signals(rule, layer: int, out: torch.Tensor, previous: torch.Tensor, exits, decoder, policy=None,
                 classifier=None) -> tuple[dict, torch.Tensor | None, dict]:
    """What `rule` reads at exit `layer` of states `out` [R, H], and nothing else: (signals, the exit's
    logits when a signal needed them, else None, the calls made per row: {"lm", "classifier", "policy",
    "confidence"}, each an int or a [R] count). previous [R, H]: the states at the previous exit (saturation).
    A signal the rule `gated` is read only on the rows its `candidates` keeps, NaN on the others."""
    logit_needs = [name for name in rule.needs if name in LOGIT_SIGNALS]
    signals, exit_logits, calls = {}, None, {"lm": 0, "classifier": 0, "policy": 0, "confidence": 0}
    if logit_needs:
        exit_logits = exits.logits(layer, out, decoder)
        calls["lm"] = 1
        signals.update(layer_signals(exit_logits, needs=logit_needs))
    if "saturation" in rule.needs:
        signals["saturation"] = saturation(out, previous)
    if "classifier_prob" in rule.needs:
        signals["classifier_prob"] = torch.sigmoid(classifier.logit(layer, out).float())
        calls["classifier"] = 1
    if "exit_prob" in rule.needs:
        signals["exit_prob"] = torch.sigmoid(policy.logit(layer, out).float())
        calls["policy"] = 1
    if "frequent_margin" in rule.needs:
        read = rule.candidates(signals) if "frequent_margin" in rule.gated else None
        read = torch.ones(out.shape[0], dtype=torch.bool, device=out.device) if read is None else read.to(out.device)
        signals["frequent_margin"] = torch.full((out.shape[0],), float("nan"), device=out.device)
        if bool(read.any()):
            signals["frequent_margin"][read] = margin(exits.frequent_logits(layer, out[read], decoder))
        calls["confidence"] = read.long()
    return signals, exit_logits, calls


def _token_step(decoder, exits, rule, hidden, ctx, finished, policy, classifier, propagate_kv):
    """One new token per row through the layers. Returns its logits [B, V] and per-row counts."""
    batch, L = hidden.shape[0], decoder.num_layers
    device = hidden.device
    exit_set = set(exits.exit_layers)
    running = ~finished            # rows still in the network (finished rows only fill K/V)
    computing = running.clone()    # rows that run the layers (exited ones too without propagation)
    logits = None
    exit_at = torch.zeros(batch, dtype=torch.long, device=device)
    lm_calls = torch.zeros(batch, dtype=torch.long, device=device)
    policy_calls = torch.zeros_like(lm_calls)
    classifier_calls = torch.zeros_like(lm_calls)
    confidence_reads = torch.zeros_like(lm_calls)
    previous = hidden[:, -1].clone()  # the state at the previous exit (saturation)
    full_tokens = _full_depth_tokens(decoder, hidden, ctx) if rule.needs_labels else None
    state = rule.init_state(int(running.sum()), device)  # rows of `state` = running rows, in order
    for index in range(L):
        layer = index + 1
        hidden = decoder.advance(index, hidden, ctx, computing if not propagate_kv else running)
        if layer not in exit_set or not bool(running.any()):
            continue
        rows = running.nonzero().squeeze(1)
        out = hidden[rows, -1]
        exit_logits = None
        if layer == L:
            leave = torch.ones(rows.numel(), dtype=torch.bool, device=device)
        else:
            signals, exit_logits, calls = exit_signals(rule, layer, out, previous[rows], exits, decoder, policy,
                                                       classifier)
            lm_calls[rows] += calls["lm"]
            classifier_calls[rows] += calls["classifier"]
            policy_calls[rows] += calls["policy"]
            confidence_reads[rows] += calls["confidence"]
            labels = full_tokens[rows] if full_tokens is not None else None
            leave, state = rule.decide(layer, signals, state, labels=labels)
            leave = leave.to(device)
            state = select_state(state, (~leave).nonzero().squeeze(1))
        previous[rows] = out
        if not bool(leave.any()):
            continue
        out_rows = rows[leave]
        if exit_logits is None:
            out_logits = exits.logits(layer, out[leave], decoder)
            lm_calls[out_rows] += 1
        else:
            out_logits = exit_logits[leave]
        if logits is None:
            logits = out_logits.new_zeros(batch, out_logits.shape[-1])
        logits[out_rows] = out_logits
        exit_at[out_rows] = layer
        running[out_rows] = False
    if logits is None:  # every row had finished: the caller pads them
        logits = torch.zeros(batch, decoder.vocab_size, device=device)
    kv_fills = (L - exit_at).masked_fill(exit_at == 0, 0) if propagate_kv else torch.zeros_like(exit_at)
    counts = {"exit": exit_at, "lm": lm_calls, "kv": kv_fills, "policy": policy_calls, "classifier": classifier_calls,
              "confidence": confidence_reads}
    return logits.float(), counts
