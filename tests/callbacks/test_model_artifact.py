"""TranslatorArtifactCallback's W&B metadata describes the checkpoint each version holds, not the end of fit."""

from __future__ import annotations

import json

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from activation_transfer.io import sha256_file
from callbacks import model_artifact
from callbacks.checkpoint import LastEveryValidationCheckpoint
from lightning_modules.translator import TranslatorModule


class _Run:
    """Records what the callback logs, as a W&B run would."""

    id = "fake"

    def __init__(self):
        self.logged: list[tuple[list, dict]] = []

    def log_artifact(self, artifact, aliases=None):
        self.logged.append((aliases, dict(artifact.metadata)))


def test_artifact_metadata_gives_each_checkpoints_own_epoch_and_step(tmp_path, monkeypatch):
    run = _Run()
    monkeypatch.setattr(model_artifact, "recording_runs", lambda trainer: [run])
    # Validation targets are the negated training targets: val/loss grows every epoch, the best is epoch 0's.
    a = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    train = [{"sender": x, "receiver": x @ a} for x in torch.randn(256, 8, generator=torch.Generator().manual_seed(1))]
    val = [{"sender": x, "receiver": -(x @ a)} for x in torch.randn(64, 8, generator=torch.Generator().manual_seed(2))]
    saver = LastEveryValidationCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/loss", mode="min", filename="best-{epoch}", save_last=True
    )
    trainer = pl.Trainer(
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[model_artifact.TranslatorArtifactCallback(), saver],
    )
    module = TranslatorModule(8, 6, lr=1e-2, warmup_steps=0, decay="constant")
    trainer.fit(module, DataLoader(train, batch_size=64), DataLoader(val, batch_size=64))
    (best_aliases, best), (last_aliases, last) = run.logged
    assert (best_aliases, last_aliases) == (["best"], ["last"])
    assert (best["checkpoint"], best["epoch"], best["global_step"]) == ("best-epoch=0.ckpt", 0, 4)
    assert best["checkpoint_sha256"] == sha256_file(tmp_path / "ckpt" / "best-epoch=0.ckpt")
    # The trainer's checkpoint callback rewrites last.ckpt every epoch (plain Lightning 2.6 kept epoch 0's here).
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert (last["checkpoint"], last["epoch"], last["global_step"]) == ("last.ckpt", 2, 12)
    assert (saved["epoch"], saved["global_step"]) == (2, 12)
    assert last["checkpoint_sha256"] == sha256_file(tmp_path / "ckpt" / "last.ckpt")
    assert (trainer.current_epoch, trainer.global_step) == (3, 12)  # what the metadata gave before
    source = json.loads((tmp_path / "ckpt" / "best-epoch=0" / "config.json").read_text())["source"]
    assert (source["epoch"], source["global_step"]) == (best["epoch"], best["global_step"])
