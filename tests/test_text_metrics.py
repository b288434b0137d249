"""ROUGE F1 and token agreement, with hand-computed values."""
from __future__ import annotations

import pytest

from ee_lightning.evaluation.text_metrics import (bootstrap_interval, corpus_token_agreement, rouge_f1, rouge_per_pair,
                                                  token_agreement, trim_generation)


def test_rouge_hand_checked():
    # prediction "the cat sat", reference "the cat sat on the mat"
    # unigrams: 3 shared; P = 3/3, R = 3/6 -> F1 = 2/3. bigrams: 2 shared of 2 and 5 -> F1 = 2*1*0.4/1.4 = 4/7.
    # LCS = 3 -> same as ROUGE-1: 2/3.
    scores = rouge_f1(["the cat sat"], ["the cat sat on the mat"], use_stemmer=False)
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(4 / 7)
    assert scores["rougeL"] == pytest.approx(2 / 3)


def test_rouge_l_uses_order_and_averages_pairs():
    # "b a" vs "a b": unigrams all shared (F1 1), no shared bigram (0), LCS 1 of 2 (0.5); second pair identical.
    scores = rouge_f1(["b a", "x y"], ["a b", "x y"], use_stemmer=False)
    assert scores == pytest.approx({"rouge1": 1.0, "rouge2": 0.5, "rougeL": 0.75})


def test_rouge_stemmer_and_errors():
    assert rouge_f1(["models"], ["model"])["rouge1"] == 1.0
    assert rouge_f1(["models"], ["model"], use_stemmer=False)["rouge1"] == 0.0
    with pytest.raises(ValueError, match="pair up"):
        rouge_f1(["a"], ["a", "b"])


def test_token_agreement_counts_length_differences():
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert token_agreement([1, 2], [1, 2, 3, 4]) == 0.5          # stopped early: missing tokens disagree
    assert token_agreement([1, 2, 3, 4], [1, 2]) == 0.5
    assert token_agreement([], []) == 1.0 and token_agreement([], [1]) == 0.0
    assert trim_generation([5, 6, 2, 0, 0], eos_token_id=2) == [5, 6]
    assert trim_generation([5, 6], eos_token_id=2) == [5, 6]


def test_corpus_token_agreement_mean_and_micro():
    # pair 1: 1 of 1; pair 2: 1 of 3 -> mean (1 + 1/3) / 2 = 2/3, micro 2 / 4
    assert corpus_token_agreement([([7], [7]), ([1, 2, 3], [1, 5])]) == pytest.approx({"mean": 2 / 3, "micro": 0.5})


def test_rouge_per_pair_averages_to_rouge_f1():
    predictions, references = ["the cat sat", "a dog ran far"], ["the cat sat down", "the dog ran"]
    per_pair = rouge_per_pair(predictions, references)
    assert per_pair["rouge1"][0] == pytest.approx(2 * 1.0 * 0.75 / 1.75)  # P 3/3, R 3/4
    mean = rouge_f1(predictions, references)
    assert {name: sum(v) / 2 for name, v in per_pair.items()} == pytest.approx(mean)


def test_bootstrap_interval():
    assert bootstrap_interval([0.3] * 7) == pytest.approx((0.3, 0.3, 0.3))
    # two items: a resampled mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 95%
    # interval's ends are 0 and 1 (each has far more than 2.5% of the mass)
    assert bootstrap_interval([0.0, 1.0]) == pytest.approx((0.5, 0.0, 1.0))
    # 100 coin flips: the interval is about mean +- 1.96 * 0.5 / 10
    mean, low, high = bootstrap_interval([0.0, 1.0] * 50, resamples=2000)
    assert mean == 0.5 and 0.15 < high - low < 0.25 and low < mean < high
    assert bootstrap_interval([0.0, 1.0] * 5, seed=3) == bootstrap_interval([0.0, 1.0] * 5, seed=3)
    with pytest.raises(ValueError, match="no scores"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="level=1.5"):
        bootstrap_interval([1.0], level=1.5)
