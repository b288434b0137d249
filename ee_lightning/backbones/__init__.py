from .build import BackboneError, build_backbone, check_checkpoint, load_tokenizer
from .layerwise import ADAPTERS, LayerwiseBackbone, additive_attention_mask

__all__ = ["ADAPTERS", "BackboneError", "LayerwiseBackbone", "additive_attention_mask", "build_backbone", "check_checkpoint", "load_tokenizer"]
