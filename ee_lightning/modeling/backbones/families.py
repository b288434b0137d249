"""Which adapter runs which model: the registry of adapters, and the model types that share a
supported family's modules.

Many model types are another family underneath: XLM-RoBERTa, CamemBERT and Data2Vec-Text are
RoBERTa's modules under other names. transformers 5 generates such models as renamed copies, so
no class or config inherits from another; we recognise them from the model's own classes instead.
A model type shares family F's modules when, built from the same config values, its module tree
is F's (same paths, same kinds of module) and every one of its classes' `forward` is F's code up
to the class-name prefix (comments and docstrings aside). Both are built on the meta device: no
weights are allocated.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import logging
import re
import textwrap

import torch
from transformers import AutoConfig, AutoModel

from ee_lightning.modeling.backbones.deberta import DebertaV2Backbone
from ee_lightning.modeling.backbones.layerwise import (AlbertBackbone, BertBackbone, DistilBertBackbone,
                                                       ElectraBackbone, LayerwiseBackbone, RobertaBackbone)
from ee_lightning.modeling.backbones.modernbert import ModernBertBackbone
from ee_lightning.modeling.backbones.mpnet import MPNetBackbone

log = logging.getLogger(__name__)

ADAPTERS: dict[str, type[LayerwiseBackbone]] = {
    cls.family: cls
    for cls in (BertBackbone, RobertaBackbone, ElectraBackbone, AlbertBackbone, DistilBertBackbone, MPNetBackbone,
                DebertaV2Backbone, ModernBertBackbone)
}
# config keys that name or date a model rather than shape it
NOT_ARCHITECTURE = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path")
NEAREST_MAX_DIFFERENCES = 6  # beyond that a "nearest" family says nothing useful


def adapter_for(config) -> type[LayerwiseBackbone] | None:
    """The adapter for a model of this config: its own family's, or that of the supported family
    whose modules it shares; None when there is none (see `unsupported_message`)."""
    if config.model_type in ADAPTERS:
        return ADAPTERS[config.model_type]
    family = shared_family(config.model_type, _architecture_json(config))
    if family is not None:
        log.info("a %s model shares %s's modules: it runs with the %s adapter", config.model_type, family, family)
        return ADAPTERS[family]
    return None


@functools.lru_cache(maxsize=32)
def shared_family(model_type: str, architecture: str) -> str | None:
    """The supported family whose modules a model type shares (see the module docstring), or None."""
    fields = json.loads(architecture)
    try:
        mine = module_signature(_on_meta(AutoConfig.for_model(model_type, **fields)))
    except Exception as err:  # a model type AutoModel cannot build has nothing to compare
        log.debug("cannot build a %s model to compare: %s", model_type, err)
        return None
    for family in ADAPTERS:
        reference = _reference_signature(family, architecture)
        if reference is not None and reference == mine:
            return family
    return None


def unsupported_message(model_type: str, config=None) -> str:
    """Why a model type cannot run layer by layer and what an adapter for it would need; names the
    nearest supported family when only a few of its modules differ."""
    message = (f"{model_type!r} models have no layer-wise adapter; supported families: {sorted(ADAPTERS)}, and any "
               "model type built from one of their modules (xlm-roberta, camembert, data2vec-text share roberta's). "
               f"An adapter for {model_type} (ee_lightning/modeling/backbones/) would say where its embeddings live "
               "and how they are called, how one layer is called, and what its encoder computes once per forward "
               "for every layer beside the hidden states (masks, position biases, rotary tables): that goes in an "
               "EncoderContext subclass whose select() slices it with the rows")
    if config is not None:
        nearest = nearest_family(model_type, _architecture_json(config))
        if nearest is not None and len(nearest[1]) <= NEAREST_MAX_DIFFERENCES:
            family, differing = nearest
            message += f". Nearest supported family: {family}; the modules that differ from its: {differing}"
    return message


@functools.lru_cache(maxsize=32)
def nearest_family(model_type: str, architecture: str) -> tuple[str, list[str]] | None:
    fields = json.loads(architecture)
    try:
        mine = module_signature(_on_meta(AutoConfig.for_model(model_type, **fields)))
    except Exception:
        return None
    best = None
    for family in ADAPTERS:
        reference = _reference_signature(family, architecture)
        if reference is None:
            continue
        differing = sorted({path or "(model)" for path, *_ in mine ^ reference})
        if best is None or len(differing) < len(best[1]):
            best = (family, differing)
    return best


def module_signature(model) -> frozenset:
    """(module path with layer numbers as '*', class name and forward code without the model's class-name
    prefix) for every submodule: equal for two models exactly when one is the other's modules renamed."""
    prefix = type(model).__name__.removesuffix("Model")
    entries = set()
    for path, module in model.named_modules():
        if not path:
            continue
        cls = type(module)
        if cls.__module__.startswith("transformers.models."):
            name, code = cls.__name__.replace(prefix, "<P>", 1), _forward_code(cls, prefix)
        else:  # torch.nn and transformers' shared modules are the same class in every model
            name, code = f"{cls.__module__}.{cls.__qualname__}", ""
        entries.add((re.sub(r"\.\d+(?=\.|$)", ".*", path), name, code))
    return frozenset(entries)


def _forward_code(cls, prefix: str) -> str:
    """A digest of `cls.forward`'s syntax tree with docstrings dropped (the tree has no comments)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return "?"
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha1(ast.dump(tree).replace(prefix, "<P>").encode()).hexdigest()


@functools.lru_cache(maxsize=64)
def _reference_signature(family: str, architecture: str) -> frozenset | None:
    try:
        return module_signature(_on_meta(AutoConfig.for_model(family, **json.loads(architecture))))
    except Exception:  # these config values do not make a model of that family
        return None


def _on_meta(config):
    with torch.device("meta"):
        return AutoModel.from_config(config)


def _architecture_json(config) -> str:
    fields = {k: v for k, v in config.to_dict().items() if k not in NOT_ARCHITECTURE}
    return json.dumps(fields, sort_keys=True, default=str)
