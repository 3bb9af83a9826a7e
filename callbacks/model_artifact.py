"""Publish the trained translator at the end of ``fit``: an exported Hugging Face folder next to the best checkpoint,
and a W&B artifact of type ``model`` with two versions: the best checkpoint and that folder (alias ``best``), then
the last checkpoint (``last.ckpt``, alias ``last``: what ``--ckpt_path last`` resumes from). W&B adds ``latest`` to
each version it logs, so ``latest`` ends on the last checkpoint's.

Works with W&B online and offline (``wandb sync`` uploads the artifact later); a disabled run, or no W&B logger,
gets only the exported folder. Runs on global rank 0 only; reads the module's public ``translator`` and ``hparams``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from activation_transfer.translators.export import (
    checkpoint_translator,
    config_from_hparams,
    export_from_checkpoint,
    save_pretrained,
)
from callbacks.wandb_artifacts import files_artifact, log_to_runs, recording_runs

log = logging.getLogger(__name__)

IDENTITY_HPARAMS = ("sender_dim", "receiver_dim", "translator", "normalize", "loss", "sender", "receiver")


def _float(value) -> float | None:
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None


def training_metrics(trainer: pl.Trainer) -> dict:
    """The best monitored score and the last validation metrics, as plain floats (what the artifact records)."""
    out = {f"final/{k}": _float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and getattr(ckpt, "best_model_score", None) is not None and ckpt.monitor:
        out[f"best/{ckpt.monitor}"] = _float(ckpt.best_model_score)
    return out


class TranslatorArtifactCallback(pl.Callback):
    """Export the best translator as a ``from_pretrained`` folder and log it, with its checkpoint, to W&B.

    Args:
        export: Write the exported folder (``<best checkpoint without .ckpt>/``, or ``<default_root_dir>/translator``
            from the final weights when no checkpoint was saved).
        log_artifact: Log a W&B ``model`` artifact to every online or offline W&B run of the trainer.
        name: Artifact name; None gives ``translator-<W&B run id>``.
        aliases: Aliases of the best checkpoint's version.
        last_aliases: Aliases of the last checkpoint's version (logged after the best one, when a ``last.ckpt``
            exists; empty: not logged).
    """

    def __init__(
        self,
        export: bool = True,
        log_artifact: bool = True,
        name: str | None = None,
        aliases: tuple[str, ...] = ("best",),
        last_aliases: tuple[str, ...] = ("last",),
    ) -> None:
        self.export, self.log_artifact, self.name, self.aliases = export, log_artifact, name, list(aliases)
        self.last_aliases = list(last_aliases)
        self.exported: Path | None = None
        self.logged: list[str] = []

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Export and log the best checkpoint (or, without one, the module's final weights), then the last one."""
        ckpt_cb = trainer.checkpoint_callback
        best, last = (self._file(ckpt_cb, attr) for attr in ("best_model_path", "last_model_path"))
        metrics = training_metrics(trainer)
        if self.export:
            if best is not None:
                self.exported = export_from_checkpoint(best, best.with_suffix(""), metrics)
            else:
                folder = Path(trainer.default_root_dir) / "translator"
                config = config_from_hparams(pl_module.hparams, metrics)
                self.exported = save_pretrained(folder, pl_module.translator, config)
            log.info("exported translator: %s", self.exported)
        runs = recording_runs(trainer) if self.log_artifact else []
        if not runs or (best is None and self.exported is None):
            return
        h = pl_module.hparams
        metadata = {
            **{k: h.get(k) for k in IDENTITY_HPARAMS},
            "metrics": metrics,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
        }
        files = {}
        if best is not None:
            metadata.update(self._source(best))
            files[best.name] = best
        folders = {"exported": self.exported} if self.exported is not None else {}
        for run in runs:
            name = self.name or f"translator-{run.id}"
            log_to_runs([run], files_artifact(name, "model", files, folders, metadata), self.aliases)
            self.logged.append(name)
            if last is not None and self.last_aliases:
                last_meta = {**metadata, **self._source(last)}
                art = files_artifact(name, "model", {last.name: last}, None, last_meta)
                log_to_runs([run], art, self.last_aliases)
                self.logged.append(f"{name}:last")

    @staticmethod
    def _source(ckpt: Path) -> dict:
        """The checkpoint's own name, SHA-256, epoch and global step (as its exported config's ``source``): the best
        checkpoint may come from an epoch long before the end of fit, whose epoch and step the trainer holds."""
        return dict(checkpoint_translator(ckpt).config["source"])

    @staticmethod
    def _file(ckpt_cb, attr: str) -> Path | None:
        path = getattr(ckpt_cb, attr, "") if ckpt_cb is not None else ""
        return Path(path) if path and Path(path).is_file() else None
