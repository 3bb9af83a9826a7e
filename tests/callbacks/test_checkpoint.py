"""The trainer's checkpoint callback writes every checkpoint whole: a process killed while writing ``last.ckpt``
leaves the previous one, never a torn file that ``--ckpt_path last`` would stop on; a fit stopped part-way through an
epoch resumes from ``last.ckpt`` where it stopped."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from callbacks.checkpoint import LastEveryValidationCheckpoint
from lightning_modules.translator import TranslatorModule


class _Killed(Exception):
    """The process dying half-way through a write."""


def test_a_kill_while_writing_last_ckpt_leaves_the_previous_one(tmp_path, monkeypatch):
    # /tmp on another file system (a tmpfs) than the run folder: a rename from there fails with EXDEV, and a file is
    # copied instead. The second write of last.ckpt dies half-way, by whichever way its bytes reach the disk.
    writes, real_rename, real_copyfile, real_save = [], os.rename, shutil.copyfile, torch.save

    def rename(src, dst, *args, **kwargs):
        if str(dst).endswith(".ckpt") and os.path.dirname(src) != os.path.dirname(dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, *args, **kwargs)

    def die_on_second_write(name: str, write) -> None:
        if name.startswith((".last.ckpt.", "last.ckpt")):
            writes.append(name)
            if len(writes) == 2:
                write()
                raise _Killed

    def copyfile(src, dst, *args, **kwargs):
        die_on_second_write(os.path.basename(dst), lambda: Path(dst).write_bytes(Path(src).read_bytes()[:100]))
        return real_copyfile(src, dst, *args, **kwargs)

    def save(obj, f, *args, **kwargs):
        if isinstance(f, str | os.PathLike):
            die_on_second_write(os.path.basename(f), lambda: Path(f).write_bytes(b"PK\x03\x04"))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "copyfile", copyfile)
    monkeypatch.setattr(torch, "save", save)
    data = [{"sender": x, "receiver": x[:6]} for x in torch.randn(64, 8, generator=torch.Generator().manual_seed(0))]
    saver = LastEveryValidationCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_last=True)
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    trainer.callbacks.append(saver)
    module = TranslatorModule(8, 6, lr=1e-2, warmup_steps=0, decay="constant")
    try:
        trainer.fit(module, DataLoader(data, batch_size=32), DataLoader(data, batch_size=32))
    except _Killed:
        pass
    assert len(writes) == 2  # the premise: killed while writing the second last.ckpt
    # What `--ckpt_path last` resumes from: epoch 0's checkpoint, whole (the torn copy used to replace it).
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0
    assert not list((tmp_path / "ckpt").glob(".*.tmp"))


class _StopAt(pl.Callback):
    """Stops the fit after global step ``step`` by ``trainer.should_stop``, as ``trainer.max_time``'s Timer does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _fit(root: Path, callbacks=(), ckpt_path: str | None = None, monitor="val/loss", **limits) -> pl.Trainer:
    """TranslatorModule on 64 pairs, 2 batches an epoch, the default callback's settings (monitor val/loss)."""
    data = [{"sender": x, "receiver": x[:6]} for x in torch.randn(64, 8, generator=torch.Generator().manual_seed(0))]
    saver = LastEveryValidationCheckpoint(dirpath=root / "ckpt", monitor=monitor, save_last=True)
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = pl.Trainer(default_root_dir=root, callbacks=[*callbacks, saver], **quiet, **limits)
    module = TranslatorModule(8, 6, lr=1e-2, warmup_steps=0, decay="constant")
    loader = DataLoader(data, batch_size=32)
    trainer.fit(module, loader, loader, ckpt_path=ckpt_path)
    return trainer


# The resume writes into the first fit's folder; a plain DataLoader does not skip the batches already taken.
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.parametrize("stop", [{"max_steps": 3}, {"callbacks": [_StopAt(3)]}], ids=["max_steps", "should_stop"])
@pytest.mark.parametrize(
    "resume, steps", [({"max_epochs": 2}, 4), ({"max_epochs": 3, "max_steps": 5}, 5)], ids=["same", "more_steps"]
)
def test_a_fit_stopped_mid_epoch_resumes_from_last_ckpt_where_it_stopped(tmp_path, stop, resume, steps):
    # Stopped after step 3, epoch 1's first of 2 batches. last.ckpt was written in the cut-short epoch's
    # on_train_epoch_end, the epoch counted as processed: the resume skipped its rest, or stopped at once at step 3
    # ("max_epochs=2 reached"), or (max_steps 5) counted epoch 1 twice and stopped at step 4 ("max_epochs=3 reached").
    assert _fit(tmp_path, max_epochs=2, **stop).global_step == 3
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert _fit(tmp_path, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), **resume).global_step == steps
    # From the step where the fit stopped (not an older one), epoch 1 not counted as processed.
    assert last["global_step"] == 3 and last["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 1


def test_a_fit_stopped_mid_epoch_keeps_lightnings_choice_of_top_k(tmp_path):
    # last.ckpt is written at the stopping batch; the top-k save Lightning makes at the cut-short epoch's end (without
    # a monitor: the latest step) still happens, so the exported "best" translator is the same as before.
    trainer = _fit(tmp_path, max_epochs=2, max_steps=3, monitor=None)
    assert Path(trainer.checkpoint_callback.best_model_path).name == "epoch=1-step=3.ckpt"
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3
