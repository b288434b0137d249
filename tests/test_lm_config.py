"""Typed configs of the decoder side (method=consistentee_lm): every decoder config composes and
validates; a misspelt key or a wrong type fails at compose naming the key; each range and cross-field
rule fails validation with its message, before any model or data loads."""
from __future__ import annotations

import json
import shutil

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from ee_lightning.app.validate import ConfigError, typed, validate_config
from ee_lightning.config.schema import (ACLSumData, ConsistentEELMMethod, GenerationRules, LMExitsConfig,
                                        PromptResponseData, TokenPolicyStage)
from ee_lightning.app.validate import lm_exits_config
from tests.conftest import CONF_DIR, compose_train

LM = ["experiment=aclsum_consistentee"]
DECODER_BACKBONES = sorted(p.stem for p in (CONF_DIR / "backbone").glob("*.yaml")
                           if OmegaConf.load(p).get("kind") == "decoder")


def problems(overrides: list[str], tmp_path) -> str:
    cfg = compose_train(overrides, tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    return str(err.value)


def compose_error(overrides: list[str], tmp_path) -> str:
    """Hydra's composition error with the OmegaConf error it came from."""
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(overrides, tmp_path / "run")
    return f"{err.value} {err.value.__cause__}"


def jsonl_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n" for i in range(6)))
    return path


# --- every decoder config composes, typed, and validates -----------------------------------------
@pytest.mark.parametrize("backbone", DECODER_BACKBONES)
def test_every_decoder_backbone_composes_and_validates_with_the_lm_method(backbone, tmp_path):
    extra = ["backbone.pretrained_path=/models/llm"] if backbone == "llama_3_8b" else []
    if backbone.startswith("tiny_"):  # 4 layers: the experiment's static layers (9..27) are SmolLM2's
        extra.append("method.generation.rules.static=null")
    cfg = compose_train([*LM, f"backbone={backbone}", *extra], tmp_path / "run")
    validate_config(cfg)
    assert cfg.backbone.kind == "decoder"


def test_decoder_experiments_and_data_are_typed(tmp_path):
    cfg = compose_train(LM, tmp_path / "cpu")
    validate_config(cfg)
    assert OmegaConf.get_type(cfg.method) is ConsistentEELMMethod
    assert OmegaConf.get_type(cfg.method.lm_exits) is LMExitsConfig
    assert OmegaConf.get_type(cfg.method.lm_exits.policy) is TokenPolicyStage
    assert OmegaConf.get_type(cfg.method.generation.rules) is GenerationRules
    assert OmegaConf.get_type(cfg.data) is ACLSumData
    method = typed(cfg.method)
    assert method.lm_exits.exit_every == 3 and method.lm_exits.policy.tau == 0.5  # experiment, then lm_exits yaml
    assert method.generation.rules.static == [15, 21, 24, 27] and method.generation.rules.policy == [0.1, 0.3, 0.5, 0.7]
    assert method.lm_exits.lora.enabled is False and method.lm_exits.lora.target_modules == ["q_proj", "v_proj"]
    gpu = compose_train(["experiment=llama_consistentee_gpu", "backbone.pretrained_path=/models/llm"], tmp_path / "gpu")
    validate_config(gpu)
    assert gpu.method.lm_exits.cache.dtype == "bfloat16" and gpu.method.lm_exits.rank == 64
    local = compose_train([*LM, "data=jsonl_generation", f"data.train_file={jsonl_file(tmp_path)}"], tmp_path / "j")
    validate_config(local)
    assert OmegaConf.get_type(local.data) is PromptResponseData


def test_the_lora_node_takes_its_keys(tmp_path):
    cfg = compose_train([*LM, "method.lm_exits.lora.rank=4",
                         "method.lm_exits.lora.target_modules=[q_proj,k_proj,v_proj]"], tmp_path / "run")
    validate_config(cfg)
    assert typed(cfg.method).lm_exits.lora.target_modules == ["q_proj", "k_proj", "v_proj"]


# --- unknown keys and wrong types fail at compose, naming the key -------------------------------
def test_misspelt_lm_exits_key_gets_the_nearest_key(tmp_path):
    assert "method.lm_exits.polcy is not a known key: did you mean method.lm_exits.policy?" in \
        compose_error([*LM, "method.lm_exits.polcy.k=3"], tmp_path)
    assert "did you mean method.lm_exits.policy.tau?" in compose_error([*LM, "method.lm_exits.policy.tua=0.3"], tmp_path)
    assert "did you mean method.generation.max_new_tokens?" in \
        compose_error([*LM, "method.generation.max_new_token=8"], tmp_path)
    assert "did you mean method.generation.rules.saturation?" in \
        compose_error([*LM, "method.generation.rules.saturaton=[0.9]"], tmp_path)
    assert "did you mean method.lm_exits.lora.rank?" in compose_error([*LM, "method.lm_exits.lora.rnk=4"], tmp_path)
    assert "did you mean data.max_prompt_length?" in compose_error([*LM, "data.max_prompt_len=64"], tmp_path)


def test_misspelt_key_in_the_lm_exits_yaml_file(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    node = conf / "lm_exits" / "default.yaml"
    node.write_text(node.read_text().replace("exit_every:", "exit_evry:"))
    with initialize_config_dir(str(conf), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as err:
            compose("train", overrides=LM)
    assert "In 'lm_exits/default'" in str(err.value)
    assert "method.lm_exits.exit_evry is not a known key: did you mean method.lm_exits.exit_every?" in str(err.value)


@pytest.mark.parametrize("override,key", [
    ("method.lm_exits.policy.k=abc", "method.lm_exits.policy.k"),
    ("method.lm_exits.exit_every=every", "method.lm_exits.exit_every"),
    ("method.lm_exits.cache.batch_size=1.5", "method.lm_exits.cache.batch_size"),
    ("method.lm_exits.policy.normalize_advantages=maybe", "method.lm_exits.policy.normalize_advantages"),
    ("method.generation.max_new_tokens=many", "method.generation.max_new_tokens"),
    ("method.generation.rules.softmax_margin=[high]", "method.generation.rules.softmax_margin"),
    ("method.generation.rules.static=[2.5]", "method.generation.rules.static"),
    ("method.generation.rules.oracle=sometimes", "method.generation.rules.oracle"),
    ("method.generation.rules.confirmed_policy=[0.05]", "method.generation.rules.confirmed_policy"),
    ("method.lm_exits.confidence_tokens=many", "method.lm_exits.confidence_tokens"),
    ("method.lm_exits.lora.target_modules=q_proj", "method.lm_exits.lora.target_modules"),
    ("data.max_prompt_length=long", "data.max_prompt_length"),
])
def test_wrong_type_fails_at_compose_naming_the_key(override, key, tmp_path):
    assert key in compose_error([*LM, override], tmp_path)


# --- ranges and rules across keys, before anything loads ------------------------------------------
@pytest.mark.parametrize("overrides,expected", [
    (["method.lm_exits.policy.tau=1.0"], "method.lm_exits.policy.tau=1.0: must be in (0.0, 1.0)"),
    (["method.lm_exits.policy.tau=0"], "method.lm_exits.policy.tau=0.0: must be in (0.0, 1.0)"),
    (["method.lm_exits.policy.k=1"], "method.lm_exits.policy.k=1: must be >= 2; the baseline is the mean reward"),
    (["method.lm_exits.policy.alpha=-0.1"], "method.lm_exits.policy.alpha=-0.1: must be >= 0"),
    (["method.lm_exits.policy.hidden=0"], "method.lm_exits.policy.hidden=0: must be >= 1"),
    (["method.lm_exits.policy.task_target=gold"], "method.lm_exits.policy.task_target=gold: must be one of reference | full"),
    (["method.lm_exits.policy.task_term=reward"], "method.lm_exits.policy.task_term=reward: must be one of ce | correct"),
    (["method.lm_exits.policy.depth_term=hardnes"], "(did you mean hardness?)"),
    (["method.lm_exits.policy.eps_start=1.5"], "method.lm_exits.policy.eps_start=1.5: must be in [0.0, 1.0]"),
    (["method.lm_exits.policy.propagated.k=1"], "method.lm_exits.policy.propagated.k=1: must be >= 2; each position's "
                                                "baseline is the mean over the other rollouts"),
    (["method.lm_exits.policy.propagated.gamma=1.5"], "method.lm_exits.policy.propagated.gamma=1.5: must be in [0.0, 1.0]"),
    (["method.lm_exits.policy.propagated.epochs=-1"], "method.lm_exits.policy.propagated.epochs=-1: must be >= 0; 0 skips"),
    (["method.lm_exits.hardness.target=fulll"], "method.lm_exits.hardness.target=fulll: must be one of reference | full "
                                               "(did you mean full?)"),
    (["method.lm_exits.adapters.target=model"], "method.lm_exits.adapters.target=model: must be one of reference | full"),
    (["method.lm_exits.adapters.weights=linear"], "method.lm_exits.adapters.weights=linear: must be one of layer | uniform"),
    (["method.lm_exits.exit_every=0"], "method.lm_exits.exit_every=0: must be >= 1"),
    (["method.lm_exits.rank=0"], "method.lm_exits.rank=0: must be >= 1"),
    (["method.lm_exits.cross_fit=-1"], "method.lm_exits.cross_fit=-1: must be >= 0; 0 scores with the run's own exits"),
    (["method.lm_exits.cross_fit=1"], "method.lm_exits.cross_fit=1: one fold leaves no tokens to score out of fold"),
    (["method.lm_exits.cross_fit=2", "method.lm_exits.adapters.epochs=0"],
     "method.lm_exits.cross_fit=2: with method.lm_exits.adapters.epochs=0 the exits never see their training tokens"),
    (["method.lm_exits.cross_fit=2", "method.lm_exits.lora.enabled=true"],
     "method.lm_exits.cross_fit=2: the exits trained with LoRA cannot be retrained per fold without it"),
    (["method.lm_exits.cross_fit=2", "method.lm_exits.adapters.objective=distill"],
     "method.lm_exits.cross_fit=2: the folds' exits are trained with method.lm_exits.adapters.objective=ce"),
    (["method.lm_exits.evaluate_split=dev"], "method.lm_exits.evaluate_split=dev: must be one of train | validation | test"),
    (["method.lm_exits.cache.dtype=int8"], "method.lm_exits.cache.dtype=int8: must be one of float32 | float16 | bfloat16"),
    (["method.lm_exits.adapters.epochs=-1"], "method.lm_exits.adapters.epochs=-1: must be >= 0; 0 skips the stage"),
    (["method.lm_exits.classifier.lr=0"], "method.lm_exits.classifier.lr=0.0: must be > 0"),
    (["method.lm_exits.policy.batch_size=0"], "method.lm_exits.policy.batch_size=0: must be >= 1"),
    (["method.generation.max_new_tokens=0"], "method.generation.max_new_tokens=0: must be >= 1"),
    (["method.generation.kv=later"], "method.generation.kv=later: must be one of propagate | defer"),
    (["method.generation.batch_size=0"], "method.generation.batch_size=0: must be >= 1"),
    (["method.generation.max_prompts=0"], "method.generation.max_prompts=0: must be >= 1; or null for every prompt"),
    (["method.generation.split=dev"], "method.generation.split=dev: must be one of train | validation | test"),
    (["method.generation.calibration.split=test"], "method.generation.calibration.split=test: is also "
                                                   "method.generation.split, where the chosen points are measured"),
    (["method.generation.calibration.split=dev"], "method.generation.calibration.split=dev: must be one of train | "
                                                  "validation | test"),
    (["method.generation.calibration.level=1.5"], "method.generation.calibration.level=1.5: must be in [0.0, 1.0]"),
    (["method.generation.rules.static=[0,3]"], "method.generation.rules.static=[0, 3]: rule 'static': knob k=0 must "
                                               "be >= 1; null: every exit layer below the last"),
    (["method.generation.rules.softmax_margin=[0.5,1.2]"],
     "method.generation.rules.softmax_margin=[0.5, 1.2]: rule 'softmax_margin': knob threshold=1.2 must be <= 1.0"),
    (["method.generation.rules.classifier=[-0.1]"], "method.generation.rules.classifier=[-0.1]: rule 'classifier': "
                                                    "knob threshold=-0.1 must be >= 0.0"),
    (["method.generation.rules.saturation=[-1.5]"], "method.generation.rules.saturation=[-1.5]: rule 'saturation': "
                                                    "knob threshold=-1.5 must be >= -1.0"),
    (["method.generation.rules.policy=[1.5]"], "method.generation.rules.policy=[1.5]: rule 'policy': knob tau=1.5 "
                                               "must be <= 1.0"),
    (["method.lm_exits.confidence_tokens=-1"], "method.lm_exits.confidence_tokens=-1: must be >= 0; the head rows "
                                               "rule confirmed_policy reads"),
    (["method.generation.rules.confirmed_policy=[[0.05,0.35]]"],
     "method.generation.rules.confirmed_policy=[[0.05, 0.35]]: reads the exits' margin over the frequent tokens, and "
     "method.lm_exits.confidence_tokens=0 gives them none: set method.lm_exits.confidence_tokens=4096"),
    (["method.lm_exits.confidence_tokens=64", "method.generation.rules.confirmed_policy=[[0.05,1.35]]"],
     "method.generation.rules.confirmed_policy=[[0.05, 1.35]]: rule 'confirmed_policy': knob margin=1.35 must be <= 1.0"),
    (["method.lm_exits.confidence_tokens=64", "method.generation.rules.confirmed_policy=[[0.05,0.3,0.1]]"],
     "rule 'confirmed_policy': grid point [0.05, 0.3, 0.1] does not match its knobs ('tau', 'margin')"),
    (["backbone=tiny_llama"], "method.generation.rules.static=[15, 21, 24, 27]: rule 'static': k=15 is outside 1..4 "
                              "(the model has 4 layers)"),
    (["backbone=tiny_llama", "backbone.dtype=int8"], "backbone.dtype=int8: must be one of float32 | bfloat16 | float16"),
    (["backbone=tiny_llama", "backbone.family=bert"], "backbone.family=bert: must be one of llama | qwen2 | qwen3"),
    (["data.max_prompt_length=0"], "data.max_prompt_length=0: must be >= 1"),
    (["data.aspects=[method]"], "data.aspects=['method']: choose one or more of ['challenge', 'approach', 'outcome']"),
    (["data=jsonl_generation"], "data.train_file=None: the jsonl_generation option needs a file"),
    (["data.train_prompt_templates=[Say hello]"], "data.train_prompt_templates=Say hello: has no {abstract} field"),
    (["data.train_prompt_templates=['{title}: {abstract}']"], "data.train_prompt_templates={title}: {abstract}: is "
                                                              "not a template of {abstract} and {aspect} only"),
    (["data.train_prompt_templates=['Title: {abstract}']", "method.lm_exits.responses=reference"],
     "data.train_prompt_templates=['Title: {abstract}']: the extra training prompts have no reference text: set "
     "method.lm_exits.responses=model"),
])
def test_bad_decoder_setting_fails_validation_naming_the_key(overrides, expected, tmp_path):
    assert expected in problems([*LM, *overrides], tmp_path)


def test_a_saturation_threshold_may_be_negative(tmp_path):
    validate_config(compose_train([*LM, "method.generation.rules.saturation=[-0.5,0.9]",
                                   "method.generation.rules.static=null", "method.generation.rules.policy=null"],
                                  tmp_path / "run"))


def test_every_decoder_problem_is_reported_at_once(tmp_path):
    message = problems([*LM, "method.lm_exits.policy.tau=2", "method.lm_exits.policy.k=1",
                        "method.lm_exits.policy.alpha=-1", "method.generation.max_new_tokens=0",
                        "method.generation.rules.static=[0]"], tmp_path)
    assert "5 problem(s)" in message
    for key in ("policy.tau=2.0", "policy.k=1", "policy.alpha=-1.0", "max_new_tokens=0", "rules.static=[0]"):
        assert key in message


# --- the method, the backbone and the data must be of one kind -----------------------------------
@pytest.mark.parametrize("overrides,expected", [
    (["backbone=tiny_llama"], "backbone=tiny_llama: method=consistentee: a decoder LM runs with method=consistentee_lm"),
    (["method=finetune", "backbone=smollm2_135m"], "backbone=smollm2_135m: method=finetune: a decoder LM runs with"),
    (["data=aclsum"], "data=aclsum: method=consistentee: aclsum is prompt -> response data for method=consistentee_lm"),
    ([*LM, "backbone=tiny_bert"], "backbone=tiny_bert: method=consistentee_lm: choose a decoder backbone (kind: decoder)"),
    # the decoder experiment sets generation data keys: the method alone, on the default data
    (["~experiment", "+method=consistentee_lm", "backbone=tiny_llama"],
     "data=rotten_tomatoes: method=consistentee_lm: choose generation data: data=aclsum | jsonl_generation"),
])
def test_method_backbone_and_data_kinds_must_match(overrides, expected, tmp_path):
    assert expected in problems(overrides, tmp_path)


def test_both_mismatches_and_the_methods_own_problems_are_reported_together(tmp_path):
    message = problems(["~experiment", "+method=consistentee_lm", "backbone=tiny_bert", "method.lm_exits.policy.k=1"],
                       tmp_path)
    assert "3 problem(s)" in message and "backbone=tiny_bert" in message and "data=rotten_tomatoes" in message


def test_the_lm_method_fails_before_loading_anything(tmp_path, monkeypatch):
    import ee_lightning.app.train as train_module
    import ee_lightning.training.methods as methods_module
    import ee_lightning.training.lm_pipeline as lm_pipeline

    class Loaded(Exception):
        pass

    def never(*args, **kwargs):
        raise Loaded("loaded something")

    monkeypatch.setattr(lm_pipeline, "build_decoder", never)
    for name in ("build_datamodule", "load_tokenizer"):
        monkeypatch.setattr(methods_module, name, never)
    for bad in ([*LM, "method.lm_exits.policy.tau=1.5"], [*LM, "backbone=tiny_bert"], ["backbone=tiny_llama"]):
        with pytest.raises(ConfigError):
            train_module.train(compose_train(bad, tmp_path / "bad"))
    with pytest.raises(Loaded):  # a valid config gets as far as loading the decoder
        train_module.train(compose_train([*LM, "backbone=tiny_llama", "method.generation.rules.static=null"],
                                         tmp_path / "ok"))


def test_the_large_experiment_is_the_small_one_with_more_of_the_models_own_text(tmp_path):
    from ee_lightning.data.generation import ACLSumDataModule
    from tests.lm_fixtures import tiny_chat_tokenizer

    small, large = compose_train(LM, tmp_path / "small"), compose_train(["experiment=aclsum_consistentee_large"],
                                                                       tmp_path / "large")
    validate_config(large)
    assert large.method.lm_exits.responses == "model" and large.method.lm_exits.adapter == "block"
    assert large.method.lm_exits.policy.alpha == 0.02 and large.method.lm_exits.adapters.epochs == 1
    assert large.method.generation == small.method.generation  # the same evaluation as the small experiment
    data = {key: large.data[key] for key in ("aspects", "prompt_template", "train_prompt_templates",
                                              "max_train_samples", "max_eval_samples")}
    dm = ACLSumDataModule(tiny_chat_tokenizer(), max_prompt_length=16, max_response_length=4, **data)
    dm.setup()
    # 300 (paper, aspect) pairs and 100 training papers under each of six more instructions
    assert len(dm.dataset("train")) == 300 + 100 * 6 and len(dm.dataset("test")) == 16


# --- train_lm_exits' own config: typed and checked -------------------------------------------------
def test_lm_exits_config_types_a_plain_node():
    node = OmegaConf.load(CONF_DIR / "lm_exits" / "default.yaml")
    node.policy.k = 4
    config = lm_exits_config(node)
    assert isinstance(config, LMExitsConfig) and config.policy.k == 4 and config.lora.rank == 8
    assert isinstance(config.adapters.lr, float)
    assert lm_exits_config(config) == config  # a schema object passes through
    plain = OmegaConf.to_container(node)
    del plain["policy"]["tau"]
    with pytest.raises(ConfigError, match=r"lm_exits.policy.tau is missing"):
        lm_exits_config(plain)
    with pytest.raises(ConfigError, match=r"lm_exits.policy.k=1: must be >= 2"):
        lm_exits_config(OmegaConf.merge(node, {"policy": {"k": 1}}))
    with pytest.raises(ConfigKeyError, match="polcy"):
        lm_exits_config(OmegaConf.merge(node, {"polcy": {"k": 1}}))
    # a run directory written before cross_fit existed still loads, as it ran: the exits' own scores
    del plain["cross_fit"]
    plain["policy"]["tau"] = 0.5
    assert lm_exits_config(plain).cross_fit == 0
