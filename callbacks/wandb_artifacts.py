"""W&B artifacts of the project: finding the trainer's W&B runs, logging files as an artifact, resolving a
``wandb:`` translator reference on rank 0 (``activation_transfer.translators.loading`` resolves it) for every rank,
recording a local translator as a used reference artifact (lineage), and one W&B run per results folder (resume).

Logging works online and offline (an offline run keeps the artifact's manifest in its ``.wandb`` file and the staged
copies under W&B's data folder, and ``wandb sync`` uploads both); a disabled run logs nothing. Using an artifact
needs an online run: offline, W&B cannot download anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from activation_transfer.errors import UsageError
from activation_transfer.io import write_json
from activation_transfer.translators.loading import is_wandb_ref, resolve_translator_ref
from callbacks.wandb_ledger import BOOKKEEPING, RunLedger, value_digest


def wandb_loggers(trainer: pl.Trainer) -> list[tuple]:
    """``(logger, run)`` of the trainer's W&B-like loggers (those with ``log_table``), whatever their mode.

    On ranks other than 0 a ``WandbLogger``'s experiment is a dummy without artifact methods: none is returned.
    """
    out = []
    for logger in trainer.loggers:
        if isinstance(logger, RunFolderWandbLogger):
            logger.start()  # asked for before its folder is known (a wandb: translator): a run of its own
        run = getattr(logger, "experiment", None) if hasattr(logger, "log_table") else None
        if run is not None and hasattr(run, "log_artifact"):
            out.append((logger, run))
    return out


def wandb_runs(trainer: pl.Trainer) -> list:
    """The runs of :func:`wandb_loggers`."""
    return [run for _, run in wandb_loggers(trainer)]


def recording_loggers(trainer: pl.Trainer) -> list[tuple]:
    """``(logger, run)`` of the W&B runs (online or offline) that record artifacts; disabled runs are left out."""
    return [(logger, run) for logger, run in wandb_loggers(trainer) if not getattr(run, "disabled", False)]


def recording_runs(trainer: pl.Trainer) -> list:
    """The W&B runs (online or offline) of the trainer that record artifacts; disabled runs are left out."""
    return [run for _, run in recording_loggers(trainer)]


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


RUN_ID_FILE = "wandb_run.json"


class RunFolderWandbLogger(WandbLogger):
    """The evaluation's ``WandbLogger``: one W&B run per results folder, so a resumed evaluation resumes its run.

    Lightning starts every logger's run at setup, before the evaluation knows its run folder (its name hashes the
    loaded models and translators); this logger's run waits for :meth:`start` (its ``experiment`` is ``None`` until
    then), which reads the run id stored in ``<folder>/wandb_run.json`` and resumes it (``resume="allow"``), or
    stores the new run's id there. An ``id`` given in the config wins. Takes ``WandbLogger``'s arguments.

    What the folder's run already holds is in its :class:`~callbacks.wandb_ledger.RunLedger` (``ledger``, once the
    run started in a folder): :meth:`log_metrics` (so ``log_table`` and ``log_image`` too) logs only the keys the run
    does not hold with the same value, never at a step below the run's recorded one.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.started = False
        self.ledger: RunLedger | None = None

    @property
    def experiment(self):
        if not self.started and self._experiment is None:
            return None  # Lightning's setup-time trigger: the run starts in start()
        return super().experiment

    def start(self, folder: str | Path | None = None):
        """Start (or resume) the run of ``folder`` (None: a run of its own); idempotent. Returns the run."""
        if not self.started and self._experiment is None and folder is not None:
            stored = _stored_ids(folder).get(self._wandb_init.get("project"))
            if stored and not self._wandb_init.get("id"):
                self._wandb_init.update(id=stored, resume="allow")
                self._id = stored
        self.started = True
        run = super().experiment
        if folder is not None:
            _store_id(folder, self._wandb_init.get("project"), run)
            if self.ledger is None and not getattr(run, "disabled", False) and hasattr(run, "id"):
                self.ledger = RunLedger(folder, f"{self._wandb_init.get('project')}/{run.id}")
        return run

    @rank_zero_only
    def log_metrics(self, metrics: Mapping, step: int | None = None) -> None:
        """``WandbLogger.log_metrics`` without what the run already holds (see the class); a row of nothing new is
        not logged. Offline a resumed run counts its steps from 0: the row goes to the recorded next step."""
        if self.ledger is None:
            super().log_metrics(metrics, step)
            return
        if self._prefix:
            metrics = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}": v for k, v in metrics.items()}
        new = self.ledger.new({k: value_digest(v) for k, v in metrics.items() if k not in BOOKKEEPING})
        if not new:
            return
        row = {k: v for k, v in metrics.items() if k in new or k in BOOKKEEPING}
        if step is not None and not self._wandb_init.get("sync_tensorboard"):
            row["trainer/global_step"] = step
        run = self.experiment
        if self.ledger.step > run.step:
            run.log(row, step=self.ledger.step, commit=True)
        else:
            run.log(row)
        self.ledger.record(new, step=run.step)


def _store_id(folder: str | Path, project: str | None, run) -> None:
    """Record ``run``'s id as ``project``'s in ``<folder>/wandb_run.json`` (a disabled run has none to record)."""
    if getattr(run, "disabled", False) or not hasattr(run, "id"):
        return
    ids = _stored_ids(folder)
    if ids.get(project) != run.id:
        ids[project] = run.id
        write_json(Path(folder) / RUN_ID_FILE, ids)  # atomic: a torn file would block every resume


def _stored_ids(folder: str | Path) -> dict:
    path = Path(folder) / RUN_ID_FILE
    if not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        ids = None
    if not isinstance(ids, dict):
        raise UsageError(
            f"{path} is not the JSON object of W&B run ids this folder's runs wrote; delete it (the evaluation then "
            "starts a new W&B run) or restore it"
        )
    return ids


def _checkpoint_folder(trainer: pl.Trainer) -> Path | None:
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    return Path(dirpath) if dirpath else None


def resume_checkpoint_run(trainer: pl.Trainer, ckpt_path: str | None) -> None:
    """``fit --ckpt_path``: each ``WandbLogger`` without an ``id`` of its own resumes (``resume="allow"``) the W&B run
    that wrote the checkpoint, whose id :func:`store_checkpoint_run` keeps in ``wandb_run.json`` beside it; so a
    resumed training continues its run (and its ``translator-<run id>`` artifact) instead of starting another.
    Call before the loggers' runs start."""
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry") or ckpt_path.startswith("registry:"):
        return
    folder = _checkpoint_folder(trainer) if ckpt_path == "last" else Path(ckpt_path).parent
    if folder is None:
        return
    ids = _stored_ids(folder)
    for logger in trainer.loggers:
        stored = ids.get(getattr(logger, "_wandb_init", {}).get("project"))
        if (
            isinstance(logger, WandbLogger)
            and logger._experiment is None
            and stored
            and not logger._wandb_init.get("id")
        ):
            logger._wandb_init.update(id=stored, resume="allow")
            logger._id = stored


class CheckpointRunId(pl.Callback):
    """Keep the id of each running ``WandbLogger`` run in ``<checkpoint dirpath>/wandb_run.json`` (global rank 0), for
    :func:`resume_checkpoint_run`; written at fit start, after ``ModelCheckpoint`` checked that its folder is empty."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = _checkpoint_folder(trainer)
        if folder is None or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                _store_id(folder, logger._wandb_init.get("project"), logger.experiment)


def bind_run_to_folder(trainer: pl.Trainer, folder: str | Path) -> None:
    """Start the trainer's :class:`RunFolderWandbLogger` runs as ``folder``'s (global rank 0; idempotent)."""
    for logger in trainer.loggers:
        if isinstance(logger, RunFolderWandbLogger):
            logger.start(folder)


def use_local_translator(run, path: str | Path, sha256: str, kind: str) -> None:
    """Record a local translator (checkpoint or exported folder) as an input of ``run``: a ``model`` artifact
    ``translator-<sha256[:12]>`` holding a checksummed ``file://`` reference (nothing is uploaded), used by the run.

    Online this is ``run.use_artifact``. Offline W&B refuses ``use_artifact``; the run instead records the artifact
    with ``use_after_commit`` (what ``use_artifact`` of a new artifact does online), which ``wandb sync`` replays as
    the artifact's creation and its use by the run.
    """
    import wandb

    path = Path(path).resolve()
    metadata = {"path": str(path), "sha256": sha256, "kind": kind}
    art = wandb.Artifact(name=f"translator-{sha256[:12]}", type="model", metadata=metadata)
    art.add_reference(path.as_uri(), name=path.name, checksum=True)
    if getattr(run, "offline", False):
        run._log_artifact(art, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(art)
