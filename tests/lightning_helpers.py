"""Lightning set-up that many test modules share: a Trainer that prints and writes nothing of its own, and a module's
weights-only checkpoint written without training (as ``train.py`` writes one)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


def quiet_trainer(root: str | Path | None = None, **overrides) -> pl.Trainer:
    """A one-device CPU Trainer without logger, checkpoints, progress bar or model summary; ``root`` is its
    ``default_root_dir`` (None: Lightning's default); ``overrides`` win (e.g. ``logger=fake``, ``max_steps=2``)."""
    options = {"accelerator": "cpu", "devices": 1, **QUIET}
    if root is not None:
        options["default_root_dir"] = str(root)
    return pl.Trainer(**{**options, **overrides})


def save_weights(module: pl.LightningModule, path: str | Path) -> str:
    """``module``'s weights-only checkpoint at ``path``, untrained; returns the path as text."""
    trainer = quiet_trainer()
    trainer.strategy.connect(module)
    trainer.save_checkpoint(str(path), weights_only=True)
    return str(path)
