"""Which samples of a map-style dataset each process reads, so that DDP neither repeats nor reorders them.

Lightning replaces a plain sampler under DDP with a ``DistributedSampler`` that pads every rank to the same count by
repeating samples: validation metrics then count up to ``world - 1`` samples twice, and the training order is set by
the global seed instead of the data module's own. Samplers that already are ``DistributedSampler`` s are left alone,
so these are. :class:`EpochLoader` also says where in its epoch a pass starts, so a resumed run reads what an
uninterrupted one read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from activation_transfer.errors import UsageError


def rank_world(trainer) -> tuple[int, int]:
    """``(global rank, world size)`` of the trainer a data module is attached to; ``(0, 1)`` without one."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    return 0, 1


def sample_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order a ``RandomSampler`` over ``n`` items with a generator seeded once with ``seed`` gives in epoch
    ``epoch``, computed from ``(seed, epoch)`` alone so that a resumed run sees the order an uninterrupted one saw."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    # RandomSampler draws two permutations per epoch without replacement (the second one is cut to length 0).
    for _ in range(2 * int(epoch)):
        torch.randperm(n, generator=generator)
    return torch.randperm(n, generator=generator).tolist()


def _check_enough(dataset, world: int, what: str) -> None:
    if len(dataset) < world:
        raise UsageError(f"{len(dataset)} {what} samples cannot be split over {world} processes; give at least {world}")


class EpochOrderSampler(DistributedSampler):
    """Training order: :func:`sample_order` of ``(seed, epoch)``. Lightning calls :meth:`set_epoch` before each pass,
    and :class:`EpochLoader` says how many of the pass's steps a resumed run already took (read before the loader's
    workers ask for indices), so a resumed run reads what an uninterrupted one read.

    One process reads the whole order. Under DDP rank ``r`` of ``w`` reads every ``w``-th sample of it from ``r``,
    up to ``w * (n // w)``: every rank runs the same number of steps (DDP syncs gradients at each), no sample is read
    twice, and the ``n % w`` (at most ``w - 1``) samples at the order's end, other ones each epoch, wait for the next.

    Args:
        dataset: The training samples (a sized dataset).
        seed: Seed of the order, independent of the global seed.
        num_replicas: Number of processes.
        rank: This process's rank.
        batch_size: Samples per step of the loader that batches this order (a resumed pass skips whole steps).
    """

    def __init__(self, dataset, seed: int, num_replicas: int = 1, rank: int = 0, batch_size: int = 1) -> None:
        _check_enough(dataset, num_replicas, "training")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed), drop_last=True)
        self.batch_size, self.skip_steps = int(batch_size), 0

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        """Read epoch ``epoch``'s order, starting after this rank's first ``skip_steps`` steps (a mid-epoch resume)."""
        super().set_epoch(int(epoch))
        self.skip_steps = int(skip_steps)

    def __iter__(self):
        order = sample_order(len(self.dataset), self.seed, self.epoch)
        share = order[self.rank : self.total_size : self.num_replicas]
        return iter(share[self.skip_steps * self.batch_size :])


def eval_sampler(dataset, rank: int, world: int) -> UnrepeatedDistributedSampler | None:
    """Validation: ``None`` (the loader's own sequential order) in one process; under DDP every ``world``-th sample
    from ``rank``, each sample on exactly one rank (counts may differ by one: evaluation syncs no gradients, and
    epoch-level metrics are weighted by each rank's sample count)."""
    if world == 1:
        return None
    _check_enough(dataset, world, "validation")
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)


def train_position(trainer) -> tuple[int, int]:
    """``(epoch, steps already taken in it)`` for the training pass whose first batch is being asked for.

    Both come from the trainer's loop state, which a checkpoint restores: a run resumed at an epoch's end continues
    with the next epoch's order, and one resumed mid-epoch (a checkpoint every n steps) skips exactly the steps
    taken, so a resumed run sees what an uninterrupted one sees. ``(0, 0)`` without a trainer.
    """
    if trainer is None:
        return 0, 0
    return int(trainer.current_epoch), int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


class _LazyIterator:
    """An iterator that calls ``start()`` for the real one when the first item is asked for."""

    def __init__(self, start: Callable[[], Iterator]):
        self._start, self._it = start, None

    def __iter__(self) -> _LazyIterator:
        return self

    def __next__(self):
        if self._it is None:
            self._it = self._start()
        return next(self._it)


class EpochLoader(DataLoader):
    """A DataLoader that tells whatever orders its batches where to start before each pass (workers get a fresh copy
    every pass): the dataset of an ``IterableDataset`` stream, else the sampler; either has
    ``set_epoch(epoch, skip_steps)`` and a ``len`` in steps.

    ``position_fn`` returns ``(epoch, steps already taken)`` (:func:`train_position`); it is read when the pass's
    first batch is asked for, not when ``iter()`` is called: Lightning creates the first iterator while estimating
    the number of steps, *before* it restores a checkpoint's loop state, so a resumed run would otherwise replay
    epoch 0's order (and worker processes ask the sampler for indices as soon as the iterator exists).
    """

    def __init__(self, dataset, position_fn: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(dataset, **kwargs)
        self._position_fn = position_fn

    def _start(self) -> Iterator:
        epoch, done = self._position_fn()
        ordered = self.dataset if isinstance(self.dataset, IterableDataset) else self.sampler
        # All of the epoch's steps are taken when a run resumes from a checkpoint written at the epoch's end
        # (on_train_epoch_end) under max_steps: Lightning asks for one batch more in that epoch, and an empty pass
        # makes it go on to the next one instead of training on a batch the uninterrupted run never took.
        ordered.set_epoch(epoch, min(done, len(ordered)))
        return super().__iter__()

    def __iter__(self):
        return _LazyIterator(self._start)

    # Nothing to save: the position is the trainer's loop state, restored from the same checkpoint. Having these
    # methods tells Lightning that this loader resumes mid-epoch correctly (it warns about loaders without them).
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
