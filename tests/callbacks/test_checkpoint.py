"""The trainer's checkpoint callback writes every checkpoint whole: a process killed while writing ``last.ckpt``
leaves the previous one, never a torn file that ``--ckpt_path last`` would stop on."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

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
