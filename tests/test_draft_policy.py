"""Verify mode's learned stop rule: its reward and objective on hand-computed numbers, its stops in
generation (where its probability exceeds tau, the output still greedy full depth's), its training on
cached exit states, the stage in the decoder run, and the saved model that carries it."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from tiny_decoders import PAD, left_padded_prompts, tiny_lm
from ee_lightning.exits import rl
from ee_lightning.exits.drafting import draft_windows, round_costs, simulate_rounds
from ee_lightning.inference.generate import PlainExits
from ee_lightning.inference.verify import draft_cost, generate_verified, head_cost
from ee_lightning.modeling.draft_policy import DraftStopPolicy
from ee_lightning.modeling.lm_exits import FORCED_LOGIT
from ee_lightning.training.lm_draft import draft_layer_of, draft_policy_stage, draft_summary
from ee_lightning.training.systems.draft import DraftRounds

NEW = 12


# --------------------------------------------------------------------------- pure functions


def test_round_starts_and_their_draft_positions_by_hand():
    # responses 0 (4 tokens), 1 (2 tokens), 2 (1 token); a round may not draft its response's last token
    starts, index, allowed = draft_windows(torch.tensor([0, 0, 0, 0, 1, 1, 2]), max_drafts=2)
    assert starts.tolist() == [0, 1, 2, 4]
    assert allowed.tolist() == [2, 2, 1, 1]
    assert index.tolist() == [[0, 1], [1, 2], [2, 2], [4, 4]]  # past the last allowed draft: repeated
    with pytest.raises(ValueError, match="together"):
        draft_windows(torch.tensor([0, 1, 0]), 2)


def test_round_costs_by_hand():
    # layer 10 of 30, head 8: d drafts cost (d + 1) * 10 + d * 8 + 20 + 8
    assert round_costs(10, 30, 3, head_cost=8.0).tolist() == [56.0, 74.0, 92.0]
    assert round_costs(10, 30, 2, head_cost=8.0, draft_head_cost=1.0).tolist() == [20 + 1 + 28, 30 + 2 + 28]


def test_round_tokens_by_hand():
    agree = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 1]]).bool()
    tokens = rl.draft_round_tokens(agree, torch.tensor([3, 3, 2]))
    # leading agreements 2, 0 and 2 (the third round may draft 2): d drafts emit min(d, leading) + 1
    assert tokens.tolist() == [[2.0, 1.0, 2.0], [3.0, 1.0, 3.0], [3.0, 1.0, 3.0]]
    logits = rl.forced_stops(torch.zeros(3, 2), torch.tensor([1, 3]))
    assert logits.tolist() == [[FORCED_LOGIT, 0.0], [FORCED_LOGIT, 0.0], [FORCED_LOGIT, FORCED_LOGIT]]


def test_the_expected_objective_by_hand():
    # one round start, 2 drafts allowed; p(stop after draft 1) = sigmoid(0) = 0.5, the second stop is forced.
    # The first draft is right, the second wrong: 1 or 2 drafts both emit 2 tokens, at 4 or 6 passes.
    z = torch.zeros(2, 1, requires_grad=True)
    tokens = rl.draft_round_tokens(torch.tensor([[True, False]]), torch.tensor([2]))
    assert tokens[:, 0].tolist() == [2.0, 2.0]
    step, rate = rl.draft_objective(z, tokens, torch.tensor([4.0, 6.0]), torch.tensor([2]), rollouts=4,
                                    estimator="expected", generator=torch.Generator().manual_seed(0))
    # J = (0.5 * 2 + 0.5 * 2) / (0.5 * 4 + 0.5 * 6) = 0.4; rewards 2 - 0.4 * 4 = 0.4 and 2 - 0.4 * 6 = -0.4
    assert float(rate) == pytest.approx(0.4)
    assert step.loss.item() == pytest.approx(0.0, abs=1e-6)  # -(0.5 * 0.4 + 0.5 * -0.4)
    step.loss.backward()
    # d/dz of sigmoid(z) * 0.4 + (1 - sigmoid(z)) * -0.4 at 0 is 0.25 * 0.8: stopping earlier pays
    assert z.grad[0, 0].item() == pytest.approx(-0.2, abs=1e-5) and z.grad[1, 0].item() == 0.0
    # the sampled rounds: their drafts (1 or 2), tokens and costs
    assert set(step.exits.flatten().tolist()) <= {1, 2}
    torch.testing.assert_close(step.parts.task, torch.full((4, 1), 2.0))
    torch.testing.assert_close(step.parts.depth_cost, 0.4 * (4.0 + 2.0 * (step.exits == 2).float()))


def _random_rounds(starts=6, k=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, starts, generator=gen)
    agree = torch.rand(starts, k, generator=gen) < 0.6
    allowed = torch.randint(1, k + 1, (starts,), generator=gen)
    return logits, rl.draft_round_tokens(agree, allowed), round_costs(3, 8, k, head_cost=2.0), allowed


def test_the_expected_objective_ascends_the_tokens_per_pass_rate():
    """grad J = (grad E[sum T] - J grad E[sum C]) / E[sum C]: the loss's gradient is J's, scaled."""
    logits, tokens, costs, allowed = _random_rounds()
    z = logits.clone().requires_grad_(True)
    step, rate = rl.draft_objective(z, tokens, costs, allowed, rollouts=2)
    step.loss.backward()
    y = logits.clone().requires_grad_(True)
    chance = rl.exit_distribution(rl.forced_stops(y, allowed))
    expected_costs = (chance * costs.unsqueeze(1)).sum()
    J = (chance * tokens).sum() / expected_costs
    J.backward()
    assert rate.item() == pytest.approx(J.item())
    scale = tokens.shape[1] / expected_costs.item()  # the loss averages over round starts
    torch.testing.assert_close(-z.grad * scale, y.grad, rtol=1e-4, atol=1e-7)
    assert y.grad.abs().sum() > 0


def test_reinforce_rounds_follow_the_policy_and_estimate_the_expected_gradient():
    logits, tokens, costs, allowed = _random_rounds(starts=3)
    exact = logits.clone().requires_grad_(True)
    rl.draft_objective(exact, tokens, costs, allowed, rollouts=2)[0].loss.backward()
    sampled = logits.clone().requires_grad_(True)
    step, rate = rl.draft_objective(sampled, tokens, costs, allowed, rollouts=40000, estimator="reinforce",
                                    generator=torch.Generator().manual_seed(3))
    assert bool((step.exits <= allowed.unsqueeze(0)).all()) and bool((step.exits >= 1).all())
    # the drawn round lengths follow pi(d): exit_distribution of the forced logits
    chance = rl.exit_distribution(rl.forced_stops(logits, allowed))
    drawn = torch.stack([(step.exits == d).float().mean(0) for d in range(1, 5)])
    torch.testing.assert_close(drawn, chance, atol=0.01, rtol=0)
    step.loss.backward()
    # the mean-baseline score function estimates the same gradient (up to the sampled rate's noise)
    torch.testing.assert_close(sampled.grad, exact.grad, atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="estimator"):
        rl.draft_objective(logits, tokens, costs, allowed, rollouts=2, estimator="exact")


# --------------------------------------------------------------------------- the stop rule in generation


def one_prompt(row=0):
    ids, mask = left_padded_prompts()
    keep = mask[row].bool()
    return ids[row, keep][None], mask[row, keep][None]


def stop_policy_between(decoder, states, layer, max_drafts, seed=0):
    """A random stop policy of `layer` whose tau lies between its probabilities on `states` [N, H], so that
    it stops after some drafts and not after others."""
    torch.manual_seed(seed)
    policy = DraftStopPolicy(decoder.hidden_size, layer, max_drafts, hidden=8)
    for parameter in policy.parameters():
        torch.nn.init.normal_(parameter, 0, 0.5)
    probs = policy.prob(states).detach().sort().values
    middle = len(probs) // 2
    policy.tau = float(probs[middle - 1: middle + 1].mean())
    return policy


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_the_policy_stops_where_its_probability_exceeds_tau_and_the_output_is_greedy(family):
    model, decoder = tiny_lm(family)
    ids, mask = one_prompt()
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                         pad_token_id=PAD)
    P, exits = ids.shape[1], PlainExits(4)
    for layer in (1, 2, 3):
        with torch.no_grad():
            states = decoder(ref, torch.ones_like(ref))[layer - 1][0, P - 1:-1]  # the state each new token came from
        agree = (exits.logits(layer, states, decoder).argmax(-1) == ref[0, P:]).tolist()
        policy = stop_policy_between(decoder, states, layer, 4)
        out = generate_verified(decoder, exits, ids, mask, NEW, draft_layer=layer, draft_length=4, stop=policy)
        assert torch.equal(out.sequences, ref), layer
        position = 0
        for drafted, accepted, probs in zip(out.drafted, out.accepted, out.stop_probs):
            assert len(probs) == drafted
            # the round stopped at its first draft whose stop probability exceeds tau, or at its cap
            assert all(p <= policy.tau for p in probs[:-1])
            assert drafted == min(4, NEW - position - 1) or (drafted and probs[-1] > policy.tau)
            # a draft after accepted ones came from the full model's own state there: the policy read it
            for j in range(min(accepted + 1, drafted)):
                assert probs[j] == pytest.approx(policy.prob(states[position + j]).item(), abs=1e-5)
            position += accepted + 1
        stops = [float(p) > policy.tau for p in policy.prob(states)]
        assert any(stops) and not all(stops)
        # the teacher-forced rounds with the policy's stops are the driver's (accepted drafts exactly)
        drafted, accepted = simulate_rounds(agree, 4, [not s for s in stops])
        assert accepted == out.accepted and all(d >= s for d, s in zip(drafted, out.drafted))


def test_a_stop_policy_of_another_layer_is_refused():
    _, decoder = tiny_lm("llama")
    ids, mask = one_prompt()
    with pytest.raises(ValueError, match="trained on the drafts of layer 3"):
        generate_verified(decoder, PlainExits(4), ids, mask, 4, draft_layer=2, draft_length=2,
                          stop=DraftStopPolicy(decoder.hidden_size, 3, 2))
    with pytest.raises(ValueError, match="tau"):
        DraftStopPolicy(decoder.hidden_size, 3, 2, tau=1.0)


# --------------------------------------------------------------------------- training on cached states


def synthetic_cache(responses=40, length=10, hidden=16, seed=0):
    """Cached draft-exit states whose first coordinate says whether the exit names the full model's token."""
    gen = torch.Generator().manual_seed(seed)
    n = responses * length
    agree = torch.rand(n, generator=gen) < 0.5
    states = torch.randn(n, 1, hidden, generator=gen)
    states[:, 0, 0] = torch.where(agree, 2.0, -2.0)
    full = torch.randint(6, 50, (n,), generator=gen)
    tokens = torch.where(agree, full, full + 1).unsqueeze(0)  # one exit
    cache = {"states": states, "full_tokens": full, "rows": torch.arange(responses).repeat_interleave(length),
             "exit_layers": torch.tensor([1])}
    return cache, tokens, agree


class CostOnly:
    """Stands in for the decoder in the costs: 8 layers, an LM head of a quarter layer (4 x 16 weights
    over 16 x 16). Drafting at layer 1 then pays while the drafts are right: a round of d drafts costs
    8.25 + 1.25 d passes, full depth 8.25 per token."""
    num_layers, vocab_size, hidden_size = 8, 4, 16

    @staticmethod
    def layers():
        return [torch.nn.Linear(16, 16, bias=False)]


def test_the_policy_learns_to_stop_after_drafts_that_will_be_rejected():
    L.seed_everything(0)
    cache, tokens, agree = synthetic_cache()
    policy = DraftStopPolicy(16, 1, 4, hidden=8)
    cfg = OmegaConf.create({"k": 8, "estimator": "expected", "lr": 3e-2})
    system, data = draft_policy_stage(policy, CostOnly(), PlainExits(8), cache, tokens, cfg)
    assert len(data) == 40 * 9 and system.costs.tolist() == [8.25 + 1.25 * d for d in range(1, 5)]
    before = draft_summary(policy, CostOnly(), PlainExits(8), cache, tokens)
    trainer = L.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(system, torch.utils.data.DataLoader(data, batch_size=64, shuffle=True))
    probs = policy.prob(cache["states"][:, 0]).detach()
    assert probs[~agree].mean() > 0.8 and probs[agree].mean() < 0.2  # stop after a draft that will be rejected
    after = draft_summary(policy, CostOnly(), PlainExits(8), cache, tokens)
    assert after["policy"]["passes_per_token"] < before["policy"]["passes_per_token"]
    best_fixed = min(row["passes_per_token"] for row in after["fixed"].values())
    assert after["policy"]["passes_per_token"] < best_fixed
    assert after["agreement"] == pytest.approx(float(agree.float().mean()))
    assert after["full_depth_passes_per_token"] == 8.25
    assert set(trainer.callback_metrics) >= {"draft/rate", "draft/tokens_per_round", "draft/drafts"}


def test_draft_costs_and_layers_are_read_from_the_model():
    _, decoder = tiny_lm("llama")
    layer_weights = sum(p.numel() for p in decoder.layers()[0].parameters())
    assert head_cost(decoder) == pytest.approx(97 * 32 / layer_weights)
    assert draft_cost(decoder, PlainExits(4), 2) == pytest.approx(head_cost(decoder))
    from ee_lightning.modeling.lm_exits import LMExitHeads

    exits = LMExitHeads(4, 32, exit_every=2, rank=4)
    assert draft_cost(decoder, exits, 2) == pytest.approx(head_cost(decoder) + 2 * 32 * 4 / layer_weights)
    assert draft_layer_of(None, [2, 4], 4) == 2 and draft_layer_of(2, [2, 4], 4) == 2
    with pytest.raises(ValueError, match="draft_layer=3 has no exit"):
        draft_layer_of(3, [2, 4], 4)
    with pytest.raises(ValueError, match="lower method.lm_exits.exit_every"):
        draft_layer_of(None, [4], 4)
    with pytest.raises(ValueError, match="per cached token"):
        DraftRounds(torch.zeros(3, 2), torch.zeros(2), torch.zeros(1, 2, dtype=torch.long), torch.ones(1))


# --------------------------------------------------------------------------- the stage and the saved model


class EpochsRun(L.Callback):
    """Records (stage, epoch) for every training epoch a Trainer starts."""

    def __init__(self, stage, seen):
        self.stage, self.seen = stage, seen

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append((self.stage, trainer.current_epoch))


def checkpointing_stages(run_dir, seen=None):
    """A run's stages with bare Trainers that keep each stage's last.ckpt, as a run's do (no loggers)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ee_lightning.training.stages import Stages

    def make(stage=None, max_epochs=1, log=False, replicate=False, **overrides):
        callbacks = [ModelCheckpoint(dirpath=run_dir / "checkpoints" / stage, save_last=True),
                     EpochsRun(stage, [] if seen is None else seen)] if stage else []
        return L.Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", callbacks=callbacks, **overrides)

    return Stages(run_dir, make)


def draft_run(tmp_path, run_dir, epochs, seen=None):
    from ee_lightning.app.validate import lm_exits_config
    from ee_lightning.modeling.backbones.decoders import wrap_decoder
    from ee_lightning.training.lm_pipeline import train_lm_exits
    from tests.conftest import CONF_DIR
    from tests.lm_fixtures import tiny_llama
    from tests.test_lm_training import jsonl_datamodule

    L.seed_everything(0)
    dm = jsonl_datamodule(tmp_path)
    decoder = wrap_decoder(tiny_llama(num_layers=4, hidden=16, vocab=len(dm.tokenizer)))
    cfg = OmegaConf.load(CONF_DIR / "lm_exits" / "default.yaml")
    cfg.exit_every, cfg.rank = 2, 4
    cfg.adapters.epochs, cfg.policy.epochs, cfg.classifier.epochs = 1, 0, 0
    cfg.draft_policy.epochs, cfg.draft_policy.batch_size, cfg.draft_policy.max_drafts = epochs, 8, 3
    return train_lm_exits(decoder, dm, lm_exits_config(cfg), checkpointing_stages(run_dir, seen)), dm


def test_the_stage_is_ledgered_reads_back_and_resumes_to_the_same_weights(tmp_path):
    reference, dm = draft_run(tmp_path, tmp_path / "reference", epochs=2)
    ledger = json.loads((tmp_path / "reference" / "stages.json").read_text())
    assert list(ledger) == ["lm_cache_train", "lm_adapters", "lm_scores", "lm_draft_policy", "lm_cache_validation"]
    policy = reference.draft_policy
    assert policy.draft_layer == 2 and policy.max_drafts == 3  # null: the deepest exit below the last
    summary = reference.summary
    assert summary["draft_policy"]["tokens"] == summary["train"]["tokens"]
    held_out = summary["evaluation"]["draft_policy"]
    assert held_out["tokens"] == summary["evaluation"]["tokens"] > 0 and set(held_out["fixed"]) == {"1", "2", "3"}
    assert held_out["policy"]["passes_per_token"] > 0
    weights = {k: v.clone() for k, v in policy.state_dict().items()}
    # read back: a rerun into the directory does not train the finished stage again
    seen = []
    again, _ = draft_run(tmp_path, tmp_path / "reference", epochs=2, seen=seen)
    assert seen == []
    assert all(torch.equal(again.draft_policy.state_dict()[k], w) for k, w in weights.items())
    assert json.loads((tmp_path / "reference" / "stages.json").read_text()) == ledger
    # resumed: a run whose stage was cut after its first epoch (last.ckpt written, not in the ledger)
    # continues from there to the uninterrupted run's weights, bit for bit
    cut = tmp_path / "cut"
    draft_run(tmp_path, cut, epochs=1)
    entries = json.loads((cut / "stages.json").read_text())
    del entries["lm_draft_policy"], entries["lm_cache_validation"]
    (cut / "stages.json").write_text(json.dumps(entries))
    resumed, _ = draft_run(tmp_path, cut, epochs=2, seen=seen)
    assert seen == [("lm_draft_policy", 1)]  # its second epoch only
    assert torch.load(cut / "checkpoints" / "lm_draft_policy" / "last.ckpt", weights_only=False)["global_step"] == \
        torch.load(tmp_path / "reference" / "checkpoints" / "lm_draft_policy" / "last.ckpt", weights_only=False)["global_step"]
    assert all(torch.equal(resumed.draft_policy.state_dict()[k], w) for k, w in weights.items())


def test_the_saved_model_carries_the_policy_and_verify_mode_uses_it(tmp_path):
    import ee_lightning
    from ee_lightning.modeling.export import ModelFolderError, save_decoder
    from tests.test_saved_model import tiny_decoder_folder

    decoder, tokenizer, exits, policy, classifier = tiny_decoder_folder(tmp_path / "plain")
    stop = DraftStopPolicy(decoder.hidden_size, 2, 3, hidden=8, tau=0.45)
    torch.manual_seed(2)
    for parameter in stop.parameters():
        torch.nn.init.normal_(parameter, 0, 0.5)
    save_decoder(tmp_path / "model", decoder, tokenizer, exits, policy, classifier, draft_policy=stop,
                 generation={"rules": {"policy": [0.5]}, "tau": 0.5, "max_new_tokens": 8, "batch_size": 2},
                 data={"system_prompt": None, "max_prompt_length": 48}, backbone="tiny_llama")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["draft_policy"] == {"draft_layer": 2, "max_drafts": 3, "hidden": 8, "tau": 0.45}
    loaded = ee_lightning.load(tmp_path / "model")
    assert all(torch.equal(loaded.parts.draft_policy.state_dict()[k], v) for k, v in stop.state_dict().items())
    prompts = ["Say hello.", "What is an early exit in a transformer?", "Count to three."]
    full = loaded.generate(prompts, rule="full")
    verified = loaded.generate(prompts, mode="verify")  # the policy's layer, its max_drafts, its stops
    assert verified.tokens == full.tokens
    assert verified.drafts["stop"] == "policy" and verified.drafts["draft_layer"] == 2
    assert verified.drafts["draft_length"] == 3 and verified.drafts["drafted"] > 0
    # the same rounds as generate_verified with the policy on the loaded modules, prompt by prompt
    from ee_lightning.data.generation import chat_prompt_ids

    drafted = longer = 0
    for prompt in prompts:
        ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)])
        out = generate_verified(loaded.decoder, loaded.parts.exits, ids, torch.ones_like(ids), 8, draft_layer=2,
                                draft_length=3, eos_token_id=tokenizer.eos_token_id, stop=loaded.parts.draft_policy)
        drafted += sum(out.drafted)
        unstopped = generate_verified(loaded.decoder, loaded.parts.exits, ids, torch.ones_like(ids), 8, draft_layer=2,
                                      draft_length=3, eos_token_id=tokenizer.eos_token_id)
        longer += sum(unstopped.drafted)
    assert verified.drafts["drafted"] == drafted < longer  # the policy ended some rounds before 3 drafts
    fixed = loaded.generate(prompts, mode="verify", draft_layer=2, draft_length=3, min_confidence=None)
    assert fixed.tokens == full.tokens and fixed.drafts["stop"] == "policy"  # its layer: the policy drafts
    # a folder without a draft policy (saved before it existed) still asks for the layer
    with pytest.raises(ValueError, match="needs draft_layer=E"):
        ee_lightning.load(tmp_path / "plain").generate(prompts, mode="verify")
    config["draft_policy"]["draft_layer"] = 3
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="layer 3 has no exit"):
        ee_lightning.load(tmp_path / "model")


@pytest.mark.parametrize("overrides,expected", [
    (["method.lm_exits.draft_policy.draft_layer=4"],  # the experiment's exits sit on every 3rd layer
     "method.lm_exits.draft_policy.draft_layer=4: has no exit: the exits sit on the multiples of exit_every=3"),
    (["method.lm_exits.draft_policy.draft_layer=0"], "method.lm_exits.draft_policy.draft_layer=0: must be >= 1"),
    (["method.lm_exits.draft_policy.tau=1.0"], "method.lm_exits.draft_policy.tau=1.0: must be in (0.0, 1.0)"),
    (["method.lm_exits.draft_policy.max_drafts=0"], "method.lm_exits.draft_policy.max_drafts=0: must be >= 1"),
    (["method.lm_exits.draft_policy.estimator=exact"],
     "method.lm_exits.draft_policy.estimator=exact: must be one of reinforce | expected"),
    (["method.lm_exits.draft_policy.estimator=reinforce", "method.lm_exits.draft_policy.k=1"],
     "method.lm_exits.draft_policy.k=1: must be >= 2; the baseline is the mean reward of the k rollouts"),
    (["method.lm_exits.draft_policy.epochs=-1"], "method.lm_exits.draft_policy.epochs=-1: must be >= 0; 0 skips"),
])
def test_bad_draft_policy_settings_fail_validation_naming_the_key(overrides, expected, tmp_path):
    from tests.test_lm_config import LM, problems

    assert expected in problems([*LM, *overrides], tmp_path)


def test_the_stage_is_off_by_default_and_its_node_validates(tmp_path):
    from ee_lightning.app.validate import validate_config
    from tests.conftest import compose_train

    cfg = compose_train(["experiment=aclsum_consistentee", "method.lm_exits.draft_policy.epochs=2",
                         "method.lm_exits.draft_policy.draft_layer=27"], tmp_path / "run")
    validate_config(cfg)
    default = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "lm_exits" / "default.yaml")
    assert default.draft_policy.epochs == 0 and default.draft_policy.draft_layer is None
