from ee_lightning.modeling.backbones.build import BackboneError, build_backbone, check_checkpoint, load_tokenizer
from ee_lightning.modeling.backbones.layerwise import ADAPTERS, LayerwiseBackbone, additive_attention_mask

__all__ = ["ADAPTERS", "BackboneError", "LayerwiseBackbone", "additive_attention_mask", "build_backbone", "check_checkpoint", "load_tokenizer"]
