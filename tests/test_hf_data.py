"""data=hf: datasets saved to disk, csv/json/parquet files by builder, Hub names offline; labels, splits, errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ee_lightning.data import DataError, HfDataModule, build_datamodule
from ee_lightning.modeling.backbones import build_backbone
from ee_lightning.tasks import TaskSpec

try:
    from tests.conftest import CONF_DIR, backbone_cfg
except ImportError:
    from conftest import CONF_DIR, backbone_cfg

datasets = pytest.importorskip("datasets")
SPLITS = ("train", "validation", "test")
NAMES = ["negative", "positive"]


@pytest.fixture(scope="module")
def tok():
    return build_backbone(backbone_cfg("tiny_bert"))[1]


def rows(n: int, offset: int = 0) -> dict:
    """Generated premise/hypothesis pairs, a class label and a score."""
    words = ["calm", "storm", "bright", "dull", "quick", "slow"]
    return {"premise": [f"the {words[(i + offset) % 6]} day number {i + offset}" for i in range(n)],
            "hypothesis": [f"a {words[(i * 5 + offset) % 6]} thought" for i in range(n)],
            "label": [(i + offset) % 2 for i in range(n)],
            "score": [((i + offset) % 7) / 2 for i in range(n)]}


def features(label=None):
    return datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                              "label": label or datasets.ClassLabel(names=NAMES), "score": datasets.Value("float32")})


def save_dict(folder: Path, sizes=(("train", 20), ("validation", 6), ("test", 5)), label=None) -> Path:
    dd = datasets.DatasetDict({split: datasets.Dataset.from_dict(rows(n, 100 * k), features=features(label))
                               for k, (split, n) in enumerate(sizes)})
    dd.save_to_disk(str(folder))
    return folder


def module(tok, tmp_path, **kw) -> HfDataModule:
    kw.setdefault("text_column", "premise")
    return HfDataModule(tok, cache_dir=str(tmp_path / "cache"), hf_cache_dir=str(tmp_path / "hf_cache"), **kw)


def sizes(dm) -> dict:
    return {s: dm.split_size(s) for s in SPLITS}


def test_saved_dataset_dict_with_class_labels_and_pairs(tok, tmp_path, monkeypatch):
    path = save_dict(tmp_path / "saved")
    dm = module(tok, tmp_path, path=str(path), text_pair_column="hypothesis", name="nli")
    dm.prepare_data()
    dm.setup()
    assert dm.task == TaskSpec("nli", "classification", 2, "acc", tuple(NAMES))  # from the ClassLabel feature
    assert sizes(dm) == {"train": 20, "validation": 6, "test": 5}
    assert dm.dataset("validation").labels.tolist() == rows(6, 100)["label"]
    assert dm.texts("test") == rows(5, 200)["premise"]
    batch = next(iter(dm.dataloader("train", batch_size=4)))
    assert (batch["token_type_ids"] == 1).any()  # the pair is the second segment
    assert batch["attention_mask"].shape == batch["input_ids"].shape and batch["labels"].dtype == torch.long
    # a second module on the same data reads the tokenized cache, not the dataset
    calls = []
    monkeypatch.setattr(HfDataModule, "load_dataset_dict", lambda self: calls.append(1))
    again = module(tok, tmp_path, path=str(path), text_pair_column="hypothesis", name="nli")
    again.setup()
    assert calls == [] and again.cache_path == dm.cache_path and again.task == dm.task
    # another label setting is another cache entry
    assert module(tok, tmp_path, path=str(path), label_names=["neg", "pos"]).cache_path != dm.cache_path


def test_saved_single_dataset_carves_validation_and_test(tok, tmp_path):
    path = tmp_path / "one"
    datasets.Dataset.from_dict(rows(40), features=features()).save_to_disk(str(path))
    with pytest.raises(DataError, match=r"has no split 'validation' \(its splits: \['train'\]\); set "
                                        r"data\.validation_split to one of them, or data\.validation_split=null"):
        module(tok, tmp_path, path=str(path)).prepare_data()
    dm = module(tok, tmp_path, path=str(path), validation_split=None, test_split=None, validation_fraction=0.2)
    dm.setup()
    assert sizes(dm) == {"train": 28, "validation": 8, "test": 4}
    seen = sorted(t for s in SPLITS for t in dm.texts(s))
    assert seen == sorted(rows(40)["premise"])  # disjoint, nothing lost
    # the carving is seeded: the same config gives the same validation rows
    other = module(tok, tmp_path / "b", path=str(path), validation_split=None, test_split=None,
                   validation_fraction=0.2)
    assert other.texts("validation") == dm.texts("validation")


def write_csv(path: Path, data: dict) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(data))
        writer.writerows(zip(*data.values()))
    return path


def write_jsonl(path: Path, data: dict) -> Path:
    path.write_text("".join(json.dumps(dict(zip(data, values))) + "\n" for values in zip(*data.values())))
    return path


def test_csv_files_by_builder_with_string_labels(tok, tmp_path):
    files = {}
    for k, (split, n) in enumerate((("train", 16), ("validation", 5), ("test", 4))):
        data = rows(n, 100 * k)
        data["label"] = [("sad", "glad", "mad")[v % 3] for v in range(n)]
        files[split] = str(write_csv(tmp_path / f"{split}.csv", data))
    dm = module(tok, tmp_path, path="csv", data_files=files, metric="f1")
    dm.setup()
    assert dm.task == TaskSpec("hf", "classification", 3, "f1", ("glad", "mad", "sad"))  # sorted train labels
    assert sizes(dm) == {"train": 16, "validation": 5, "test": 4}
    assert dm.dataset("test").labels.tolist() == [2, 0, 1, 2]


def test_json_files_regression_and_glob(tok, tmp_path):
    write_jsonl(tmp_path / "part-0.jsonl", rows(12))
    write_jsonl(tmp_path / "part-1.jsonl", rows(12, 12))
    dm = module(tok, tmp_path, path="json", data_files=str(tmp_path / "part-*.jsonl"), label_column="score",
                task_kind="regression", validation_split=None, test_split=None)
    assert dm.task == TaskSpec("hf", "regression", 1, "pearson_spearman")
    dm.setup()
    assert sum(sizes(dm).values()) == 24
    labels = torch.cat([dm.dataset(s).labels for s in SPLITS])
    assert labels.dtype == torch.float32
    assert sorted(labels.tolist()) == sorted(rows(12)["score"] + rows(12, 12)["score"])


def test_parquet_files_integer_labels(tok, tmp_path):
    files = {}
    for split, n in (("train", 10), ("validation", 4), ("test", 4)):
        path = tmp_path / f"{split}.parquet"
        datasets.Dataset.from_dict(rows(n)).to_parquet(str(path))
        files[split] = str(path)
    dm = module(tok, tmp_path, path="parquet", data_files=files)
    dm.setup()
    assert dm.task.num_labels == 2 and dm.task.label_names == ("0", "1")
    assert dm.dataset("train").labels.tolist() == rows(10)["label"]


def test_errors_name_the_problem_and_the_fix(tok, tmp_path):
    with pytest.raises(DataError, match=r"data\.path is not set"):
        module(tok, tmp_path, path=None)
    with pytest.raises(DataError, match=r"data\.path=/no/such/folder: no such folder"):
        module(tok, tmp_path, path="/no/such/folder")
    with pytest.raises(DataError, match=r"data\.path=csv is a file builder: set data\.data_files"):
        module(tok, tmp_path, path="csv")
    with pytest.raises(DataError, match=r"data\.data_files: .*missing\.csv matches no file"):
        module(tok, tmp_path, path="csv", data_files={"train": str(tmp_path / "missing.csv")})
    single = write_csv(tmp_path / "train.csv", rows(10))
    with pytest.raises(DataError, match=r"is a file; set data\.path=csv and data\.data_files="):
        module(tok, tmp_path, path=str(single))
    saved = save_dict(tmp_path / "saved")
    with pytest.raises(DataError, match=r"\[train\]: no column 'sentence' \(columns: .*'premise'.*\); "
                                        r"set data\.text_column to one of them"):
        module(tok, tmp_path, path=str(saved), text_column="sentence").prepare_data()
    with pytest.raises(DataError, match=r"no column 'gold'.*set data\.label_column"):
        module(tok, tmp_path, path=str(saved), label_column="gold").prepare_data()
    with pytest.raises(DataError, match=r"no split 'dev' .*set data\.test_split to one of them"):
        module(tok, tmp_path, path=str(saved), test_split="dev").prepare_data()
    with pytest.raises(DataError, match=r"column 'score' holds .*float32.*not text; set data\.text_column"):
        module(tok, tmp_path, path=str(saved), text_column="score").prepare_data()
    with pytest.raises(DataError, match=r"holds class labels .*set data\.task_kind=classification"):
        module(tok, tmp_path, path=str(saved), task_kind="regression").prepare_data()
    with pytest.raises(DataError, match=r"num_labels=3 but the labels are named \['negative', 'positive'\]"):
        module(tok, tmp_path, path=str(saved), num_labels=3).prepare_data()
    # an unlabelled test split (GLUE's official test sets are all -1)
    unlabelled = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(10), features=features()),
                                       "validation": datasets.Dataset.from_dict(rows(4), features=features()),
                                       "test": datasets.Dataset.from_dict({**rows(3), "label": [-1] * 3},
                                                                          features=features())})
    unlabelled.save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(DataError, match=r"\[test\], row 1: no label \(-1\) in 3 row\(s\) \(every row.*"
                                        r"data\.test_split=validation data\.validation_split=null"):
        module(tok, tmp_path, path=str(tmp_path / "unlabelled")).prepare_data()
    # an integer id outside the head, named by split and row
    ints = tmp_path / "ints"
    datasets.Dataset.from_dict({**rows(6), "label": [0, 1, 0, 5, 1, 0]}).save_to_disk(str(ints))
    with pytest.raises(DataError, match=r"\[train\], line 4: label 5 is outside the classifier head.*num_labels=2"):
        module(tok, tmp_path, path=str(ints), num_labels=2, validation_split="train", test_split="train").prepare_data()
    # an empty text
    empty = tmp_path / "empty"
    datasets.Dataset.from_dict({**rows(4), "premise": ["a", "b", "  ", "d"]}).save_to_disk(str(empty))
    with pytest.raises(DataError, match=r"\[train\], row 3: empty text in column 'premise'"):
        module(tok, tmp_path, path=str(empty), validation_split="train", test_split="train").prepare_data()


def test_hub_name_offline_and_not_cached(tok, tmp_path, monkeypatch):
    """HF_DATASETS_OFFLINE (read by datasets at import) is honoured: no network, a clear error."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    dm = module(tok, tmp_path, path="someone/not_a_cached_dataset")
    assert dm.kind == "hub"
    with pytest.raises(DataError, match=r"data\.path=someone/not_a_cached_dataset: offline .* not in the datasets "
                                        r"cache .*save_to_disk and set data\.path=FOLDER"):
        dm.prepare_data()


def test_conf_hf_builds_from_config(tok, tmp_path):
    cfg = OmegaConf.load(CONF_DIR / "data" / "hf.yaml")
    cfg.pop("defaults")  # the file as Hydra composes it: its schema line is not a datamodule argument
    assert cfg.name == "hf" and cfg.path is None
    cfg.cache_dir = str(tmp_path / "cache")  # the app config interpolates it from paths.cache_dir
    cfg.path = str(save_dict(tmp_path / "saved"))
    cfg.text_column = "premise"
    dm = build_datamodule(cfg, tok)
    assert isinstance(dm, HfDataModule)
    dm.setup()
    assert sizes(dm) == {"train": 20, "validation": 6, "test": 5}
    cfg.colour = "red"
    with pytest.raises(DataError, match="unexpected keyword"):
        build_datamodule(cfg, tok)


def test_folder_of_data_files(tok, tmp_path):
    """A folder that is not a save_to_disk folder: the datasets library infers its splits from the file names."""
    folder = tmp_path / "folder"
    folder.mkdir()
    write_csv(folder / "train.csv", rows(12))
    write_csv(folder / "test.csv", rows(4, 50))
    dm = module(tok, tmp_path, path=str(folder), validation_split=None)
    assert dm.kind == "folder"
    dm.setup()
    assert sizes(dm) == {"train": 11, "validation": 1, "test": 4}
    assert dm.texts("test") == rows(4, 50)["premise"]
