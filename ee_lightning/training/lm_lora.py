"""LoRA on a decoder's layers, trained together with the exits' adapters, then merged (method.lm_exits.lora).

Without it the decoder stays frozen: its exit states are cached once and only the small exit
adapters learn (training/systems/lm.py), which is what a CPU can afford. On a GPU the backbone
itself can learn to serve its exits: peft's LoRA on the layers' projections (`target_modules`)
trains jointly with the exits' low-rank adapters, from live teacher-forced passes through the
decoder's step interface, on the weighted LM loss over exits (each exit's next-token cross-entropy
on the reference response tokens). The last exit is the model itself; its term is in the loss here,
because LoRA changes the full model too and that term is what keeps it a good LM.

Afterwards the LoRA weights are merged into the backbone's own weights (peft's `merge_and_unload`):
generation, the K/V fill of skipped layers and the FLOPs are those of a plain model, and no peft
module is left in the forward path. The LoRA and exit-adapter weights are saved in the run directory
(`lora_backbone.pt`) with the settings they were trained with; a rerun with the same settings loads
and merges them instead of training again. The exit-state caches built afterwards are keyed by a
digest of those weights, so a cache of the un-adapted backbone is never reused.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ee_lightning.config.schema import LoRAStage
from ee_lightning.files import load_artefact, save_artefact
from ee_lightning.inference.lm_cache import source_meta
from ee_lightning.modeling.lm_exits import LMExitHeads
from ee_lightning.training.processes import is_global_zero
from ee_lightning.training.systems.lm import LoraExitSystem

log = logging.getLogger(__name__)

PEFT_REQUIREMENT = "peft==0.21.2"
ARTEFACT = "lora_backbone.pt"


class LoraError(ValueError):
    """A LoRA setting this backbone or environment cannot serve; the message says how to fix it."""


def require_peft():
    """The peft module, or a LoraError naming the install command."""
    try:
        import peft
    except ImportError as err:
        raise LoraError(f"method.lm_exits.lora.enabled=true needs peft, which is not installed: run "
                        f"`pip install {PEFT_REQUIREMENT}` (or `pip install -e '.[lora]'`), or set "
                        "method.lm_exits.lora.enabled=false") from err
    return peft


def _is_projection(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's projections are Conv1D, not Linear

    return isinstance(module, (nn.Linear, Conv1D))


def projection_names(decoder) -> list[str]:
    """The names (last part) of the Linear / Conv1D modules inside the decoder's layers: what
    `target_modules` may name (e.g. Llama: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in decoder.layers().named_modules()
                   if name and _is_projection(module)})


def check_targets(decoder, targets) -> None:
    """Every target names a projection inside the layers (peft would silently skip a misspelt one
    in a list, and the LM head is not the layers' to adapt)."""
    names = projection_names(decoder)
    unknown = [t for t in targets if t not in names]
    if not targets or unknown:
        what = "is empty" if not targets else f"names no Linear module of this backbone's layers: {unknown}"
        raise LoraError(f"method.lm_exits.lora.target_modules {what}; the {type(decoder).__name__}'s layers have "
                        f"these Linear modules (name them in target_modules): {', '.join(names)}")


def attach_lora(decoder, settings: LoRAStage):
    """Inject peft LoRA layers into `decoder.model` in place (the step interface then runs them);
    the base weights are frozen, only the LoRA weights train. Returns the PeftModel (for its state
    dict and the merge)."""
    peft = require_peft()
    check_targets(decoder, settings.target_modules)
    decoder.requires_grad_(False)
    config = peft.LoraConfig(r=int(settings.rank), lora_alpha=float(settings.alpha),
                             lora_dropout=float(settings.dropout), target_modules=list(settings.target_modules),
                             bias="none")
    # autocast_adapter_dtype (peft's default): LoRA weights in float32 over bf16/fp16 base weights
    return peft.get_peft_model(decoder.model, config)


def merge_lora(decoder, peft_model) -> None:
    """Fold the LoRA weights into the base weights and remove every peft module; `decoder` is then
    the plain transformers model again (frozen, eval mode)."""
    merged = peft_model.merge_and_unload()
    decoder.model = merged  # the same object (peft works in place); assigned so that this never depends on it
    from peft.tuners.tuners_utils import BaseTunerLayer

    left = [name for name, module in decoder.named_modules() if isinstance(module, BaseTunerLayer)]
    if left:
        raise RuntimeError(f"peft modules remain after the merge: {left[:5]}")
    decoder.requires_grad_(False)
    decoder.eval()


def lora_weights(peft_model) -> dict[str, torch.Tensor]:
    """The LoRA weights alone (peft's own state dict of the adapter), on the CPU."""
    from peft import get_peft_model_state_dict

    return {key: value.detach().cpu() for key, value in get_peft_model_state_dict(peft_model).items()}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors' bytes: the identity of the adapted backbone in the caches' keys."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class LoraOutcome:
    """What the LoRA stage did: the weights' digest (the adapted backbone's identity) and its losses."""

    digest: str
    reused: bool
    target_modules: list[str]
    trainable_parameters: int
    epoch_losses: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return asdict(self)


def train_backbone_lora(decoder, exits: LMExitHeads, datamodule, settings: LoRAStage, stages,
                        identity: dict | None = None, exits_lr: float = 1e-3, weights: str = "layer") -> LoraOutcome:
    """LoRA + `exits` trained on the train split as the run's stage `lm_lora` (`stages`: a
    `training.stages.Stages`), or loaded from checkpoints/lm_lora/lora_backbone.pt when saved with the
    same settings, then merged into `decoder`. `decoder` is a LayerwiseDecoder (`model`, `layers()`,
    `decoder(ids, mask)` -> each layer's states); `datamodule` a GenerationDataModule."""
    if int(settings.epochs) < 1:
        raise LoraError(f"method.lm_exits.lora.epochs={settings.epochs}: must be >= 1 when LoRA is enabled")
    peft_model = attach_lora(decoder, settings)
    lora_parameters = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    meta = {**source_meta(decoder, datamodule, "train", identity), "dtype": str(next(decoder.parameters()).dtype),
            "exits": {name: list(value.shape) for name, value in exits.state_dict().items()},  # exit layers, rank
            "exit_layers": exits.exit_layers, "lora": asdict(settings), "exits_lr": exits_lr, "weights": weights}
    path = stages.folder("lm_lora") / ARTEFACT
    saved, reused = load_artefact(path, meta), True
    if saved is None:
        reused = False
        system = LoraExitSystem(exits, decoder, lora_parameters, lr=float(settings.lr), exits_lr=exits_lr,
                                weights=weights)
        loader = datamodule.dataloader("train", "train", shuffle=True, batch_size=int(settings.batch_size),
                                       seed=stages.seed)
        # the artefact, not the ledger, says whether these settings' LoRA exists: never restored from the ledger
        stages.fit("lm_lora", system, int(settings.epochs), restore=False, train_dataloaders=loader)
        saved = {**{f"lora.{k}": v for k, v in lora_weights(peft_model).items()},
                 **{f"exits.{k}": v.detach().cpu() for k, v in exits.state_dict().items()},
                 "epoch_losses": torch.tensor(system.epoch_losses, dtype=torch.float64)}
        if is_global_zero():
            save_artefact(path, saved, meta)
        log.info("LoRA stage trained (losses per epoch %s); weights saved to %s", system.epoch_losses, path)
    else:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(peft_model, {k[5:]: v for k, v in saved.items() if k.startswith("lora.")})
        mismatched = list(result.unexpected_keys) + [k for k in result.missing_keys if "lora_" in k]
        if mismatched:
            raise LoraError(f"{path} does not fit this model's LoRA layers ({mismatched[:5]}); delete it to train "
                            "again")
        exits.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("exits.")})
        log.info("LoRA stage reused from %s (saved with the same settings)", path)
    merge_lora(decoder, peft_model)
    lora_only = {k: v for k, v in saved.items() if k.startswith("lora.")}
    return LoraOutcome(digest=digest(lora_only), reused=reused, target_modules=list(settings.target_modules),
                       trainable_parameters=sum(p.numel() for p in lora_parameters.values()),
                       epoch_losses=[float(x) for x in saved["epoch_losses"]])
