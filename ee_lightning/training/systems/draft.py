"""Stage lm_draft_policy's LightningModule: verify mode's stop rule trained on cached exit states.

Each training item is a round start of a teacher-forced response: the draft exit's states at the
positions the round's drafts would take, whether the exit's token there is the full model's, and how
many drafts the response leaves room for. The step is `exits.rl.draft_objective`: rounds drawn from
the policy's stop probabilities, each rewarded with its emitted tokens less the current tokens-per-pass
rate times its layer passes.
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import Dataset

from ee_lightning.exits.rl import draft_objective, draft_round_tokens
from ee_lightning.modeling.draft_policy import DraftStopPolicy


class DraftRounds(Dataset):
    """Round starts: item s = {"states": [k, H] float32 draft-exit states at the round's draft positions,
    "agree": [k] bool (the exit's token there is the full model's), "allowed": drafts it may make}.
    states [N, H] and agree [N] are per cached token; index [S, k] and allowed [S] come from
    `exits.drafting.draft_windows`."""

    def __init__(self, states: torch.Tensor, agree: torch.Tensor, index: torch.Tensor, allowed: torch.Tensor):
        if len(agree) != len(states) or len(index) != len(allowed):
            raise ValueError(f"states ({len(states)}) and agree ({len(agree)}) must be per cached token, index "
                             f"({len(index)}) and allowed ({len(allowed)}) per round start")
        self.states, self.agree, self.index, self.allowed = states, agree.bool(), index, allowed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, s: int) -> dict:
        at = self.index[s]
        return {"states": self.states[at].float(), "agree": self.agree[at], "allowed": self.allowed[s]}


class DraftPolicySystem(L.LightningModule):
    """REINFORCE (or its exact expectation) for a `DraftStopPolicy` over round starts. costs [max_drafts]:
    layer passes of a round of 1..max_drafts drafts (`exits.drafting.round_costs`). Logs `draft/*`: the
    reward, tokens per round, the rate (tokens per layer pass), drafts per round, the loss and the mean
    stop probability."""

    def __init__(self, policy: DraftStopPolicy, costs: torch.Tensor, k: int = 16, estimator: str = "expected",
                 normalize_advantages: bool = False, entropy_bonus: float = 0.0, lr: float = 1e-3):
        super().__init__()
        if costs.shape != (policy.max_drafts,):
            raise ValueError(f"costs must hold one value per round length 1..{policy.max_drafts}, got {tuple(costs.shape)}")
        self.policy = policy
        self.register_buffer("costs", costs.float(), persistent=False)  # a function of the model, not a weight
        self.save_hyperparameters(ignore=["policy", "costs"])

    def training_step(self, batch, batch_idx):
        h = self.hparams
        logits = self.policy.logit(batch["states"]).T  # [k, S]
        tokens = draft_round_tokens(batch["agree"], batch["allowed"])
        step, rate = draft_objective(logits, tokens, self.costs, batch["allowed"], rollouts=h.k, estimator=h.estimator,
                                     normalize_advantages=h.normalize_advantages, entropy_bonus=h.entropy_bonus)
        stats = {"reward": step.parts.reward.mean(), "tokens_per_round": step.parts.task.mean(), "rate": rate,
                 "drafts": step.exits.float().mean(), "loss": step.loss.detach(),
                 "p_stop": torch.sigmoid(logits.detach()).mean()}
        self.log_dict({f"draft/{name}": value for name, value in stats.items()}, batch_size=len(batch["allowed"]),
                      on_step=True, on_epoch=False, prog_bar=False)
        return step.loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.policy.parameters(), lr=self.hparams.lr, weight_decay=0.0)
