"""Epoch metrics of the trainers: the running bests survive a resume, the epoch training loss weights rows."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.translator import TranslatorModule

QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}


def _pairs(n: int, sign: float, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    return [{"sender": x, "receiver": sign * (x @ a)} for x in torch.randn(n, 8, generator=g)]


def _fit_translator(root, epochs: int, ckpt: str | None = None) -> dict:
    # Validation targets are the negated training targets: validation cosine falls every epoch, the best is epoch 0's.
    pl.seed_everything(0, verbose=False)
    module = TranslatorModule(8, 6, lr=1e-2, warmup_steps=0, decay="constant")
    saver = ModelCheckpoint(dirpath=root, save_last=True, monitor=None)
    trainer = pl.Trainer(max_epochs=epochs, default_root_dir=root, callbacks=[saver], **QUIET)
    train, val = DataLoader(_pairs(256, 1.0, 1), batch_size=64), DataLoader(_pairs(64, -1.0, 2), batch_size=64)
    trainer.fit(module, train, val, ckpt_path=ckpt)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if "cos_norm" in k}


# The resumed fit writes into the folder of the fit it continues.
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_the_best_cos_norm_survives_a_resume(tmp_path):
    full = _fit_translator(tmp_path / "full", 3)
    first = _fit_translator(tmp_path / "part", 1)
    resumed = _fit_translator(tmp_path / "part", 3, str(tmp_path / "part" / "last.ckpt"))
    assert full["val/cos_norm_best"] == pytest.approx(first["val/cos_norm"])  # the data make epoch 0 the best
    assert resumed["val/cos_norm_best"] == pytest.approx(full["val/cos_norm_best"])
    assert resumed["val/cos_norm"] == pytest.approx(full["val/cos_norm"])


def test_the_epoch_training_loss_weights_rows(tmp_path):
    # 70 rows in batches of 64 and 6, lr ~0 so the weights stay put: the epoch loss is the mean over rows.
    rows = _pairs(70, 1.0, 3)
    for row in rows:
        row["receiver"] = torch.randn(6)
    module = TranslatorModule(8, 6, lr=1e-12, warmup_steps=0, decay="constant")
    trainer = pl.Trainer(max_epochs=1, enable_checkpointing=False, num_sanity_val_steps=0, **QUIET)
    loader = DataLoader(rows, batch_size=64)
    trainer.fit(module, loader, loader)
    logged = trainer.callback_metrics
    assert float(logged["train/loss_epoch"]) == pytest.approx(float(logged["val/loss"]), abs=1e-6)


def test_the_best_answer_accuracy_is_saved_and_kept_at_train_start():
    kwargs = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "vocab_size": 32}
    trained = CausalLMModule(**kwargs)
    trained.val_answer_acc_best.update(torch.tensor(0.7))
    resumed = CausalLMModule(**kwargs)
    resumed.load_state_dict(trained.state_dict())  # what a resumed fit does before on_train_start
    resumed.on_train_start()
    assert float(resumed.val_answer_acc_best.max_value) == pytest.approx(0.7)  # the state (compute wants an update)
