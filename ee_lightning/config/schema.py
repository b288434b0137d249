"""Typed schemas of our config groups, registered with Hydra's ConfigStore.

Composition merges every yaml file into its schema, so a wrong type (`method.policy.k=abc`) or an
unknown key (`method.polcy.k=3`, or a misspelt key in a yaml file) fails while Hydra composes the
config, naming the key. Ranges and rules across fields are `validate.validate_config`'s job.

Where the defaults live: a knob's value and the comment explaining it are in its yaml file under
conf/ (the place a user reads and changes them), once. Fields every option sets in its yaml are
`MISSING` here; a field has a default here only when the yaml files may leave it out (e.g.
`BackboneConfig.kind`), so no value is written twice.

How the schemas are attached:
- the root configs (conf/train.yaml, conf/eval.yaml) start their defaults list with `train_schema` /
  `eval_schema`, whose typed fields (backbone, head, policy, report) type every option of those groups;
- `data` and `method` options differ in their keys: each option's yaml starts its own defaults list
  with its schema (`defaults: [glue_schema, _self_]`), registered in that group. A new data option
  or method registers its own schema here (`register_configs`) and names it the same way. The decoder
  side's options (method=consistentee_lm, data=aclsum | jsonl_generation) are registered the same way;
  conf/lm_exits/default.yaml merges into `method.lm_exits`, typed by the method's schema.
- trainer, logger, callbacks, paths and hydra are third-party objects' arguments: untyped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


# --- model -----------------------------------------------------------------------------------
@dataclass
class BackboneConfig:
    name: str = MISSING
    family: str = MISSING
    pretrained_path: Optional[str] = MISSING
    tokenizer_path: Optional[str] = MISSING
    attn_implementation: str = MISSING
    architecture: Dict[str, Any] = MISSING
    random_init_expected: bool = MISSING
    kind: str = "encoder"  # encoder (bidirectional, classification heads) | decoder (causal LM)
    dtype: str = "float32"  # decoders: the weights' dtype (float32 | bfloat16 | float16)


@dataclass
class HeadConfig:
    pooling: str = MISSING
    dropout: float = MISSING


@dataclass
class PolicyNetConfig:
    """The exit policy net (conf/policy), not the policy training stage (method.policy)."""

    hidden: int = MISSING
    use_confidence: bool = MISSING
    detach_state: bool = MISSING
    normalize_state: bool = False  # a default, not MISSING: run directories written before the key existed still load


# --- method stages ----------------------------------------------------------------------------
@dataclass
class FinetuneStage:
    epochs: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    warmup_ratio: float = MISSING
    layer_weights: Any = MISSING  # linear | uniform | a list of one weight per layer
    head_lr: Optional[float] = MISSING  # null: the exit heads learn at lr, as the backbone
    distill_weight: float = MISSING  # 0: task loss only; w: (1 - w) * task + w * self-distillation below the last layer
    distill_temperature: float = MISSING


@dataclass
class HardnessStage:
    tolerance: float = MISSING
    cache_train_outputs: bool = MISSING


@dataclass
class PolicyStage:
    epochs: int = MISSING
    lr: float = MISSING
    batch_size: int = MISSING
    k: int = MISSING
    alpha: float = MISSING
    task_term: str = MISSING
    depth_term: str = MISSING
    sampler: str = MISSING
    eps_start: float = MISSING
    eps_end: float = MISSING
    eps_decay_steps: int = MISSING
    normalize_advantages: bool = MISSING
    entropy_bonus: float = MISSING
    estimator: str = MISSING


@dataclass
class JointStage:
    enabled: bool = MISSING
    epochs: int = MISSING
    lr_model: float = MISSING
    lr_policy: float = MISSING
    layer_loss_weight: float = 0.0  # older run configs have no such key: the paper's objective alone


@dataclass
class ChooseConfig:
    tolerance: Optional[float] = MISSING  # null: method.tau as set


@dataclass
class FrontierConfig:
    alphas: List[float] = MISSING
    seeds: int = MISSING


@dataclass
class EncoderPolicyStage(PolicyStage):
    validate_every: int = MISSING  # epochs between validations (each runs the backbone over the validation split)


@dataclass
class FinetuneMethod:
    name: str = MISSING
    finetune: FinetuneStage = field(default_factory=FinetuneStage)


@dataclass
class ConsistentEEMethod(FinetuneMethod):
    tau: float = MISSING
    hardness: HardnessStage = field(default_factory=HardnessStage)
    policy: EncoderPolicyStage = field(default_factory=EncoderPolicyStage)
    joint: JointStage = field(default_factory=JointStage)
    choose: ChooseConfig = field(default_factory=ChooseConfig)
    frontier: FrontierConfig = field(default_factory=FrontierConfig)


# --- the decoder method (method=consistentee_lm): exits trained on cached states, then generation ----
@dataclass
class LMCacheConfig:
    dtype: str = MISSING
    batch_size: int = MISSING


@dataclass
class LMAdapterStage:
    epochs: int = MISSING
    lr: float = MISSING
    batch_size: int = MISSING
    weights: str = MISSING
    target: str = MISSING
    objective: str = MISSING
    top_k: int = MISSING
    vocabulary: str = MISSING


@dataclass
class LMHardnessConfig:
    target: str = MISSING


@dataclass
class PropagatedPolicyStage:
    """The token policy fine-tuned on rollouts under propagated K/V (systems.lm.PropagatedPolicySystem);
    epochs 0 skips it."""

    epochs: int = MISSING
    lr: float = MISSING
    batch_size: int = MISSING
    k: int = MISSING
    later_weight: float = MISSING
    gamma: float = MISSING


@dataclass
class TokenPolicyStage(PolicyStage):
    """method.policy's knobs (TokenPolicySystem takes them all) plus the token policy's own."""

    hidden: int = MISSING
    task_target: str = MISSING
    tau: float = MISSING
    propagated: PropagatedPolicyStage = field(default_factory=PropagatedPolicyStage)


@dataclass
class LMClassifierStage:
    epochs: int = MISSING
    lr: float = MISSING
    batch_size: int = MISSING


@dataclass
class LoRAStage:
    """LoRA on the decoder's own layers before the cached stages (off by default)."""

    enabled: bool = MISSING
    rank: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    target_modules: List[str] = MISSING
    epochs: int = MISSING
    lr: float = MISSING
    batch_size: int = MISSING


@dataclass
class DraftPolicyStage:
    """Verify mode's learned stop rule (training/lm_draft.py); epochs 0 skips it."""

    epochs: int = MISSING
    draft_layer: Optional[int] = MISSING
    max_drafts: int = MISSING
    hidden: int = MISSING
    tau: float = MISSING
    k: int = MISSING
    estimator: str = MISSING
    lr: float = MISSING
    batch_size: int = MISSING


@dataclass
class LMExitsConfig:
    """conf/lm_exits/default.yaml, as `method.lm_exits` (training/systems/lm.py)."""

    exit_every: int = MISSING
    rank: int = MISSING
    adapter: str = MISSING
    evaluate_split: Optional[str] = MISSING
    responses: str = MISSING  # the text the caches are teacher-forced on: reference | model (its own greedy output)
    # K >= 2: the policy, classifier and draft policy learn from out-of-fold exit scores; 0: the exits' own. Not
    # MISSING: a run directory written before the key existed still loads (as 0, what it did)
    cross_fit: int = 0
    # the head rows the `frequent_margin` signal reads (rule confirmed_policy): the N tokens the full model writes
    # most often in the training responses; 0: none. Not MISSING, for the run directories written before it
    confidence_tokens: int = 0
    cache: LMCacheConfig = field(default_factory=LMCacheConfig)
    adapters: LMAdapterStage = field(default_factory=LMAdapterStage)
    hardness: LMHardnessConfig = field(default_factory=LMHardnessConfig)
    policy: TokenPolicyStage = field(default_factory=TokenPolicyStage)
    classifier: LMClassifierStage = field(default_factory=LMClassifierStage)
    lora: LoRAStage = field(default_factory=LoRAStage)
    draft_policy: DraftPolicyStage = field(default_factory=DraftPolicyStage)


@dataclass
class GenerationRules:
    """Knob grids of the token exit rules. null (or []) leaves a threshold rule out; static: null is
    every exit layer below the last, [] none; oracle: false leaves it out."""

    policy: Optional[List[float]] = MISSING
    softmax_margin: Optional[List[float]] = MISSING
    saturation: Optional[List[float]] = MISSING
    classifier: Optional[List[float]] = MISSING
    static: Optional[List[int]] = MISSING
    oracle: bool = MISSING
    # [tau, margin] pairs; needs lm_exits.confidence_tokens. Not MISSING, for the run directories written before it
    confirmed_policy: Optional[List[List[float]]] = None


@dataclass
class GenerationCalibration:
    """CALM's calibration: each rule's knob chosen on `split`'s prompts (never the test split) as the
    most layer saving whose ROUGE-L against the full model's own output is at least `level`."""

    split: Optional[str] = MISSING  # null: no calibration (the policy's point is lm_exits.policy.tau)
    max_prompts: Optional[int] = MISSING
    level: float = MISSING


@dataclass
class GenerationConfig:
    split: str = MISSING
    max_prompts: Optional[int] = MISSING
    batch_size: int = MISSING
    max_new_tokens: int = MISSING
    kv: str = MISSING
    timed_per_batch: Optional[int] = MISSING  # kv=defer: prompts per batch decoded deferred and timed; null: all
    rules: GenerationRules = field(default_factory=GenerationRules)
    calibration: GenerationCalibration = field(default_factory=GenerationCalibration)


@dataclass
class ConsistentEELMMethod:
    name: str = MISSING
    lm_exits: LMExitsConfig = field(default_factory=LMExitsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


# --- report -----------------------------------------------------------------------------------
@dataclass
class LatencyConfig:
    enabled: bool = MISSING
    batch_sizes: List[int] = MISSING
    num_examples: int = MISSING
    repeats: int = MISSING
    warmup: int = MISSING


@dataclass
class ReportConfig:
    rules: Optional[List[str]] = MISSING
    grids: Dict[str, List[Any]] = MISSING  # rule -> knob values (pcee: [patience, threshold] pairs)
    latency: LatencyConfig = field(default_factory=LatencyConfig)


# --- data options (one schema each: their datamodules take different arguments) ---------------
@dataclass
class LoaderConfig:
    """What every datamodule takes, for classification and for generation alike."""

    _target_: str = MISSING
    name: str = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    num_workers: int = MISSING
    max_train_samples: Optional[int] = MISSING
    max_eval_samples: Optional[int] = MISSING
    split_seed: int = MISSING


@dataclass
class DataConfig(LoaderConfig):
    """What every TextDataModule takes (ee_lightning/data/base.py)."""

    max_length: Optional[int] = MISSING
    bucket_by_length: bool = MISSING
    cache_dir: Optional[str] = MISSING


@dataclass
class RottenTomatoesData(DataConfig):
    source_path: Optional[str] = MISSING
    verify_checksum: bool = MISSING
    test_size: int = MISSING
    validation_size: int = MISSING


@dataclass
class BBCNewsData(DataConfig):
    source_path: Optional[str] = MISSING
    verify_checksum: bool = MISSING
    test_fraction: float = MISSING
    validation_fraction: float = MISSING
    stratify: bool = MISSING


@dataclass
class GlueData(DataConfig):
    task: str = MISSING
    data_dir: Optional[str] = MISSING
    train_file: Optional[str] = MISSING
    validation_file: Optional[str] = MISSING
    test_file: Optional[str] = MISSING
    mnli_eval: str = MISSING
    validation_fraction: float = MISSING
    skip_malformed: bool = MISSING


@dataclass
class ColumnsData(DataConfig):
    """Data read by column names (ee_lightning/data/columns.py): csv files and Hugging Face datasets."""

    text_column: str = MISSING
    text_pair_column: Optional[str] = MISSING
    label_column: str = MISSING
    task_kind: str = MISSING
    label_names: Optional[List[Any]] = MISSING
    num_labels: Optional[int] = MISSING
    metric: Optional[str] = MISSING
    validation_fraction: float = MISSING
    test_fraction: float = MISSING


@dataclass
class CsvData(ColumnsData):
    train_file: Optional[str] = MISSING
    validation_file: Optional[str] = MISSING
    test_file: Optional[str] = MISSING
    tsv_quote_none: bool = MISSING


@dataclass
class HfData(ColumnsData):
    path: Optional[str] = MISSING
    config_name: Optional[str] = MISSING
    data_files: Any = MISSING  # a path or glob, a list, or {split: files}
    revision: Optional[str] = MISSING
    hf_cache_dir: Optional[str] = MISSING
    train_split: str = MISSING
    validation_split: Optional[str] = MISSING
    test_split: Optional[str] = MISSING


# --- generation data (method=consistentee_lm; ee_lightning/data/generation.py) ----------------------
@dataclass
class GenerationData(LoaderConfig):
    """What every GenerationDataModule takes."""

    system_prompt: Optional[str] = MISSING
    max_prompt_length: int = MISSING
    max_response_length: int = MISSING


@dataclass
class ACLSumData(GenerationData):
    aclsum_dir: Optional[str] = MISSING
    aspects: List[str] = MISSING
    prompt_template: str = MISSING
    train_prompt_templates: List[str] = MISSING


@dataclass
class PromptResponseData(GenerationData):
    train_file: Optional[str] = MISSING
    validation_file: Optional[str] = MISSING
    test_file: Optional[str] = MISSING
    prompt_field: str = MISSING
    response_field: str = MISSING
    input_field: Optional[str] = MISSING
    validation_fraction: float = MISSING
    test_fraction: float = MISSING


# --- roots ------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """conf/train.yaml (ee-train)."""

    task_name: str = MISSING
    seed: int = MISSING
    init_from: Optional[str] = MISSING
    optimized_metrics: Any = MISSING  # null | list of names (ee_lightning/app/sweep.py)
    backbone: BackboneConfig = MISSING
    head: HeadConfig = MISSING
    policy: PolicyNetConfig = MISSING
    report: Optional[ReportConfig] = None  # `~report`: no exit-rule report at the end of consistentee
    data: Any = MISSING    # typed by the option's own schema (DATA_SCHEMAS)
    method: Any = MISSING  # typed by the option's own schema (METHOD_SCHEMAS)
    paths: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = None


@dataclass
class ExpectConfig:
    backbone: Optional[str] = MISSING
    task: Optional[str] = MISSING


@dataclass
class EvalConfig:
    """conf/eval.yaml (ee-eval)."""

    task_name: str = MISSING
    ckpt_path: Optional[str] = MISSING
    model_dir: Optional[str] = MISSING
    split: str = MISSING
    tau: Optional[float] = MISSING
    data: Dict[str, Any] = MISSING  # overrides of the checkpoint's data config: untyped here
    expect: ExpectConfig = field(default_factory=ExpectConfig)
    report: ReportConfig = MISSING
    paths: Any = MISSING


# Per-option schemas: conf/<group>/<option>.yaml names `<option>_schema` first in its defaults list.
# Encoder data (classification / regression) and the decoder's generation data are kept apart: each
# method takes one kind.
DATA_SCHEMAS: dict[str, type] = {
    "rotten_tomatoes": RottenTomatoesData,
    "bbc_news": BBCNewsData,
    "glue": GlueData,
    "csv": CsvData,
    "hf": HfData,
}
GENERATION_DATA_SCHEMAS: dict[str, type] = {
    "aclsum": ACLSumData,
    "jsonl_generation": PromptResponseData,
}
METHOD_SCHEMAS: dict[str, type] = {
    "finetune": FinetuneMethod,
    "consistentee": ConsistentEEMethod,
    "consistentee_lm": ConsistentEELMMethod,
}
DECODER_METHODS = ("consistentee_lm",)


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore; needed before composing conf/ (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    for group, schemas in (("data", DATA_SCHEMAS), ("data", GENERATION_DATA_SCHEMAS), ("method", METHOD_SCHEMAS)):
        for option, schema in schemas.items():
            store.store(group=group, name=f"{option}_schema", node=schema)
