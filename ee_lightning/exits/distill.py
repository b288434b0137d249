"""Distilling the exits from the full model: top-k targets and the loss, as pure tensor functions.

The teacher is the frozen full model. At every position it gives a next-token distribution over
the whole vocabulary; only its k most likely tokens are kept (`teacher_topk`): their ids and their
log-probabilities, normalised over the whole vocabulary, so a stored target never depends on k.

An exit (the student) is trained on cross-entropy to the teacher's top-k renormalised to sum to 1
(`distill_loss`), which is KL(teacher_k || student) up to the teacher's constant entropy. The
student's log-probabilities are normalised over the vocabulary its logits cover: the whole
vocabulary (the honest one: an exit then competes with every token, as it does in generation),
or a restricted one, the union of every token the teacher ever ranked in its top k on the
training text (`restricted_vocabulary`), which makes the LM head many times cheaper to train
through but lets the student ignore tokens outside it.
"""
from __future__ import annotations

import torch

VOCABULARIES = ("full", "restricted")
OBJECTIVES = ("ce", "distill")  # stage 1: cross-entropy to one token per response position, or this distillation


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, V] logits -> (ids [N, k] long, log-probs [N, k] float32), most likely first. The log-probs
    are normalised over all V tokens (logsumexp of the whole row)."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top_k={k} must lie in 1..{logits.shape[-1]} (the vocabulary size)")
    log_probs = logits.float().log_softmax(-1)
    values, ids = log_probs.topk(k, dim=-1)
    return ids, values


def restricted_vocabulary(top_ids: torch.Tensor) -> torch.Tensor:
    """[N, k] teacher ids -> [V'] sorted unique ids: every token the teacher ranked in its top k."""
    return torch.unique(top_ids.reshape(-1))


def to_restricted(ids: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
    """Token ids -> their positions in the sorted `vocabulary`; an id outside it is an error."""
    where = torch.searchsorted(vocabulary, ids)
    inside = where < len(vocabulary)
    if not bool(inside.all()) or not bool((vocabulary[where.clamp(max=len(vocabulary) - 1)] == ids).all()):
        raise ValueError("a target id lies outside the restricted vocabulary; build the vocabulary from the same "
                         "top-k targets (restricted_vocabulary) or use vocabulary 'full'")
    return where


def distill_loss(student_logits: torch.Tensor, target_ids: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy [N] of the student to the teacher's top-k renormalised:
    -sum_j q_j log p(j), q = softmax(target_logp) over the k kept tokens, p = softmax(student_logits)
    over the student's vocabulary; `target_ids` [N, k] index into the student's logits [N, V']."""
    if target_ids.shape != target_logp.shape or target_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(f"student logits {tuple(student_logits.shape)}, target ids {tuple(target_ids.shape)} and "
                         f"target log-probs {tuple(target_logp.shape)} must share N (and the targets their k)")
    log_p = student_logits.float().log_softmax(-1).gather(-1, target_ids)
    q = target_logp.float().softmax(-1)
    return -(q * log_p).sum(-1)
