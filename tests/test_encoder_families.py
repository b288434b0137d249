"""The families beyond BERT's layer call: MPNet, DeBERTa-v2/v3, ModernBERT variants; model types recognised
as a supported family's modules; the error for an unsupported family; the base configs."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig

from ee_lightning.modeling.backbones import BackboneError, adapter_for, build_backbone
from ee_lightning.modeling.backbones.families import module_signature, unsupported_message
from ee_lightning.modeling.backbones.layerwise import BertBackbone, RobertaBackbone

from conftest import CONF_DIR, SENTENCES, make_batch
from test_backbones import PADDED_TEXTS, assert_states_match, build, layerwise_and_reference, library_view

TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64}


def build_family(family: str, seed: int = 0, attn: str = "sdpa", **arch):
    torch.manual_seed(seed)
    backbone, tokenizer = build_backbone({"family": family, "architecture": {**TINY, **arch},
                                          "attn_implementation": attn, "random_init_expected": True})
    return backbone.eval(), tokenizer


@pytest.mark.slow  # the first comparison imports every candidate family's modeling code
@pytest.mark.parametrize("family", ["camembert", "data2vec-text", "xlm-roberta"])
def test_model_types_with_roberta_modules_run_with_the_roberta_adapter(family):
    backbone, tokenizer = build_family(family, type_vocab_size=1)
    assert type(backbone) is RobertaBackbone and backbone.config.model_type == family
    batch = make_batch(tokenizer, PADDED_TEXTS)
    mine, out = layerwise_and_reference(backbone, batch)
    assert_states_match(mine, out.hidden_states[1:])


def test_signature_tells_renamed_copies_from_changed_modules():
    def on_meta(model_type, **arch):
        with torch.device("meta"):
            from transformers import AutoModel
            return AutoModel.from_config(AutoConfig.for_model(model_type, **{**TINY, **arch}))

    roberta = module_signature(on_meta("roberta"))
    assert module_signature(on_meta("xlm-roberta")) == roberta  # RoBERTa renamed
    assert module_signature(on_meta("roberta-prelayernorm")) != roberta  # other modules
    assert module_signature(on_meta("bert")) != roberta  # same tree, other embeddings code
    assert adapter_for(AutoConfig.for_model("bert", **TINY)) is BertBackbone


@pytest.mark.slow
def test_unsupported_family_says_what_an_adapter_needs():
    with pytest.raises(BackboneError) as err:
        build_family("ernie")
    message = str(err.value)
    assert "backbone.family='ernie' is not supported" in message
    for need in ("embeddings", "one layer is called", "once per forward", "EncoderContext", "select()"):
        assert need in message, need
    # ERNIE is BERT but for its embeddings (task-type embeddings): the nearest family and the difference are named
    assert "Nearest supported family: bert" in message and "['embeddings']" in message
    for family in ("bert", "roberta", "mpnet", "deberta-v2", "modernbert"):
        assert f"'{family}'" in message
    gpt2 = unsupported_message("gpt2", AutoConfig.for_model("gpt2", n_layer=1, n_embd=8, n_head=2))
    assert "'gpt2' models have no layer-wise adapter" in gpt2 and "Nearest" not in gpt2  # nothing close
    with pytest.raises(BackboneError, match="not a transformers model type"):
        build_family("no-such-model")


@pytest.mark.parametrize("variant", [
    {"conv_kernel_size": 3, "conv_act": "gelu"},  # DeBERTa-v2 xlarge: a convolution after layer 0
    {"relative_attention": False, "position_biased_input": True},  # absolute positions only
    {"pos_att_type": ["c2p"], "share_att_key": False, "norm_rel_ebd": "none"},  # v2-style separate position keys
], ids=["conv", "absolute", "c2p_only"])
def test_deberta_variants_match_the_library(variant):
    base = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "backbone" / "tiny_deberta_v2.yaml").architecture)
    backbone, tokenizer = build_family("deberta-v2", attn="eager", **{**base, **variant})
    batch = make_batch(tokenizer, PADDED_TEXTS)
    mine, out = layerwise_and_reference(backbone, batch)
    assert_states_match(mine, out.hidden_states[1:])
    # the runner's row selection keeps the extras consistent: short rows alone == short rows in the batch
    with torch.no_grad():
        hidden, ctx = backbone.start(batch)
        hidden = backbone.step(0, hidden, ctx)
        rows = torch.tensor([0, 2, 3])
        hidden, ctx = ctx.select(rows, hidden)
        for index in range(1, backbone.num_layers):
            hidden = backbone.step(index, hidden, ctx)
    width = hidden.shape[1]
    assert width < batch["input_ids"].shape[1]  # padding columns were dropped
    tokens = batch["attention_mask"][rows, :width].bool()
    torch.testing.assert_close(hidden[tokens], mine[-1][rows, :width][tokens], rtol=1e-4, atol=1e-5)


def test_deberta_with_token_types_reads_the_second_segment():
    base = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "backbone" / "tiny_deberta_v2.yaml").architecture)
    backbone, tokenizer = build_family("deberta-v2", attn="eager", **{**base, "type_vocab_size": 2})
    assert backbone.takes_token_types
    batch = make_batch(tokenizer, PADDED_TEXTS, SENTENCES[:4])
    mine, out = layerwise_and_reference(backbone, batch)
    assert_states_match(mine, out.hidden_states[1:])
    with torch.no_grad():
        flat, _ = layerwise_and_reference(backbone, {**batch, "token_type_ids": torch.zeros_like(batch["token_type_ids"])})
    assert not torch.allclose(flat[-1], mine[-1])


def test_modernbert_alternates_local_and_global_attention():
    backbone, tokenizer = build("tiny_modernbert")
    kinds = [backbone.layer_module(i).attention_type for i in range(backbone.num_layers)]
    assert kinds == ["full_attention", "sliding_attention"] * 2
    batch = make_batch(tokenizer, PADDED_TEXTS)
    assert batch["input_ids"].shape[1] > backbone.config.local_attention  # the window really cuts
    hidden, ctx = backbone.start(batch)
    assert set(ctx.masks) == set(ctx.rotary) == {"full_attention", "sliding_attention"}
    # a wider window is another model: the local mask is in use
    wide, _ = build("tiny_modernbert", **{"architecture.local_attention": 512})
    mine, out = layerwise_and_reference(backbone, batch)
    wide_states, _ = layerwise_and_reference(wide, batch)
    assert not torch.allclose(wide_states[-1], mine[-1])
    # the library's output is the last state through the final norm; the exit heads apply it at every
    # exit, before cls and before mean pooling alike
    assert torch.allclose(library_view(backbone, mine)[-1], out.last_hidden_state, atol=1e-5)
    assert backbone.first_token_pooler() is None and backbone.output_norm() is backbone.model.final_norm
    from ee_lightning.modeling.heads import ExitHeads, mean_pool

    for pooling in ("cls", "mean"):
        heads = ExitHeads(1, backbone.hidden_size, 2, pooling=pooling, output_norm=backbone.output_norm())
        normed = backbone.model.final_norm(mine[1])
        expected = normed[:, 0] if pooling == "cls" else mean_pool(normed, batch["attention_mask"])
        assert torch.allclose(heads.pool(mine[1], batch["attention_mask"]), expected, atol=1e-6)


def test_modernbert_rejects_unpadding_attention():
    from ee_lightning.modeling.backbones.modernbert import ModernBertBackbone

    backbone, _ = build("tiny_modernbert")
    backbone.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2.*sdpa"):
        ModernBertBackbone(backbone.model)


@pytest.mark.parametrize("name", ["tiny_mpnet", "tiny_deberta_v2", "tiny_xlm_roberta", "tiny_modernbert"])
def test_rebuilt_from_the_recorded_config(name):
    """What a checkpoint's model spec keeps (the transformers config) rebuilds the same adapter and model."""
    from ee_lightning.modeling.backbones import backbone_from_config

    backbone, tokenizer = build(name)
    rebuilt = backbone_from_config(backbone.model.config.to_dict(), backbone_cfg_attn(name))
    assert type(rebuilt) is type(backbone)
    rebuilt.load_state_dict(backbone.state_dict())
    rebuilt.eval()
    batch = make_batch(tokenizer, PADDED_TEXTS)
    mine, _ = layerwise_and_reference(backbone, batch)
    again, _ = layerwise_and_reference(rebuilt, batch)
    for a, b in zip(mine, again):
        assert torch.equal(a, b)


def backbone_cfg_attn(name: str) -> str:
    return OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml").attn_implementation


@pytest.mark.parametrize("name,family,layers,hidden", [
    ("mpnet_base", "mpnet", 12, 768), ("deberta_v3_base", "deberta-v2", 12, 768),
    ("xlm_roberta_base", "xlm-roberta", 12, 768), ("modernbert_base", "modernbert", 22, 768),
])
def test_base_configs_describe_the_public_architectures(name, family, layers, hidden):
    cfg = OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml")
    assert cfg.family == family and cfg.pretrained_path is None and cfg.random_init_expected is False
    config = AutoConfig.for_model(family, **OmegaConf.to_container(cfg.architecture))
    assert (config.num_hidden_layers, config.hidden_size) == (layers, hidden)
    assert adapter_for(config) is not None


# --- a checkpoint of another family through backbone.pretrained_path, on real data -------------------

def mpnet_tokenizer():
    """An MPNet tokenizer over the packaged MiniLM WordPiece vocabulary, with MPNet's special tokens first
    (<pad> = 1, as MPNet's position ids assume)."""
    from transformers import MPNetTokenizer

    from ee_lightning.modeling.backbones import load_tokenizer

    words = sorted(load_tokenizer({}).get_vocab().items(), key=lambda item: item[1])
    vocab = ["<s>", "<pad>", "</s>", "<unk>"] + [word for word, _ in words] + ["<mask>"]
    return MPNetTokenizer(vocab={word: i for i, word in enumerate(dict.fromkeys(vocab))}, unk_token="<unk>")


def deberta_v3_tokenizer():
    """A DeBERTa-v3 style unigram tokenizer: [PAD] [CLS] [SEP] [UNK] first, then the MiniLM words as
    '▁word' pieces and its continuations as plain pieces."""
    import math

    from transformers import DebertaV2Tokenizer

    from ee_lightning.modeling.backbones import load_tokenizer

    words = [word for word, _ in sorted(load_tokenizer({}).get_vocab().items(), key=lambda item: item[1])]
    pieces = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    pieces += ["▁" + w for w in words if not w.startswith(("[", "##"))] + [w[2:] for w in words if w.startswith("##")]
    pieces = list(dict.fromkeys(pieces)) + ["[MASK]"]
    vocab = [(piece, 0.0 if i < 4 else -math.log(2 + i)) for i, piece in enumerate(pieces)]
    return DebertaV2Tokenizer(vocab=vocab, do_lower_case=True)


SHAPES = {
    # a DeBERTa-v3-base shaped model (relative buckets, shared keys, no absolute positions or token types), smaller
    "deberta_v3_base": (deberta_v3_tokenizer, {"num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 2,
                                               "intermediate_size": 64}),
    "mpnet_base": (mpnet_tokenizer, {"num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 2,
                                     "intermediate_size": 64}),
}


def save_random_checkpoint(name: str, folder):
    """A random model of the base config's architecture (smaller), saved with save_pretrained with its tokenizer."""
    from transformers import AutoModel

    make_tokenizer, smaller = SHAPES[name]
    cfg = OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml")
    tokenizer = make_tokenizer()
    arch = {**OmegaConf.to_container(cfg.architecture), **smaller, "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.for_model(cfg.family, **arch)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHAPES))
def test_saved_checkpoint_runs_consistentee_on_real_data(name, tmp_path):
    """`ee-train backbone=<base> backbone.pretrained_path=DIR method=consistentee data=rotten_tomatoes`
    on a save_pretrained folder of that family (tiny epochs, a few real rows)."""
    import json
    import shutil

    from ee_lightning.app.train import train
    from tests.conftest import compose_train

    folder = save_random_checkpoint(name, tmp_path / "checkpoint")
    run = tmp_path / "run"
    cfg = compose_train([f"backbone={name}", f"backbone.pretrained_path={folder}", "data=rotten_tomatoes",
                         "data.max_train_samples=64", "data.max_eval_samples=32", "data.batch_size=16",
                         "method=consistentee", "method.finetune.epochs=1", "method.policy.epochs=1",
                         "logger=csv", "trainer.enable_progress_bar=false", "report.latency.enabled=false"], run)
    results = train(cfg)
    written = json.loads((run / "results.json").read_text())
    assert written["num_layers"] == 3  # read from the checkpoint, not the base config's 12
    assert set(json.loads((run / "stages.json").read_text())) == {"finetune", "policy"}
    assert set(written["methods"]) >= {"consistentee", "full"}
    assert 0.0 <= results.methods["consistentee"].metric <= 1.0
    # ee-eval rebuilds the model from the checkpoint alone (no pretrained folder), with the checkpoint's tokenizer
    from ee_lightning.app.evaluate_checkpoint import evaluate

    ckpt = json.loads((run / "stages.json").read_text())["policy"]["checkpoint"]
    shutil.rmtree(folder)
    evaluate(compose_train([f"ckpt_path={ckpt}", "report.latency.enabled=false"], tmp_path / "eval", "eval"))
    rows = (tmp_path / "eval" / "pareto.csv").read_text().splitlines()
    assert len(rows) > 2 and rows[0].startswith("rule")


def test_deberta_batched_cost_is_per_row_cost_less_the_shared_position_projections():
    """The per-instance FLOP count is DeBERTa's batch-1 cost; a batch of B rows shares, in every layer, the
    projections of the relative position embeddings (query and key projections of [2 * buckets, H] when keys
    are shared), so it costs (B - 1) of them less than B single rows."""
    from conftest import make_tiny_model
    from ee_lightning.evaluation.cost import flop_counter, flops_per_instance
    from ee_lightning.exits.rules import build_rule
    from ee_lightning.inference.runner import EarlyExitRunner

    model, _ = make_tiny_model("tiny_deberta_v2", output_size=3)
    rows, width = 8, 12
    batch = {"input_ids": torch.randint(1000, 2000, (rows, width), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(rows, width, dtype=torch.long)}
    config = model.backbone.config
    projection = 2 * (2 * (2 * config.position_buckets) * config.hidden_size * config.hidden_size)  # query + key
    for k in (1, 4):
        with flop_counter() as counter:
            _, exits = EarlyExitRunner(model).run(batch, build_rule("static", k=k))
        predicted = flops_per_instance(model, width, exits) * rows
        assert predicted - float(counter.get_total_flops()) == k * (rows - 1) * projection
