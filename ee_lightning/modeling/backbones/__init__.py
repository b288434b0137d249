from ee_lightning.modeling.backbones.build import (BackboneError, backbone_from_config, build_backbone, check_checkpoint,
                                                  load_tokenizer)
from ee_lightning.modeling.backbones.families import ADAPTERS, adapter_for
from ee_lightning.modeling.backbones.layerwise import (EncoderContext, LayerwiseBackbone, additive_attention_mask,
                                                       attention_bias)

__all__ = ["ADAPTERS", "adapter_for", "BackboneError", "backbone_from_config", "EncoderContext", "LayerwiseBackbone", "additive_attention_mask",
           "attention_bias", "build_backbone", "check_checkpoint", "load_tokenizer"]
