"""Fit a training schedule to a time budget without making it unreproducible.

A run stopped by ``trainer.max_time`` ends part-way through its learning-rate schedule: no recipe gives its weights.
:class:`FitStepsToTime` instead measures the pace of a few steps during the warm-up, then sets ``max_steps`` (and the
module's schedule length) once, so the whole schedule ends inside the budget. The warm-up's rates do not depend on
the schedule's length, so the run takes the same steps as a plain run with ``trainer.max_steps`` set to the chosen
number from the start: that number (written to ``fit_steps_to_time.json`` in the run's log folder) is the recipe.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pytorch_lightning as pl

from activation_transfer.errors import UsageError
from activation_transfer.io import atomic_write

log = logging.getLogger(__name__)
RECORD = "fit_steps_to_time.json"


def steps_within(
    seconds_left: float,
    pace: float,
    step: int,
    round_to: int,
    margin: float,
    ceiling: int | None = None,
    floor: int = 0,
) -> int:
    """The largest multiple of ``round_to`` steps that ``pace`` (steps/s) reaches in ``margin`` of the time left.

    Never fewer than the next multiple after ``step`` (the run already took those) nor than ``floor`` (the warm-up:
    a schedule shorter than it would be clamped at configure time, unlike the plain recipe's), never more than
    ``ceiling``.
    """
    reach = step + max(seconds_left, 0.0) * margin * pace
    steps = max(math.floor(reach / round_to), math.floor(step / round_to) + 1) * round_to
    steps = max(steps, floor)
    return min(steps, ceiling) if ceiling else steps


class FitStepsToTime(pl.Callback):
    """Set ``max_steps`` once, from the measured pace, so that the schedule finishes within ``seconds``."""

    def __init__(
        self,
        seconds: float,
        measure_from: int = 100,
        measure_to: int = 400,
        round_to: int = 500,
        margin: float = 0.85,
    ) -> None:
        """Measure the pace between two steps of the warm-up and choose the run's length.

        Args:
            seconds: Time budget of the training loop, counted from the start of fit (setup not included).
            measure_from: Step at which the pace measurement starts (the first steps compile kernels and fill
                caches; they are slower).
            measure_to: Step at which the length is chosen. Must not exceed the module's ``warmup_steps``: the
                learning rate before that point must not depend on the schedule's length.
            round_to: The chosen ``max_steps`` is a multiple of this (a recipe people can read).
            margin: Share of the remaining time planned for steps; the rest covers validation and slower steps.
                The trainer's ``max_steps`` stays the ceiling.
        """
        super().__init__()
        if not 0 < measure_from < measure_to:
            raise UsageError(f"FitStepsToTime: need 0 < measure_from ({measure_from}) < measure_to ({measure_to})")
        self.seconds, self.measure_from, self.measure_to = seconds, measure_from, measure_to
        self.round_to, self.margin = round_to, margin
        self.chosen: int | None = None
        self._warmup = 0
        self._start = self._t0 = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        warmup = getattr(pl_module.hparams, "warmup_steps", None)
        if warmup is None or not hasattr(pl_module, "set_schedule_steps"):
            raise UsageError(f"FitStepsToTime needs a module with warmup_steps and set_schedule_steps, not {pl_module}")
        if warmup < self.measure_to:
            raise UsageError(
                f"FitStepsToTime: measure_to={self.measure_to} is after the warm-up ({warmup} steps), where the "
                "learning rate already depends on the schedule's length; raise model.warmup_steps or lower measure_to"
            )
        self._warmup = int(warmup)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        step = trainer.global_step
        if step == self.measure_from:
            self._t0 = time.perf_counter()
        if step != self.measure_to or self.chosen is not None:
            return
        now = time.perf_counter()
        pace = (self.measure_to - self.measure_from) / max(now - self._t0, 1e-9)
        ceiling = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        left = self.seconds - (now - self._start)
        within = steps_within(left, pace, step, self.round_to, self.margin, ceiling)
        self.chosen = steps_within(left, pace, step, self.round_to, self.margin, ceiling, floor=self._warmup)
        if self.chosen > within:
            log.warning("FitStepsToTime: the budget ends inside the warm-up; running its %d steps anyway", self.chosen)
        trainer.fit_loop.epoch_loop.max_steps = self.chosen  # what the loop checks (fit_loop.max_steps reads it)
        pl_module.set_schedule_steps(self.chosen)
        record = {"max_steps": self.chosen, "steps_per_s": round(pace, 2), "seconds": self.seconds, "at_step": step}
        log.info("FitStepsToTime: %.1f steps/s, max_steps set to %d", pace, self.chosen)
        if trainer.is_global_zero and trainer.log_dir:
            atomic_write(Path(trainer.log_dir) / RECORD, json.dumps(record, indent=2) + "\n")
