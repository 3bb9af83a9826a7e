"""Progress a person can follow in a log: periodic plain lines instead of a progress bar.

Lightning's progress bar redraws one line with carriage returns: right on a terminal, noise in a CI log or a file
(and invisible when it is switched off, which is what made long runs silent). :func:`progress_callbacks` keeps the
bar on a terminal and otherwise adds :class:`PlainProgress`, which writes one line every ``every_seconds`` with the
step, the epoch, the latest loss and an ETA, and one line per finished validation with its metrics.
"""

from __future__ import annotations

import logging
import time

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from activation_transfer import loop_progress as components_progress
from activation_transfer.loop_progress import eta, fmt_seconds

log = logging.getLogger(__name__)


def _scalars(metrics: dict, prefixes: tuple[str, ...]) -> str:
    items = []
    for key in sorted(metrics):
        if key.startswith(prefixes):
            try:
                items.append(f"{key} {float(metrics[key]):.4f}")
            except (TypeError, ValueError):  # a non-scalar metric: not for a one-line summary
                continue
    return ", ".join(items)


class PlainProgress(pl.Callback):
    """Plain progress lines for non-interactive output (CI, log files), on global rank 0.

    Args:
        every_seconds: Least seconds between two progress lines of the same loop.
    """

    def __init__(self, every_seconds: float = 30.0) -> None:
        self.every_seconds = every_seconds
        self._start: float | None = None
        self._last = 0.0

    def _due(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.every_seconds:
            self._last = now
            return True
        return False

    def _reset(self) -> None:
        self._start = time.monotonic()
        self._last = self._start

    @rank_zero_only
    def on_train_start(self, trainer, pl_module) -> None:
        self._reset()
        total = trainer.estimated_stepping_batches
        log.info("training: %s steps (max_epochs %s)", total, trainer.max_epochs)

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._due():
            return
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        elapsed = time.monotonic() - self._start
        loss = _scalars(trainer.callback_metrics, ("train/",))
        log.info(
            "epoch %d step %d/%s %s elapsed %s eta %s",
            trainer.current_epoch,
            step,
            total,
            f"({loss})" if loss else "",
            fmt_seconds(elapsed),
            eta(elapsed, step, total),
        )

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = _scalars(trainer.callback_metrics, ("val/",))
        log.info("epoch %d validation: %s", trainer.current_epoch, metrics or "(no metrics)")

    @rank_zero_only
    def on_test_start(self, trainer, pl_module) -> None:
        self._reset()

    @rank_zero_only
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if not self._due():
            return
        total = trainer.num_test_batches[dataloader_idx] if trainer.num_test_batches else 0
        done = batch_idx + 1
        elapsed = time.monotonic() - self._start
        log.info(
            "test batch %d/%s elapsed %s eta %s", done, total or "?", fmt_seconds(elapsed), eta(elapsed, done, total)
        )


def progress_callbacks(enable_progress_bar: bool | None) -> tuple[bool, list[pl.Callback]]:
    """``(enable_progress_bar, extra callbacks)`` for a run: the bar on a terminal, plain lines elsewhere.

    Args:
        enable_progress_bar: The config's explicit choice, or None to decide from the terminal. An explicit False
            still gets plain lines: switching the bar off must not make a long run silent.
    """
    if enable_progress_bar is None:
        enable_progress_bar = components_progress.interactive()
    return enable_progress_bar, ([] if enable_progress_bar else [PlainProgress()])
