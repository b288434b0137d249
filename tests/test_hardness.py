"""hardness.py: memorized layers of constructed prediction tables, buckets, and the saved artefact."""
from __future__ import annotations

import pytest
import torch

from ee_lightning.exits import hardness
from ee_lightning.tasks import REGRESSION, TaskSpec

T, F = True, False


def table(*columns: list[bool]) -> torch.Tensor:
    """Instances given as columns (one list of per-layer correctness each) -> [L, N]."""
    return torch.tensor(columns, dtype=torch.bool).T


def test_memorized_layer_constructed_cases():
    correct = table(
        [T, T, T, T],  # all right -> 1
        [F, F, F, F],  # all wrong -> L
        [T, F, T, T],  # right from 3 on -> 3
        [T, T, T, F],  # last head wrong -> L
        [F, T, T, T],  # -> 2
        [F, F, F, T],  # only the last head right -> L as well
        [T, F, F, T],  # -> 4
    )
    assert hardness.memorized_layer(correct).tolist() == [1, 4, 3, 4, 2, 4, 4]


def test_memorized_layer_single_layer_and_dtype():
    m = hardness.memorized_layer(table([T], [F]))
    assert m.tolist() == [1, 1] and m.dtype == torch.long


def test_correct_table_classification():
    # L=2, N=3, C=3
    logits = torch.tensor([
        [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]],
        [[0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0]],
    ])
    labels = torch.tensor([0, 1, 2])
    task = TaskSpec("toy", num_labels=3)
    correct = hardness.correct_table(task, logits, labels)
    assert correct.tolist() == [[T, T, T], [F, T, F]]
    assert hardness.memorized_layer(correct).tolist() == [2, 1, 2]


def test_correct_table_regression_tolerance():
    task = TaskSpec("sts", kind=REGRESSION, num_labels=1, metric="pearson_spearman")
    labels = torch.tensor([3.0, 1.0])
    # L=3, N=2, C=1: instance 0 errors 1.0, 0.3, 0.05; instance 1 errors 0.05, 0.3, 0.3
    logits = torch.tensor([[[4.0], [1.05]], [[2.7], [1.3]], [[3.05], [0.7]]])
    loose = hardness.correct_table(task, logits, labels, tolerance=0.5)
    assert loose.tolist() == [[F, T], [T, T], [T, T]]
    assert hardness.memorized_layer(loose).tolist() == [2, 1]
    tight = hardness.correct_table(task, logits, labels, tolerance=0.1)
    assert tight.tolist() == [[F, T], [F, F], [T, F]]
    assert hardness.memorized_layer(tight).tolist() == [3, 3]


def test_factor_buckets_histogram():
    m = torch.tensor([1, 2, 3, 4, 5, 6])
    assert hardness.hardness_factor(m, 6).tolist() == pytest.approx([5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])
    # L=6: easy m <= 2, hard m > 4
    assert hardness.hardness_buckets(m, 6).tolist() == [0, 0, 1, 1, 2, 2]
    # L=12: easy 1..4, medium 5..8, hard 9..12
    assert hardness.hardness_buckets(torch.arange(1, 13), 12).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # L=4: easy m <= 1.33, hard m > 2.67
    assert hardness.hardness_buckets(torch.arange(1, 5), 4).tolist() == [0, 1, 2, 2]
    assert hardness.BUCKET_NAMES == ("easy", "medium", "hard")
    assert hardness.histogram(torch.tensor([1, 1, 3, 6, 6, 6]), 6).tolist() == [2, 0, 1, 0, 0, 3]
    with pytest.raises(ValueError):
        hardness.histogram(torch.tensor([0]), 6)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "stage1.ckpt"
    path.write_bytes(b"weights v1")
    return path


def test_save_load_round_trip(tmp_path, checkpoint):
    meta = hardness.hardness_meta(checkpoint, num_layers=6, task=TaskSpec("sst2"), split_size=10, tolerance=0.5)
    path = tmp_path / "runs" / "hardness.pt"
    idx = torch.tensor([7, 0, 3, 5])
    m = torch.tensor([2, 6, 1, 4])
    hardness.save_hardness(path, m, idx, meta)
    assert [p.name for p in path.parent.iterdir()] == ["hardness.pt"]  # no temp file left behind
    lookup = hardness.load_hardness(path, meta)
    assert lookup is not None and lookup.dtype == torch.long
    assert lookup[idx].tolist() == [2, 6, 1, 4]
    assert lookup.shape == (10,)  # the whole split, though row 7 is the last one saved
    assert lookup[9].item() == hardness.MISSING
    assert lookup[1].item() == hardness.MISSING
    # metadata equal after a JSON round trip (tuple vs list, key order) still matches
    reordered = dict(reversed(list({**meta, "extra": (1, 2)}.items())))
    hardness.save_hardness(path, m, idx, {**meta, "extra": [1, 2]})
    assert hardness.load_hardness(path, reordered) is not None


def test_load_stale_or_missing_returns_none(tmp_path, checkpoint):
    meta = hardness.hardness_meta(checkpoint, num_layers=6, task="sst2", split_size=10, tolerance=0.5)
    path = tmp_path / "hardness.pt"
    hardness.save_hardness(path, torch.tensor([1, 2]), torch.tensor([0, 1]), meta)
    assert hardness.load_hardness(path, meta) is not None
    assert hardness.load_hardness(path, {**meta, "num_layers": 12}) is None
    assert hardness.load_hardness(path, {**meta, "tolerance": 0.1}) is None
    assert hardness.load_hardness(path, {**meta, "split_size": 11}) is None
    assert hardness.load_hardness(path, {**meta, "task": "mnli"}) is None
    # the checkpoint changed on disk: its fingerprint no longer matches
    checkpoint.write_bytes(b"weights v2")
    fresh = hardness.hardness_meta(checkpoint, num_layers=6, task="sst2", split_size=10, tolerance=0.5)
    assert fresh["checkpoint"]["sha256"] != meta["checkpoint"]["sha256"]
    assert hardness.load_hardness(path, fresh) is None
    assert hardness.load_hardness(tmp_path / "absent.pt", meta) is None
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    assert hardness.load_hardness(tmp_path / "garbage.pt", meta) is None


def test_save_rejects_bad_input(tmp_path):
    meta = {"num_layers": 4}
    with pytest.raises(ValueError):
        hardness.save_hardness(tmp_path / "h.pt", torch.tensor([1, 2]), torch.tensor([0]), meta)
    with pytest.raises(ValueError):
        hardness.save_hardness(tmp_path / "h.pt", torch.tensor([1, 2]), torch.tensor([0, 0]), meta)
    with pytest.raises(ValueError):
        hardness.save_hardness(tmp_path / "h.pt", torch.tensor([1, 5]), torch.tensor([0, 1]), meta)
    assert not list(tmp_path.iterdir())


def test_checkpoint_fingerprint_folder(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"aa")
    (folder / "b.json").write_text("{}")
    first = hardness.checkpoint_fingerprint(folder)
    assert first["size"] == 4
    (folder / "a.bin").write_bytes(b"ab")
    assert hardness.checkpoint_fingerprint(folder)["sha256"] != first["sha256"]
    assert "sha256" not in hardness.checkpoint_fingerprint(folder, hash_contents=False)
