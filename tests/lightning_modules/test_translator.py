"""TranslatorModule: translate(), losses, schedule, checkpoints with weights_only, identity checks."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from activation_transfer.translators.architectures import LinearTranslator, MLPTranslator, translator_spec
from activation_transfer.translators.loading import check_translator_matches, load_translator
from lightning_modules.translator import TranslatorModule

S_ID = {
    "name": "tiny-neox",
    "model_type": "gpt_neox",
    "hidden_size": 6,
    "num_layers": 2,
    "layer": "gpt_neox.layers.1",
    "layer_index": 1,
    "preset_seed": 0,
    "revision": None,
}
R_ID = dict(S_ID, name="tiny-neox-large", hidden_size=5, num_layers=4, layer="gpt_neox.layers.2", layer_index=2)


def test_translate_normalizes_and_keeps_leading_dims():
    m = TranslatorModule(6, 5)
    x = torch.randn(2, 7, 6)
    y = m.translate(x)
    assert y.shape == (2, 7, 5)
    torch.testing.assert_close(m.translate(x * 13.0), y)  # per-vector L2 normalization first
    raw = TranslatorModule(6, 5, normalize=False)
    raw.translator.load_state_dict(m.translator.state_dict())
    assert not torch.allclose(raw.translate(x * 13.0), y)


def test_losses():
    pred, target = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert TranslatorModule(2, 2, loss="cosine")._loss(pred, target).item() == pytest.approx(1.0)
    assert TranslatorModule(2, 2, loss="mse")._loss(pred, target).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="model.loss"):
        TranslatorModule(2, 2, loss="l1")


@pytest.mark.parametrize("floor", [0.0, 0.5])
@pytest.mark.parametrize("warmup", [0, 10])
def test_warmup_then_linear_decay(floor, warmup):
    m = TranslatorModule(3, 3, lr=1.0, warmup_steps=warmup, min_lr_ratio=floor)
    m._trainer = SimpleNamespace(estimated_stepping_batches=110)
    sched = m.configure_optimizers()["lr_scheduler"]["scheduler"]
    # Optimizer step k runs at factor(k) (the scheduler steps after it): steps 0..109.
    factors = [sched.lr_lambdas[0](s) for s in range(110)]
    if warmup:
        assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    # The peak is used by one step only, and the last step runs at the promised floor, halfway in between.
    assert factors.count(1.0) == 1 and factors[max(warmup - 1, 0)] == 1.0
    assert factors[-1] == pytest.approx(floor)
    peak = max(warmup - 1, 0)
    assert factors[(peak + 109) // 2] == pytest.approx(1 - (1 - floor) * ((109 - peak) // 2) / (109 - peak))


@pytest.mark.parametrize(
    "translator",
    [
        LinearTranslator,
        functools.partial(MLPTranslator, hidden_dim=8),
        {"class_path": "MLPTranslator", "init_args": {"hidden_dim": 8}},
    ],
)
def test_checkpoint_loads_with_weights_only(tmp_path, translator):
    import pytorch_lightning as pl

    m = TranslatorModule(6, 5, translator=translator, sender=S_ID, receiver=R_ID)
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, max_epochs=0, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.strategy.connect(m)
    path = tmp_path / "t.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # no classes, partials, dataclasses or paths in hparams
    assert ckpt["hyper_parameters"]["translator"] == translator_spec(translator)
    loaded = load_translator(path)
    assert type(loaded.translator) is type(m.translator) and not loaded.training
    x = torch.randn(4, 6)
    torch.testing.assert_close(loaded.translate(x), m.eval().translate(x))
    check_translator_matches(loaded, S_ID, R_ID)


def test_load_translator_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        load_translator(tmp_path / "missing.ckpt")
    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"corrupt\.ckpt"):
        load_translator(bad)


def test_check_translator_matches_lists_differences():
    m = TranslatorModule(6, 5, sender=S_ID, receiver=R_ID)
    check_translator_matches(m, dict(S_ID, revision="abc", dtype="bfloat16"), R_ID)  # None revision, dtype: ignored
    with pytest.raises(ValueError, match=r"receiver layer: translator 'gpt_neox.layers.2', model 'gpt_neox.layers.3'"):
        check_translator_matches(m, S_ID, dict(R_ID, layer="gpt_neox.layers.3", layer_index=3))
    with pytest.raises(ValueError, match=r"sender hidden size: translator 6, model 8"):
        check_translator_matches(m, dict(S_ID, hidden_size=8), R_ID)
    with pytest.raises(ValueError, match="records no model identity"):
        check_translator_matches(TranslatorModule(6, 5), S_ID, R_ID)


def test_check_translator_matches_compares_weight_digests_when_both_sides_have_one():
    m = TranslatorModule(6, 5, sender=dict(S_ID, weights_sha256="a" * 64), receiver=R_ID)
    check_translator_matches(m, dict(S_ID, weights_sha256="a" * 64), R_ID)
    check_translator_matches(m, S_ID, dict(R_ID, weights_sha256="c" * 64))  # recorded on one side only: skipped
    with pytest.raises(ValueError, match=r"sender weights_sha256: translator 'a+', model 'b+'"):
        check_translator_matches(m, dict(S_ID, weights_sha256="b" * 64), R_ID)


def test_a_functional_translator_is_checked_against_the_evaluations_slots():
    # It learnt what K slots at given positions mean: another slot spec is a mismatch (allow_mismatch can accept it).
    from activation_transfer.injection.slots import SlotSpec

    m = TranslatorModule(6, 5, sender=S_ID, receiver=R_ID)
    trained = SlotSpec("last", k=4).to_dict()
    m.hparams["training"] = {"objective": "answer_ce", "slots": trained}
    check_translator_matches(m, S_ID, R_ID, slots=SlotSpec("last", k=4).to_dict())
    check_translator_matches(m, S_ID, R_ID)  # the paper protocol has no slots to compare
    with pytest.raises(ValueError, match=r"slots: trained with .*'k': 4.*evaluated with .*'k': 8"):
        check_translator_matches(m, S_ID, R_ID, slots=SlotSpec("last", k=8).to_dict())
    aligned = TranslatorModule(6, 5, sender=S_ID, receiver=R_ID)  # no training slots: nothing to compare
    check_translator_matches(aligned, S_ID, R_ID, slots=SlotSpec("pooled").to_dict())
