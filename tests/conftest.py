"""Shared test helpers: tiny random backbones, generated text, composed configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ee_lightning.backbones import build_backbone
from ee_lightning.heads import ExitHeads
from ee_lightning.model import EarlyExitModel
from ee_lightning.policy import ExitPolicy

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY_BACKBONES = ["tiny_bert", "tiny_roberta", "tiny_albert", "tiny_distilbert", "tiny_electra"]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def backbone_cfg(name: str = "tiny_bert"):
    return OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml")


def make_tiny_model(name: str = "tiny_bert", output_size: int = 2, with_policy: bool = False,
                    pooling: str = "cls", seed: int = 0, use_confidence: bool = False) -> tuple[EarlyExitModel, object]:
    torch.manual_seed(seed)
    backbone, tokenizer = build_backbone(backbone_cfg(name))
    heads = ExitHeads(backbone.num_layers, backbone.hidden_size, output_size, dropout=0.0)
    policy = (ExitPolicy(backbone.num_layers, backbone.hidden_size, output_size, use_confidence=use_confidence)
              if with_policy else None)
    return EarlyExitModel(backbone, heads, pooling=pooling, policy=policy).eval(), tokenizer


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
