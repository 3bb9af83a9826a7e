"""Issue 20: functional training data never holds the paper's evaluation questions, even under another file name
(item 2), and its shuffled order depends on the epoch, so a resumed run sees the order an uninterrupted one does
(item 6)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from torch.utils.data import RandomSampler

from activation_transfer.errors import UsageError
from datamodules.qa_sources import PAPER_FILES
from datamodules.qa_training import (
    CLEAN_EVAL_CONTEXTS,
    QATrainingDataModule,
    clean_eval_contexts,
    context_digest,
)
from datamodules.rank_samplers import EpochOrderSampler, eval_sampler


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_shipped_clean_eval_digests_are_those_of_the_pinned_file(multihop_dir):
    path = multihop_dir / "clean_eval.jsonl"
    shipped = json.loads(CLEAN_EVAL_CONTEXTS.read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == shipped["clean_eval_sha256"]
    assert shipped["clean_eval_sha256"] == PAPER_FILES["clean_eval"].sha256
    assert clean_eval_contexts() == {context_digest(r["context"]) for r in _rows(path)}
    assert len(clean_eval_contexts()) == 394  # 396 questions, 2 contexts asked twice


def test_the_papers_train_and_val_files_lose_their_clean_eval_contexts(multihop_dir):
    # val.jsonl holds 4 clean_eval questions verbatim (5 contexts), train.jsonl 13 clean_eval contexts with other
    # questions: the paper deduplicated clean_eval against train by key only.
    held_out = {r["context"] for r in _rows(multihop_dir / "clean_eval.jsonl")}
    assert sum(r["context"] in held_out for r in _rows(multihop_dir / "val.jsonl")) == 5
    assert sum(r["context"] in held_out for r in _rows(multihop_dir / "train.jsonl")) == 13
    dm = QATrainingDataModule(train_source="train", val_source="val", data_dir=str(multihop_dir))
    dm.setup("fit")
    # 94 more training rows are validation questions (dropped from training since issue 20).
    assert len(dm.val_set) == 80 - 5 and len(dm.train_set) == 560 - 13 - 94
    assert not any(s.context in held_out for s in dm.train_set.samples + dm.val_set.samples)


def test_part_of_an_evaluation_file_under_another_name_leaves_nothing_to_train_on(tmp_path, multihop_dir):
    # Its SHA-256 is not the file's, so the whole-file check cannot see it; the contexts can.
    part = tmp_path / "my_qa.jsonl"
    part.write_text("".join((multihop_dir / "clean_eval.jsonl").read_text().splitlines(keepends=True)[:50]))
    dm = QATrainingDataModule(train_source=str(part), num_val_samples=4)
    with pytest.raises(UsageError, match="no training samples left"):
        dm.setup("fit")


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
    sampler = EpochOrderSampler(data, 5)
    got = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        got.append(list(sampler))
    assert got == expected and expected[1] != expected[2]
    resumed = EpochOrderSampler(data, 5)  # a fresh sampler, as after a restart, at epoch 2
    resumed.set_epoch(2)
    assert list(resumed) == expected[2]


def test_under_ddp_each_rank_reads_its_share_of_the_seeded_order_and_no_sample_twice():
    data = list(range(11))
    once = RandomSampler(data, generator=torch.Generator().manual_seed(5))
    orders = [list(once) for _ in range(2)]  # the one-process order of epochs 0 and 1
    for epoch, order in enumerate(orders):
        ranks = []
        for rank in range(3):
            sampler = EpochOrderSampler(data, 5, num_replicas=3, rank=rank)
            sampler.set_epoch(epoch)
            ranks.append(list(sampler))
        # Every 3rd of the order from the rank, up to 3 * (11 // 3): equal counts, 2 samples wait for the next epoch.
        assert ranks == [order[r:9:3] for r in range(3)]
        assert len(set(sum(ranks, []))) == 9
    with pytest.raises(UsageError, match="2 training samples cannot be split over 3 processes"):
        EpochOrderSampler([0, 1], 5, num_replicas=3, rank=0)


def test_under_ddp_validation_reads_every_sample_exactly_once():
    data = list(range(5))
    assert eval_sampler(data, 0, 1) is None  # one process: the loader's own sequential order
    shares = [list(eval_sampler(data, rank, 2)) for rank in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]
    with pytest.raises(UsageError, match="validation samples cannot be split over 8 processes"):
        eval_sampler(data, 0, 8)


def test_the_data_modules_loaders_take_this_ranks_share():
    dm = QATrainingDataModule(num_train_samples=9, num_val_samples=5, batch_size=2, shuffle_seed=3)
    dm.setup("fit")
    one = [s.sample_id for batch in dm.train_dataloader() for s in batch]
    dm.trainer = type("Trainer", (), {"global_rank": 1, "world_size": 2})()  # rank 1 of a DDP run of 2
    train = [s.sample_id for batch in dm.train_dataloader() for s in batch]
    val = [s.sample_id for batch in dm.val_dataloader() for s in batch]
    assert train == one[1:8:2]  # rank 1 of 2: every 2nd of the one-process order, up to 2 * (9 // 2)
    assert val == [s.sample_id for s in dm.val_set.samples[1::2]]
