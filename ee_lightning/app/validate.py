"""Checks of a composed config before any data or model loads.

Composition (schema.py) already rejects unknown keys and wrong types. `validate_config` checks what a
type cannot say: ranges (tau in (0, 1), lr > 0, ...), choices (pooling, task_term, ...), and rules
across fields (k >= 2 with the mean baseline, a static exit within the backbone's depth, a rule that
needs class probabilities on a regression task). It reports every problem of the config at once, each
naming the key, the bad value and the fix, in one ConfigError.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ee_lightning.config.schema import (DATA_SCHEMAS, DECODER_METHODS, GENERATION_DATA_SCHEMAS, METHOD_SCHEMAS,
                                        ACLSumData, ConsistentEEMethod, CsvData, FinetuneMethod, GlueData,
                                        LMExitsConfig, PromptResponseData)

from ee_lightning.data.glue import MNLI_EVAL
from ee_lightning.evaluation.generation_eval import GENERATION_KV
from ee_lightning.exits.distill import OBJECTIVES as ADAPTER_OBJECTIVES
from ee_lightning.exits.distill import VOCABULARIES as DISTILL_VOCABULARIES
from ee_lightning.exits.lm_targets import HARDNESS_TARGETS as TOKEN_TARGETS
from ee_lightning.exits.lm_targets import WEIGHT_SCHEMES as ADAPTER_WEIGHTS
from ee_lightning.inference.lm_cache import DTYPES
from ee_lightning.modeling.heads import POOLINGS
from ee_lightning.modeling.lm_exits import ADAPTERS as ADAPTER_KINDS
from ee_lightning.tasks import TASK_KINDS
from ee_lightning.training.lm_responses import RESPONSE_SOURCES
from ee_lightning.training.systems.finetune import LAYER_WEIGHTS

CACHE_DTYPES = tuple(DTYPES)
BACKBONE_KINDS = ("encoder", "decoder")
SPLITS = ("train", "validation", "test")
DECODER_DTYPES = ("float32", "bfloat16", "float16")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the config tree (inside the wheel; a link in a checkout)


class ConfigError(ValueError):
    """Every problem of a config, one per line; each names the key, the value and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"the config has {len(self.problems)} problem(s); nothing was loaded:\n{lines}")


_MISSING = object()


@dataclass
class Checker:
    """Collects problems; `depth` (backbone layers) and `regression` when the config tells them."""

    problems: list[str] = field(default_factory=list)
    depth: int | None = None
    regression: bool | None = None

    def add(self, key: str, value, fix: str) -> None:
        self.problems.append(f"{key}={_show(value)}: {fix}")

    def number(self, node, key: str, prefix: str, *, low=None, high=None, low_open=False, high_open=False,
               integer=False, optional=False, why: str = "") -> None:
        """`node[key]` is a number in the given range (bounds closed unless *_open)."""
        value = _value(node, key)
        if value is _MISSING or (optional and value is None):
            return
        name = f"{prefix}{key}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, float) and math.isnan(value)) or (integer and not float(value).is_integer()):
            self.add(name, value, f"must be {'an integer' if integer else 'a number'}{' or null' if optional else ''}")
            return
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            left = "(" if low_open else "["
            right = ")" if high_open else "]"
            span = (f"in {left}{low}, {high}{right}" if low is not None and high is not None
                    else f"{'>' if low_open else '>='} {low}" if low is not None else f"{'<' if high_open else '<='} {high}")
            self.add(name, value, f"must be {span}{'; ' + why if why else ''}")

    def choice(self, node, key: str, prefix: str, choices, optional=False) -> None:
        value = _value(node, key)
        if value is _MISSING or (optional and value is None) or value in choices:
            return
        self.add(f"{prefix}{key}", value, f"must be one of {' | '.join(choices)}{_did_you_mean(value, choices)}")


# ---------------------------------------------------------------------------------- entry points
def validate_config(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every problem of an ee-train or ee-eval config; return if none."""
    check = Checker()
    for key in missing_keys(cfg):
        options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml")) if "." not in key else []
        fix = (f"choose an option: {key}={' | '.join(options)}" if options
               else f"set it in its yaml file or on the command line ({key}=VALUE)")
        check.problems.append(f"{key} is missing (???): {fix}")
    if "ckpt_path" in cfg:
        check_eval(cfg, check)
    else:
        check_train(cfg, check)
    if check.problems:
        raise ConfigError(check.problems)


def typed(cfg: DictConfig):
    """The composed config as schema objects (`typed(cfg).method.policy.k` is an int of a PolicyStage),
    or one group node as its schema object (`typed(cfg.method)`). Untyped groups stay dicts."""
    if "hydra" in cfg:  # the compose API keeps Hydra's own node; hydra.main removes it
        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["hydra"]
    return OmegaConf.to_object(cfg)


def lm_exits_config(node) -> LMExitsConfig:
    """An `lm_exits` node as its schema object, checked: the composed `method.lm_exits`, or a dict /
    DictConfig holding every key (e.g. conf/lm_exits/default.yaml, loaded and changed). An unknown key
    or a wrong type raises OmegaConf's error naming it; missing keys and bad values one ConfigError."""
    merged = OmegaConf.merge(OmegaConf.structured(LMExitsConfig), node)
    check = Checker()
    for key in _missing_in(merged, "lm_exits"):
        check.problems.append(f"{key} is missing (???): set it (conf/lm_exits/default.yaml has every key)")
    check_lm_exits(merged, check, "lm_exits.")
    if check.problems:
        raise ConfigError(check.problems)
    return OmegaConf.to_object(merged)


def missing_keys(cfg: DictConfig) -> list[str]:
    """`???` values in our groups (not in Hydra's or the third-party nodes)."""
    found = []
    for key in cfg:
        if key in ("hydra", "trainer", "logger", "callbacks", "paths"):
            continue
        found += _missing_in(cfg._get_node(key), str(key))
    return found


def _missing_in(node, path: str) -> list[str]:
    """Walk nodes without resolving interpolations (paths need Hydra's runtime; they are not ours)."""
    if node._is_missing():
        return [path]
    if isinstance(node, DictConfig) and not node._is_none():
        return [m for k in node.keys() for m in _missing_in(node._get_node(k), f"{path}.{k}")]
    return []


# ---------------------------------------------------------------------------------- ee-train
def check_train(cfg: DictConfig, check: Checker) -> None:
    backbone, data, method = _value(cfg, "backbone"), _value(cfg, "data"), _value(cfg, "method")
    decoder_method = method is not _MISSING and method.get("name") in DECODER_METHODS
    method_name = method.get("name") if method is not _MISSING else "???"
    decoder_backbone = backbone is not _MISSING and backbone.get("kind") == "decoder"
    if backbone is not _MISSING and decoder_backbone != decoder_method:
        fix = ("choose a decoder backbone (kind: decoder), e.g. backbone=smollm2_135m" if decoder_method else
               "a decoder LM runs with method=consistentee_lm, e.g. experiment=aclsum_consistentee")
        check.add("backbone", backbone.get("name"), f"method={method_name}: {fix}")
    generation_data = data is not _MISSING and OmegaConf.get_type(data) in GENERATION_DATA_SCHEMAS.values()
    if data is not _MISSING and method is not _MISSING and generation_data != decoder_method:
        fix = (f"choose generation data: data={' | '.join(GENERATION_DATA_SCHEMAS)}" if decoder_method else
               f"{data.get('name')} is prompt -> response data for method=consistentee_lm; choose "
               f"data={' | '.join(DATA_SCHEMAS)}")
        check.add("data", data.get("name"), f"method={method_name}: {fix}")
    if decoder_method:
        check_decoder_train(cfg, check, backbone if decoder_backbone else _MISSING,
                            data if generation_data else _MISSING)
        return
    if backbone is not _MISSING and not decoder_backbone:
        check_backbone(backbone, check)
    if data is not _MISSING and not generation_data:
        check_data(data, check)
    if method is not _MISSING:
        check_method(method, cfg, check)
    if _value(cfg, "head") is not _MISSING:
        check.choice(cfg.head, "pooling", "head.", POOLINGS)
        check.number(cfg.head, "dropout", "head.", low=0.0, high=1.0, high_open=True)
    if _value(cfg, "policy") is not _MISSING:
        check.number(cfg.policy, "hidden", "policy.", low=1, integer=True)
    if _value(cfg, "report") not in (_MISSING, None):
        check_report(cfg.report, check)
    trainer = cfg.get("trainer") or {}
    if trainer.get("max_epochs") is not None:
        check.add("trainer.max_epochs", trainer.get("max_epochs"),
                  "each stage's epochs are method.finetune.epochs, method.policy.epochs and method.joint.epochs; "
                  "set those instead")


# ---------------------------------------------------------------------------------- decoders
def check_decoder_train(cfg: DictConfig, check: Checker, backbone, data) -> None:
    """method=consistentee_lm (training/lm_pipeline.py): the decoder backbone (when it is one), the
    generation data (when it is such), the exits' stages and the generation grids. What depends on the
    number of layers (exit_every below it) is checked when the model loads (modeling/lm_exits.py)."""
    if backbone is not _MISSING:
        check_decoder_backbone(backbone, check)
    if data is not _MISSING:
        check_generation_data(data, check)
    method = cfg.method
    check_lm_exits(method.lm_exits, check, "method.lm_exits.")
    extra = _value(data, "train_prompt_templates") if data is not _MISSING else _MISSING
    if extra not in (_MISSING, None) and len(extra) and _value(method.lm_exits, "responses") != "model":
        check.add("data.train_prompt_templates", list(extra),
                  "the extra training prompts have no reference text: set method.lm_exits.responses=model (their "
                  "text is then the model's own response), or data.train_prompt_templates=[]")
    # random weights: the depth is in the config (a checkpoint's is checked when it loads)
    architecture = _value(backbone, "architecture") if backbone is not _MISSING else _MISSING
    depth = (_layers(architecture) if architecture not in (_MISSING, None) and _value(backbone, "pretrained_path") is None
             else None)
    check_generation(method.generation, check, depth)
    confirmed = _value(method.generation.rules, "confirmed_policy")
    if confirmed not in (_MISSING, None) and len(confirmed) and not _value(method.lm_exits, "confidence_tokens"):
        check.add("method.generation.rules.confirmed_policy", [list(v) for v in confirmed],
                  "reads the exits' margin over the frequent tokens, and method.lm_exits.confidence_tokens=0 gives "
                  "them none: set method.lm_exits.confidence_tokens=4096, or drop this grid (null)")


def check_decoder_backbone(backbone: DictConfig, check: Checker) -> None:
    check.choice(backbone, "dtype", "backbone.", DECODER_DTYPES)
    path = _value(backbone, "pretrained_path")
    if isinstance(path, str) and path.startswith("package:"):
        from ee_lightning.modeling.backbones.decoder_build import DecoderError, package_gguf

        try:
            package_gguf(path.split(":", 1)[1])
        except DecoderError as err:
            check.add("backbone.pretrained_path", path, str(err))
    if path is None:  # random weights: the family builds the model (a checkpoint's own config says it)
        from ee_lightning.modeling.backbones.decoders import SUPPORTED_FAMILIES

        check.choice(backbone, "family", "backbone.", SUPPORTED_FAMILIES)


def check_generation_data(data: DictConfig, check: Checker) -> None:
    p = "data."
    for key in ("batch_size", "eval_batch_size", "max_prompt_length", "max_response_length"):
        check.number(data, key, p, low=1, integer=True)
    check.number(data, "num_workers", p, low=0, integer=True)
    for key in ("max_train_samples", "max_eval_samples"):
        check.number(data, key, p, low=1, integer=True, optional=True, why="or null for every row")
    schema = OmegaConf.get_type(data)
    if schema is ACLSumData:
        from ee_lightning.data.generation import ACLSUM_ASPECTS, extra_template_problem

        aspects = _value(data, "aspects")
        unknown = [a for a in (aspects if aspects not in (_MISSING, None) else []) if a not in ACLSUM_ASPECTS]
        if unknown or aspects in (None, []):
            check.add(p + "aspects", aspects, f"choose one or more of {list(ACLSUM_ASPECTS)}")
        templates = _value(data, "train_prompt_templates")
        for template in templates if templates not in (_MISSING, None) else []:
            problem = extra_template_problem(str(template))
            if problem:
                check.add(p + "train_prompt_templates", template, problem)
    if schema is PromptResponseData:
        if not _value(data, "train_file"):
            check.add(p + "train_file", None, "the jsonl_generation option needs a file of prompt -> response rows: "
                                              "data.train_file=PATH (.jsonl or .json)")
        for key in ("validation_fraction", "test_fraction"):
            check.number(data, key, p, low=0.0, high=1.0, high_open=True)


def check_lm_exits(node: DictConfig, check: Checker, p: str = "") -> None:
    """The `lm_exits` node (conf/lm_exits/default.yaml); `p` its key's prefix (method.lm_exits.)."""
    check.number(node, "exit_every", p, low=1, integer=True)
    check.number(node, "rank", p, low=1, integer=True)
    check.choice(node, "adapter", p, ADAPTER_KINDS)
    check.choice(node, "evaluate_split", p, SPLITS, optional=True)
    check.choice(node, "responses", p, RESPONSE_SOURCES)
    check.choice(node.cache, "dtype", f"{p}cache.", CACHE_DTYPES)
    check.number(node.cache, "batch_size", f"{p}cache.", low=1, integer=True)
    adapters = node.adapters
    check.choice(adapters, "weights", f"{p}adapters.", ADAPTER_WEIGHTS)
    check.choice(adapters, "target", f"{p}adapters.", TOKEN_TARGETS)
    check.choice(adapters, "objective", f"{p}adapters.", ADAPTER_OBJECTIVES)
    check.number(adapters, "top_k", f"{p}adapters.", low=1, integer=True, why="the teacher's tokens kept per position")
    check.choice(adapters, "vocabulary", f"{p}adapters.", DISTILL_VOCABULARIES)
    check.choice(node.hardness, "target", f"{p}hardness.", TOKEN_TARGETS)
    check_cross_fit(node, check, p)
    check.number(node, "confidence_tokens", p, low=0, integer=True,
                 why="the head rows rule confirmed_policy reads (e.g. 4096); 0: none")
    for stage in ("adapters", "policy", "classifier"):  # epochs=0 skips a stage
        q = f"{p}{stage}."
        check.number(node[stage], "epochs", q, low=0, integer=True, why="0 skips the stage")
        check.number(node[stage], "lr", q, low=0.0, low_open=True)
        check.number(node[stage], "batch_size", q, low=1, integer=True)
    policy, q = node.policy, f"{p}policy."
    check_reinforce(policy, check, q)
    check.number(policy, "hidden", q, low=1, integer=True)
    check.number(policy, "tau", q, low=0.0, high=1.0, low_open=True, high_open=True,
                 why="the greedy exit is the first exit whose exit probability exceeds tau")
    check.choice(policy, "task_target", q, TOKEN_TARGETS)
    propagated, q = policy.propagated, f"{q}propagated."
    check.number(propagated, "epochs", q, low=0, integer=True, why="0 skips the stage")
    check.number(propagated, "lr", q, low=0.0, low_open=True)
    check.number(propagated, "batch_size", q, low=1, integer=True, why="responses per step")
    check.number(propagated, "k", q, low=2, integer=True, why="each position's baseline is the mean over the other rollouts")
    check.number(propagated, "later_weight", q, low=0.0)
    check.number(propagated, "gamma", q, low=0.0, high=1.0, why="the discount of later tokens' agreement")
    check_lora(_value(node, "lora"), check, f"{p}lora.")
    draft = _value(node, "draft_policy")
    if isinstance(draft, DictConfig):
        check_draft_policy(draft, check, _value(node, "exit_every"), f"{p}draft_policy.")


def check_cross_fit(node: DictConfig, check: Checker, p: str) -> None:
    """`cross_fit`: 0, or K >= 2 folds whose exits the lm_adapters stage's own recipe can train."""
    folds = _value(node, "cross_fit")
    check.number(node, "cross_fit", p, low=0, integer=True, why="0 scores with the run's own exits")
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 1:
        return
    if folds == 1:
        check.add(f"{p}cross_fit", folds, "one fold leaves no tokens to score out of fold: use 0 (the run's own "
                  "exits' scores) or K >= 2 folds")
        return
    adapters = node.adapters
    if _value(adapters, "epochs") == 0:
        check.add(f"{p}cross_fit", folds, f"with {p}adapters.epochs=0 the exits never see their training tokens, so "
                  "their own scores are already out of sample: set cross_fit=0")
    if _value(adapters, "objective") == "distill":
        check.add(f"{p}cross_fit", folds, f"the folds' exits are trained with {p}adapters.objective=ce; with distill "
                  "set cross_fit=0")
    lora = _value(node, "lora")
    if isinstance(lora, DictConfig) and lora.get("enabled"):
        check.add(f"{p}cross_fit", folds, "the exits trained with LoRA cannot be retrained per fold without it: "
                  f"set cross_fit=0 or {p}lora.enabled=false")


def check_draft_policy(node: DictConfig, check: Checker, exit_every, p: str) -> None:
    """The `draft_policy` node (verify mode's stop rule); its draft layer against the exits' spacing (the
    model's depth is checked when the stage starts: training/lm_draft.py)."""
    from ee_lightning.exits.rl import ESTIMATORS

    check.number(node, "epochs", p, low=0, integer=True, why="0 skips the stage")
    check.number(node, "draft_layer", p, low=1, integer=True, optional=True,
                 why="an exit layer below the last, or null for the deepest such exit")
    layer = _value(node, "draft_layer")
    if isinstance(layer, int) and isinstance(exit_every, int) and exit_every >= 1 and layer >= 1 and layer % exit_every:
        check.add(f"{p}draft_layer", layer, f"has no exit: the exits sit on the multiples of exit_every="
                  f"{exit_every} (and the last layer); choose a multiple below the last, or null")
    check.number(node, "max_drafts", p, low=1, integer=True, why="drafts per round at most")
    check.number(node, "hidden", p, low=1, integer=True)
    check.number(node, "tau", p, low=0.0, high=1.0, low_open=True, high_open=True,
                 why="a round stops after a draft whose stop probability exceeds tau")
    check.choice(node, "estimator", p, ESTIMATORS)
    if _value(node, "estimator") == "reinforce":
        check.number(node, "k", p, low=2, integer=True, why="the baseline is the mean reward of the k rollouts")
    else:
        check.number(node, "k", p, low=1, integer=True)
    check.number(node, "lr", p, low=0.0, low_open=True)
    check.number(node, "batch_size", p, low=1, integer=True, why="round starts per step")


def check_lora(lora, check: Checker, p: str = "method.lm_exits.lora.") -> None:
    """The `lora` node, when enabled: ranges, a list of target names, and peft installed (whether the
    names exist in the backbone is known once it is built: training/lm_lora.py checks that)."""
    if not isinstance(lora, DictConfig) or not lora.get("enabled"):
        return
    check.number(lora, "rank", p, low=1, integer=True)
    check.number(lora, "alpha", p, low=0, low_open=True)
    check.number(lora, "dropout", p, low=0.0, high=1.0, high_open=True)
    check.number(lora, "epochs", p, low=1, integer=True, why="set enabled=false to skip LoRA")
    check.number(lora, "lr", p, low=0, low_open=True)
    check.number(lora, "batch_size", p, low=1, integer=True)
    targets = _value(lora, "target_modules")
    if not isinstance(targets, ListConfig) or not targets or not all(isinstance(t, str) for t in targets):
        check.add(f"{p}target_modules", targets, "must be a non-empty list of Linear module names inside the "
                  "layers, e.g. [q_proj, v_proj] (Llama / Qwen / Mistral) or [c_attn] (GPT-2)")
    if importlib.util.find_spec("peft") is None:
        from ee_lightning.training.lm_lora import PEFT_REQUIREMENT

        check.add(f"{p}enabled", True, f"needs peft, which is not installed: run `pip install {PEFT_REQUIREMENT}` "
                  "(or `pip install -e '.[lora]'`), or set it to false")


def check_generation(node: DictConfig, check: Checker, depth: int | None = None) -> None:
    from ee_lightning.exits.rules import rule_from_grid

    p = "method.generation."
    check.choice(node, "split", p, SPLITS)
    check.number(node, "max_prompts", p, low=1, integer=True, optional=True, why="or null for every prompt")
    check.number(node, "batch_size", p, low=1, integer=True)
    check.number(node, "max_new_tokens", p, low=1, integer=True)
    check.choice(node, "kv", p, GENERATION_KV)
    check.number(node, "timed_per_batch", p, low=1, integer=True, optional=True,
                 why="prompts of each batch timed one at a time under kv=defer; null: every prompt")
    calibration, c = node.calibration, f"{p}calibration."
    check.choice(calibration, "split", c, SPLITS, optional=True)
    if _value(calibration, "split") is not None and _value(calibration, "split") == _value(node, "split"):
        check.add(f"{c}split", calibration.split, f"is also {p}split, where the chosen points are measured: choose "
                  "on another split (validation), or null for no calibration")
    check.number(calibration, "max_prompts", c, low=1, integer=True, optional=True, why="or null for every prompt")
    check.number(calibration, "level", c, low=0.0, high=1.0, why="the ROUGE-L against the full output to keep")
    # Each knob as the rule itself checks it (exits/rules.py: thresholds within their signal's range,
    # static layers within 1..depth; without a known depth, checked again once the model is loaded).
    rules, q = node.rules, f"{p}rules."
    for name in ("policy", "softmax_margin", "saturation", "classifier", "static", "confirmed_policy"):
        grid = _value(rules, name)
        for value in (grid if grid not in (_MISSING, None) else []):
            try:
                rule_from_grid(name, value, num_layers=depth)
            except ValueError as err:
                hint = "; null: every exit layer below the last" if name == "static" else ""
                check.add(q + name, list(grid), f"{err}{hint}")
                break


def check_backbone(backbone: DictConfig, check: Checker) -> None:
    check.choice(backbone, "kind", "backbone.", BACKBONE_KINDS)
    check.depth = backbone_depth(backbone, check)


def backbone_depth(backbone: DictConfig, check: Checker | None = None) -> int | None:
    """The backbone's number of layers when the config tells it: the checkpoint's config.json (read,
    no weights loaded) for a pretrained_path, else `architecture`; None when neither says."""
    path = _value(backbone, "pretrained_path")
    if path not in (_MISSING, None):
        from ee_lightning.modeling.backbones.build import resolve_path

        try:
            config_file = resolve_path(path) / "config.json"
        except ValueError as err:  # BackboneError: a package: that is not installed
            if check is not None:
                check.add("backbone.pretrained_path", path, str(err))
            return None
        if not config_file.is_file():
            if check is not None:
                check.add("backbone.pretrained_path", path,
                          f"{config_file} does not exist; point it at a local transformers checkpoint folder")
            return None
        return _layers(json.loads(config_file.read_text()))
    architecture = _value(backbone, "architecture")
    return _layers(architecture) if architecture not in (_MISSING, None) else None


def _layers(config) -> int | None:
    for key in ("num_hidden_layers", "n_layers", "n_layer", "num_layers"):  # n_layer: GPT-2
        if isinstance(config.get(key), int):
            return int(config.get(key))
    return None


def check_data(data: DictConfig, check: Checker) -> None:
    schema = OmegaConf.get_type(data)
    if schema not in DATA_SCHEMAS.values():
        name = data.get("name", "?")
        check.add("data", name, "this data option has no schema: register one in ee_lightning/config/schema.py "
                                "(DATA_SCHEMAS) and name it first in its yaml file's defaults list")
        return
    p = "data."
    for key in ("batch_size", "eval_batch_size"):
        check.number(data, key, p, low=1, integer=True)
    check.number(data, "max_length", p, low=1, integer=True, optional=True)
    check.number(data, "num_workers", p, low=0, integer=True)
    for key in ("max_train_samples", "max_eval_samples"):
        check.number(data, key, p, low=1, integer=True, optional=True, why="or null for every row")
    fractions = [key for key in ("validation_fraction", "test_fraction") if key in data]
    for key in fractions:
        check.number(data, key, p, low=0.0, high=1.0, high_open=True)
    values = [_value(data, key) for key in fractions]
    if len(values) == 2 and all(isinstance(v, (int, float)) for v in values) and sum(values) >= 1:
        check.add("data.validation_fraction + data.test_fraction", sum(values), "must be < 1 (train needs rows)")
    for key in ("test_size", "validation_size"):
        if key in data:
            check.number(data, key, p, low=1, integer=True)
    if "mnli_eval" in data:
        check.choice(data, "mnli_eval", p, MNLI_EVAL)
    if "task_kind" in data:
        check.choice(data, "task_kind", p, TASK_KINDS)
        if _value(data, "task_kind") in TASK_KINDS:
            check.regression = _value(data, "task_kind") == "regression"
    if schema is CsvData and not _value(data, "train_file"):
        check.add("data.train_file", None, "the csv option needs a training file: data.train_file=PATH")
    if schema is GlueData:
        from ee_lightning.data.glue import GLUE_TASKS, glue_task

        try:
            check.regression = glue_task(_value(data, "task")).kind == "regression"
        except ValueError:
            check.choice(data, "task", p, list(GLUE_TASKS))


def check_method(method: DictConfig, cfg: DictConfig, check: Checker) -> None:
    schema = OmegaConf.get_type(method)
    if schema not in METHOD_SCHEMAS.values():
        check.add("method", method.get("name", "?") if isinstance(method, DictConfig) else method,
                  f"choose method={' | '.join(METHOD_SCHEMAS)} (or an experiment=... that picks one)")
        return
    check.choice(method, "name", "method.", [n for n, s in METHOD_SCHEMAS.items() if s is schema])
    if issubclass(schema, FinetuneMethod):
        check_finetune(method.finetune, check)
    if issubclass(schema, ConsistentEEMethod):
        check.number(method, "tau", "method.", low=0.0, high=1.0, low_open=True, high_open=True,
                     why="ConsistentEE exits at the first layer whose exit probability exceeds tau")
        check.number(method.hardness, "tolerance", "method.hardness.", low=0.0)
        check_policy_stage(method.policy, check)
        check.number(method.choose, "tolerance", "method.choose.", low=0.0, optional=True,
                     why="the reported points are the most validation saving within this of the full model's metric")
        check_frontier(method.frontier, check)
        joint = method.joint
        if _value(joint, "enabled") is True:
            check.number(joint, "epochs", "method.joint.", low=1, integer=True)
            check.number(joint, "lr_model", "method.joint.", low=0.0, low_open=True)
            check.number(joint, "lr_policy", "method.joint.", low=0.0, low_open=True)
            check.number(joint, "layer_loss_weight", "method.joint.", low=0.0)
    init_from = _value(cfg, "init_from")
    if init_from not in (_MISSING, None):
        if not issubclass(schema, ConsistentEEMethod):
            check.add("init_from", init_from, "a stage-1 checkpoint to start ConsistentEE from; method=finetune "
                                              "would ignore it: drop init_from or use method=consistentee")
        elif not Path(str(init_from)).is_file():
            check.add("init_from", init_from, "the file does not exist; give the path of a stage-1 .ckpt file")


def check_finetune(stage: DictConfig, check: Checker) -> None:
    p = "method.finetune."
    check.number(stage, "epochs", p, low=1, integer=True)
    check.number(stage, "lr", p, low=0.0, low_open=True)
    check.number(stage, "weight_decay", p, low=0.0)
    check.number(stage, "warmup_ratio", p, low=0.0, high=1.0, high_open=True)
    check.number(stage, "head_lr", p, low=0.0, low_open=True, optional=True)
    check.number(stage, "distill_weight", p, low=0.0, high=1.0, high_open=True)
    check.number(stage, "distill_temperature", p, low=0.0, low_open=True)
    weights = _value(stage, "layer_weights")
    if weights is _MISSING:
        return
    if isinstance(weights, str):
        check.choice(stage, "layer_weights", p, LAYER_WEIGHTS)
        return
    numbers = list(weights) if isinstance(weights, (list, ListConfig)) else None
    fix = f"give {'a list of ' + str(check.depth) if check.depth else 'a list of one per layer'} non-negative numbers " \
          "(not all zero), or linear | uniform"
    if numbers is None or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in numbers) \
            or sum(numbers) <= 0:
        check.add(p + "layer_weights", weights, fix)
    elif check.depth is not None and len(numbers) != check.depth:
        check.add(p + "layer_weights", weights, f"has {len(numbers)} weights but the backbone has {check.depth} "
                                                 f"layers; {fix}")


def check_reinforce(stage: DictConfig, check: Checker, p: str) -> None:
    """The REINFORCE settings an encoder's and a decoder's policy stage share (exits.rl)."""
    from ee_lightning.exits.rl import DEPTH_TERMS, ESTIMATORS, SAMPLERS, TASK_TERMS

    check.number(stage, "k", p, low=2, integer=True,
                 why="the baseline is the mean reward of the k rollouts, so with one rollout every advantage "
                     "is 0 and the policy never learns")
    check.number(stage, "alpha", p, low=0.0)
    check.choice(stage, "task_term", p, TASK_TERMS)
    check.choice(stage, "depth_term", p, DEPTH_TERMS)
    check.choice(stage, "sampler", p, SAMPLERS)
    check.number(stage, "eps_start", p, low=0.0, high=1.0)
    check.number(stage, "eps_end", p, low=0.0, high=1.0)
    check.number(stage, "eps_decay_steps", p, low=1, integer=True)
    check.number(stage, "entropy_bonus", p, low=0.0)
    check.choice(stage, "estimator", p, ESTIMATORS)


def check_frontier(frontier: DictConfig, check: Checker) -> None:
    p = "method.frontier."
    check.number(frontier, "seeds", p, low=1, integer=True)
    alphas = _value(frontier, "alphas")
    if alphas is not _MISSING and any(not isinstance(a, (int, float)) or a < 0 for a in alphas):
        check.add(p + "alphas", list(alphas), "give non-negative depth costs, e.g. [0.05, 0.1, 0.15], or [] to skip "
                                              "the frontier")


def check_policy_stage(stage: DictConfig, check: Checker) -> None:
    p = "method.policy."
    check.number(stage, "epochs", p, low=1, integer=True)
    check.number(stage, "lr", p, low=0.0, low_open=True)
    check.number(stage, "batch_size", p, low=1, integer=True)
    check.number(stage, "validate_every", p, low=1, integer=True)
    check_reinforce(stage, check, p)


# ---------------------------------------------------------------------------------- report
def _not_an_encoder_rule(name: str, valid) -> str:
    from ee_lightning.exits.rules import RULES

    if name in RULES:
        return (f"{name!r} reads signals that only generation computes (a decoder's method.generation.rules); "
                f"valid rules here: {', '.join(valid)}")
    return f"{name!r} is not a rule; valid rules: {', '.join(valid)}{_did_you_mean(name, valid)}"


def check_report(report: DictConfig, check: Checker) -> None:
    from ee_lightning.exits.rules import ENCODER_RULES, RULES, rule_from_grid

    rules = _value(report, "rules")
    chosen = None
    if rules not in (_MISSING, None):
        chosen = [str(r) for r in rules]
        if not chosen:
            check.add("report.rules", [], f"give at least one rule ({', '.join(ENCODER_RULES)}), or null for every rule "
                                          "that applies to the task")
        for name in chosen:
            if name not in ENCODER_RULES:
                check.add("report.rules", chosen, _not_an_encoder_rule(name, ENCODER_RULES))
        needs_classes = [n for n in chosen if n in ENCODER_RULES and RULES[n].classification_only]
        if check.regression and needs_classes:
            check.add("report.rules", chosen, f"{needs_classes} need class probabilities, and this is a regression "
                                              "task: drop them, or set report.rules=null for every rule that applies")
    grids = _value(report, "grids")
    for name, grid in (grids.items() if grids not in (_MISSING, None) else []):
        key = f"report.grids.{name}"
        if name not in ENCODER_RULES:
            check.add(key, grid, _not_an_encoder_rule(name, ENCODER_RULES))
            continue
        if chosen is not None and name not in chosen:
            check.add(key, grid, f"{name!r} is not in report.rules={chosen}: add it there or drop this grid")
        elif chosen is None and check.regression and RULES[name].classification_only:
            check.add(key, grid, f"{name!r} needs class probabilities, and this is a regression task: drop this grid")
        if len(grid) == 0:
            check.add(key, [], "give at least one knob value, or drop it for the default grid")
        for value in grid:
            try:
                rule_from_grid(name, OmegaConf.to_object(value) if isinstance(value, ListConfig) else value,
                               num_layers=check.depth)
            except ValueError as err:
                check.add(key, list(grid), f"{err}")
    latency = _value(report, "latency")
    if latency not in (_MISSING, None):
        p = "report.latency."
        sizes = _value(latency, "batch_sizes")
        if sizes is not _MISSING and (not sizes or any(not isinstance(b, int) or b < 1 for b in sizes)):
            check.add(p + "batch_sizes", sizes, "give a non-empty list of batch sizes >= 1")
        check.number(latency, "num_examples", p, low=1, integer=True)
        check.number(latency, "repeats", p, low=1, integer=True)
        check.number(latency, "warmup", p, low=0, integer=True)


# ---------------------------------------------------------------------------------- ee-eval
def check_eval(cfg: DictConfig, check: Checker) -> None:
    given = [key for key in ("ckpt_path", "model_dir") if _value(cfg, key) not in (_MISSING, None)]
    if len(given) != 1:
        check.problems.append(f"{' and '.join(given) or 'neither ckpt_path nor model_dir'} given: give one, "
                              "ckpt_path=<run>/checkpoints/<stage>/last.ckpt or model_dir=<run>/model")
    check.choice(cfg, "split", "", SPLITS)
    check.number(cfg, "tau", "", low=0.0, high=1.0, low_open=True, high_open=True, optional=True,
                 why="null: the tau the checkpoint was trained with")
    if _value(cfg, "report") not in (_MISSING, None):
        check_report(cfg.report, check)


# ---------------------------------------------------------------------------------- helpers
def _value(node, key: str):
    """node[key], or _MISSING when it is absent or ??? (reported once, by missing_keys)."""
    if not isinstance(node, DictConfig) or key not in node or OmegaConf.is_missing(node, key):
        return _MISSING
    return node[key]


def _show(value) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    # As typed on the command line (key=value), quoted only where that would hide the value.
    return repr(value) if isinstance(value, str) and (not value.strip() or value != value.strip()) else str(value)


def _did_you_mean(value, choices) -> str:
    near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {near[0]}?)" if near else ""
