"""The trainer's checkpoint callback: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is the last validation's.

Lightning 2.6 writes ``last.ckpt`` only when a top-k checkpoint is written at the same step. With a monitored metric
and ``save_top_k=1`` that is only when the metric improves, so after an interruption ``--ckpt_path last`` resumed from
the last improvement and retrained every epoch since (pvnet #544 hit the same). This callback writes ``last.ckpt`` at
every point where Lightning would have checked for a top-k save, as Lightning < 2.6 did; the best checkpoints are
chosen exactly as before.

A fit that stops part-way through an epoch (``trainer.max_steps``, or ``trainer.should_stop``: ``max_time``) still gets
Lightning's epoch-end hooks, with the cut-short epoch already counted as processed: a ``last.ckpt`` written there
resumed as if that epoch had ended, skipping its remaining batches (or stopping at once, "max_epochs reached", when it
was the last epoch). ``last.ckpt`` is written at the stopping batch's end instead, like an ``every_n_train_steps``
checkpoint, which resumes exactly where the fit stopped.

Every checkpoint is written to a temporary file beside it and renamed into place (:class:`AtomicCheckpointIO`).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins import TorchCheckpointIO

from activation_transfer.io import atomic_output


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with the temporary file in the checkpoint's folder, renamed into place.

    Lightning writes through a temporary file in the system's temp folder and ``shutil.move``; across file systems
    (a tmpfs ``/tmp``, ``TMPDIR``) that move copies into the checkpoint's own name, so a process killed during the
    copy left a torn ``last.ckpt`` in place of the good one, and ``--ckpt_path last`` failed with a traceback.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # Lightning's refusal, and remote file systems
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_output(path) as tmp:
            torch.save(checkpoint, tmp)


class LastEveryValidationCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) that also rewrites ``last.ckpt`` when no top-k checkpoint was written."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not a chosen plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if self.save_last and _stops_mid_epoch(trainer) and not self._should_skip_saving_checkpoint(trainer):
            saved = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            # Only last.ckpt is written early: a validation that follows this batch still saves its top-k as before.
            self._last_global_step_saved = saved

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        # Lightning's own epoch-end save and _catch_up_last alike: none in the hooks of an epoch cut short.
        if not _in_cut_short_epoch_end(trainer):
            super()._save_last_checkpoint(trainer, monitor_candidates)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._catch_up_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._catch_up_last(trainer)

    def _catch_up_last(self, trainer: pl.Trainer) -> None:
        # _should_skip_saving_checkpoint is true when this step was saved already (a top-k save writes last.ckpt
        # with it), during sanity checks, fast_dev_run and outside fit: the cases where Lightning saves nothing.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _stops_mid_epoch(trainer: pl.Trainer) -> bool:
    """At a train batch's end: the fit stops after this batch, which is not its epoch's last."""
    loop = trainer.fit_loop
    if loop.epoch_loop._num_ready_batches_reached():
        return False  # the epoch ends here: its epoch-end checkpoint resumes at the next epoch, as it should
    by_steps = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
    return by_steps or (trainer.should_stop and loop._can_stop_early)


def _in_cut_short_epoch_end(trainer: pl.Trainer) -> bool:
    """In ``on_train_epoch_end`` (the fit loop counts the epoch processed, not yet completed) of an epoch that stopped
    before its last batch: a checkpoint's loop state here says the epoch ended."""
    loop = trainer.fit_loop
    progress = loop.epoch_progress.current
    return progress.processed > progress.completed and not loop.epoch_loop._num_ready_batches_reached()
