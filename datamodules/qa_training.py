"""QA samples for training translators *for use* (functional training), never the evaluation set.

Batches are plain lists of :class:`QASample`: the functional module owns both tokenizers and tokenizes them itself.
Held out twice over, as for the model organisms: the generator's ``EVAL_SEED`` is refused, every generated sample whose
key occurs in the built-in evaluation set is dropped (validation keys are dropped from training too), the paper's
evaluation files are refused as training or validation sources, and every sample whose context is one of the paper's
clean_eval contexts is dropped (read from the pinned file; a file source needs it, a generated one is checked when
it is at hand): the paper's val.jsonl holds 4 clean_eval questions verbatim and its train.jsonl 13 clean_eval contexts
with other questions (the paper deduplicated clean_eval against train by key).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import random

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from activation_transfer.errors import UsageError
from activation_transfer.task.generator import EVAL_SEED, check_seed
from datamodules.multihop_qa import QADataset
from datamodules.organism_text import held_out_samples
from datamodules.qa_sources import (
    PAPER_FILES,
    QASample,
    load_source,
    paper_cache_path,
    read_jsonl,
    resolve_paper_file,
)
from datamodules.rank_samplers import EpochLoader, EpochOrderSampler, eval_sampler, rank_world, train_position

log = logging.getLogger(__name__)

# The paper's files a translator may learn from; the others hold (or overlap) its evaluation questions.
TRAINING_PAPER_FILES = ("train", "val")


def context_digest(context: str) -> str:
    """First 16 hex digits of the SHA-256 of a context."""
    return hashlib.sha256(context.encode()).hexdigest()[:16]


@functools.cache
def _digests_of(path: str) -> frozenset[str]:
    return frozenset(context_digest(s.context) for s in read_jsonl(path))


def clean_eval_contexts(data_dir: str | None = None, cache_dir: str | None = None, download: bool = True):
    """Digests of every context of the paper's clean_eval.jsonl, read from the pinned file (``data_dir``, else the
    cache, else downloaded when ``download``; SHA-256 checked), or None when it is not at hand and not downloaded."""
    local = data_dir is not None or paper_cache_path("clean_eval", cache_dir).is_file()
    if not local and not download:
        return None
    try:
        path, _ = resolve_paper_file("clean_eval", data_dir=data_dir, cache_dir=cache_dir)
    except UsageError as err:
        raise UsageError(
            f"functional training holds out the contexts of the paper's clean_eval.jsonl and could not read it: {err}; "
            "set data.data_dir to a folder holding it, or allow its download once"
        ) from None
    return _digests_of(str(path))


def drop_clean_eval_contexts(
    samples: list[QASample], source: str, data_dir: str | None = None, cache_dir: str | None = None
) -> list[QASample]:
    """The samples whose context is not one of clean_eval's, with a log line when some were dropped.

    A generated source is checked when the pinned file is at hand (``data_dir`` or the cache) and not downloaded for
    it: the generator's contexts link random entities, the paper's state facts (none of the shipped training sets
    holds one: tests/datamodules/test_qa_training.py). A file source needs the file.
    """
    held_out = clean_eval_contexts(data_dir, cache_dir, download=source != "synthetic")
    if held_out is None:
        log.info("generated %s samples not checked against clean_eval's contexts (the file is not at hand)", source)
        return samples
    kept = [s for s in samples if context_digest(s.context) not in held_out]
    if len(kept) < len(samples):
        log.info(
            "dropped %d of %d samples of %s whose context is a clean_eval context",
            len(samples) - len(kept),
            len(samples),
            source,
        )
    return kept


def sample_key(s: QASample) -> str:
    """Exact-match key of a sample (the generator's ``MultiHopSample.key``)."""
    return f"{s.context}\n{s.question}\n{s.answer}"


def context_derangement(contexts: list[str], seed: int) -> list[int]:
    """A seeded permutation ``p`` with ``contexts[p[i]] != contexts[i]`` for every ``i`` (so ``p[i] != i``).

    Sattolo's algorithm draws a single cycle (no fixed point); a donor whose context text equals the sample's (two
    samples with one context) is then swapped with another sample's donor where both pairs stay different.
    """
    n = len(contexts)
    if n < 2:
        raise UsageError(f"data.mismatched_contexts needs at least 2 samples, got {n}")
    rng = random.Random(seed)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    for i in range(n):
        if contexts[perm[i]] != contexts[i]:
            continue
        j = next((j for j in range(n) if contexts[perm[j]] != contexts[i] and contexts[perm[i]] != contexts[j]), None)
        if j is None:
            raise UsageError("data.mismatched_contexts: every sample has the same context; nothing to swap")
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def mismatched(samples: list[QASample], seed: int) -> list[QASample]:
    """Each sample with the context of another (:func:`context_derangement`); question and answer are kept."""
    perm = context_derangement([s.context for s in samples], seed)
    return [dataclasses.replace(s, context=samples[p].context) for s, p in zip(samples, perm, strict=True)]


class QATrainingDataModule(pl.LightningDataModule):
    """Training and validation QA samples for functional translator training.

    Args:
        train_source: ``synthetic`` (the built-in generator, seed ``train_seed``), the paper's ``train`` or ``val``
            file, or a local JSONL file with ``context``, ``question``, ``answer``.
        val_source: Same choices, for the validation samples (``synthetic`` uses ``val_seed``).
        num_train_samples: Generated training samples (before de-duplication); a file keeps its first N when set.
        num_val_samples: Generated validation samples; a file keeps its first N when set.
        train_seed: Generator seed of the training samples; must differ from ``EVAL_SEED`` and ``val_seed``.
        val_seed: Generator seed of the validation samples; must differ from ``EVAL_SEED``.
        shuffle_seed: Seed of the training order (independent of the global seed). Under DDP each rank reads its
            share of that order (``datamodules.rank_samplers``): no sample twice, at most ``world - 1`` left to the
            next epoch; validation reads every sample once.
        mismatched_contexts: Give every training and validation sample another sample's context (a seeded
            derangement: no sample keeps its own context): a translator trained so can only learn what the question
            alone tells (the ``slots_functional_mismatched`` control).
        mismatch_seed: Seed of that derangement (validation uses ``mismatch_seed + 1``).
        batch_size: Samples per batch.
        data_dir: Local folder holding the paper's files (else downloaded once, SHA-256 checked).
        cache_dir: Cache folder for downloads.
        num_workers: DataLoader worker processes.
    """

    # The options that decide what a fit trains on, in which order (a resumed fit must keep them:
    # activation_transfer.resume_checks); folders and workers change where and how, not what.
    RESUME_KEYS = (
        *("train_source", "val_source", "num_train_samples", "num_val_samples", "train_seed", "val_seed"),
        *("shuffle_seed", "mismatched_contexts", "mismatch_seed", "batch_size"),
    )

    def __init__(
        self,
        train_source: str = "synthetic",
        val_source: str = "synthetic",
        num_train_samples: int | None = 2000,
        num_val_samples: int | None = 128,
        train_seed: int = 1,
        val_seed: int = 2,
        shuffle_seed: int = 0,
        mismatched_contexts: bool = False,
        mismatch_seed: int = 0,
        batch_size: int = 16,
        data_dir: str | None = None,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        for name, source in (("train_source", train_source), ("val_source", val_source)):
            if source in PAPER_FILES and source not in TRAINING_PAPER_FILES:
                raise UsageError(
                    f"data.{name}={source!r} is one of the paper's evaluation files; train and validate on "
                    f"{' or '.join(TRAINING_PAPER_FILES)}, 'synthetic' or a local JSONL file"
                )
        for name, seed in (("train_seed", train_seed), ("val_seed", val_seed)):
            check_seed(f"data.{name}", seed)
            if seed == EVAL_SEED:
                raise UsageError(
                    f"data.{name}={seed} is EVAL_SEED, the held-out evaluation set's generator seed; pick another seed"
                )
        if train_source == val_source == "synthetic" and train_seed == val_seed:
            raise UsageError("data.train_seed and data.val_seed must differ, or validation would measure memorisation")
        for name, n in (("num_train_samples", num_train_samples), ("num_val_samples", num_val_samples)):
            if n is not None and n < 1:
                raise UsageError(f"data.{name} must be >= 1 or null, got {n}")
        if batch_size < 1:
            raise UsageError(f"data.batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters(logger=False)  # the logger gets the nested CLI config (save_config), once
        self.train_set: QADataset | None = None
        self.val_set: QADataset | None = None

    def prepare_data(self) -> None:
        # One process per node downloads a paper file before every rank reads it.
        for source in {self.hparams.train_source, self.hparams.val_source} & set(TRAINING_PAPER_FILES):
            if self.hparams.data_dir is None:
                resolve_paper_file(source, cache_dir=self.hparams.cache_dir)

    def _load(self, source: str, num: int | None, seed: int) -> list[QASample]:
        h = self.hparams
        if source == "synthetic":
            gen = held_out_samples(2000 if num is None else num, seed)
            samples = [QASample(s.sample_id, s.context, s.question, s.answer, s.hops) for s in gen]
            return drop_clean_eval_contexts(samples, source, h.data_dir, h.cache_dir)
        samples, info = load_source(source, data_dir=h.data_dir, cache_dir=h.cache_dir)
        copied = info.get("paper_file") if info.get("kind") == "jsonl" else None
        if copied is not None and copied not in TRAINING_PAPER_FILES:  # a renamed copy: the same bytes, other name
            raise UsageError(
                f"{source} is a copy of the paper's evaluation file {PAPER_FILES[copied].filename} (same SHA-256): "
                "training on evaluation questions; train on 'synthetic', train, val or other questions"
            )
        samples = drop_clean_eval_contexts(samples, source, h.data_dir, h.cache_dir)
        return samples if num is None else samples[:num]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        val = self._load(h.val_source, h.num_val_samples, h.val_seed)
        train_all = self._load(h.train_source, h.num_train_samples, h.train_seed)
        val_keys = {sample_key(s) for s in val}
        train = [s for s in train_all if sample_key(s) not in val_keys]
        if len(train) < len(train_all):
            log.info("dropped %d training samples that are also validation samples", len(train_all) - len(train))
        if not train or not val:
            raise UsageError(
                f"no {'training' if not train else 'validation'} samples left (data.train_source "
                f"{h.train_source!r}, data.val_source {h.val_source!r})"
            )
        if h.mismatched_contexts:
            train, val = mismatched(train, h.mismatch_seed), mismatched(val, h.mismatch_seed + 1)
        self.train_set, self.val_set = QADataset(train), QADataset(val)

    def train_dataloader(self) -> DataLoader:
        # A private generator: the order depends on shuffle_seed and the epoch only, not on how much global RNG ran
        # before, nor on whether the run was resumed.
        rank, world = rank_world(self.trainer)
        batch = int(self.hparams.batch_size)
        sampler = EpochOrderSampler(self.train_set, int(self.hparams.shuffle_seed), world, rank, batch_size=batch)
        # EpochLoader: the epoch and the steps already taken are read when the first batch is asked for, after a
        # checkpoint's loop state is restored (worker processes ask the sampler for indices as soon as an iterator
        # exists, and Lightning creates the first one before restoring).
        return EpochLoader(
            self.train_set,
            lambda: train_position(self.trainer),
            batch_size=batch,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=list,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.hparams.batch_size,
            sampler=eval_sampler(self.val_set, *rank_world(self.trainer)),
            shuffle=False,
            num_workers=self.hparams.num_workers,
            collate_fn=list,
        )

    def transfer_batch_to_device(self, batch: list[QASample], device: torch.device, dataloader_idx: int) -> list:
        # Strings only: the module tokenizes and moves tensors itself (Lightning cannot rebuild a frozen QASample).
        return batch
