"""Save the fully resolved LightningCLI config once per run: into the W&B run (config and a file) and to disk.

The stock ``SaveConfigCallback`` writes ``<trainer.log_dir>/config.yaml`` and aborts when it exists. With a
``WandbLogger`` ``log_dir`` is the shared ``save_dir``, so every second run would abort (pytorch-lightning #7679,
#11256, #14162). This subclass writes instead:

- into the W&B run: ``run.config`` gets the whole resolved config, and ``resolved_config.yaml`` goes into the run's
  ``files/`` folder (unique per run, synced with it; not ``config.yaml``, the name W&B itself writes
  ``run.config`` to when the run finishes);
- without a live W&B run (``WANDB_MODE=disabled``, other loggers, no logger): ``<trainer.log_dir>/config.yaml``,
  or ``config-1.yaml``, ``config-2.yaml``... when taken, so nothing is ever overwritten and no run aborts.

A module that names its results folder at test start (a ``run_dir`` attribute: the evaluation) gets its config
saved at the start of the test epoch instead of at setup, once the folder is known, so that the W&B run is started
as that folder's run (:func:`callbacks.wandb_artifacts.bind_run_to_folder`: a resumed evaluation resumes its run).

Generic otherwise: it knows nothing about the models; the training and evaluation CLIs both use it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger

from activation_transfer.io import atomic_write
from callbacks.wandb_artifacts import bind_run_to_folder

log = logging.getLogger(__name__)

WANDB_FILENAME = "resolved_config.yaml"


def _unique_path(folder: Path, filename: str) -> Path:
    path = folder / filename
    stem, suffix = os.path.splitext(filename)
    i = 1
    while path.exists():
        path = folder / f"{stem}-{i}{suffix}"
        i += 1
    return path


def _live_wandb_runs(trainer) -> list:
    runs = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            if run is not None and not getattr(run, "disabled", False):
                runs.append(run)
    return runs


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Save the resolved config to the W&B run (config + file) or, without one, to a never-overwritten file.

    Args:
        parser: The CLI parser (given by LightningCLI).
        config: The parsed config (given by LightningCLI).
        config_filename: File name of the config saved on disk (in a W&B run it is ``resolved_config.yaml``).
        overwrite: Overwrite an existing file on disk instead of choosing a free name.
        multifile: Unused (the config is always saved as one file); kept for the parent's signature.
        save_to_log_dir: Ignored: the parent's ``log_dir`` writing is always off (it is what collides).
    """

    def __init__(
        self,
        parser,
        config,
        config_filename: str = "config.yaml",
        overwrite: bool = False,
        multifile: bool = False,
        save_to_log_dir: bool = False,
    ):
        super().__init__(
            parser,
            config,
            config_filename=config_filename,
            overwrite=overwrite,
            multifile=multifile,
            save_to_log_dir=False,
        )
        self.saved_paths: list[str] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "test" and hasattr(pl_module, "run_dir"):
            return  # on_test_epoch_start: the results folder, hence the W&B run, is not known yet
        super().setup(trainer, pl_module, stage)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        if hasattr(pl_module, "run_dir"):
            super().setup(trainer, pl_module, "test")  # the parent's once-only guard and rank broadcast

    def save_config(self, trainer, pl_module, stage: str) -> None:
        # Runs on global rank 0 only (the parent guarantees it): no collectives here.
        if getattr(pl_module, "run_dir", None) is not None:
            bind_run_to_folder(trainer, pl_module.run_dir)
        text = self.parser.dump(self.config, skip_none=False)
        runs = _live_wandb_runs(trainer)
        if runs:
            as_dict = yaml.safe_load(text)
            for run in runs:
                run.config.update(as_dict, allow_val_change=True)
            folders, filename = [Path(run.dir) for run in runs], WANDB_FILENAME
        else:
            # Not trainer.log_dir: it broadcasts, and this runs on rank 0 only (a collective here hangs DDP).
            logger = trainer.logger
            folder = (getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)) if logger else None
            folders, filename = [Path(folder or trainer.default_root_dir)], self.config_filename
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / filename if self.overwrite else _unique_path(folder, filename)
            atomic_write(path, text)
            self.saved_paths.append(str(path))
            log.info("saved the resolved config to %s", path)
