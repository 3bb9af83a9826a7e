"""Training text for the offline model organisms: paper-format prompts from the built-in generator, with answers.

The evaluation set (``EVAL_SEED``) is held out twice over: its seed may not be used for training or validation, and
any training or validation sample whose key also occurs in the evaluation set is dropped.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from activation_transfer.errors import UsageError
from activation_transfer.task.entities import candidates
from activation_transfer.task.generator import (
    EVAL_SEED,
    MultiHopSample,
    check_seed,
    eval_keys,
    generate_samples,
)
from activation_transfer.task.prompts import format_prompt
from datamodules.rank_samplers import EpochLoader, eval_sampler, rank_world, train_position

log = logging.getLogger(__name__)

# Masks stored per token: 0 padding, 1 prompt, 2 answer (target) token.
PAD, PROMPT, ANSWER = 0, 1, 2


def held_out_samples(
    num_samples: int, seed: int, distractor_prob: float = 0.5, exclude: set[str] | None = None
) -> list[MultiHopSample]:
    """Generate samples from ``seed`` and drop those whose key is in ``exclude`` (the evaluation set by default).

    Args:
        num_samples: How many samples to draw before filtering.
        seed: Generator seed; must differ from ``EVAL_SEED``.
        distractor_prob: Passed to the generator.
        exclude: Keys to drop; ``None`` means the built-in evaluation set's keys.

    Returns:
        The kept samples (at most ``num_samples``).
    """
    if seed == EVAL_SEED:
        raise UsageError(f"seed {seed} is EVAL_SEED: the evaluation set's generator seed is held out of training")
    exclude = eval_keys() if exclude is None else exclude
    samples = generate_samples(num_samples, seed, distractor_prob=distractor_prob)
    kept = [s for s in samples if s.key not in exclude]
    if len(kept) < len(samples):
        log.info(
            "dropped %d of %d samples (seed %d) that also occur in the held-out set",
            len(samples) - len(kept),
            len(samples),
            seed,
        )
    return kept


def encode_samples(
    samples: list[MultiHopSample], tokenizer, max_length: int, with_candidates: bool = True
) -> dict[str, torch.Tensor]:
    """Tokenize prompt + `` {answer}`` + EOS into fixed-length, right-padded tensors.

    The prompt is the paper's ``Context: {context}\\nQ: {question}\\nA:``. The loss is taken on the ANSWER tokens
    and the EOS (so a trained organism stops right after its answer under greedy decoding); the PROMPT tokens serve an
    optional, down-weighted language-modelling loss.

    Args:
        samples: The samples to encode.
        tokenizer: A tokenizer whose ``eos_token_id`` doubles as padding (id 0 for the offline tokenizer).
        max_length: Length every row is padded to; a longer example raises instead of being truncated (truncation
            would cut the context the answer must be read from).
        with_candidates: Also count each context's candidates (a regex scan per entity: half the encoding time, and
            only validation uses it).

    Returns:
        ``input_ids`` (N, max_length) and ``token_type`` (N, max_length) with values PAD / PROMPT / ANSWER, and with
        ``with_candidates`` also ``candidates`` (N,): how many entities of the answer's type the context names (0 if
        untyped).
    """
    eos = tokenizer.eos_token_id
    prompts = tokenizer([format_prompt(s.context, s.question) for s in samples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([" " + s.answer for s in samples], add_special_tokens=False)["input_ids"]
    # Rows are filled as Python lists and converted once: a tensor per row costs more than the tokenizer here.
    ids = [[eos] * max_length for _ in samples]
    kind = [[PAD] * max_length for _ in samples]
    for i, (p, a) in enumerate(zip(prompts, answers)):
        row = p + a + [eos]
        if len(row) > max_length:
            raise UsageError(f"sample {samples[i].sample_id} needs {len(row)} tokens but max_length is {max_length}")
        ids[i][: len(row)] = row
        kind[i][: len(row)] = [PROMPT] * len(p) + [ANSWER] * (len(row) - len(p))
    out = {
        "input_ids": torch.tensor(ids, dtype=torch.long).view(len(samples), max_length),
        "token_type": torch.tensor(kind, dtype=torch.long).view(len(samples), max_length),
    }
    if with_candidates:
        out["candidates"] = torch.tensor([candidates(s.context, s.answer) or 0 for s in samples], dtype=torch.long)
    return out


class LengthBucketBatchSampler(DistributedSampler):
    """Shuffled batches of similar-length rows: padding (and its compute) shrinks, the order stays seeded.

    Epoch ``e``'s batches are a pure function of ``(seed, e)``: a permutation drawn from ``seed * 100003 + e``, cut
    into pools of ``pool_batches`` batches, each pool sorted by length and split into batches, and the batch order
    shuffled. Incomplete batches are dropped. Lightning calls :meth:`set_epoch` before each pass and
    :class:`~datamodules.rank_samplers.EpochLoader` says how many of the pass's batches a resumed run already took,
    so a resumed run reads what an uninterrupted one read.

    Each item is a whole batch (a list of row indices), so the loader takes ``batch_size=None``. Being a
    ``DistributedSampler``, Lightning leaves it alone under DDP (it cannot put its own sampler into a batch sampler):
    rank ``r`` of ``w`` reads batches ``r, r + w, ...`` of the epoch's list, cut to a multiple of ``w``, so every rank
    runs the same number of steps and no batch is read twice.

    Args:
        lengths: Used length of every row.
        batch_size: Rows per batch.
        seed: Seed of the permutations.
        pool_batches: Batches per sorting pool (1 disables bucketing; larger gives tighter buckets).
        num_replicas: Number of processes.
        rank: This process's rank.
    """

    def __init__(
        self,
        lengths: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        pool_batches: int = 16,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if len(lengths) // batch_size < num_replicas:
            raise UsageError(
                f"{len(lengths) // batch_size} training batches cannot be split over {num_replicas} processes; give "
                f"at least {num_replicas * batch_size} training samples or fewer --trainer.devices"
            )
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed), drop_last=True)
        self.lengths, self.batch_size, self.pool_batches = lengths, batch_size, pool_batches
        self.skip_steps = 0

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        """Read epoch ``epoch``'s batches, starting after this rank's first ``skip_steps`` (a mid-epoch resume)."""
        super().set_epoch(int(epoch))
        self.skip_steps = int(skip_steps)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All of epoch ``epoch``'s batches, in order, before they are shared out over the ranks."""
        gen = torch.Generator().manual_seed(self.seed * 100003 + int(epoch))
        order = torch.randperm(len(self.lengths), generator=gen)
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        batches = [b for b in batches if len(b) == self.batch_size]
        return [batches[i].tolist() for i in torch.randperm(len(batches), generator=gen).tolist()]

    def __len__(self) -> int:
        return len(self.lengths) // self.batch_size // self.num_replicas

    def __iter__(self):
        batches = self.epoch_batches(self.epoch)
        share = batches[self.rank : len(self) * self.num_replicas : self.num_replicas]
        return iter(share[self.skip_steps :])


class OrganismTextDataModule(pl.LightningDataModule):
    """Generated multi-hop QA text (prompt + answer) for training the model organisms."""

    # The options that decide what an organism trains on, in which order (a resumed fit must keep them:
    # activation_transfer.resume_checks); the cache folder and workers change neither.
    RESUME_KEYS = (
        *("num_train_samples", "train_seed", "num_val_samples", "val_seed", "distractor_prob", "max_length"),
        *("batch_size", "trim_padding", "bucket_pool_batches", "shuffle_seed"),
    )

    def __init__(
        self,
        num_train_samples: int = 20000,
        train_seed: int = 1,
        num_val_samples: int = 256,
        val_seed: int = 2,
        distractor_prob: float = 0.5,
        max_length: int = 96,
        batch_size: int = 64,
        trim_padding: bool = True,
        bucket_pool_batches: int = 1,
        num_workers: int = 0,
        shuffle_seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        """Build the data module; the offline tokenizer is loaded here so its vocabulary size can be linked.

        Args:
            num_train_samples: Training samples drawn from ``train_seed`` (before eval-key de-duplication).
            train_seed: Generator seed of the training set; must differ from ``EVAL_SEED`` and ``val_seed``.
            num_val_samples: Validation samples drawn from ``val_seed``.
            val_seed: Generator seed of the validation set; must differ from ``EVAL_SEED``.
            distractor_prob: Probability that a sample carries a distractor chain (as in the evaluation set).
            max_length: Fixed padded length of every row (prompt + answer + EOS); the longest generated example
                is under 90 tokens with the offline tokenizer.
            batch_size: Rows per batch.
            trim_padding: Drop the columns that are padding in every row of a batch. Rows are right-padded and the
                model is causal, so this changes no loss or gradient, only the compute spent on padding (about half
                of a 96-token row is padding on average).
            bucket_pool_batches: Training batches are drawn from pools of this many batches sorted by length, so
                rows in a batch have similar lengths (with ``trim_padding``, about 1.6x less compute per step at
                16). Off (1) by default: batches of one length are also of one hop count, and in the tuning runs
                that slowed learning per step by more than it saved.
            num_workers: DataLoader workers; 0 keeps tiny CPU runs simple and deterministic.
            shuffle_seed: Seed of the training order (independent of the global seed).
            cache_dir: Project cache folder holding the offline tokenizer (default: ``cache_root()``).
        """
        super().__init__()
        # Checked before the tokenizer and the samples: each was a traceback at setup (an empty batch's IndexError, a
        # ZeroDivisionError in the sampler, the generator's ValueError) or, for a distractor_prob above 1, silently 1.
        for name, value in (
            *(("num_train_samples", num_train_samples), ("num_val_samples", num_val_samples)),
            *(("max_length", max_length), ("batch_size", batch_size)),
        ):
            if value < 1:
                raise UsageError(f"data.{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise UsageError(f"data.num_workers must be >= 0, got {num_workers}")
        if not 0 <= distractor_prob <= 1:
            raise UsageError(f"data.distractor_prob must be in [0, 1], got {distractor_prob}")
        for name, seed in (("train_seed", train_seed), ("val_seed", val_seed)):
            check_seed(f"data.{name}", seed)
            if seed == EVAL_SEED:
                raise UsageError(f"{name}={seed} is EVAL_SEED, which is held out for evaluation")
        if train_seed == val_seed:
            raise UsageError("train_seed and val_seed must differ, or validation would measure memorisation")
        self.save_hyperparameters()
        from activation_transfer.task.tokenizer import offline_tokenizer

        self.tokenizer = offline_tokenizer(cache_dir)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.num_dropped = 0

    @property
    def vocab_size(self) -> int:
        """Embedding rows the model needs (linked into ``model.vocab_size`` by the organism CLI)."""
        return len(self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        exclude = eval_keys()
        val = held_out_samples(hp.num_val_samples, hp.val_seed, hp.distractor_prob, exclude)
        # Validation keys are dropped from training too, so val/answer_acc measures reading, not recall.
        train_all = held_out_samples(hp.num_train_samples, hp.train_seed, hp.distractor_prob, exclude)
        val_keys = {s.key for s in val}
        train = [s for s in train_all if s.key not in val_keys]
        self.num_dropped = hp.num_train_samples - len(train)
        self.train_keys = {s.key for s in train}
        enc_train = encode_samples(train, self.tokenizer, hp.max_length, with_candidates=False)
        enc_val = encode_samples(val, self.tokenizer, hp.max_length)
        self.train_set = TensorDataset(enc_train["input_ids"], enc_train["token_type"])
        # Validation rows also carry their candidate count: val/answer_acc_two_candidates follows the chain-reading
        # skill itself (with one candidate of the answer's type, naming it is enough).
        self.val_set = TensorDataset(enc_val["input_ids"], enc_val["token_type"], enc_val["candidates"])

    def _collate(self, rows):
        return self._trim(tuple(torch.stack(column) for column in zip(*rows)))

    def _trim(self, columns):
        input_ids, token_type, *rest = columns
        if self.hparams.trim_padding:
            used = int((token_type != PAD).any(dim=0).nonzero().max()) + 1
            input_ids, token_type = input_ids[:, :used], token_type[:, :used]
        return (input_ids, token_type, *rest)

    def train_dataloader(self) -> DataLoader:
        # Private generators: the order depends on shuffle_seed and the epoch only, not on how much global RNG ran
        # before, nor on whether the run was resumed.
        hp = self.hparams
        rank, world = rank_world(self.trainer)
        lengths = (self.train_set.tensors[1] != PAD).sum(dim=1)
        sampler = LengthBucketBatchSampler(
            lengths,
            hp.batch_size,
            seed=hp.shuffle_seed,
            pool_batches=max(hp.bucket_pool_batches, 1),
            num_replicas=world,
            rank=rank,
        )
        # The sampler yields whole batches of row indices; the TensorDataset returns their rows in one indexing.
        return EpochLoader(
            self.train_set,
            lambda: train_position(self.trainer),
            sampler=sampler,
            batch_size=None,
            num_workers=hp.num_workers,
            collate_fn=self._trim,
        )

    def val_dataloader(self) -> DataLoader:
        # Under DDP each validation row goes to one rank only, so the val/* means count every row once.
        return DataLoader(
            self.val_set,
            batch_size=self.hparams.batch_size,
            sampler=eval_sampler(self.val_set, *rank_world(self.trainer)),
            num_workers=self.hparams.num_workers,
            collate_fn=self._collate,
        )
