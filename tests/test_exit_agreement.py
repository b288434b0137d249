"""The exit-agreement study picks up where an earlier sitting stopped: exits distilled with the same settings are
read back instead of trained again, and a report's rows are kept only when they measured the same thing."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

from ee_lightning.inference.lm_cache import collect_exit_states
from ee_lightning.modeling.lm_exits import LMExitHeads
from tests.conftest import ROOT
from tests.lm_fixtures import LlamaLayers, tiny_llama
from tests.test_lm_training import jsonl_datamodule


def study():
    spec = importlib.util.spec_from_file_location("exit_agreement", ROOT / "experiments" / "exit_agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def settings(out: Path, **changes) -> argparse.Namespace:
    args = study().parse(["--train-rows", "8", "--val-rows", "4", "--epochs", "1", "--rank", "4", "--out", str(out)])
    return argparse.Namespace(**{**vars(args), **changes})


def test_exits_distilled_with_the_same_settings_are_read_back_not_trained_again(tmp_path, monkeypatch):
    agreement = study()
    dm = jsonl_datamodule(tmp_path, n=12)
    dm.setup()
    model = tiny_llama(num_layers=4, hidden=16, vocab=len(dm.tokenizer), init_std=0.5)
    decoder = LlamaLayers(model)
    train = collect_exit_states(decoder, dm.dataloader("train", "train", batch_size=4), [2, 4], progress=False,
                                positions="all", top_k=4)
    args = settings(tmp_path / "out", exit_every=2)

    def exits():
        torch.manual_seed(0)
        return LMExitHeads(4, 16, exit_every=2, rank=4, adapter="block", layers=model.model.layers)

    first = exits()
    info = agreement.distilled(first, "block", args, decoder, train, tmp_path)
    assert info["vocabulary_size"] == len(torch.unique(train["top_ids"]))

    calls = []
    monkeypatch.setattr(agreement, "distill_exits", lambda *a, **k: calls.append(a) or {"vocabulary_size": -1})
    second = exits()
    assert agreement.distilled(second, "block", args, decoder, train, tmp_path) == info
    assert calls == []  # read back
    for name, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name
    third = exits()
    agreement.distilled(third, "block", settings(tmp_path / "out", exit_every=2, epochs=2), decoder, train, tmp_path)
    assert len(calls) == 1  # other settings: trained again


def test_an_earlier_report_is_kept_only_when_it_measured_the_same_thing(tmp_path):
    agreement = study()
    out = tmp_path / "out"
    out.mkdir()
    args = settings(out)
    train, held_out = {"targets": torch.zeros(10)}, {"targets": torch.zeros(6)}
    assert agreement.earlier_report(args, train, held_out) == {}  # none yet
    stored = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"settings": {**stored, "adapters": ["lowrank"], "out": "/elsewhere"}, "train_positions": 10,
              "val_positions": 6, "exits": {"distilled lowrank (rank 4)": {"agreement_response": [0.5]}}}
    (out / "exit_agreement.json").write_text(json.dumps(report))
    assert agreement.earlier_report(args, train, held_out) == report  # other kinds asked for, another folder: kept
    assert agreement.earlier_report(settings(out, epochs=3), train, held_out) == {}
    assert agreement.earlier_report(args, {"targets": torch.zeros(11)}, held_out) == {}
