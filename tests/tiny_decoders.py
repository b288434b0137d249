"""Tiny random-init decoder LMs of every supported family, built in memory (no tokenizer needed)."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ee_lightning.modeling.backbones.decoders import wrap_decoder

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gpt2"]
VOCAB, PAD, EOS = 97, 0, 5


def tiny_lm(family: str, layers: int = 4, seed: int = 0, attn: str = "sdpa"):
    """(transformers model, layer-wise decoder) of `family` with 4 layers, hidden 32."""
    if family == "gpt2":
        arch = dict(n_embd=32, n_layer=layers, n_head=4, n_positions=128)
    else:
        arch = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, max_position_embeddings=128)
        if family == "qwen3":
            arch["head_dim"] = 8
    config = AutoConfig.for_model(family, vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1, **arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    return model, wrap_decoder(model)


def left_padded_prompts(lengths=(7, 4, 6), seed: int = 1):
    """Random prompts (ids 6..VOCAB-1, never EOS) of `lengths`, left-padded with PAD."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(6, VOCAB, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, width - length:] = 1
    return ids.masked_fill(mask == 0, PAD), mask
