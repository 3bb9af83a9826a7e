"""A training writes only under its output root and the project cache: nothing into the home folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cli.lightning_cli import train_main as main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "train" / "tiny.yaml")
WANDB_DIRS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CONFIG_DIR")


def test_offline_training_writes_nothing_into_home_and_restores_the_environment(tmp_path, monkeypatch, request):
    import wandb

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var, sub in (("XDG_CACHE_HOME", ".cache"), ("XDG_DATA_HOME", ".local/share"), ("XDG_CONFIG_HOME", ".config")):
        monkeypatch.setenv(var, str(home / sub))
    for var in WANDB_DIRS:  # conftest points them at tmp_path: here W&B's own defaults must be overridden
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    wandb.teardown()  # wandb keeps process-wide settings from its first setup: start and end with a fresh one
    monkeypatch.setenv("WANDB_MODE", "offline")
    request.addfinalizer(wandb.teardown)
    root = tmp_path / "root"
    options = "--trainer.max_epochs 1 --data.corpus.builtin_samples 60 --trainer.enable_progress_bar false".split()
    main(["fit", "-c", TINY, "--trainer.default_root_dir", str(root), *options])
    assert list((root / "wandb").glob("offline-run-*/run-*.wandb"))
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
    assert not written, f"written into the home folder: {written}"
    assert not any(os.environ.get(var) for var in WANDB_DIRS)  # the CLI's settings ended with it
