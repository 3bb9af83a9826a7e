"""ActivationPairDataModule: streams ``{"sender", "receiver", "index"}`` batches from an activation store.

The store is found or extracted by ``datamodules.activation_store``; the order of the rows, and which rank, worker
and step reads which of them, is ``datamodules.pair_stream`` (memory bounded by ``shuffle_buffer``, each pair seen
once per epoch across ranks and workers, a pure function of (seed, epoch)). Validation is the last ``val_fraction``
of the rows in store order (documents, then positions), unshuffled: the paper holds out the last 10% the same way.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from activation_transfer.errors import UsageError
from activation_transfer.io import atomic_write
from activation_transfer.models.frozen_lm import ModelRef
from datamodules.activation_store import ensure_store
from datamodules.corpora import CorpusSpec
from datamodules.pair_stream import PairStream, epoch_order, step_bounds
from datamodules.rank_samplers import EpochLoader, rank_world, train_position
from datamodules.store_format import PairStore, StoreError, read_manifest

log = logging.getLogger(__name__)


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
        rebuild: Rebuild the store even if a matching one exists (also allows overwriting a mismatching or
            unreadable ``store_dir``).
        verify: Check every shard's bytes against the SHA-256 in the store manifest, once per process, before
            training reads it (a full read of the store; false trusts the files).
        batch_size: Pairs per batch per rank (the paper: 32).
        val_fraction: Fraction of pairs held out for validation, taken from the end of the store (the paper: 0.1).
        shuffle_buffer: Rows per shuffle window; bounds the loader's memory (about 2 windows per worker).
        chunk_rows: Consecutive rows that stay together when shuffling.
        seed: Shuffle seed (each epoch reshuffles with (seed, epoch)); the paper's first seed is 42.
        num_workers: DataLoader worker processes.
    """

    # The options that decide which pairs a fit trains on, in which order (a resumed fit must keep them:
    # activation_transfer.resume_checks). The models' identities are the translator's own (model.sender/receiver);
    # folders, extraction batching, shard size (the order is over row offsets) and workers change none of it.
    RESUME_KEYS = (
        *("corpus", "max_length", "store_dtype", "batch_size", "val_fraction", "shuffle_buffer", "chunk_rows"),
        "seed",
    )

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
        verify: bool = True,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        shuffle_buffer: int = 16384,
        chunk_rows: int = 64,
        seed: int = 42,
        num_workers: int = 0,
    ):
        super().__init__()
        if (sender_model is None) != (receiver_model is None):
            raise UsageError(
                "give both data.sender_model and data.receiver_model (to extract), or neither (with data.store_dir)"
            )
        if sender_model is None and store_dir is None:
            raise UsageError("data.store_dir is required when data.sender_model and data.receiver_model are not given")
        if not 0.0 < val_fraction < 1.0:
            raise UsageError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        for option, value in (
            ("max_length", max_length),
            ("extract_batch_size", extract_batch_size),
            ("shard_rows", shard_rows),
            ("batch_size", batch_size),
            ("shuffle_buffer", shuffle_buffer),
            ("chunk_rows", chunk_rows),
        ):
            if value < 1:
                raise UsageError(f"data.{option} must be >= 1, got {value}")
        self.save_hyperparameters(logger=False)  # the logger gets the nested CLI config (save_config), once
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
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if h.rebuild and world > 1:
                # Every process would clear and extract the store in turn, while the others read it.
                raise UsageError(
                    f"data.rebuild is set in a run of {world} processes: rebuild the store once with one process "
                    "(the same command with --trainer.devices 1), then train without data.rebuild"
                )
            folder, manifest = ensure_store(
                self.sender_model,
                self.receiver_model,
                self.corpus,
                store_dir=h.store_dir,
                cache_dir=h.cache_dir,
                max_length=h.max_length,
                batch_size=h.extract_batch_size,
                shard_rows=h.shard_rows,
                store_dtype=h.store_dtype,
                device=h.extract_device,
                rebuild=h.rebuild,
            )
        # Opening checks the manifest against the shards (and their SHA-256): a damaged store stops here, before
        # the CLI links its dimensions into the model.
        num_rows = PairStore(folder, verify=h.verify).num_rows
        if num_rows < 2:
            raise StoreError(f"activation store {folder} holds {num_rows} pair(s): too few to split")
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

    def _loader(self, rows: tuple[int, int], shuffle: bool) -> DataLoader:
        rank, world = rank_world(self.trainer)
        h = self.hparams
        ds = PairStream(
            self.store_folder,
            *rows,
            batch_size=h.batch_size,
            shuffle=shuffle,
            seed=h.seed,
            chunk_rows=h.chunk_rows,
            shuffle_buffer=h.shuffle_buffer,
            rank=rank,
            world_size=world,
            verify=h.verify,
        )
        # batch_size=None: the dataset yields whole batches (it decides which rows go to which rank and worker).
        # Training resumes where the trainer's loop state says; validation: always all of it, in order.
        position = (lambda: train_position(self.trainer)) if shuffle else lambda: (0, 0)
        return EpochLoader(ds, position, batch_size=None, num_workers=h.num_workers)

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
