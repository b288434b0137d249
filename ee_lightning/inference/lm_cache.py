"""One teacher-forced pass of the frozen decoder over prompt + reference, kept on disk.

For every response token (every position whose label is not -100) the cache holds the hidden
state of each exit layer at the position that predicts it, its target (the reference token) and
the full model's own next-token prediction there. The exits, the policy and CALM's classifier
then train on these states without running the decoder again. The file carries the settings it
was built with; a file built with other settings (or unreadable) is rebuilt, never half-written
(atomic save).

Layout (N tokens, E exits, H hidden): states [N, E, H] (stored dtype), targets [N], full_tokens [N],
rows [N] (dataset row), positions [N] (token number within its response), exit_layers [E].

For distilling the exits (`exits.distill`) the same pass can keep every position of the text, the
prompt's included (`positions="all"`: positions [N] is then the position in the sequence and
response [N] marks the response tokens), and the full model's top-k next tokens (`top_k`:
top_ids [N, k] and top_logp [N, k], log-probs normalised over the whole vocabulary).
"""
from __future__ import annotations

import hashlib
import json
import logging

import torch
from tqdm.auto import tqdm

from ee_lightning.data.generation import IGNORE_INDEX
from ee_lightning.exits.distill import teacher_topk
from ee_lightning.modeling.draft_head import frequent_tokens
from ee_lightning.progress import progress_enabled

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
POSITIONS = ("response", "all")


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T - 1] bool: position t predicts a response token (label t + 1 is not -100)."""
    return labels[:, 1:] != IGNORE_INDEX


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] right-padded mask -> [B, T - 1] bool: position t predicts a real token (t + 1 is not padding)."""
    return attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()


def _device(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def exit_state_parts(decoder, batch: dict, exit_layers: list[int], dtype: str = "float32", positions: str = "response",
                     top_k: int | None = None) -> dict:
    """One LM batch's share of the cache (on the CPU): each response token's exit states, target, the
    full model's own token, its dataset row and its position within the response. positions="all":
    every position that predicts a token of the text (prompt included), numbered in the sequence, and
    `response` marking the response's; top_k: also the full model's k most likely next tokens."""
    if positions not in POSITIONS:
        raise ValueError(f"cache positions {positions!r}: use one of {POSITIONS}")
    device = _device(decoder)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    states = decoder(ids, mask)
    if len(states) != decoder.num_layers:
        raise ValueError(f"the decoder gave {len(states)} layer states for {decoder.num_layers} layers")
    response = predicting_positions(labels)
    keep = response if positions == "response" else text_positions(mask)
    last = states[-1][:, :-1][keep]
    full_logits = decoder.lm_head(decoder.final_norm(last))
    part = {"states": torch.stack([states[layer - 1][:, :-1][keep] for layer in exit_layers], dim=1)
            .to("cpu", DTYPES[dtype]),
            "targets": ids[:, 1:][keep].cpu(),  # the response's equal its labels
            "full_tokens": full_logits.argmax(-1).cpu(),
            "rows": batch["idx"].to(device).unsqueeze(1).expand_as(keep)[keep].cpu()}
    if positions == "response":
        part["positions"] = (keep.long().cumsum(1) - 1)[keep].cpu()
    else:
        part["positions"] = torch.arange(keep.shape[1], device=device).expand_as(keep)[keep].cpu()
        part["response"] = response[keep].cpu()
    if top_k:
        part["top_ids"], part["top_logp"] = (t.cpu() for t in teacher_topk(full_logits, top_k))
    return part


def merge_parts(parts: list[dict], exit_layers: list[int]) -> dict:
    """Batches' parts -> the cache, its tokens ordered by (dataset row, position): the same order
    whichever batches, or processes, computed them."""
    if not parts:
        raise ValueError("the loader gave no batches to cache")
    cache = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    order = torch.argsort(cache["rows"] * (int(cache["positions"].max()) + 1) + cache["positions"], stable=True)
    cache = {key: value[order] for key, value in cache.items()}
    cache["exit_layers"] = torch.tensor(exit_layers)
    return cache


def check_exit_layers(decoder, exit_layers: list[int], dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype {dtype!r}: use one of {sorted(DTYPES)}")
    if not exit_layers or any(not 1 <= layer <= decoder.num_layers for layer in exit_layers):
        raise ValueError(f"exit layers {exit_layers} must lie in 1..{decoder.num_layers}")


@torch.no_grad()
def collect_exit_states(decoder, loader, exit_layers: list[int], dtype: str = "float32",
                        progress: bool | None = None, positions: str = "response", top_k: int | None = None) -> dict:
    """Run `decoder(input_ids, attention_mask) -> L states [B, T, H]` over LM batches of `loader`, in
    this process (a run's stage does the same pass under its Trainer: `training.systems.lm`).

    `decoder` also gives final_norm and lm_head (for the full model's own token)."""
    check_exit_layers(decoder, exit_layers, dtype)
    was_training = decoder.training
    decoder.eval()
    parts = []
    bar = tqdm(loader, desc="caching exit states", unit="batch", dynamic_ncols=True,
               disable=not progress_enabled() if progress is None else not progress)
    try:
        for batch in bar:
            parts.append(exit_state_parts(decoder, batch, exit_layers, dtype, positions, top_k))
            bar.set_postfix(tokens=sum(len(part["targets"]) for part in parts))
    finally:
        bar.close()
        decoder.train(was_training)
    return merge_parts(parts, exit_layers)


def response_only(cache: dict) -> dict:
    """A cache of every position (`positions="all"`) cut to its response tokens, numbered within each
    response as a `positions="response"` cache numbers them; a response cache is returned as it is."""
    if "response" not in cache:
        return cache
    keep = cache["response"]
    per_token = {key: value[keep] for key, value in cache.items() if key not in ("exit_layers", "response")}
    rows = per_token["rows"]
    starts = torch.ones_like(rows, dtype=torch.bool)
    starts[1:] = rows[1:] != rows[:-1]
    index = torch.arange(len(rows))
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), 0).values
    per_token["positions"] = index - first
    return {**per_token, "exit_layers": cache["exit_layers"]}


def confidence_tokens(cache: dict, size: int, eos_token_id: int | None = None) -> torch.Tensor:
    """The `size` tokens the full model writes most often over a cache's response tokens (its `full_tokens`),
    EOS always among them, sorted: the LM-head rows the exits' `frequent_logits` read (the frequent_margin signal)."""
    tokens = response_only(cache)["full_tokens"].tolist()
    return frequent_tokens([tokens], size, always=[] if eos_token_id is None else [eos_token_id])


def source_meta(decoder, datamodule, split: str, identity: dict | None) -> dict:
    """What states computed from `decoder` on a split of `datamodule` depend on: the model (its
    `identity`, e.g. name and weights' digest, and shape) and the split's exact token rows. The
    keys of the saved caches and of the LoRA stage's weights start from it."""
    dataset = datamodule.dataset(split)
    rows = json.dumps([dataset.prompt_ids, dataset.response_ids]).encode()
    return {"identity": identity or {}, "decoder": type(decoder).__name__, "num_layers": decoder.num_layers,
            "hidden_size": decoder.hidden_size, "data": datamodule.name, "split": split,
            "rows": hashlib.sha256(rows).hexdigest()}


@torch.no_grad()
def exit_tables(cache: dict, exits, decoder, batch_size: int = 256, progress: bool | None = None,
                confidence_rows: torch.Tensor | None = None) -> dict:
    """Each exit's argmax token and cross-entropy per cached token: tokens [E, N], ce [E, N] against the
    reference token, ce_full [E, N] against the full model's token (float32). One LM-head pass per exit
    over the cache, in chunks (V-wide logits are big). With `confidence_rows` (token ids), also confidence
    [E, N, 2]: the top-1 probability and CALM's margin (top-1 minus top-2) of the softmax over those rows only
    (what a head of those rows alone would tell)."""
    states, targets, full = cache["states"], cache["targets"], cache["full_tokens"]
    layers = [int(x) for x in cache["exit_layers"]]
    device = _device(decoder)
    exits.to(device)
    tokens = torch.empty(len(layers), len(targets), dtype=torch.long)
    ce = torch.empty(len(layers), len(targets))
    ce_full = torch.empty(len(layers), len(targets))
    confidence = None if confidence_rows is None else torch.empty(len(layers), len(targets), 2)
    confidence_rows = None if confidence_rows is None else confidence_rows.to(device)
    starts = range(0, len(targets), batch_size)
    for start in tqdm(starts, desc="scoring exits", unit="chunk", dynamic_ncols=True,
                      disable=not progress_enabled() if progress is None else not progress):
        chunk = states[start:start + batch_size].to(device, torch.float32)
        target = targets[start:start + batch_size].to(device)
        full_target = full[start:start + batch_size].to(device)
        rows = slice(start, start + len(target))
        for e, layer in enumerate(layers):
            logits = exits.logits(layer, chunk[:, e].to(_dtype(decoder)), decoder).float()
            log_probs = logits.log_softmax(-1)
            tokens[e, rows] = log_probs.argmax(-1).cpu()
            ce[e, rows] = -log_probs.gather(1, target[:, None]).squeeze(1).cpu()
            ce_full[e, rows] = -log_probs.gather(1, full_target[:, None]).squeeze(1).cpu()
            if confidence is not None:
                top = logits[:, confidence_rows].softmax(-1).topk(2, dim=-1).values
                confidence[e, rows] = torch.stack([top[:, 0], top[:, 0] - top[:, 1]], -1).cpu()
    return {"tokens": tokens, "ce": ce, "ce_full": ce_full,
            **({"confidence": confidence} if confidence is not None else {})}


def _dtype(module) -> torch.dtype:
    try:
        return next(module.parameters()).dtype
    except (StopIteration, AttributeError):
        return torch.float32
