from ee_lightning.modeling.backbones.build import (BackboneError, backbone_from_config, build_backbone, check_checkpoint,
                                                  load_tokenizer)
from ee_lightning.modeling.backbones.layerwise import (ADAPTERS, EncoderContext, LayerwiseBackbone,
                                                       additive_attention_mask, attention_bias)

__all__ = ["ADAPTERS", "BackboneError", "backbone_from_config", "EncoderContext", "LayerwiseBackbone", "additive_attention_mask",
           "attention_bias", "build_backbone", "check_checkpoint", "load_tokenizer"]
