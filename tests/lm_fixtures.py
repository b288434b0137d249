"""Offline stand-ins for the decoder side's tests: a word-level chat tokenizer and a tiny Llama."""
from __future__ import annotations

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def tiny_chat_tokenizer(texts: list[str] = ()):
    """A whitespace word-level tokenizer over the words of `texts` (+ the chat template's words), with
    <|im_end|> as EOS and <pad> as padding; unknown words map to <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["user", "system", "assistant", "Summarize", "the", "of", "this", "paper", "in", "one", "sentence:"]
    for text in texts:
        words += text.split()
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(num_layers: int = 4, hidden: int = 16, vocab: int = 50, seed: int = 0, init_std: float = 0.02):
    """A random-init LlamaForCausalLM small enough for CPU tests (tied embeddings like SmolLM2).
    A larger init_std gives logits far from uniform (the default's are nearly flat)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         initializer_range=init_std)
    return LlamaForCausalLM(config).eval()


class LlamaLayers(torch.nn.Module):
    """The decoder protocol the exits and the cache pass use, over a plain LlamaForCausalLM: `forward`
    gives each layer's raw (un-normed) output, read by forward hooks on the library's own layers."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.hidden_size = model.config.hidden_size
        self.vocab_size = model.config.vocab_size

    def final_norm(self, hidden):
        return self.model.model.norm(hidden)

    def lm_head(self, hidden):
        return self.model.lm_head(hidden)

    def forward(self, input_ids, attention_mask):
        states = []

        def keep(module, args, output):
            states.append(output[0] if isinstance(output, tuple) else output)

        handles = [layer.register_forward_hook(keep) for layer in self.model.model.layers]
        try:
            self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return states
