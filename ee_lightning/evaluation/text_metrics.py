"""Text metrics for generation: ROUGE F1 against references, and token agreement between two generations.

ROUGE comes from Google's `rouge-score` package (the reference implementation of the ROUGE script's
tokenisation: lower-cased, non-alphanumerics dropped; Porter stemming on by default); ROUGE-L is
the sentence-level longest common subsequence. Scores are F1 in [0, 1], averaged over pairs.

Token agreement compares an early-exit generation with the full model's, token by token:
    agreement(a, b) = #{i < min(|a|, |b|): a_i = b_i} / max(|a|, |b|)
Positions past the shorter sequence count as disagreements, so a generation that stops early (or
runs on) is penalised for the missing tokens; two empty sequences agree fully (1.0). Sequences
should be cut at the end-of-sequence token first (`trim_generation`), or the padding after it
would count as agreement.
"""
from __future__ import annotations

from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_f1(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over aligned (prediction, reference) pairs: {"rouge1": .., "rouge2": .., "rougeL": ..}."""
    per_pair = rouge_per_pair(predictions, references, use_stemmer)
    return {name: sum(values) / len(values) for name, values in per_pair.items()}


def rouge_per_pair(predictions: Sequence[str], references: Sequence[str],
                   use_stemmer: bool = True) -> dict[str, list[float]]:
    """ROUGE-1/2/L F1 of every aligned (prediction, reference) pair: {"rouge1": [..], ...}."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; they must pair up")
    if not predictions:
        raise ValueError("no predictions to score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    out = {name: [] for name in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references):
        # the package's signature is score(target, prediction)
        scores = scorer.score(reference, prediction)
        for name in ROUGE_TYPES:
            out[name].append(scores[name].fmeasure)
    return out


def bootstrap_interval(values: Sequence[float], resamples: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-item scores and its percentile bootstrap interval: the items
    are resampled with replacement `resamples` times (seeded), and low / high are the (1 - level) / 2
    and (1 + level) / 2 quantiles of the resampled means."""
    import torch

    if len(values) == 0:
        raise ValueError("no scores to bootstrap")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"level={level} must lie in (0, 1) and resamples={resamples} be >= 1")
    data = torch.tensor([float(v) for v in values], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(data), (resamples, len(data)), generator=generator)
    means = data[picks].mean(1)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return float(data.mean()), low, high


def trim_generation(ids: Sequence[int], eos_token_id: int | None = None) -> list[int]:
    """The tokens before the first EOS (the EOS itself and anything after it dropped)."""
    ids = [int(i) for i in ids]
    if eos_token_id is not None and eos_token_id in ids:
        return ids[:ids.index(eos_token_id)]
    return ids


def agreement_counts(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """(positions where a and b hold the same token, max(|a|, |b|))."""
    a, b = list(a), list(b)
    return sum(x == y for x, y in zip(a, b)), max(len(a), len(b))


def token_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of aligned positions with the same token, over the longer length (1.0 for two empty sequences)."""
    same, length = agreement_counts(a, b)
    return 1.0 if length == 0 else same / length


def corpus_token_agreement(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, float]:
    """Over many (a, b) pairs: "mean" of the per-pair agreements, and "micro" = all equal positions over
    all lengths (long generations weigh more)."""
    if not pairs:
        raise ValueError("no generation pairs to compare")
    counts = [agreement_counts(a, b) for a, b in pairs]
    total = sum(length for _, length in counts)
    return {"mean": sum(1.0 if n == 0 else s / n for s, n in counts) / len(counts),
            "micro": 1.0 if total == 0 else sum(s for s, _ in counts) / total}
