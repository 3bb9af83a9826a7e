"""ActivationPairDataModule streaming: order, sharding over ranks and workers, split, bounded reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from activation_transfer.errors import UsageError
from datamodules.activation_pairs import ActivationPairDataModule, PairStream, epoch_order, step_bounds
from datamodules.store_format import PairStore, write_pairs_store


@pytest.fixture
def store(tmp_path):
    g = torch.Generator().manual_seed(0)
    s, r = torch.randn(1003, 6, generator=g), torch.randn(1003, 5, generator=g)
    write_pairs_store(tmp_path / "store", s, r, shard_rows=97)
    return tmp_path / "store", s, r


def test_epoch_order_is_a_seeded_permutation():
    a, wa = epoch_order(1000, shuffle=True, seed=1, epoch=0, chunk_rows=16, window_rows=128)
    b, _ = epoch_order(1000, shuffle=True, seed=1, epoch=0, chunk_rows=16, window_rows=128)
    c, _ = epoch_order(1000, shuffle=True, seed=1, epoch=1, chunk_rows=16, window_rows=128)
    d, _ = epoch_order(1000, shuffle=True, seed=2, epoch=0, chunk_rows=16, window_rows=128)
    assert sorted(a.tolist()) == list(range(1000)) and np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    # Windows hold at most window_rows rows: the reader's memory bound.
    assert np.diff(np.append(wa, 1000)).max() <= 128
    plain, _ = epoch_order(10, shuffle=False, seed=1, epoch=3, chunk_rows=4, window_rows=4)
    assert plain.tolist() == list(range(10))


@pytest.mark.parametrize(("n", "batch", "world"), [(101, 10, 2), (201, 10, 2), (7, 3, 3), (64, 32, 1)])
def test_step_bounds_cover_everything_with_equal_steps(n, batch, world):
    bounds = step_bounds(n, batch, world)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(b - a >= world for a, b in bounds)  # every rank gets at least one row per step


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_and_workers_see_disjoint_pairs_covering_the_split(store, num_workers):
    folder, s, r = store
    seen, steps = [], []
    for rank in range(3):
        ds = PairStream(
            str(folder),
            0,
            900,
            batch_size=16,
            shuffle=True,
            seed=3,
            chunk_rows=8,
            shuffle_buffer=64,
            rank=rank,
            world_size=3,
        )
        batches = list(DataLoader(ds, batch_size=None, num_workers=num_workers))
        steps.append(len(batches))
        assert len(batches) == len(ds)
        for b in batches:
            torch.testing.assert_close(b["sender"], s[b["index"]])
            torch.testing.assert_close(b["receiver"], r[b["index"]])
            seen += b["index"].tolist()
    assert len(set(steps)) == 1  # equal step counts: DDP ranks never wait on each other
    assert len(seen) == len(set(seen)) == 900 and set(seen) == set(range(900))


def test_reads_are_bounded_by_the_shuffle_buffer(store, monkeypatch):
    folder, _, _ = store
    sizes = []
    real = PairStore.read_rows

    def spy(self, rows):
        sizes.append(len(rows))
        return real(self, rows)

    monkeypatch.setattr(PairStore, "read_rows", spy)
    ds = PairStream(str(folder), 0, 1000, batch_size=32, shuffle=True, seed=0, chunk_rows=10, shuffle_buffer=250)
    assert sum(len(b["index"]) for b in ds) == 1000
    assert max(sizes) <= 250 and sum(sizes) == 1000  # each row read once, at most one buffer at a time


def test_data_module_split_dims_and_epochs(store):
    folder, s, _ = store
    dm = ActivationPairDataModule(store_dir=str(folder), batch_size=50, val_fraction=0.1, seed=0)
    assert (dm.sender_dim, dm.receiver_dim) == (6, 5)
    assert dm.sender_identity["name"] == "synthetic-sender"
    (tlo, thi), (vlo, vhi) = dm.split_rows()
    assert (tlo, thi, vlo, vhi) == (0, 903, 903, 1003)  # the last 10% of rows, in store order
    val = [b["index"] for b in dm.val_dataloader()]
    assert torch.cat(val).tolist() == list(range(903, 1003))
    train = dm.train_dataloader()
    e0 = torch.cat([b["index"] for b in train])
    again = torch.cat([b["index"] for b in train])
    assert torch.equal(e0, again)  # same epoch, same order (no trainer: epoch 0)
    assert sorted(e0.tolist()) == list(range(903))
    ds = train.dataset
    ds.set_epoch(1)
    assert not torch.equal(e0, torch.cat([b["index"] for b in ds]))


def test_data_module_bad_options(tmp_path):
    with pytest.raises(ValueError, match="data.store_dir is required"):
        ActivationPairDataModule()
    with pytest.raises(ValueError, match="val_fraction"):
        ActivationPairDataModule(store_dir=str(tmp_path), val_fraction=0.0)
    dm = ActivationPairDataModule(store_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"nowhere/manifest\.json does not exist"):
        _ = dm.sender_dim


@pytest.mark.parametrize("option", ["extract_batch_size", "max_length"])
@pytest.mark.parametrize("value", [0, -3])
def test_sizes_below_one_name_the_option(tmp_path, option, value):
    with pytest.raises(ValueError, match=rf"^data\.{option} must be >= 1, got {value}$"):
        ActivationPairDataModule(store_dir=str(tmp_path), **{option: value})


def test_rebuild_in_a_run_of_several_processes_is_refused_before_any_extraction(tmp_path, monkeypatch):
    # Each process cleared and re-extracted the store in turn while the others read it ("manifest.json does not
    # exist" on rank 0, or world_size extractions in a row).
    import datamodules.activation_pairs as pairs

    monkeypatch.setattr(pairs, "ensure_store", lambda *a, **k: pytest.fail("extracted"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    dm = ActivationPairDataModule(sender_model="tiny-neox", receiver_model="tiny-neox-large", rebuild=True)
    with pytest.raises(UsageError, match=r"^data\.rebuild is set in a run of 2 processes: .*--trainer\.devices 1"):
        _ = dm.sender_dim
