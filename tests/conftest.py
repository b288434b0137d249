"""Shared test helpers: tiny random backbones, generated text, composed configs."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

import ee_lightning.config  # noqa: F401  (registers the config schemas with Hydra before any compose)

from ee_lightning.modeling.backbones import build_backbone
from ee_lightning.modeling.heads import ExitHeads
from ee_lightning.modeling.model import EarlyExitModel
from ee_lightning.modeling.exit_policy import ExitPolicy

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY_BACKBONES = ["tiny_bert", "tiny_roberta", "tiny_albert", "tiny_distilbert", "tiny_electra", "tiny_mpnet",
                  "tiny_deberta_v2", "tiny_xlm_roberta", "tiny_modernbert"]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from a second thread, and busy-waiting threads slow a loaded 2-core machine.
torch.set_num_threads(1)


def experiment_fixture(name: str):
    """A module-scoped fixture importing experiments/<name>.py, with the experiments folder on the path while it
    lives (the scripts import each other by name, as they do when run)."""
    @pytest.fixture(scope="module")
    def module():
        sys.path.insert(0, str(ROOT / "experiments"))
        try:
            yield importlib.import_module(name)
        finally:
            sys.path.remove(str(ROOT / "experiments"))
    return module


def backbone_cfg(name: str = "tiny_bert"):
    return OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml")


def make_tiny_model(name: str = "tiny_bert", output_size: int = 2, with_policy: bool = False,
                    pooling: str = "cls", seed: int = 0, use_confidence: bool = False) -> tuple[EarlyExitModel, object]:
    torch.manual_seed(seed)
    backbone, tokenizer = build_backbone(backbone_cfg(name))
    heads = ExitHeads(backbone.num_layers, backbone.hidden_size, output_size, dropout=0.0, pooling=pooling,
                      first_token_pooler=backbone.first_token_pooler(), output_norm=backbone.output_norm())
    policy = (ExitPolicy(backbone.num_layers, backbone.hidden_size, output_size, use_confidence=use_confidence)
              if with_policy else None)
    return EarlyExitModel(backbone, heads, policy=policy).eval(), tokenizer


def layer_states(backbone, batch: dict) -> list[torch.Tensor]:
    """Every layer's hidden states (L tensors of [B, S, H]) through the step interface."""
    hidden, ctx = backbone.start(batch)
    states = []
    for index in range(backbone.num_layers):
        hidden = backbone.step(index, hidden, ctx)
        states.append(hidden)
    return states


SENTENCES = [
    "a gripping, beautifully acted film",
    "dull",
    "the plot never comes together and the jokes fall flat in every single scene",
    "an instant classic",
    "i wanted my two hours back",
    "warm , funny and surprisingly moving from start to finish",
    "meh",
    "not bad at all",
]


def make_batch(tokenizer, texts=SENTENCES, pairs=None) -> dict:
    enc = tokenizer(list(texts), list(pairs) if pairs is not None else None, padding=True, return_tensors="pt")
    return dict(enc)


@pytest.fixture
def tiny_model():
    return make_tiny_model()


# --- composing and running ee-train in-process ------------------------------------------
os.environ.setdefault("EE_CACHE_DIR", str(ROOT / ".cache"))
DATA_OPTIONS = ["rotten_tomatoes", "bbc_news", "glue", "csv", "hf"]


def write_sentiment_files(folder: Path, n_train: int = 48, n_eval: int = 16) -> Path:
    """A GLUE SST-2 style folder (sentence<TAB>label, with header) of generated sentences."""
    import random

    rng = random.Random(0)
    good, bad = ["great", "moving", "funny", "brilliant"], ["dull", "boring", "awful", "flat"]
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_eval), ("test.tsv", n_eval)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            words = rng.choices(good if label else bad, k=rng.randint(1, 6))
            rows.append(f"the film was {' and '.join(words)}\t{label}")
        (folder / name).write_text("\n".join(rows) + "\n")
    return folder


def data_overrides(option: str, tmp_path: Path) -> list[str]:
    """Overrides that make a data option run on small local files (real files for the packaged sets)."""
    if option == "glue":
        folder = write_sentiment_files(tmp_path / "SST-2")
        return ["data=glue", "data.task=sst2", f"data.data_dir={folder}"]
    if option == "csv":
        folder = write_sentiment_files(tmp_path / "csvdata")
        return ["data=csv", f"data.train_file={folder / 'train.tsv'}", f"data.test_file={folder / 'test.tsv'}",
                "data.text_column=sentence", "data.label_column=label"]
    if option == "hf":
        return ["data=hf", f"data.path={write_sentiment_dataset(tmp_path / 'hfdata')}", "data.text_column=sentence",
                f"data.hf_cache_dir={tmp_path / 'hf_cache'}"]
    return [f"data={option}"]


def write_sentiment_dataset(folder: Path) -> Path:
    """The generated sentiment rows as a Hugging Face DatasetDict saved with save_to_disk."""
    import csv

    import datasets

    files = write_sentiment_files(folder.with_name(folder.name + "_tsv"))
    splits = {}
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv"), ("test", "test.tsv")):
        with open(files / name, newline="") as handle:
            table = list(csv.DictReader(handle, delimiter="\t"))
        splits[split] = datasets.Dataset.from_dict({"sentence": [r["sentence"] for r in table],
                                                    "label": [int(r["label"]) for r in table]})
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def compose_train(overrides: list[str], run_dir: Path, config_name: str = "train"):
    """The config ee-train would run with, its output directory set to `run_dir`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg


class FailInStage(Callback):
    """Fails the fit of one stage (`+callbacks.fail._target_=tests.conftest.FailInStage
    +callbacks.fail.stage=policy`): a failure no config check can foresee, for the failure-path tests."""

    def __init__(self, stage: str):
        self.stage, self.bound = stage, None

    def bind_stage(self, stage: str, run_dir) -> None:
        self.bound = stage

    def on_train_start(self, trainer, pl_module) -> None:
        if self.bound == self.stage:
            raise RuntimeError(f"deliberate failure in stage {self.stage}")
