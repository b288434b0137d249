"""A token policy's exits over a teacher-forced response under propagated K/V, in one pass.

Generation with early exit (`inference.generate`) gives the deeper layers the K/V of an exited
token computed from its exit state (CALM's state propagation), so every exit changes what later
tokens see at the layers it skipped. A policy trained on the states of a full-depth pass never
sees that, and in free-running generation its exits then stop agreeing with the full model. This
pass lets it see it. The response is teacher-forced and all its positions go up the layers
together; a position that exits stops there: its state is frozen, and every deeper layer runs on
that frozen state only to write its K/V (a layer computes a position's K/V from its input exactly
as propagation does; its output there is thrown away). Layer by layer, each position attends to
the earlier positions' propagated K/V, as it would in generation with the same exits, so one
pass replays the exits of a whole generation (the tokens being the forced ones). ConsistentEE's
authors train their LLaMA policy the same way, copying each token's exit state up the layers.

The prompt (all but its last token) runs once at full depth (`generate.prefill`) and is shared by
the K rollouts of a row, which are rows b*K .. b*K + K-1 of every output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ee_lightning.inference.generate import prefill


@dataclass
class PropagatedExits:
    """Per rollout row r (= b*K + k) and response position t [R, T]: the exit number 1..E (0 on padding),
    log pi of the position's exit decisions (differentiable in the policy; 0 on padding), the exit's
    greedy token, and the policy's exit probability at every exit the position reached ([E, R, T],
    nan where it had left before)."""

    exit_index: torch.Tensor
    log_prob: torch.Tensor
    tokens: torch.Tensor
    probs: torch.Tensor
    mask: torch.Tensor

    def exit_layers(self, exit_layers: list[int]) -> torch.Tensor:
        """[R, T] exit layers (1..L; 0 on padding)."""
        table = torch.tensor([0, *exit_layers], device=self.exit_index.device)
        return table[self.exit_index]


def propagated_exits(decoder, exits, policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     response_ids: torch.Tensor, response_mask: torch.Tensor, k: int = 1, tau: float | None = None,
                     generator: torch.Generator | None = None) -> PropagatedExits:
    """Exits of the response tokens under the token policy, K rollouts per row.

    prompt_ids/prompt_mask [B, P]: LEFT-padded prompts (as generation takes them); response_ids /
    response_mask [B, N]: the teacher-forced response, right-padded. Position t holds the state that
    predicts response token t (its input is the previous token), as generation's step t does.
    tau: None samples each exit from Bernoulli(p) (training rollouts, `generator`); a number exits at
    the first p > tau (the policy rule), which makes the pass equal generation forced to the response.
    The decoder runs without gradient; the log-probabilities carry the policy's.
    """
    if k < 1:
        raise ValueError(f"k={k} rollouts: use at least 1")
    if response_ids.shape != response_mask.shape or prompt_ids.shape != prompt_mask.shape:
        raise ValueError("ids and masks must have the same shapes")
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be LEFT-padded (every row's last column a real token)")
    batch, steps = response_ids.shape
    layers = list(exits.exit_layers)
    if list(policy.exit_layers) != layers:
        raise ValueError(f"policy exits {list(policy.exit_layers)} differ from the exit heads' {layers}")
    new_ids = torch.cat([prompt_ids[:, -1:], response_ids[:, :-1]], dim=1)
    mask = torch.cat([prompt_mask, response_mask[:, :-1]], dim=1).long()
    valid = response_mask.bool()
    with torch.no_grad():
        cache = prefill(decoder, prompt_ids, prompt_mask)
        if k > 1:
            cache.batch_repeat_interleave(k)
        new_ids, mask, valid = (t.repeat_interleave(k, dim=0) for t in (new_ids, mask, valid))
        hidden, ctx = decoder.start(new_ids, mask, cache)
    rows = batch * k
    frozen = torch.zeros(rows, steps, dtype=torch.bool, device=hidden.device)
    exit_index = torch.zeros(rows, steps, dtype=torch.long, device=hidden.device)
    log_prob = torch.zeros(rows, steps, device=hidden.device)
    probs = torch.full((len(layers), rows, steps), float("nan"), device=hidden.device)
    number = {layer: e + 1 for e, layer in enumerate(layers)}
    for index in range(decoder.num_layers):
        layer = index + 1
        with torch.no_grad():
            out = decoder.run_layer(index, hidden, ctx, cache)
            hidden = torch.where(frozen.unsqueeze(-1), hidden, out)
        if layer not in number:
            continue
        running = valid & ~frozen
        if layer == decoder.num_layers:
            leave = running
        else:
            logit = policy.logit(layer, hidden)
            p = torch.sigmoid(logit)
            draw = p.detach() > tau if tau is not None else \
                torch.rand(p.shape, generator=generator, device=p.device) < p.detach()
            leave = running & draw
            step = torch.where(leave, F.logsigmoid(logit), F.logsigmoid(-logit))
            log_prob = log_prob + torch.where(running, step, torch.zeros_like(step))
            probs[number[layer] - 1] = torch.where(running, p.detach(), torch.full_like(p, float("nan")))
        exit_index[leave] = number[layer]
        frozen = frozen | leave
    tokens = torch.zeros(rows, steps, dtype=torch.long, device=hidden.device)
    with torch.no_grad():
        for layer, e in number.items():
            at = exit_index == e
            if bool(at.any()):
                tokens[at] = exits.logits(layer, hidden[at], decoder).argmax(-1)
    return PropagatedExits(exit_index, log_prob, tokens, probs, valid)
