"""W&B artifacts of the project: finding the trainer's W&B runs, logging files as an artifact, and resolving a
``wandb:`` translator reference on rank 0 (``activation_transfer.translators.loading`` resolves it) for every rank.

Logging works online and offline (an offline run keeps the artifact's manifest in its ``.wandb`` file and the staged
copies under W&B's data folder, and ``wandb sync`` uploads both); a disabled run logs nothing. Using an artifact
needs an online run: offline, W&B cannot download anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytorch_lightning as pl

from activation_transfer.translators.loading import is_wandb_ref, resolve_translator_ref


def wandb_runs(trainer: pl.Trainer) -> list:
    """The runs of the trainer's W&B-like loggers (those with ``log_table``), whatever their mode.

    On ranks other than 0 a ``WandbLogger``'s experiment is a dummy without artifact methods: none is returned.
    """
    runs = []
    for logger in trainer.loggers:
        run = getattr(logger, "experiment", None) if hasattr(logger, "log_table") else None
        if run is not None and hasattr(run, "log_artifact"):
            runs.append(run)
    return runs


def recording_runs(trainer: pl.Trainer) -> list:
    """The W&B runs (online or offline) of the trainer that record artifacts; disabled runs are left out."""
    return [run for run in wandb_runs(trainer) if not getattr(run, "disabled", False)]


def files_artifact(
    name: str,
    type_: str,
    files: Mapping[str, str | Path] | None = None,
    folders: Mapping[str, str | Path] | None = None,
    metadata: Mapping | None = None,
):
    """A ``wandb.Artifact`` holding ``files`` and ``folders`` (``{name in the artifact: local path}``).

    Args:
        name: Artifact name; characters W&B refuses (anything but letters, digits, ``-``, ``_``, ``.``) become ``-``.
        type_: Artifact type (``model``, ``eval_results``).
        files: Files to add, by their name in the artifact; missing files are skipped.
        folders: Folders to add, by their name in the artifact; missing folders are skipped.
        metadata: JSON-serializable metadata shown with the artifact.
    """
    import wandb

    art = wandb.Artifact(name=re.sub(r"[^A-Za-z0-9_.-]", "-", name), type=type_, metadata=dict(metadata or {}))
    for target, path in (files or {}).items():
        if Path(path).is_file():
            art.add_file(str(path), name=target)
    for target, path in (folders or {}).items():
        if Path(path).is_dir():
            art.add_dir(str(path), name=target)
    return art


def log_to_runs(runs: Iterable, art, aliases: list[str] | None = None) -> int:
    """Log ``art`` to every run (aliases only when given); returns how many runs got it."""
    n = 0
    for run in runs:
        if aliases:
            run.log_artifact(art, aliases=list(aliases))
        else:
            run.log_artifact(art)
        n += 1
    return n


def local_translator(ref: str, trainer: pl.Trainer) -> str:
    """``ref`` as a local path on every rank: rank 0 resolves a ``wandb:`` reference through its run (``use_artifact``,
    so W&B records the lineage), since other ranks' W&B runs are placeholders; the path is broadcast."""
    if not is_wandb_ref(ref):
        return ref
    path = None
    if trainer.is_global_zero:
        runs = wandb_runs(trainer)
        path = resolve_translator_ref(ref, runs[0] if runs else None, trainer.default_root_dir)
    return trainer.strategy.broadcast(path, src=0)
