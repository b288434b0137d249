"""Typed configs and validation: every shipped config composes and validates; every bad setting fails
at compose or validate time, before any data or model loads, naming the key."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from ee_lightning.app.validate import ConfigError, typed, validate_config
from ee_lightning.config.schema import ConsistentEEMethod, EncoderPolicyStage, FinetuneMethod, GlueData
from tests.conftest import CONF_DIR, DATA_OPTIONS, ROOT, compose_train, data_overrides

GROUPS = ["backbone", "head", "policy", "method", "report", "trainer", "logger", "callbacks", "debug",
          "hparams_search", "paths", "hydra/launcher"]
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def problems(overrides: list[str], tmp_path, config_name: str = "train") -> str:
    """Compose and validate; the ConfigError's message (fails the test if the config is valid)."""
    cfg = compose_train(overrides, tmp_path / "run", config_name)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    return str(err.value)


# --- every shipped config composes and validates ------------------------------------------------
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment, tmp_path):
    # the GPU decoder experiment needs its checkpoint folder named (nothing is downloaded)
    extra = ["backbone.pretrained_path=/models/llm"] if experiment == "llama_consistentee_gpu" else []
    cfg = compose_train([f"experiment={experiment}", *extra], tmp_path / "run")
    validate_config(cfg)
    assert cfg.task_name == experiment


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)] +
                         [("data", d) for d in DATA_OPTIONS])
def test_every_option_of_every_group_composes_and_validates(group, option, tmp_path):
    # Tiny backbone: the depth checks read its architecture; data options get small local files.
    overrides = data_overrides(option, tmp_path) if group == "data" else [f"{group}={option}"]
    if group == "method" and option == "consistentee_lm":  # the decoder LM method, on its own data
        overrides = ["experiment=aclsum_consistentee", *overrides]
    if group == "backbone" and OmegaConf.load(CONF_DIR / "backbone" / f"{option}.yaml").get("kind") == "decoder":
        # decoder LMs run with their own method; a GPU config needs its checkpoint folder named
        # (the tiny ones have 4 layers: the experiment's static exit layers 9..27 are SmolLM2's)
        overrides = ["experiment=aclsum_consistentee", *overrides, "backbone.pretrained_path=/models/llm"] \
            if option == "llama_3_8b" else ["experiment=aclsum_consistentee", *overrides,
                                            "method.generation.rules.static=null"]
    if group == "hydra/launcher":
        overrides.append("hparams_search=consistentee_optuna")
    tiny = [] if "experiment=aclsum_consistentee" in overrides else ["backbone=tiny_bert"]
    cfg = compose_train([*tiny, *overrides], tmp_path / "run")
    validate_config(cfg)


def test_the_schema_types_every_group(tmp_path):
    cfg = compose_train(["data=glue"], tmp_path / "run")
    assert OmegaConf.get_type(cfg.method) is ConsistentEEMethod  # the default experiment's method
    assert OmegaConf.get_type(cfg.method.policy) is EncoderPolicyStage
    assert OmegaConf.get_type(cfg.data) is GlueData
    for group in ("backbone", "head", "policy", "report"):
        assert OmegaConf.get_type(cfg[group]).__module__ == "ee_lightning.config.schema", group
    assert cfg.backbone.kind == "encoder"  # a schema default the yaml files leave out


def test_typed_gives_schema_objects(tmp_path):
    cfg = compose_train(["method.policy.k=4"], tmp_path / "run")
    config = typed(cfg)
    assert isinstance(config.method, ConsistentEEMethod) and config.method.policy.k == 4
    assert isinstance(config.method.finetune.lr, float) and isinstance(config.trainer, dict)
    assert isinstance(typed(cfg.method), ConsistentEEMethod)


def test_the_report_can_be_dropped(tmp_path):
    cfg = compose_train(["~report"], tmp_path / "run")
    assert cfg.report is None
    validate_config(cfg)


def test_eval_config_composes_and_validates(tmp_path):
    validate_config(compose_train(["ckpt_path=/some/run/last.ckpt", "tau=0.3"], tmp_path / "run", "eval"))


# --- the defaults list and the stage epochs are honest -------------------------------------------
def test_the_experiment_picks_the_method(tmp_path):
    assert "method" not in str(OmegaConf.load(CONF_DIR / "train.yaml").defaults)
    for experiment in EXPERIMENTS:
        first = OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml").defaults[0]
        while isinstance(first, str):  # an experiment built on another (/experiment/<name>) takes its method
            first = OmegaConf.load(CONF_DIR / f"{first.lstrip('/')}.yaml").defaults[0]
        chosen = first["/method"]
        cfg = compose_train([f"experiment={experiment}"], tmp_path / experiment)
        assert cfg.method.name == chosen
    assert compose_train(["method=finetune"], tmp_path / "f").method.name == "finetune"
    assert "method is missing (???): choose an option: method=consistentee | consistentee_lm | finetune" in \
        problems(["~experiment"], tmp_path)


def test_stage_epochs_come_from_the_method_only(tmp_path):
    assert "max_epochs" not in OmegaConf.load(CONF_DIR / "trainer" / "cpu.yaml")
    assert "max_epochs" not in compose_train([], tmp_path / "run").trainer
    assert compose_train(["debug=overfit"], tmp_path / "o").method.finetune.epochs == 20
    assert "trainer.max_epochs=3: each stage's epochs are method.finetune.epochs" in \
        problems(["+trainer.max_epochs=3"], tmp_path)


def test_checkpoint_callback_yaml_sets_nothing_the_code_overwrites():
    from ee_lightning.training.trainers import build_callbacks

    checkpoint = OmegaConf.load(CONF_DIR / "callbacks" / "default.yaml").model_checkpoint
    assert not {"dirpath", "filename", "auto_insert_metric_name"} & set(checkpoint)
    cfg = OmegaConf.create({"callbacks": {"model_checkpoint": checkpoint}})
    (callback,) = build_callbacks(cfg, "policy", ROOT / "run")
    assert isinstance(callback, ModelCheckpoint) and callback.dirpath == str(ROOT / "run" / "checkpoints" / "policy")


# --- bad settings fail before anything loads, naming the key ------------------------------------
def test_wrong_type_fails_at_compose_naming_the_key(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["method.policy.k=abc"], tmp_path / "run")
    assert "method.policy.k" in str(err.value) + str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="head.dropout"):
        try:
            compose_train(["head.dropout=high"], tmp_path / "run")
        except ConfigCompositionException as e:
            raise ConfigCompositionException(f"{e} {e.__cause__}") from e


@pytest.mark.parametrize("overrides,expected", [
    (["method.tau=1.5"], "method.tau=1.5: must be in (0.0, 1.0)"),
    (["method.tau=0"], "method.tau=0.0: must be in (0.0, 1.0)"),
    (["method.policy.k=1"], "method.policy.k=1: must be >= 2; the baseline is the mean reward"),
    (["method.policy.alpha=-0.1"], "method.policy.alpha=-0.1: must be >= 0"),
    (["method.finetune.lr=0"], "method.finetune.lr=0.0: must be > 0"),
    (["method.finetune.head_lr=-1e-3"], "method.finetune.head_lr=-0.001: must be > 0"),
    (["method.finetune.distill_weight=1"], "method.finetune.distill_weight=1.0: must be in [0.0, 1.0)"),
    (["method.finetune.distill_temperature=0"], "method.finetune.distill_temperature=0.0: must be > 0"),
    (["method.policy.lr=-1e-3"], "method.policy.lr=-0.001: must be > 0"),
    (["method.joint.enabled=true", "method.joint.lr_model=0"], "method.joint.lr_model=0.0: must be > 0"),
    (["method.joint.enabled=true", "method.joint.layer_loss_weight=-1"],
     "method.joint.layer_loss_weight=-1.0: must be >= 0"),
    (["method.finetune.epochs=0"], "method.finetune.epochs=0: must be >= 1"),
    (["method.policy.epochs=0"], "method.policy.epochs=0: must be >= 1"),
    (["method.policy.validate_every=0"], "method.policy.validate_every=0: must be >= 1"),
    (["method.policy.eps_start=1.5"], "method.policy.eps_start=1.5: must be in [0.0, 1.0]"),
    (["method.policy.eps_decay_steps=0"], "method.policy.eps_decay_steps=0: must be >= 1"),
    (["method.policy.task_term=reward"], "method.policy.task_term=reward: must be one of ce | correct"),
    (["method.policy.depth_term=hardnes"], "(did you mean hardness?)"),
    (["method.policy.sampler=greedy"], "method.policy.sampler=greedy: must be one of bernoulli | epsilon_greedy"),
    (["method.hardness.tolerance=-1"], "method.hardness.tolerance=-1.0: must be >= 0"),
    (["method.finetune.layer_weights=cubic"], "method.finetune.layer_weights=cubic: must be one of linear | uniform"),
    (["backbone=tiny_bert", "method.finetune.layer_weights=[1,2]"],
     "method.finetune.layer_weights=[1, 2]: has 2 weights but the backbone has 4 layers"),
    (["head.pooling=max"], "head.pooling=max: must be one of cls | mean"),
    (["head.dropout=1.0"], "head.dropout=1.0: must be in [0.0, 1.0)"),
    (["policy.hidden=0"], "policy.hidden=0: must be >= 1"),
    (["data.batch_size=0"], "data.batch_size=0: must be >= 1"),
    (["data=bbc_news", "data.test_fraction=0.6", "data.validation_fraction=0.5"],
     "data.validation_fraction + data.test_fraction=1.1: must be < 1"),
    (["data=glue", "data.task=sst3"], "data.task=sst3: must be one of"),
    (["report.rules=[policy,entropyy]"], "'entropyy' is not a rule; valid rules: entropy"),
    (["report.rules=[policy,saturation]"], "'saturation' reads signals that only generation computes (a decoder's "
                                           "method.generation.rules); valid rules here: entropy"),
    (["backbone=tiny_bert", "+report.grids.static=[2,9]"], "report.grids.static=[2, 9]: rule 'static': k=9 is outside 1..4"),
    (["+report.grids.maxprob=[1.5]"], "report.grids.maxprob=[1.5]: rule 'maxprob': knob threshold=1.5 must be <= 1.0"),
    (["report.rules=[policy]", "+report.grids.entropy=[0.1]"], "'entropy' is not in report.rules=['policy']"),
    (["report.latency.batch_sizes=[0]"], "report.latency.batch_sizes=[0]: give a non-empty list of batch sizes >= 1"),
    (["method=finetune", "init_from=/some/stage1.ckpt"], "init_from=/some/stage1.ckpt: a stage-1 checkpoint to start"),
    (["init_from=/no/such.ckpt"], "init_from=/no/such.ckpt: the file does not exist"),
    (["backbone=tiny_bert", "backbone.kind=seq2seq"], "backbone.kind=seq2seq: must be one of encoder | decoder"),
])
def test_bad_setting_fails_validation_naming_the_key(overrides, expected, tmp_path):
    assert expected in problems(overrides, tmp_path)


@pytest.mark.parametrize("data", [["data=csv", "data.train_file=train.tsv", "data.task_kind=regression"],
                                  ["data=glue", "data.task=stsb"]])
def test_rule_that_needs_classes_on_a_regression_task(data, tmp_path):
    message = problems([*data, "report.rules=[policy,entropy,maxprob,pcee,patience]"], tmp_path)
    assert "['entropy', 'maxprob', 'pcee'] need class probabilities, and this is a regression task" in message
    # rules=null picks the rules that apply; patience has a regression form
    validate_config(compose_train([*data, "report.rules=[policy,patience,static]"], tmp_path / "ok"))
    validate_config(compose_train([*data, "report.rules=null"], tmp_path / "null"))
    assert "report.grids.entropy=[0.1]: 'entropy' needs class probabilities" in \
        problems([*data, "report.rules=null", "+report.grids.entropy=[0.1]"], tmp_path)


def test_exits_within_a_pretrained_backbones_depth(tmp_path):
    """The depth of a pretrained_path comes from its config.json; no weights are read (there are none)."""
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 3}))
    base = ["backbone=bert_base", f"backbone.pretrained_path={checkpoint}"]
    assert "rule 'static': k=4 is outside 1..3" in problems([*base, "+report.grids.static=[4]"], tmp_path)
    validate_config(compose_train([*base, "+report.grids.static=[3]"], tmp_path / "ok"))
    assert "config.json does not exist" in problems(["backbone.pretrained_path=/no/such/folder"], tmp_path)


def test_every_problem_is_reported_at_once(tmp_path):
    message = problems(["method.tau=1.5", "method.policy.k=1", "head.pooling=max", "method.finetune.lr=-1"],
                       tmp_path)
    assert "4 problem(s)" in message
    for key in ("method.tau=1.5", "method.policy.k=1", "head.pooling=max", "method.finetune.lr=-1.0"):
        assert key in message


def test_eval_settings_are_validated(tmp_path):
    message = problems(["ckpt_path=/x.ckpt", "split=dev", "tau=1.0", "report.rules=[fast]"], tmp_path, "eval")
    assert "split=dev: must be one of train | validation | test" in message
    assert "tau=1.0: must be in (0.0, 1.0)" in message and "'fast' is not a rule" in message
    assert "neither ckpt_path nor model_dir given: give one" in problems([], tmp_path, "eval")
    assert "ckpt_path and model_dir given: give one" in problems(["ckpt_path=/x.ckpt", "model_dir=/m"], tmp_path, "eval")


def test_train_and_evaluate_fail_before_loading_anything(tmp_path, monkeypatch):
    import ee_lightning.app.evaluate_checkpoint as evaluate_module
    import ee_lightning.app.train as train_module
    import ee_lightning.training.methods as methods_module

    def never(*args, **kwargs):
        raise AssertionError("loaded something before validating the config")

    for name in ("build_datamodule", "load_tokenizer"):
        monkeypatch.setattr(methods_module, name, never)
    monkeypatch.setattr(evaluate_module, "load_checkpoint_model", never)
    cfg = compose_train(["method.tau=1.5"], tmp_path / "run")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="method.tau=1.5"):
        train_module.train(cfg)
    assert time.perf_counter() - started < 5
    with pytest.raises(ConfigError, match="split=dev"):
        evaluate_module.evaluate(compose_train(["ckpt_path=/x.ckpt", "split=dev"], tmp_path / "eval", "eval"))


# --- a misspelt key gets the nearest valid one -------------------------------------------------
def test_misspelt_override_gets_the_nearest_key(tmp_path):
    with pytest.raises(ConfigCompositionException, match=r"method.polcy is not a known key: did you mean method.policy\?"):
        compose_train(["method.polcy.k=3"], tmp_path / "run")
    with pytest.raises(ConfigCompositionException, match=r"did you mean method.policy.alpha\?"):
        compose_train(["method.policy.alpah=0.2"], tmp_path / "run")
    # a free-form node (the trainer's arguments) can take new keys with +, but a near miss is still named
    with pytest.raises(ConfigCompositionException, match=r"trainer.acelerator: did you mean trainer.accelerator\?"):
        compose_train(["trainer.acelerator=cpu"], tmp_path / "run")


def test_misspelt_key_in_a_yaml_file_gets_the_nearest_key(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    head = conf / "head" / "default.yaml"
    head.write_text(head.read_text().replace("pooling:", "poolng:"))
    with initialize_config_dir(str(conf), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as err:
            compose("train")
    assert "In 'head/default'" in str(err.value)
    assert "head.poolng is not a known key: did you mean head.pooling?" in str(err.value)


def test_console_script_suggests_the_nearest_key():
    out = subprocess.run([sys.executable, "-m", "ee_lightning.app.cli", "method.polcy.k=3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "did you mean method.policy?" in out.stderr, out.stderr


def test_schema_defaults_are_not_repeated_in_the_yaml_files():
    """A value lives once: a schema default is one the yaml files leave out."""
    from dataclasses import MISSING as NO_DEFAULT, fields

    from ee_lightning.config import schema

    for group, cls in (("backbone", schema.BackboneConfig), ("head", schema.HeadConfig),
                       ("policy", schema.PolicyNetConfig)):
        with_default = {f.name: f.default for f in fields(cls) if f.default is not NO_DEFAULT and f.default != "???"}
        for option in options(group):
            yaml = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
            # a yaml may set such a field to another value (a decoder's kind), never to the default
            assert not {k for k, v in with_default.items() if k in yaml and yaml[k] == v}, (group, option)
    assert FinetuneMethod in ConsistentEEMethod.__mro__
