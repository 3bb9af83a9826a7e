"""The trainer's checkpoint callback: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is the last validation's.

Lightning 2.6 writes ``last.ckpt`` only when a top-k checkpoint is written at the same step. With a monitored metric
and ``save_top_k=1`` that is only when the metric improves, so after an interruption ``--ckpt_path last`` resumed from
the last improvement and retrained every epoch since (pvnet #544 hit the same). This callback writes ``last.ckpt`` at
every point where Lightning would have checked for a top-k save, as Lightning < 2.6 did; the best checkpoints are
chosen exactly as before.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class LastEveryValidationCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) that also rewrites ``last.ckpt`` when no top-k checkpoint was written."""

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
