"""Epoch metrics of the trainers: the running bests survive a resume, the epoch training loss weights rows."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from datamodules.organism_text import ANSWER, PROMPT
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


def test_the_organisms_validation_loss_is_the_mean_over_every_answer_token():
    # Rows with 1 to 6 answer tokens (the EOS included) after prompts of other lengths, right padded. val/loss is the
    # answer cross-entropy of the whole validation set: one mean over its answer tokens, whatever the batching.
    kwargs = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "vocab_size": 32}
    pl.seed_everything(0, verbose=False)
    module = CausalLMModule(**kwargs)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 32, (6, 12), generator=g)
    kind = torch.zeros(6, 12, dtype=torch.long)  # PAD
    for i, (prompt, answer) in enumerate([(3, 1), (5, 6), (2, 2), (7, 4), (4, 1), (3, 5)]):
        kind[i, :prompt], kind[i, prompt : prompt + answer] = PROMPT, ANSWER
    with torch.no_grad():
        logits = module.model.eval()(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    expected = float(nll[kind[:, 1:] == ANSWER].mean())
    for batch_size in (1, 4, 6):
        trainer = pl.Trainer(enable_checkpointing=False, **QUIET)
        loader = DataLoader(TensorDataset(ids, kind), batch_size=batch_size)
        logged = trainer.validate(module, loader, verbose=False)[0]
        assert logged["val/loss"] == pytest.approx(expected, rel=1e-5), batch_size
