"""The organisms' training order: seeded, a function of (seed, epoch), resumable mid-epoch, shared out under DDP."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from datamodules.organism_text import LengthBucketBatchSampler, OrganismTextDataModule

LENGTHS = torch.randint(20, 90, (650,), generator=torch.Generator().manual_seed(0))  # 20 batches of 32, 10 rows left


def _passes_before_the_fix(lengths, batch_size, seed, pool_batches, passes):
    """The sampler as it was (shipped organisms were trained on it): pass p seeded with ``seed * 100003 + p``, the pass
    counter advanced by every ``__iter__``, so a resumed run restarted at pass 0."""
    for p in range(passes):
        gen = torch.Generator().manual_seed(seed * 100003 + p)
        order = torch.randperm(len(lengths), generator=gen)
        pool = batch_size * pool_batches
        batches = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        batches = [b for b in batches if len(b) == batch_size]
        yield [batches[i].tolist() for i in torch.randperm(len(batches), generator=gen).tolist()]


def _epoch(sampler, epoch, skip_steps=0):
    sampler.set_epoch(epoch, skip_steps)
    return list(sampler)


def test_an_uninterrupted_run_reads_the_order_it_read_before_and_a_fresh_sampler_the_same_epoch():
    for pool in (1, 4):
        old = list(_passes_before_the_fix(LENGTHS, 32, 3, pool, 3))
        sampler = LengthBucketBatchSampler(LENGTHS, 32, seed=3, pool_batches=pool)
        assert [_epoch(sampler, e) for e in range(3)] == old  # the shipped recipes' weights do not change
        # A run resumed at epoch 2 builds a new sampler: it reads epoch 2's order, not epoch 0's again.
        assert _epoch(LengthBucketBatchSampler(LENGTHS, 32, seed=3, pool_batches=pool), 2) == old[2]
        assert list(sampler) == list(sampler) == old[2]  # iterating again (len, a second pass) advances nothing
        assert len(sampler) == 20


def test_batches_are_seeded_and_grouped_by_length():
    plain = _epoch(LengthBucketBatchSampler(LENGTHS, 32, seed=3, pool_batches=1), 0)
    bucketed = _epoch(LengthBucketBatchSampler(LENGTHS, 32, seed=3, pool_batches=20), 0)
    for batches in (plain, bucketed):
        flat = [i for b in batches for i in b]
        assert all(len(b) == 32 for b in batches) and len(set(flat)) == 640  # every row at most once
    sampler = LengthBucketBatchSampler(LENGTHS, 32, seed=3)
    assert _epoch(sampler, 0) != _epoch(sampler, 1)  # a new order each epoch

    def spread(batches):
        return sum(int(LENGTHS[b].max() - LENGTHS[b].min()) for b in batches) / len(batches)

    assert spread(bucketed) < spread(plain) / 4


def test_a_mid_epoch_resume_reads_exactly_the_batches_not_yet_taken():
    whole = _epoch(LengthBucketBatchSampler(LENGTHS, 32, seed=3), 1)
    for taken in (1, 7, 19):
        assert _epoch(LengthBucketBatchSampler(LENGTHS, 32, seed=3), 1, taken) == whole[taken:]
    # Resumed with the whole epoch taken (a checkpoint written at its end): nothing is left of it.
    assert _epoch(LengthBucketBatchSampler(LENGTHS, 32, seed=3), 1, 20) == []


def test_under_ddp_each_rank_reads_every_world_th_batch_the_same_number_of_steps_and_none_twice():
    whole = _epoch(LengthBucketBatchSampler(LENGTHS, 32, seed=3, pool_batches=4), 1)
    for world in (2, 3):
        shares = [
            _epoch(LengthBucketBatchSampler(LENGTHS, 32, seed=3, pool_batches=4, num_replicas=world, rank=r), 1)
            for r in range(world)
        ]
        steps = 20 // world
        assert [len(s) for s in shares] == [steps] * world  # DDP syncs gradients at every step
        assert sorted(b for s in shares for b in s) == sorted(whole[: steps * world])  # disjoint, none lost but tail
        assert shares[1] == whole[1 : steps * world : world]
        resumed = LengthBucketBatchSampler(LENGTHS, 32, seed=3, pool_batches=4, num_replicas=world, rank=1)
        assert _epoch(resumed, 1, 2) == shares[1][2:]  # a rank skips the steps it took, not the batches of all


def test_loaders_give_the_old_batches_and_under_ddp_each_validation_row_once(cache_dir):
    dm = OrganismTextDataModule(num_train_samples=200, num_val_samples=45, batch_size=16, shuffle_seed=5)
    dm.setup("fit")
    lengths = (dm.train_set.tensors[1] != 0).sum(dim=1)
    old = next(_passes_before_the_fix(lengths, 16, 5, 1, 1))
    old_loader = DataLoader(dm.train_set, batch_sampler=old, collate_fn=dm._collate)
    for new, before in zip(dm.train_dataloader(), old_loader, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(new, before, strict=True))
    assert [len(b[0]) for b in dm.val_dataloader()] == [16, 16, 13]

    def rows(loader):  # each row without its padding (batches are trimmed to their own longest row)
        return [tuple(ids[kind != 0].tolist()) for batch in loader for ids, kind in zip(batch[0], batch[1])]

    seen = []
    for rank in (0, 1):
        dm.trainer = type("Trainer", (), {"global_rank": rank, "world_size": 2})()  # rank r of a DDP run of 2
        seen += rows(dm.val_dataloader())
    assert len(seen) == 45 and sorted(seen) == sorted(rows([dm.val_set.tensors]))
