"""Out-of-fold exit scores (training/lm_cross_fit.py): folds keep responses whole, each fold's tokens are scored
by the exits trained without them, and the pipeline's policy learns from those scores."""
from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from ee_lightning.app.validate import lm_exits_config
from ee_lightning.exits.lm_targets import token_memorized_exit
from ee_lightning.inference.lm_cache import exit_tables
from ee_lightning.modeling.backbones.decoders import wrap_decoder
from ee_lightning.modeling.lm_exits import LMExitHeads
from ee_lightning.training import lm_pipeline
from ee_lightning.training.lm_cross_fit import cross_fitted_scores, response_folds
from ee_lightning.training.stages import Stages
from tests.conftest import CONF_DIR
from tests.lm_fixtures import tiny_llama
from tests.test_lm_training import jsonl_datamodule, quiet_stages


def test_response_folds_keep_each_response_whole_and_fill_every_fold():
    rows = torch.tensor([0, 0, 0, 3, 3, 5, 5, 5, 7])  # the responses' dataset rows, one per cached token
    fold = response_folds(rows, 2, seed=0)
    for row in rows.unique():
        assert fold[rows == row].unique().numel() == 1  # a response's tokens share one fold
    assert sorted(fold[[0, 3, 5, 8]].tolist()) == [0, 0, 1, 1]  # 4 responses: 2 per fold
    assert torch.equal(fold, response_folds(rows, 2, seed=0))  # the seed fixes them
    with pytest.raises(ValueError, match="at least 2 folds"):
        response_folds(rows, 1, seed=0)
    with pytest.raises(ValueError, match="holds only 4 responses; use at most 4 folds"):
        response_folds(rows, 5, seed=0)


def test_each_fold_is_scored_by_the_exits_that_never_trained_on_it():
    torch.manual_seed(0)
    decoder = wrap_decoder(tiny_llama(num_layers=4, hidden=16, vocab=50))
    rows = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5])
    n = len(rows)
    cache = {"states": torch.randn(n, 2, 16), "targets": torch.randint(0, 50, (n,)),
             "full_tokens": torch.randint(0, 50, (n,)), "rows": rows, "exit_layers": [2, 4]}
    fold_exits = [LMExitHeads(4, 16, exit_every=2, rank=4) for _ in range(3)]
    trained_on = {}

    def fit_fold(k, system, dataset):  # "training": fold k's exits get their own weights
        trained_on[k] = sorted(dataset.indices)
        assert system.exits is fold_exits[k]
        torch.manual_seed(100 + k)
        for p in fold_exits[k].parameters():
            p.data.normal_()

    adapters = OmegaConf.create({"target": "full", "lr": 1e-3, "weights": "layer", "batch_size": 5})
    rows_kept = torch.tensor([3, 7, 11])  # the confidence over these rows of the head, out of fold too
    scores = cross_fitted_scores(cache, decoder, fold_exits, fit_fold, adapters, "full", seed=7,
                                 confidence_rows=rows_kept)
    fold = response_folds(rows, 3, seed=7)
    for k in range(3):
        held = fold == k
        assert trained_on[k] == (~held).nonzero().squeeze(1).tolist()  # every other fold's tokens, none of its own
        own = exit_tables({**{key: cache[key][held] for key in ("states", "targets", "full_tokens")},
                           "exit_layers": [2, 4]}, fold_exits[k], decoder, confidence_rows=rows_kept)
        assert scores["confidence"].shape == (2, n, 2)
        for key in ("tokens", "ce", "ce_full", "confidence"):
            assert torch.allclose(scores[key][:, held], own[key])
    assert torch.equal(scores["memorized"], token_memorized_exit(scores["tokens"], cache["full_tokens"]))
    # the last exit is the model itself, in every fold
    assert torch.allclose(scores["ce_full"][1], exit_tables(cache, fold_exits[0], decoder)["ce_full"][1], atol=1e-5)


def test_the_pipeline_policy_learns_from_out_of_fold_scores(tmp_path, monkeypatch):
    L.seed_everything(0)
    dm = jsonl_datamodule(tmp_path)
    decoder = wrap_decoder(tiny_llama(num_layers=4, hidden=16, vocab=len(dm.tokenizer)))
    cfg = OmegaConf.load(CONF_DIR / "lm_exits" / "default.yaml")
    cfg.exit_every, cfg.rank, cfg.cross_fit = 2, 4, 2
    cfg.adapters.epochs, cfg.policy.epochs, cfg.classifier.epochs = 1, 1, 1
    cfg.policy.k, cfg.adapters.target, cfg.policy.task_target, cfg.hardness.target = 4, "full", "full", "full"
    learned = {}
    policy_stage = lm_pipeline.policy_stage

    def spy(policy, policy_cfg, cache, tables, memorized, seed):
        learned.update(tables=tables, memorized=memorized)
        return policy_stage(policy, policy_cfg, cache, tables, memorized, seed)

    monkeypatch.setattr(lm_pipeline, "policy_stage", spy)
    out = tmp_path / "out"
    run = lm_pipeline.train_lm_exits(decoder, dm, lm_exits_config(cfg), quiet_stages(out))
    assert {"lm_adapters_fold0", "lm_adapters_fold1", "lm_scores_cross_fit"} <= set(
        json.loads((out / "stages.json").read_text()))
    saved = torch.load(out / "checkpoints" / "lm_scores_cross_fit" / "scores.pt", weights_only=True)["tensors"]
    assert torch.equal(learned["tables"]["tokens"], saved["tokens"])
    assert torch.equal(learned["memorized"], saved["memorized"])
    own = torch.load(out / "checkpoints" / "lm_scores" / "scores.pt", weights_only=True)["tensors"]
    assert not torch.equal(saved["ce_full"], own["ce_full"])  # not the run's exits' own scores
    summary = run.summary["out_of_fold"]
    assert summary["folds"] == 2 and summary["tokens"] == run.summary["train"]["tokens"]
    assert sum(summary["memorized_histogram"]) == summary["tokens"]
    # a rerun reads the scores back instead of training the folds again
    fitted = []
    fit = Stages.fit

    def spy_fit(self, stage, system, max_epochs, restore=True, **kwargs):
        fitted.append((stage, restore))
        return fit(self, stage, system, max_epochs, restore, **kwargs)

    monkeypatch.setattr(Stages, "fit", spy_fit)
    mtime = (out / "checkpoints" / "lm_scores_cross_fit" / "scores.pt").stat().st_mtime_ns
    lm_pipeline.train_lm_exits(decoder, dm, lm_exits_config(cfg), quiet_stages(out))
    assert (out / "checkpoints" / "lm_scores_cross_fit" / "scores.pt").stat().st_mtime_ns == mtime
    assert not any(stage.startswith("lm_adapters_fold") for stage, _ in fitted)
    # another recipe rebuilds the scores, and the folds train again instead of reading back the finished stages
    cfg.adapters.lr = 3e-3
    lm_pipeline.train_lm_exits(decoder, dm, lm_exits_config(cfg), quiet_stages(out))
    assert (out / "checkpoints" / "lm_scores_cross_fit" / "scores.pt").stat().st_mtime_ns != mtime
    assert [(stage, restore) for stage, restore in fitted if stage.startswith("lm_adapters_fold")] == [
        ("lm_adapters_fold0", False), ("lm_adapters_fold1", False)]


class IdentityHead(torch.nn.Module):
    """A one-layer 'decoder' whose next-token logits are the state itself: hand-written logits for exit_tables."""

    num_layers = 1

    def __init__(self, vocab: int):
        super().__init__()
        self.head = torch.nn.Linear(vocab, vocab, bias=False)
        self.head.weight.data = torch.eye(vocab)

    def final_norm(self, hidden):
        return hidden

    def lm_head(self, hidden):
        return self.head(hidden)


def test_exit_tables_confidence_is_the_softmax_over_the_given_rows_only():
    import math

    logits = torch.tensor([[math.log(1.0), math.log(2.0), math.log(5.0), math.log(2.0)]])
    cache = {"states": logits[:, None], "targets": torch.tensor([2]), "full_tokens": torch.tensor([2]),
             "exit_layers": [1]}
    exits = LMExitHeads(1, 4, exit_every=1, rank=1)  # one exit, the last layer: the head itself
    tables = exit_tables(cache, exits, IdentityHead(4), confidence_rows=torch.tensor([1, 2]))
    # rows 1 and 2: softmax (2, 5) / 7 -> top-1 5/7, margin 3/7 (the whole vocabulary's would be 5/10, 3/10)
    assert torch.allclose(tables["confidence"][0, 0], torch.tensor([5 / 7, 3 / 7]))
    assert tables["tokens"].tolist() == [[2]] and torch.allclose(tables["ce"][0], torch.tensor([math.log(10 / 5)]))
    assert "confidence" not in exit_tables(cache, exits, IdentityHead(4))
