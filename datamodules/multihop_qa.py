"""``MultiHopQADataModule``: the QA samples of an evaluation, from the paper's files, a JSONL file or the generator.

Batches are plain lists of :class:`QASample` in source order: tokenization, truncation at 256 tokens and left
padding happen in the evaluation module, which owns the two models' tokenizers (see
:mod:`activation_transfer.task.prompts`).
"""

from __future__ import annotations

import dataclasses

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from activation_transfer.errors import UsageError
from activation_transfer.task.entities import counterfactual as substitute
from activation_transfer.task.generator import EVAL_NUM_SAMPLES, EVAL_SEED, check_seed
from datamodules.qa_sources import PAPER_FILES, QADataError, QASample, load_source, resolve_paper_file

__all__ = ["MultiHopQADataModule", "QADataError", "QADataset", "QASample"]


class QADataset(Dataset):
    """Map-style dataset over a list of samples (under DDP the evaluation module splits and gathers it)."""

    def __init__(self, samples: list[QASample]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> QASample:
        return self.samples[index]


def counterfactual_samples(samples: list[QASample], seed: int) -> list[QASample]:
    """Each sample with its gold answer replaced everywhere in the context by another entity of its type that the
    context does not name (:func:`activation_transfer.task.entities.counterfactual`, deterministic per seed and
    sample id); the substitute becomes ``answer``, the old one ``gold_original``. Samples whose answer has no known
    type are left out (counted in ``source_info``)."""
    out = []
    for s in samples:
        changed = substitute(s.context, s.answer, seed, s.sample_id)
        if changed is not None:
            context, answer = changed
            out.append(dataclasses.replace(s, context=context, answer=answer, gold_original=s.answer))
    return out


class MultiHopQADataModule(pl.LightningDataModule):
    """Multi-hop QA samples for evaluation.

    Args:
        source: ``"synthetic"`` (the built-in offline generator), a paper file name (``clean_eval``, ``train``,
            ``val``, ``test``, ``test_v2``, ``test_enhanced``), or a path to a JSONL file with ``context``,
            ``question``, ``answer`` and optional ``hops`` and id (``id``, ``sample_id`` or ``clean_eval_id``).
        data_dir: Local folder holding the paper's files; when unset they are downloaded once from the paper's
            artifact at a pinned commit into the cache. Either way they are checked against a pinned SHA-256.
            Only used for paper file names.
        cache_dir: Cache folder for downloads (default ``$ACTIVATION_TRANSFER_CACHE`` or
            ``~/.cache/activation-transfer``). Only used for paper file names.
        num_samples: How many samples the generator draws (default ``EVAL_NUM_SAMPLES``); only for
            ``source: synthetic`` (use ``limit`` to shorten a file).
        generator_seed: Seed of the generator (default ``EVAL_SEED``, the held-out evaluation seed).
        limit: Keep only the first N samples of any source, for quick runs.
        counterfactual: Swap each gold answer in its context for another entity of its type.
        counterfactual_seed: Seed of the substitutes.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        source: str = "synthetic",
        data_dir: str | None = None,
        cache_dir: str | None = None,
        num_samples: int | None = None,
        generator_seed: int = EVAL_SEED,
        limit: int | None = None,
        counterfactual: bool = False,
        counterfactual_seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
    ):
        super().__init__()
        if num_samples is not None and source != "synthetic":
            raise UsageError(
                f"data.num_samples={num_samples} only applies to source 'synthetic' (got source {source!r}): add "
                "`--data.num_samples null` (your config sets it), and `--data.limit N` to keep the first N samples"
            )
        if num_samples is not None and num_samples < 1:
            raise UsageError(f"num_samples must be >= 1, got {num_samples}")
        if limit is not None and limit < 1:
            raise UsageError(f"limit must be >= 1 or None, got {limit}")
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise UsageError(f"num_workers must be >= 0, got {num_workers}")
        check_seed("data.generator_seed", generator_seed)
        self.save_hyperparameters(logger=False)  # the logger gets the nested CLI config (save_config), once
        self.source = source
        self.data_dir = data_dir
        self.cache_dir = cache_dir
        self.num_samples = EVAL_NUM_SAMPLES if num_samples is None and source == "synthetic" else num_samples
        self.generator_seed = generator_seed
        self.limit = limit
        self.counterfactual, self.counterfactual_seed = counterfactual, counterfactual_seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._samples: list[QASample] | None = None
        self._info: dict | None = None
        self._dataset: QADataset | None = None

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node: download a paper file once before every rank reads it.
        if self.source in PAPER_FILES and self.data_dir is None:
            resolve_paper_file(self.source, cache_dir=self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        self.load_samples()

    def load_samples(self) -> list[QASample]:
        """Load, validate and cache the samples (idempotent; ``setup`` calls it)."""
        if self._samples is None:
            samples, info = load_source(
                self.source,
                data_dir=self.data_dir,
                cache_dir=self.cache_dir,
                num_samples=self.num_samples,
                generator_seed=self.generator_seed,
            )
            info["n_total"] = info["n"]
            info["limit"] = self.limit
            if self.limit is not None:
                samples = samples[: self.limit]
                info["n"] = len(samples)
            if self.counterfactual:
                samples = counterfactual_samples(samples, self.counterfactual_seed)
                info.update(
                    counterfactual={"seed": self.counterfactual_seed, "dropped_untyped": info["n"] - len(samples)},
                    n=len(samples),
                )
            if not samples:
                raise QADataError(f"QA source {self.source!r} has no samples")
            self._samples, self._info, self._dataset = samples, info, QADataset(samples)
        return self._samples

    @property
    def samples(self) -> list[QASample]:
        """The samples in source order (after ``limit``)."""
        return self.load_samples()

    @property
    def dataset(self) -> QADataset:
        self.load_samples()
        return self._dataset

    @property
    def dataset_sha256(self) -> str:
        """SHA-256 of the source file (the whole file, even under ``limit``), or the generator's fingerprint."""
        self.load_samples()
        return self._info["sha256"]

    @property
    def source_info(self) -> dict:
        """What results record about the data: source, kind, path, url, sha256, n, n_total, limit, generator seed."""
        self.load_samples()
        return dict(self._info)

    def _loader(self) -> DataLoader:
        # collate_fn=list: batches stay plain lists of QASample; the evaluation module tokenizes them itself.
        return DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=list
        )

    def transfer_batch_to_device(self, batch: list[QASample], device: torch.device, dataloader_idx: int) -> list:
        # Batches hold only strings, and Lightning's default would fail on them: it rebuilds dataclasses field by
        # field, which a frozen QASample refuses. Hand the list through unchanged (a module may still override this).
        return batch

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
