"""ActivationPairDataModule: streams ``{"sender", "receiver", "index"}`` batches from an activation store.

Streaming design (memory bounded by ``shuffle_buffer``, not by the store size):

- The rows of a split are cut into chunks of ``chunk_rows`` consecutive rows. Each epoch the chunk order is
  permuted (seed, epoch), consecutive permuted chunks are grouped into windows of about ``shuffle_buffer`` rows,
  and the rows inside each window are permuted. The resulting order is a pure function of (seed, epoch).
- A reader holds at most two windows (the current one and the next, when a batch straddles them); a window is read
  as contiguous slices of the memory-mapped safetensors shards.
- Global step s takes the next ``batch_size * world_size`` positions of the order; rank r takes every
  ``world_size``-th of them starting at r, and dataloader worker k takes the steps with ``s % num_workers == k``.
  Every rank therefore runs the same number of steps, and across ranks and workers each pair is seen exactly once
  per epoch (a last global step with fewer rows than ranks is merged into the previous one instead of being
  dropped or padded).
- Validation is the last ``val_fraction`` of the rows in store order (documents, then positions), unshuffled: the
  paper holds out the last 10% the same way.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.activation_store import ensure_store
from datamodules.corpora import CorpusSpec
from datamodules.store_format import PairStore, StoreError, read_manifest
from lightning_modules.components.frozen_lm import ModelRef
from lightning_modules.components.io import atomic_write

log = logging.getLogger(__name__)

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
        raise ValueError(f"{n} pairs cannot be split over {world_size} ranks")
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
    """Batches of one split of a store for one rank (see the module docstring for the order and sharding).

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
    """

    def __init__(self, folder: str, lo: int, hi: int, *, batch_size: int, shuffle: bool, seed: int = 0,
                 chunk_rows: int = 64, shuffle_buffer: int = 16384, rank: int = 0, world_size: int = 1):  # fmt: skip
        super().__init__()
        self.folder, self.lo, self.hi = str(folder), int(lo), int(hi)
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.chunk_rows, self.shuffle_buffer = int(chunk_rows), int(shuffle_buffer)
        self.rank, self.world_size = int(rank), int(world_size)
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
        store = PairStore(self.folder)
        n = self.hi - self.lo
        order, wstarts = epoch_order(n, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                                     chunk_rows=self.chunk_rows, window_rows=self.shuffle_buffer)  # fmt: skip
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


class _EpochLoader(DataLoader):
    """A DataLoader that tells its dataset where to start before each pass (workers get a fresh copy every pass).

    ``position_fn`` returns ``(epoch, steps already taken)``; it is read when the pass's first batch is asked for,
    not when ``iter()`` is called: Lightning creates the first iterator while estimating the number of steps,
    *before* it restores a checkpoint's loop state, so a resumed run would otherwise replay epoch 0's order.
    """

    def __init__(self, dataset: PairStream, position_fn: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(dataset, **kwargs)
        self._position_fn = position_fn

    def _start(self) -> Iterator:
        epoch, done = self._position_fn()
        # Steps taken are 0 at a fresh epoch, and all of them when the last epoch finished: skip nothing then.
        self.dataset.set_epoch(epoch, done if 0 < done < len(self.dataset) else 0)
        return super().__iter__()

    def __iter__(self):
        return _LazyIterator(self._start)

    # Nothing to save: the position is the trainer's loop state, restored from the same checkpoint. Having these
    # methods tells Lightning that this loader resumes mid-epoch correctly (it warns about loaders without them).
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# --------------------------------------------------------------------------------------------- data module


def _plain(value):
    """Dataclasses to dicts, so hparams stay loadable with ``weights_only=True``."""
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


class ActivationPairDataModule(pl.LightningDataModule):
    """Paired sender/receiver activations from an activation store, extracted on first use and cached.

    The store is found (or extracted) when a property such as ``sender_dim`` is first read: LightningCLI reads
    them right after instantiating this module to link the dimensions and model identities into the
    TranslatorModule, so ``--print_config`` (which exits before instantiation) never loads a model.

    Args:
        sender_model: Sender model and block (``{name, layer, dtype, ...}``). None with ``store_dir``: use that store
            as is.
        receiver_model: Receiver model and block. None with ``store_dir``: use that store as is.
        corpus: Extraction text (built-in generator, local .txt/.jsonl, or ``hf:`` dataset).
        store_dir: Explicit store folder. Default: ``<cache>/activations/<key>`` with a key hashing the models,
            layers, dtypes, corpus fingerprint, max_length and storage dtype.
        cache_dir: Project cache root (default ``$ACTIVATION_TRANSFER_CACHE`` or ``~/.cache/activation-transfer``).
        max_length: Tokens per document, truncating longer ones (the paper's prompts use 256).
        extract_batch_size: Documents per forward pass during extraction.
        shard_rows: Pairs per shard (a shard is the unit of resumption).
        store_dtype: Storage dtype of activations: ``float32``, ``bfloat16`` or ``float16``.
        extract_device: Device for extraction: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        rebuild: Rebuild the store even if a matching one exists (also allows overwriting a mismatching
            ``store_dir``).
        batch_size: Pairs per batch per rank (the paper: 32).
        val_fraction: Fraction of pairs held out for validation, taken from the end of the store (the paper: 0.1).
        shuffle_buffer: Rows per shuffle window; bounds the loader's memory (about 2 windows per worker).
        chunk_rows: Consecutive rows that stay together when shuffling.
        seed: Shuffle seed (each epoch reshuffles with (seed, epoch)); the paper's first seed is 42.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        sender_model: ModelRef | None = None,
        receiver_model: ModelRef | None = None,
        corpus: CorpusSpec | None = None,
        store_dir: str | None = None,
        cache_dir: str | None = None,
        max_length: int = 256,
        extract_batch_size: int = 16,
        shard_rows: int = 65536,
        store_dtype: str = "float32",
        extract_device: str = "auto",
        rebuild: bool = False,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        shuffle_buffer: int = 16384,
        chunk_rows: int = 64,
        seed: int = 42,
        num_workers: int = 0,
    ):
        super().__init__()
        if (sender_model is None) != (receiver_model is None):
            raise ValueError(
                "give both data.sender_model and data.receiver_model (to extract), or neither (with data.store_dir)"
            )
        if sender_model is None and store_dir is None:
            raise ValueError("data.store_dir is required when data.sender_model and data.receiver_model are not given")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        for option, value in (("max_length", max_length), ("extract_batch_size", extract_batch_size),
                              ("shard_rows", shard_rows), ("batch_size", batch_size),
                              ("shuffle_buffer", shuffle_buffer), ("chunk_rows", chunk_rows)):  # fmt: skip
            if value < 1:
                raise ValueError(f"data.{option} must be >= 1, got {value}")
        self.save_hyperparameters()
        for key in ("sender_model", "receiver_model", "corpus"):
            self.hparams[key] = _plain(self.hparams[key])
        self.sender_model, self.receiver_model = sender_model, receiver_model
        self.corpus = corpus if corpus is not None else CorpusSpec()
        self._folder: Path | None = None
        self._manifest: dict | None = None

    # -- store --------------------------------------------------------------------------------------------------

    def _ensure(self) -> None:
        if self._manifest is not None:
            return
        h = self.hparams
        if self.sender_model is None:
            folder = Path(h.store_dir).expanduser()
            manifest = read_manifest(folder)
            if manifest is None:
                raise StoreError(
                    f"activation store {folder / 'manifest.json'} does not exist (option data.store_dir); give "
                    "data.sender_model and data.receiver_model to extract one"
                )
        else:
            folder, manifest = ensure_store(
                self.sender_model, self.receiver_model, self.corpus, store_dir=h.store_dir, cache_dir=h.cache_dir,
                max_length=h.max_length, batch_size=h.extract_batch_size, shard_rows=h.shard_rows,
                store_dtype=h.store_dtype, device=h.extract_device, rebuild=h.rebuild,
            )  # fmt: skip
        if manifest["num_tokens"] < 2:
            raise StoreError(f"activation store {folder} holds {manifest['num_tokens']} pair(s): too few to split")
        self._folder, self._manifest = folder, manifest

    @property
    def manifest(self) -> dict:
        """The store manifest (extracting the store first if needed)."""
        self._ensure()
        return self._manifest

    @property
    def store_folder(self) -> str:
        self._ensure()
        return str(self._folder)

    @property
    def sender_dim(self) -> int:
        return int(self.manifest["dims"]["sender"])

    @property
    def receiver_dim(self) -> int:
        return int(self.manifest["dims"]["receiver"])

    @property
    def sender_identity(self) -> dict:
        """Identity of the sender model and layer (plain dict from the manifest)."""
        return dict(self.manifest["models"]["sender"])

    @property
    def receiver_identity(self) -> dict:
        return dict(self.manifest["models"]["receiver"])

    def split_rows(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((train_lo, train_hi), (val_lo, val_hi))`` in store rows."""
        n = int(self.manifest["num_tokens"])
        n_val = min(n - 1, max(1, int(round(n * self.hparams.val_fraction))))
        return (0, n - n_val), (n - n_val, n)

    # -- Lightning hooks ---------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        self._ensure()  # extraction happens once, on local rank 0, when nothing triggered it before

    def setup(self, stage: str | None = None) -> None:
        self._ensure()

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return 0, 1

    def _train_position(self) -> tuple[int, int]:
        """``(epoch, steps already taken in it)`` for the training pass whose first batch is being asked for.

        Both come from the trainer's loop state, which a checkpoint restores: a run resumed at an epoch's end
        continues with the next epoch's order, and one resumed mid-epoch (a checkpoint every n steps) skips exactly
        the steps taken, so a resumed run sees what an uninterrupted one sees.
        """
        if self.trainer is None:
            return 0, 0
        return int(self.trainer.current_epoch), int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def _loader(self, rows: tuple[int, int], shuffle: bool) -> DataLoader:
        rank, world = self._rank_world()
        h = self.hparams
        ds = PairStream(self.store_folder, *rows, batch_size=h.batch_size, shuffle=shuffle, seed=h.seed,
                        chunk_rows=h.chunk_rows, shuffle_buffer=h.shuffle_buffer, rank=rank,
                        world_size=world)  # fmt: skip
        # batch_size=None: the dataset yields whole batches (it decides which rows go to which rank and worker).
        position = self._train_position if shuffle else lambda: (0, 0)  # validation: always all of it, in order
        return _EpochLoader(ds, position, batch_size=None, num_workers=h.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.split_rows()[0], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.split_rows()[1], shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class RecordPairIndices(pl.Callback):
    """Debug/test aid: write the global pair indices each rank trained on to ``<dirpath>/rank<r>_epoch<e>.json``.

    Args:
        dirpath: Output folder.
    """

    def __init__(self, dirpath: str):
        self.dirpath = dirpath
        self._seen: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._seen += batch["index"].tolist()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        path = Path(self.dirpath) / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.json"
        atomic_write(path, json.dumps(self._seen))


__all__ = ["ActivationPairDataModule", "PairStream", "RecordPairIndices", "epoch_order", "step_bounds"]
