"""Issue 20: functional training data never holds the paper's evaluation questions, even under another file name
(item 2), and its shuffled order depends on the epoch, so a resumed run sees the order an uninterrupted one does
(item 6)."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils.data import RandomSampler

from activation_transfer.errors import UsageError
from datamodules.qa_training import EpochRandomSampler, QATrainingDataModule


@pytest.mark.parametrize("role", ["train_source", "val_source"])
def test_a_renamed_copy_of_a_paper_evaluation_file_is_refused(tmp_path, multihop_dir, role):
    copy = tmp_path / "my_qa.jsonl"
    shutil.copy(multihop_dir / "clean_eval.jsonl", copy)
    dm = QATrainingDataModule(**{role: str(copy)}, num_train_samples=8, num_val_samples=4)
    with pytest.raises(UsageError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert str(copy) in message and "clean_eval.jsonl" in message and "training on evaluation questions" in message


def test_a_renamed_copy_of_the_papers_train_file_is_accepted(tmp_path, multihop_dir):
    copy = tmp_path / "my_train.jsonl"
    shutil.copy(multihop_dir / "train.jsonl", copy)
    dm = QATrainingDataModule(train_source=str(copy), num_train_samples=8, num_val_samples=4)
    dm.setup("fit")
    assert len(dm.train_set) == 8


def test_epoch_order_is_the_once_seeded_order_and_depends_only_on_seed_and_epoch():
    data = list(range(11))
    once = RandomSampler(data, generator=torch.Generator().manual_seed(5))
    expected = [list(once) for _ in range(3)]  # what an uninterrupted run saw before (one generator, three epochs)
    sampler = EpochRandomSampler(data, 5)
    got = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        got.append(list(sampler))
    assert got == expected and expected[1] != expected[2]
    resumed = EpochRandomSampler(data, 5)  # a fresh sampler, as after a restart, at epoch 2
    resumed.set_epoch(2)
    assert list(resumed) == expected[2]
