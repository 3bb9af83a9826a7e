"""Plain progress lines for logs (no terminal): long runs are never silent."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from lightning_helpers import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from callbacks.progress import PlainProgress, progress_callbacks


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)


def test_plain_progress_reports_steps_eta_and_validation(tmp_path, caplog):
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[PlainProgress(every_seconds=0)], num_sanity_val_steps=0)
    with caplog.at_level(logging.INFO, logger="callbacks.progress"):
        trainer.fit(_Tiny(), _loader(), _loader())
    lines = [r.getMessage() for r in caplog.records if r.name == "callbacks.progress"]
    assert lines[0] == "training: 8 steps (max_epochs 2)"
    assert any(line.startswith("epoch 1 step 8/8 (train/loss ") and "eta 0:00:00" in line for line in lines)
    assert [line.split(":")[0] for line in lines if "validation" in line] == [
        "epoch 0 validation",
        "epoch 1 validation",
    ]
    assert all("val/loss" in line for line in lines if "validation" in line)


def test_bar_on_a_terminal_plain_lines_elsewhere(monkeypatch):
    from activation_transfer import loop_progress as progress

    monkeypatch.setattr(progress, "interactive", lambda: True)
    assert progress_callbacks(None) == (True, [])
    monkeypatch.setattr(progress, "interactive", lambda: False)
    bar, extra = progress_callbacks(None)
    assert bar is False and isinstance(extra[0], PlainProgress)
    # Switching the bar off explicitly still leaves plain lines.
    assert isinstance(progress_callbacks(False)[1][0], PlainProgress)
    assert progress_callbacks(True) == (True, [])


def test_extraction_progress_lines_in_a_log(caplog):
    from activation_transfer.loop_progress import Progress

    log = logging.getLogger("datamodules.test")
    with caplog.at_level(logging.INFO, logger="datamodules.test"):
        p = Progress(4, "extracting", "tokens", log, every_seconds=1e9)
        p.update(2, 100)  # not due yet: nothing
        p.update(2, 60)  # the last item: always a line
        p.close()
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("extracting: 4/4, 160 tokens (") and line.endswith("eta 0:00:00")
