"""The pair stream: which rows of an activation store each rank, worker and step reads, in which order.

Memory stays bounded by ``shuffle_buffer``, not by the store size; the order is a pure function of (seed, epoch);
every rank runs the same number of steps and each pair is seen exactly once per epoch (how: :class:`PairStream`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from activation_transfer.errors import UsageError
from datamodules.store_format import PairStore

# PairStream's __len__ is exact (it shards by rank and worker itself), but Lightning warns about any IterableDataset
# that defines __len__; silence that one message for users' runs (pyproject.toml does the same for pytest).
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined", category=UserWarning)


# --------------------------------------------------------------------------------------------- pure index logic


def epoch_order(
    n: int, *, shuffle: bool, seed: int, epoch: int, chunk_rows: int, window_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """The visiting order of ``n`` rows (offsets 0..n-1) and the start positions of its windows.

    Returns:
        ``(order, window_starts)``: ``order[p]`` is the row visited at position p; window j covers positions
        ``window_starts[j]:window_starts[j+1]`` (the last one runs to n).
    """
    chunk_rows = max(1, int(chunk_rows))
    chunk_starts = np.arange(0, n, chunk_rows)
    if not shuffle:
        order = np.arange(n, dtype=np.int64)
        return order, np.arange(0, n, max(1, window_rows), dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(epoch)])
    chunk_starts = chunk_starts[rng.permutation(len(chunk_starts))]
    per_window = max(1, int(window_rows) // chunk_rows)
    parts, starts, pos = [], [], 0
    for w in range(0, len(chunk_starts), per_window):
        rows = np.concatenate([np.arange(c, min(c + chunk_rows, n)) for c in chunk_starts[w : w + per_window]])
        parts.append(rows[rng.permutation(len(rows))])
        starts.append(pos)
        pos += len(rows)
    return np.concatenate(parts).astype(np.int64), np.asarray(starts, dtype=np.int64)


def step_bounds(n: int, batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """Position ranges of the global steps: ``batch_size * world_size`` rows each, every rank getting >= 1 row."""
    if n < world_size:
        raise UsageError(f"{n} pairs cannot be split over {world_size} ranks")
    g = batch_size * world_size
    bounds = [(a, min(a + g, n)) for a in range(0, n, g)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < world_size:
        # Too few rows for every rank: merge into the previous step (batch a little larger) rather than drop rows.
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


def rank_positions(bound: tuple[int, int], rank: int, world_size: int) -> np.ndarray:
    return np.arange(bound[0] + rank, bound[1], world_size, dtype=np.int64)


# --------------------------------------------------------------------------------------------- streaming dataset


class PairStream(IterableDataset):
    """Batches of one split of a store for one rank.

    Order and sharding:

    - The rows of a split are cut into chunks of ``chunk_rows`` consecutive rows. Each epoch the chunk order is
      permuted (seed, epoch), consecutive permuted chunks are grouped into windows of about ``shuffle_buffer`` rows,
      and the rows inside each window are permuted. The resulting order is a pure function of (seed, epoch).
    - A reader holds at most two windows (the current one and the next, when a batch straddles them); a window is
      read as contiguous slices of the memory-mapped safetensors shards.
    - Global step s takes the next ``batch_size * world_size`` positions of the order; rank r takes every
      ``world_size``-th of them starting at r, and dataloader worker k takes the steps with ``s % num_workers == k``.
      Every rank therefore runs the same number of steps, and across ranks and workers each pair is seen exactly
      once per epoch (a last global step with fewer rows than ranks is merged into the previous one instead of
      being dropped or padded).
    - Without shuffling (validation) the order is the store's (documents, then positions).

    Args:
        folder: Store folder.
        lo: First row of the split.
        hi: One past the last row of the split.
        batch_size: Rows per rank per step.
        shuffle: Shuffle (train) or keep store order (validation).
        seed: Shuffle seed.
        chunk_rows: Consecutive rows kept together when shuffling (bigger reads, coarser shuffle).
        shuffle_buffer: Rows per shuffle window: the reader's memory bound.
        rank: This process's global rank.
        world_size: Number of ranks.
        verify: Check each shard's SHA-256 before reading it (once per process: a worker started by fork inherits
            what its parent verified).
    """

    def __init__(
        self,
        folder: str,
        lo: int,
        hi: int,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        chunk_rows: int = 64,
        shuffle_buffer: int = 16384,
        rank: int = 0,
        world_size: int = 1,
        verify: bool = True,
    ):
        super().__init__()
        self.folder, self.lo, self.hi = str(folder), int(lo), int(hi)
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.chunk_rows, self.shuffle_buffer = int(chunk_rows), int(shuffle_buffer)
        self.rank, self.world_size, self.verify = int(rank), int(world_size), bool(verify)
        self.epoch, self.skip_steps = 0, 0
        self.bounds = step_bounds(self.hi - self.lo, self.batch_size, self.world_size)

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        """Visit epoch ``epoch``'s order, starting after its first ``skip_steps`` steps (a mid-epoch resume)."""
        self.epoch, self.skip_steps = int(epoch), int(skip_steps)

    def __len__(self) -> int:
        return len(self.bounds)

    def _load_window(self, store: PairStore, order: np.ndarray, a: int, b: int) -> dict[str, torch.Tensor]:
        rows = order[a:b] + self.lo
        sorted_rows = np.sort(rows)
        data = store.read_rows(sorted_rows)
        back = torch.from_numpy(np.searchsorted(sorted_rows, rows))
        return {k: v[back] for k, v in data.items()} | {"index": torch.from_numpy(rows)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        store = PairStore(self.folder, verify=self.verify)
        n = self.hi - self.lo
        order, wstarts = epoch_order(
            n,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            chunk_rows=self.chunk_rows,
            window_rows=self.shuffle_buffer,
        )
        wends = np.append(wstarts[1:], n)
        windows: dict[int, dict[str, torch.Tensor]] = {}
        # The loader takes batches from workers in turn, so worker k serves the (skip + k)-th step, and so on.
        for s in range(self.skip_steps + worker, len(self.bounds), num_workers):
            pos = rank_positions(self.bounds[s], self.rank, self.world_size)
            wid = np.searchsorted(wstarts, pos, side="right") - 1
            for j in [j for j in windows if j < wid[0]]:
                del windows[j]  # windows are visited in order: earlier ones are done
            parts: dict[str, list[torch.Tensor]] = {"sender": [], "receiver": [], "index": []}
            for j in np.unique(wid):
                j = int(j)
                if j not in windows:
                    windows[j] = self._load_window(store, order, int(wstarts[j]), int(wends[j]))
                sel = torch.from_numpy(pos[wid == j] - wstarts[j])
                for k in parts:
                    parts[k].append(windows[j][k][sel])
            yield {k: torch.cat(v) for k, v in parts.items()}
