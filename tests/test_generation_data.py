"""Generation data: detokenising, ACLSum from the installed package, local jsonl/json, and batches."""
from __future__ import annotations

import json

import pytest
import torch

from ee_lightning.data.base import DataError
from ee_lightning.data.generation import (IGNORE_INDEX, ACLSumDataModule, PromptItem, PromptResponseDataModule,
                                          aclsum_dir, collate_generate, collate_train, detokenize, encode_item,
                                          read_aclsum, read_prompt_response)
from tests.lm_fixtures import tiny_chat_tokenizer


@pytest.mark.parametrize("tokenised, plain", [
    ("Answer Extraction in Question Answering ( QA ) .", "Answer Extraction in Question Answering (QA)."),
    ("up to 20 % in MRR , we ca n't ; the user 's model : it", "up to 20% in MRR, we can't; the user's model: it"),
    ('a so-called " gold " label [ 3 ] .', 'a so-called "gold" label [3].'),
    ("`` quoted '' text", '"quoted" text'),
    ("costs $ 5", "costs $5"),
    ("", ""),
])
def test_detokenize(tokenised, plain):
    assert detokenize(tokenised) == plain


def test_aclsum_from_installed_package_has_its_750_pairs():
    folder = aclsum_dir()
    sizes = {split: len(read_aclsum(folder, split)) for split in ("train", "validation", "test")}
    assert sizes == {"train": 300, "validation": 150, "test": 300}
    first = read_aclsum(folder, "train")[0]
    assert first.prompt.startswith("Summarize the challenge of this paper in one sentence: In this paper, we explore "
                                   "correlation of dependency relation paths to rank candidate answers in answer "
                                   "extraction. Using")
    assert first.reference.startswith("A generally accessible NER system for QA systems")
    assert " ." not in first.prompt and "( " not in first.prompt


def test_aclsum_rejects_unknown_aspect_and_missing_folder(tmp_path):
    tokenizer = tiny_chat_tokenizer()
    with pytest.raises(DataError, match="choose among"):
        ACLSumDataModule(tokenizer, aspects=["conclusion"])
    with pytest.raises(DataError, match="not a folder"):
        aclsum_dir(str(tmp_path / "nowhere"))


def test_aclsum_extra_training_prompts_cover_every_training_paper_without_a_reference():
    tokenizer = tiny_chat_tokenizer()
    templates = ["Write a title for this paper: {abstract}", "Describe the {aspect} of this paper: {abstract}"]
    dm = ACLSumDataModule(tokenizer, aspects=["approach", "outcome"], train_prompt_templates=templates,
                          max_prompt_length=40, max_response_length=8)
    dm.setup()
    train = dm.dataset("train")
    assert len(train) == 100 * 2 + 100 * (1 + 2)  # the pairs, then a title per paper, then one prompt per aspect
    extra = train.items[200:]
    assert {item.reference for item in extra} == {""}
    assert extra[0].prompt.startswith("Write a title for this paper: In this paper, we explore correlation")
    assert extra[100].prompt.startswith("Describe the approach of this paper: In this paper")
    assert extra[101].prompt.startswith("Describe the outcome of this paper: In this paper")
    assert all(item.origin.startswith("ACLSum ") for item in extra)
    # the held-out splits keep their pairs only
    assert len(dm.dataset("validation")) == 50 * 2 and len(dm.dataset("test")) == 100 * 2
    with pytest.raises(DataError, match=r"'Say hello' has no \{abstract\} field"):
        ACLSumDataModule(tokenizer, train_prompt_templates=["Say hello"])
    with pytest.raises(DataError, match=r"'\{title\}: \{abstract\}' is not a template of \{abstract\} and \{aspect\} "
                                        r"only \(KeyError: 'title'\)"):
        ACLSumDataModule(tokenizer, train_prompt_templates=["{title}: {abstract}"])


def test_aclsum_datamodule_batches():
    tokenizer = tiny_chat_tokenizer()
    dm = ACLSumDataModule(tokenizer, aspects=["outcome"], max_train_samples=6, max_eval_samples=4,
                          max_prompt_length=40, max_response_length=8, batch_size=3, eval_batch_size=2)
    dm.setup()
    assert [len(dm.dataset(s)) for s in ("train", "validation", "test")] == [6, 4, 4]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 3
    assert batch["input_ids"].shape[1] <= 48
    generate = next(iter(dm.generation_dataloader("test")))
    assert len(generate["references"]) == 2 and generate["attention_mask"][:, -1].all()


def test_train_batches_mask_prompt_and_padding_and_right_pad():
    rows = [{"idx": 0, "prompt_ids": [5, 6], "response_ids": [7, 3], "prompt": "p", "reference": "r"},
            {"idx": 1, "prompt_ids": [5], "response_ids": [8, 9, 3], "prompt": "q", "reference": "s"},
            {"idx": 2, "prompt_ids": [5, 6, 6], "response_ids": [3], "prompt": "t", "reference": "u"}]
    batch = collate_train(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 3], [5, 8, 9, 3], [5, 6, 6, 3]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 3], [-100, 8, 9, 3], [-100, -100, -100, 3]]
    rows[1]["response_ids"] = [8]
    batch = collate_train(rows, pad_id=0)
    assert batch["input_ids"].tolist()[1] == [5, 8, 0, 0]
    assert batch["labels"].tolist()[1] == [-100, 8, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"].tolist()[1] == [1, 1, 0, 0]


def test_generation_batches_left_pad_prompts():
    rows = [{"idx": 4, "prompt_ids": [5, 6, 7], "response_ids": [1], "prompt": "p", "reference": "r1"},
            {"idx": 9, "prompt_ids": [5], "response_ids": [1], "prompt": "q", "reference": "r2"}]
    batch = collate_generate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["references"] == ["r1", "r2"] and batch["idx"].tolist() == [4, 9]


def test_encode_item_uses_chat_template_appends_eos_and_truncates():
    tokenizer = tiny_chat_tokenizer(["a b c d e f"])
    prompt, response, cut = encode_item(tokenizer, PromptItem("a b c", "d e", "o"), 100, 10)
    assert tokenizer.decode(prompt) == "<|im_start|> user a b c <|im_end|> <|im_start|> assistant"
    assert response == tokenizer.convert_tokens_to_ids(["d", "e"]) + [tokenizer.eos_token_id] and not cut
    prompt, response, cut = encode_item(tokenizer, PromptItem("a b c d e f", "d e", "o"), 8, 2)
    assert cut and len(prompt) == 8 and response == tokenizer.convert_tokens_to_ids(["d", "e"])
    assert tokenizer.decode(prompt) == "<|im_start|> user a b c <|im_end|> <|im_start|> assistant"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_jsonl_and_json_list(tmp_path):
    rows = [{"instruction": "say", "input": "hi there", "output": "hello"},
            {"instruction": "count", "input": "", "output": "one two"}]
    items = read_prompt_response(write_jsonl(tmp_path / "a.jsonl", rows), "instruction", "output", "input")
    assert [i.prompt for i in items] == ["say\n\nhi there", "count"]
    assert [i.reference for i in items] == ["hello", "one two"]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert read_prompt_response(tmp_path / "a.json", "instruction", "output", "input") == \
        [PromptItem(i.prompt, i.reference, str(tmp_path / "a.json") + f", item {n + 1}") for n, i in enumerate(items)]


def test_jsonl_errors_name_file_line_and_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        PromptResponseDataModule(tiny_chat_tokenizer(), train_file=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="train_file is not set"):
        PromptResponseDataModule(tiny_chat_tokenizer())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not a JSON object"):
        read_prompt_response(bad, "instruction", "output")
    missing = write_jsonl(tmp_path / "m.jsonl", [{"instruction": "a", "output": "b"}, {"question": "a", "output": "b"}])
    with pytest.raises(DataError, match=r"m.jsonl, line 2: no 'instruction' field; set data.prompt_field"):
        read_prompt_response(missing, "instruction", "output")
    empty = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "a", "output": " "}])
    with pytest.raises(DataError, match="line 1: empty response"):
        read_prompt_response(empty, "instruction", "output")


def test_jsonl_datamodule_carves_splits(tmp_path):
    rows = [{"prompt": f"w{i} a", "response": f"b w{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    tokenizer = tiny_chat_tokenizer([f"w{i} a b" for i in range(20)])
    dm = PromptResponseDataModule(tokenizer, train_file=str(path), prompt_field="prompt", response_field="response",
                                  input_field=None, validation_fraction=0.1, test_fraction=0.2)
    dm.setup()
    sizes = [len(dm.dataset(s)) for s in ("train", "validation", "test")]
    assert sizes == [14, 2, 4]
    seen = sorted(r for s in ("train", "validation", "test") for r in dm.dataset(s).references)
    assert seen == sorted(r["response"] for r in rows)
    batch = next(iter(dm.dataloader("train", "train", batch_size=20)))
    targets = batch["labels"][batch["labels"] != IGNORE_INDEX]
    assert (targets == tokenizer.eos_token_id).sum() == 14
    assert torch.equal(batch["input_ids"][batch["labels"] != IGNORE_INDEX], targets)


def test_conf_generation_options_instantiate(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.conftest import CONF_DIR

    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"w{i}", "output": "b"} for i in range(10)])
    tokenizer = tiny_chat_tokenizer([f"w{i} b" for i in range(10)])
    for option, extra in (("aclsum", {}), ("jsonl_generation", {"train_file": str(path)})):
        cfg = OmegaConf.load(CONF_DIR / "data" / f"{option}.yaml")
        assert cfg.defaults[0] == f"{option}_schema"  # Hydra's defaults list (the schema), not an argument
        del cfg["defaults"]
        assert cfg.name == option
        dm = instantiate(cfg, tokenizer=tokenizer, _convert_="all", **extra)
        dm.setup()
        assert all(len(dm.dataset(s)) > 0 for s in ("train", "validation", "test"))
        assert len(dm.dataset("train")) <= cfg.max_train_samples
