"""What a resumed fit must share with the run that wrote its checkpoint, checked before it trains a step.

A checkpoint's weights, optimizer and loop state ran with the options saved in it; a resumed run given other values
of those that decide the weights (a learning rate, a data seed, a batch size) would train on from there and record
the given values for the whole run. Lightning restores whatever it is given, so these checks refuse such a resume
in one line naming the options. Pure functions and a mixin: the library imports no Lightning.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from activation_transfer.errors import UsageError


def resume_differences(saved: dict, given: dict, keys: Iterable[str], prefix: str = "") -> list[str]:
    """``"<prefix><key>: saved X vs given Y"`` for every key of ``keys`` whose values differ. Keys absent on either
    side are not compared (a checkpoint from before a key existed)."""

    def canon(value) -> str:  # tuples and lists, AttributeDicts and dicts alike
        return json.dumps(value, sort_keys=True, default=str)

    return [
        f"{prefix}{key}: saved {saved[key]!r} vs given {given[key]!r}"
        for key in keys
        if key in saved and key in given and canon(saved[key]) != canon(given[key])
    ]


def raise_differences(diff: list[str], ckpt: str) -> None:
    """The refusal of a resume whose options differ (nothing when ``diff`` is empty)."""
    if diff:
        raise UsageError(
            f"cannot resume from {ckpt} with other options ({'; '.join(diff)}): resume with the options it was "
            "trained with, or start a new run without --ckpt_path"
        )


def check_resume_with_max_steps(checkpoint: dict, max_steps: int, ckpt: str = "the checkpoint") -> None:
    """Raise :class:`UsageError` when ``checkpoint`` was written in an epoch's end hooks (the fit loop counts the epoch
    processed, not yet completed) and is resumed with ``max_steps`` and steps left: Lightning 2.6 restarts such a fit
    at that epoch's end and counts the epoch twice, so it stops one epoch early (at once when that was the last)."""
    epochs = (((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {}).get("total") or {}
    ready, started, processed, completed = (
        int(epochs.get(k, 0)) for k in ("ready", "started", "processed", "completed")
    )
    step = int(checkpoint.get("global_step", 0))
    if max_steps != -1 and step < max_steps and ready == started == processed == completed + 1:
        raise UsageError(
            f"cannot resume from {ckpt} with --trainer.max_steps {max_steps}: it was written at the end of epoch "
            f"{checkpoint.get('epoch')} (step {step}), which Lightning 2.6 then counts twice (the fit stops an epoch "
            "early); resume with --trainer.max_steps -1 and limit the run by --trainer.max_epochs"
        )


class ResumeChecks:
    """Mixin of a LightningModule: a resumed fit (``--ckpt_path``) whose options differ from the checkpoint's in one
    that decides the weights is refused before the first step.

    The module names those options in ``RESUME_KEYS`` (its ``__init__`` arguments), its data module in its own
    ``RESUME_KEYS`` (compared with the checkpoint's ``datamodule_hyper_parameters``); options that only change how
    the same computation runs (workers, cache folders, compiling) stay out. ``load_from_checkpoint`` (no trainer) may
    override any of them.
    """

    RESUME_KEYS: tuple[str, ...] = ()

    def resuming_fit(self) -> bool:
        """Whether the checkpoint being loaded is resumed by ``fit`` (not read by ``load_from_checkpoint``, which may
        override options, nor by ``validate``/``test``, which may evaluate it on other data)."""
        return self._trainer is not None and getattr(self._trainer.state, "fn", None) == "fit"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if not self.resuming_fit():
            return
        saved = checkpoint.get("hyper_parameters") or {}
        diff = resume_differences(saved, dict(self.hparams), self.RESUME_KEYS, prefix="model.")
        datamodule = getattr(self._trainer, "datamodule", None)
        data_keys = getattr(datamodule, "RESUME_KEYS", ())
        if data_keys:
            saved = checkpoint.get("datamodule_hyper_parameters") or {}
            diff += resume_differences(saved, dict(datamodule.hparams), data_keys, prefix="data.")
        raise_differences(diff, str(self._trainer.ckpt_path or "the checkpoint"))
