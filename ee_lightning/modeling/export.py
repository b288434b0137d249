"""The saved early-exit model: one self-contained folder, safetensors and JSON only.

Every ee-train run ends by writing `<run>/model/`:

    config.json        the format and its version, the model's kind (encoder | decoder), the backbone's
                       own transformers config, and what inference needs: the task (encoders) or the
                       generation settings (decoders), the policy's trained tau, the run's data config
    model.safetensors  every weight: the backbone (LoRA merged, where the run used it), the exit heads,
                       the policy (and for decoders CALM's exit classifier and verify mode's stop rule,
                       where trained)
    tokenizer/         the tokenizer's own files (tokenizer.json, tokenizer_config.json, a chat template)

Reading one never unpickles anything: the weights go through safetensors, the settings through
json, the tokenizer through its JSON / text files, and the backbone is built from its saved config
(no pretrained folder is read). A folder that breaks these rules is refused, naming the file.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ee_lightning.modeling.backbones import backbone_from_config
from ee_lightning.modeling.backbones.decoders import LayerwiseDecoder, wrap_decoder
from ee_lightning.modeling.draft_policy import DraftStopPolicy
from ee_lightning.modeling.lm_exits import ExitClassifier, LMExitHeads, TokenExitPolicy
from ee_lightning.modeling.model import EarlyExitModel
from ee_lightning.modeling.saved import assemble
from ee_lightning.tasks import TaskSpec

FORMAT = "ee-lightning-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
# What a tokenizer folder may hold: its JSON files, a chat template, plain-text vocabularies.
TOKENIZER_SUFFIXES = (".json", ".jinja", ".txt")


class ModelFolderError(ValueError):
    """A saved model folder that cannot be read; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------- writing
def save_encoder(folder: str | Path, model: EarlyExitModel, spec: dict, tokenizer, tau: float | None,
                 max_length: int) -> Path:
    """An encoder run's model: `spec` is the run's model spec (modeling.saved.build_model); `tau` the
    policy's trained threshold, None when the run trained no policy (method=finetune); `max_length`
    the data's (texts are cut to it as in training)."""
    config = {
        "kind": "encoder",
        "model_config": spec["model_config"],
        "attn_implementation": spec["backbone"].get("attn_implementation") or "sdpa",
        "backbone": {key: value for key, value in spec["backbone"].items() if key != "architecture"},
        "head": spec["head"], "policy": spec["policy"], "task": spec["task"],
        "max_length": int(max_length), "tau": tau, "data": spec["data"],
    }
    return _write(folder, config, model, tokenizer)


class DecoderParts(nn.Module):
    """The modules a decoder's saved model holds, under the names its weights file uses."""

    def __init__(self, decoder: LayerwiseDecoder, exits: LMExitHeads, policy: TokenExitPolicy | None,
                 classifier: ExitClassifier | None, draft_policy: DraftStopPolicy | None = None):
        super().__init__()
        self.decoder = decoder.model  # the transformers model itself: its state dict names are the library's
        self.exits, self.policy, self.classifier = exits, policy, classifier
        self.draft_policy = draft_policy  # verify mode's stop rule


def save_decoder(folder: str | Path, decoder: LayerwiseDecoder, tokenizer, exits: LMExitHeads,
                 policy: TokenExitPolicy | None, classifier: ExitClassifier | None, generation: dict,
                 data: dict, backbone: str, draft_policy: DraftStopPolicy | None = None) -> Path:
    """A decoder run's model. generation: the run's rules (knob grids), the policy's trained `tau`,
    `max_new_tokens`, `batch_size`, `max_prompts`; data: the run's data config (its `system_prompt` and
    `max_prompt_length` shape every prompt); backbone: the backbone config's name; draft_policy: verify
    mode's stop rule, where the run trained one."""
    config = {
        "kind": "decoder",
        "backbone": {"name": backbone, "family": decoder.model.config.model_type},
        "model_config": decoder.model.config.to_dict(),
        "attn_implementation": decoder.model.config._attn_implementation or "sdpa",
        "dtype": str(next(decoder.parameters()).dtype).removeprefix("torch."),
        "exits": {"exit_layers": list(exits.exit_layers), "rank": _adapter_rank(exits), "adapter": exits.adapter_kind,
                  "confidence_tokens": int(exits.confidence_tokens.numel())},
        "policy": None if policy is None else {"hidden": _policy_width(policy)},
        "classifier": classifier is not None,
        "draft_policy": None if draft_policy is None else draft_policy.settings(),
        "generation": {**generation, "eos_token_id": tokenizer.eos_token_id,
                       "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                       else tokenizer.eos_token_id},
        "prompts": {"chat_template": True, "system_prompt": data.get("system_prompt"),
                    "max_prompt_length": int(data["max_prompt_length"])},
        "data": data,
    }
    return _write(folder, config, DecoderParts(decoder, exits, policy, classifier, draft_policy), tokenizer)


def _adapter_rank(exits: LMExitHeads) -> int:
    adapters = list(exits.adapters.values())
    if not adapters or exits.adapter_kind != "lowrank":
        return 1  # only the last layer has an exit (no adapter), or block adapters (no rank)
    return adapters[0].down.out_features


def _policy_width(policy: TokenExitPolicy) -> int:
    heads = list(policy.heads.values())
    return heads[0][1].out_features if heads else 1  # [LayerNorm, Linear(H, hidden), GELU, Linear(hidden, 1)]


def _write(folder: str | Path, config: dict, module: nn.Module, tokenizer) -> Path:
    """Write the folder beside its final place (`<name>.partial`), then rename it in: a crash never
    leaves a half-written model folder under the final name."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **config},
                                                  indent=2))
    # save_model keeps one copy of tied tensors (a decoder's embeddings and LM head), which save_file refuses
    save_model(module, str(partial / WEIGHTS_FILE), metadata={"format": "pt"}, force_contiguous=True)
    tokenizer.save_pretrained(partial / TOKENIZER_DIR)
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder


# ----------------------------------------------------------------------------------------- reading
def read_config(folder: str | Path) -> dict:
    """config.json of a saved model folder, checked: the format, its version, the files beside it."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise ModelFolderError(f"{folder} is not a folder; give a saved model folder (ee-train writes <run>/model/)")
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing: {folder} is not a saved ee-lightning model; give the <run>/model/ "
                               "folder an ee-train run wrote")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{path} is not JSON ({err}); copy the folder again from the run that wrote it") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFolderError(f"{path} does not name the format {FORMAT!r}: {folder} is not a saved ee-lightning "
                               "model (a transformers checkpoint folder goes to backbone.pretrained_path instead)")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFolderError(f"{path} has format_version {version!r}; this ee-lightning reads version "
                               f"{FORMAT_VERSION}: load it with the ee-lightning release that wrote it, or retrain")
    if config.get("kind") not in ("encoder", "decoder"):
        raise ModelFolderError(f"{path} has kind {config.get('kind')!r}; expected encoder or decoder")
    for name in (WEIGHTS_FILE, TOKENIZER_DIR):
        if not (folder / name).exists():
            raise ModelFolderError(f"{folder / name} is missing; a saved model folder holds {CONFIG_FILE}, "
                                   f"{WEIGHTS_FILE} and {TOKENIZER_DIR}/: copy the whole folder")
    return config


def load_weights(module: nn.Module, path: Path) -> None:
    """Fill `module` from a safetensors file; anything else (a pickle, a torch.save file) is refused unread."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header; that length's first
    # byte may be 0x80 (a header of 128 + 256 n bytes), which alone would look like a pickle
    safetensors = head[8:9] == b"{"
    if not safetensors and (head[:1] == b"\x80" or head[:2] == b"PK"):  # a pickle's protocol byte; torch.save's zip
        raise ModelFolderError(f"{path} is a pickle (torch.save) file, not safetensors; it was not opened, because "
                               "unpickling can run code. Save the weights with safetensors (ee-train does)")
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFolderError(f"{path} is not a readable safetensors file ({err}); copy the folder again "
                               "from the run that wrote it") from err
    except RuntimeError as err:  # a tensor of another shape
        raise ModelFolderError(f"{path} does not fit the model its {CONFIG_FILE} describes: {err}") from err
    if missing or unexpected:
        raise ModelFolderError(f"{path} does not fit the model its {CONFIG_FILE} describes: missing "
                               f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def load_tokenizer(folder: Path):
    tokenizer_dir = folder / TOKENIZER_DIR
    foreign = sorted(p.name for p in tokenizer_dir.iterdir() if p.suffix not in TOKENIZER_SUFFIXES)
    if foreign:
        raise ModelFolderError(f"{tokenizer_dir} holds {foreign}: a saved model's tokenizer is read from "
                               f"{', '.join(TOKENIZER_SUFFIXES)} files only; remove them")
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def load_encoder(folder: str | Path) -> tuple[EarlyExitModel, object, TaskSpec, dict]:
    """(model in eval mode, tokenizer, task, config) of a saved encoder."""
    folder = Path(folder)
    config = _expect(folder, "encoder")
    task = TaskSpec.from_dict(config["task"])
    backbone = backbone_from_config(config["model_config"], config["attn_implementation"])
    model = assemble(backbone, config["head"], config["policy"], task)
    load_weights(model, folder / WEIGHTS_FILE)
    return model.eval(), load_tokenizer(folder), task, config


def load_decoder(folder: str | Path) -> tuple[DecoderParts, LayerwiseDecoder, object, dict]:
    """(the parts: exits, policy, classifier; the layer-wise decoder in eval mode; tokenizer; config)."""
    folder = Path(folder)
    config = _expect(folder, "decoder")
    model_config = dict(config["model_config"])
    dtype = getattr(torch, config["dtype"])
    hf_config = AutoConfig.for_model(model_config.pop("model_type"), **model_config)
    decoder = wrap_decoder(AutoModelForCausalLM.from_config(hf_config, attn_implementation=config["attn_implementation"],
                                                            dtype=dtype))
    exit_layers = config["exits"]["exit_layers"]
    num_layers, hidden = decoder.num_layers, decoder.hidden_size
    every = exit_layers[0] if len(exit_layers) > 1 else num_layers
    adapter = config["exits"].get("adapter", "lowrank")  # folders saved before block adapters existed
    exits = LMExitHeads(num_layers, hidden, exit_every=every, rank=config["exits"]["rank"], adapter=adapter,
                        layers=decoder.layers() if adapter == "block" else None,
                        confidence_tokens=int(config["exits"].get("confidence_tokens", 0)))  # none before they existed
    if exits.exit_layers != exit_layers:
        raise ModelFolderError(f"{folder / CONFIG_FILE}: exits at {exit_layers} are not every k-th layer of "
                               f"{num_layers}; the file was edited, copy it again")
    policy = (TokenExitPolicy(num_layers, hidden, hidden=config["policy"]["hidden"], exit_layers=exit_layers)
              if config["policy"] is not None else None)
    classifier = ExitClassifier(num_layers, hidden, exit_layers=exit_layers) if config["classifier"] else None
    draft = config.get("draft_policy")  # folders saved before verify mode's stop rule existed have none
    draft_policy = DraftStopPolicy(hidden, **draft) if draft else None
    if draft_policy is not None and draft_policy.draft_layer not in exit_layers[:-1]:
        raise ModelFolderError(f"{folder / CONFIG_FILE}: the draft policy's layer {draft_policy.draft_layer} has no "
                               f"exit below the last ({exit_layers}); the file was edited, copy it again")
    parts = DecoderParts(decoder, exits, policy, classifier, draft_policy)
    load_weights(parts, folder / WEIGHTS_FILE)  # the backbone in its saved dtype, the exits' nets in float32
    tokenizer = load_tokenizer(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    return parts.eval(), decoder.eval(), tokenizer, config


def _expect(folder: Path, kind: str) -> dict:
    config = read_config(folder)
    if config["kind"] != kind:
        raise ModelFolderError(f"{folder} holds a {config['kind']} model, not an {kind}")
    return config
