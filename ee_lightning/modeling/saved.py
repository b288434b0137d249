"""An early-exit model as a checkpoint keeps it: what rebuilds it, and its weights by part.

A stage's checkpoint carries, beside Lightning's state dict, a *model spec*: the resolved
backbone / head / policy settings, the task, the backbone's own transformers config and the
tokenizer's files. `model_from_spec` rebuilds model and tokenizer from it alone, so `ee-eval`
needs no pretrained folder.

Weights load by part (`backbone`, `heads`, `policy`): a stage takes only the parts it needs from
a checkpoint (policy training takes backbone and heads from stage 1 and builds its policy from the
current config), and a part whose shape differs is refused with the part and both shapes named.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from ee_lightning.modeling.backbones import LayerwiseBackbone, backbone_from_config, build_backbone
from ee_lightning.modeling.exit_policy import ExitPolicy
from ee_lightning.modeling.heads import ExitHeads
from ee_lightning.modeling.model import EarlyExitModel
from ee_lightning.tasks import TaskSpec

PARTS = ("backbone", "heads", "policy")
SPEC_KEY = "ee_lightning"  # where a checkpoint keeps the model spec


def assemble(backbone: LayerwiseBackbone, head: dict, policy: dict, task: TaskSpec) -> EarlyExitModel:
    """Heads and policy nets around a backbone. Every stage uses the same modules, so stage 1 simply
    leaves the policy untrained."""
    heads = ExitHeads(backbone.num_layers, backbone.hidden_size, task.output_size, dropout=head["dropout"],
                      pooling=head["pooling"], first_token_pooler=backbone.first_token_pooler(),
                      output_norm=backbone.output_norm())
    policy_nets = ExitPolicy(backbone.num_layers, backbone.hidden_size, task.output_size, hidden=policy["hidden"],
                             use_confidence=policy["use_confidence"], detach_state=policy["detach_state"],
                             normalize_state=policy.get("normalize_state", False))  # absent from older specs
    return EarlyExitModel(backbone, heads, policy_nets)


def build_model(backbone_cfg: dict, head: dict, policy: dict, task: TaskSpec, tokenizer, **extra):
    """The model of a run, built once, and its spec (with `extra` entries, e.g. the data config)."""
    backbone, tokenizer = build_backbone(backbone_cfg, tokenizer)
    model = assemble(backbone, head, policy, task)
    spec = {"backbone": dict(backbone_cfg), "head": dict(head), "policy": dict(policy), "task": task.to_dict(),
            "model_config": backbone.model.config.to_dict(), "tokenizer_files": tokenizer_files(tokenizer), **extra}
    return model, spec


def model_from_spec(spec: dict):
    """Rebuild (model, tokenizer, task) from a checkpoint's spec, without any pretrained folder."""
    backbone = backbone_from_config(spec["model_config"], spec["backbone"].get("attn_implementation", "sdpa"))
    task = TaskSpec.from_dict(spec["task"])
    return assemble(backbone, spec["head"], spec["policy"], task), tokenizer_from_files(spec["tokenizer_files"]), task


def check_same_model(spec: dict, task: TaskSpec, source: str, backbone_name: str | None = None) -> None:
    """Refuse a checkpoint trained for another task (or, given `backbone_name`, another backbone)."""
    def describe(backbone, task: TaskSpec) -> str:
        prefix = f"backbone={backbone} " if backbone_name is not None else ""
        return f"{prefix}task {task.name} ({task.kind}, {task.output_size} outputs)"

    theirs = describe(spec["backbone"].get("name"), TaskSpec.from_dict(spec["task"]))
    mine = describe(backbone_name, task)
    if mine != theirs:
        raise ValueError(f"{source} was trained with {theirs}, but this run has {mine}; "
                         "pass the matching backbone=/data= overrides, or the checkpoint trained for this run")


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}


def tokenizer_from_files(files: dict[str, bytes]):
    with tempfile.TemporaryDirectory() as folder:
        for name, content in files.items():
            (Path(folder) / name).write_bytes(content)
        return AutoTokenizer.from_pretrained(folder)


def part_state(state_dict: dict, part: str, prefix: str = "model.") -> dict:
    """The entries of one part in a LightningModule state dict (keys `model.<part>.*`), without the prefix."""
    head = f"{prefix}{part}."
    return {key[len(head):]: value for key, value in state_dict.items() if key.startswith(head)}


def load_parts(model: EarlyExitModel, state_dict: dict, parts, source: str) -> None:
    """Copy `parts` of a checkpoint's state dict into `model`. A part whose tensors differ in shape from
    this model's (e.g. a policy net built for other inputs) is refused, naming the part and both shapes."""
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"unknown model part {part!r}; parts: {', '.join(PARTS)}")
        module = getattr(model, part)
        theirs = part_state(state_dict, part)
        if not theirs:
            raise ValueError(f"{source} has no {part} weights (keys model.{part}.*)")
        mine = module.state_dict()
        for key in sorted(set(mine) | set(theirs)):
            if key not in theirs or key not in mine:
                where = "missing from the checkpoint" if key not in theirs else "unknown to this model"
                raise ValueError(f"{source}: the {part} does not match this run's: {part}.{key} is {where}; "
                                 f"the {part} settings differ from the checkpoint's")
            if mine[key].shape != theirs[key].shape:
                raise ValueError(
                    f"{source}: the {part} does not match this run's: {part}.{key} has shape "
                    f"{list(theirs[key].shape)} in the checkpoint but {list(mine[key].shape)} here; "
                    f"use the {part} settings the checkpoint was trained with, or retrain that stage")
        module.load_state_dict(theirs)
