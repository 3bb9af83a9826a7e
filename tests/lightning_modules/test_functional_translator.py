"""Functional translator training: only the translator learns, the loss falls, the export translates identically,
bad options fail clearly, and train.py trains it when the config's model.class_path names it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from lightning_helpers import quiet_trainer

from activation_transfer.injection.protocols.split import SplitProtocol
from activation_transfer.injection.sources import position_ids
from activation_transfer.models.generation import GenerationSettings
from activation_transfer.task.generator import EVAL_SEED
from activation_transfer.translators.export import from_pretrained
from activation_transfer.translators.functional_loss import answer_logits, build_batch
from activation_transfer.translators.loading import load_translator
from cli.lightning_cli import TrainCLI, train_main
from datamodules.qa_training import QATrainingDataModule
from lightning_modules.functional_translator import FunctionalTranslatorModule

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "train" / "functional_demo.yaml")
SENDER = {"name": "tiny-neox", "layer": 1}
RECEIVER = {"name": "tiny-neox-large", "layer": 2}


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    return quiet_trainer(tmp_path, **{"num_sanity_val_steps": 0, **kwargs})


def test_only_the_translator_learns(tmp_path):
    module = FunctionalTranslatorModule(SENDER, RECEIVER, objective="distill", mse_weight=0.1, lr=1e-2, warmup_steps=0)
    lms = {"sender": module.sender, "receiver": module.receiver}
    frozen = {(m, k): v.clone() for m, lm in lms.items() for k, v in lm.state_dict().items()}
    before = {k: v.clone() for k, v in module.translator.state_dict().items()}
    data = QATrainingDataModule(num_train_samples=24, num_val_samples=8, batch_size=8)
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.translator.parameters()}
    assert all(not p.requires_grad for lm in lms.values() for p in lm.parameters())
    assert not module.sender.training and not module.receiver.training
    after = {m: lm.state_dict() for m, lm in lms.items()}
    assert frozen and all(torch.equal(v, after[m][k]) for (m, k), v in frozen.items())
    assert any(not torch.equal(v, module.translator.state_dict()[k]) for k, v in before.items())


def test_answer_logits_only_on_the_last_columns_match_the_full_head():
    module = FunctionalTranslatorModule(SENDER, RECEIVER)
    data = QATrainingDataModule(num_train_samples=8, num_val_samples=4, batch_size=4)
    data.setup()
    samples = list(data.val_set.samples)
    batch = build_batch(samples, module.sender_lm.tokenizer, module.receiver_lm.tokenizer, module.slot_spec, 64, 16)
    teacher = batch["teacher"]
    mask = teacher["attention_mask"]
    with torch.no_grad():
        full = module.receiver(
            input_ids=teacher["input_ids"], attention_mask=mask, position_ids=position_ids(mask), use_cache=False
        ).logits
        expected, expected_targets = answer_logits(full, teacher["labels"])
        got, targets = module.answer_logits(teacher)
    # Every answer token + EOS of every row, in row order.
    assert len(targets) == int(teacher["labels"].ne(-100).sum()) > len(samples)
    assert torch.equal(targets, expected_targets)
    assert torch.allclose(got, expected, atol=1e-5)


def test_distill_on_the_teachers_greedy_answer_lines_up_with_its_own_argmax():
    module = FunctionalTranslatorModule(SENDER, RECEIVER, objective="distill", distill_on="teacher_greedy")
    with torch.no_grad():  # a larger head than the random 0.02 one: no near-ties between greedy steps
        module.receiver.get_output_embeddings().weight.mul_(50.0)
    data = QATrainingDataModule(num_train_samples=8, num_val_samples=4, batch_size=4)
    data.setup()
    samples = list(data.val_set.samples)
    answers = module.teacher_answers(samples)
    eos = module.receiver_lm.tokenizer.eos_token_id
    assert all(a[-1] == eos and eos not in a[:-1] for a in answers)
    batch = build_batch(
        samples, module.sender_lm.tokenizer, module.receiver_lm.tokenizer, module.slot_spec, 64, 16, answer_ids=answers
    )
    with torch.no_grad():
        logits, targets = module.answer_logits(batch["teacher"])
        out = module.losses(samples)
    # Teacher forcing on its own greedy answer reproduces every greedy step at the paired positions (an EOS may be
    # appended to an answer cut at max_answer_tokens: that one is no greedy step).
    steps = targets != eos
    assert steps.sum() > len(samples) and torch.equal(logits.argmax(dim=-1)[steps], targets[steps])
    assert torch.isfinite(out["loss"]) and float(out["kl"]) >= 0.0 and torch.equal(out["loss"], out["kl"])


def test_training_slots_are_the_split_evaluations_slots():
    # pooled + normalize: translating then pooling differs from pooling then translating, so the order is checked.
    module = FunctionalTranslatorModule(SENDER, RECEIVER, slots={"scheme": "pooled", "k": 2})
    data = QATrainingDataModule(num_train_samples=8, num_val_samples=5, batch_size=4)
    data.setup()
    samples = list(data.val_set.samples)
    batch = build_batch(samples, module.sender_lm.tokenizer, module.receiver_lm.tokenizer, module.slot_spec, 64, 16)
    with torch.no_grad():
        trained = module.slot_vectors(batch)
        split = SplitProtocol(module.slot_spec)
        split.start(module.sender_lm, module.receiver_lm, GenerationSettings(), samples)
        evaluated = split.translate(module, batch_size=2)  # other batches: other padding, same vectors
    for sample, vectors in zip(samples, trained, strict=True):
        assert vectors.shape == (2, 48)
        assert torch.allclose(vectors, evaluated[sample.sample_id], atol=1e-5)


def _val_ce(module: FunctionalTranslatorModule, samples) -> float:
    module.eval()
    with torch.no_grad():
        ce = float(module.losses(samples)["ce"])
    module.train()
    return ce


def test_answer_loss_falls_when_only_the_sender_reads_the_context(tmp_path):
    torch.manual_seed(0)
    module = FunctionalTranslatorModule(SENDER, {**RECEIVER, "layer": 0}, lr=2e-2, warmup_steps=5)
    # A random 0.02-scale LM head keeps every logit near 0 whatever the states (CE pinned at ln V): scaled up, the
    # frozen receiver can express answers, and only the slots (written at block 0, read by blocks 1-3) can move it.
    with torch.no_grad():
        module.receiver.get_output_embeddings().weight.mul_(50.0)
    data = QATrainingDataModule(num_train_samples=320, num_val_samples=32, batch_size=16)
    data.setup()
    held_out = list(data.val_set.samples)
    initial = _val_ce(module, held_out)
    _trainer(tmp_path, max_steps=40, limit_val_batches=0).fit(module, datamodule=data)
    final = _val_ce(module, held_out)
    assert final < 0.8 * initial, (initial, final)


# The resumed run writes into the first run's checkpoint folder on purpose; Lightning says so.
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_cli_fit_exports_a_translator_that_translates_like_the_module(tmp_path):
    args = [
        "fit",
        "-c",
        DEMO,
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--model.init_args.sender_model.name",
        "tiny-neox",
        "--model.init_args.receiver_model.name",
        "tiny-neox-large",
        "--data.init_args.num_train_samples",
        "32",
        "--data.init_args.num_val_samples",
        "8",
        "--data.init_args.batch_size",
        "8",
        "--trainer.max_epochs",
        "1",
    ]
    cli = train_main(args)
    module = cli.model
    assert isinstance(cli, TrainCLI) and isinstance(module, FunctionalTranslatorModule)  # picked by model.class_path
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    ckpt = torch.load(best, weights_only=True)
    assert set(ckpt["state_dict"]) == {f"translator.{k}" for k in module.translator.state_dict()}
    assert ckpt["hyper_parameters"]["training"]["objective"] == "answer_ce"
    assert ckpt["hyper_parameters"]["receiver"]["layer"] == "gpt_neox.layers.0"  # the config's receiver block
    folder = best.with_suffix("")
    x = torch.randn(5, 32)
    module.cpu().eval()
    expected = module.translate(x)
    for loaded in (from_pretrained(folder), load_translator(folder), load_translator(best)):
        assert torch.equal(loaded.translate(x), expected)
        assert loaded.hparams["receiver_dim"] == 48 and loaded.hparams["loss"] == "functional:answer_ce"
    assert from_pretrained(folder).config["training"]["slots"]["scheme"] == "all"
    # Loading restores the translator into a module whose frozen LMs come from the given models (overrides allowed:
    # only a resumed fit refuses other decisive options).
    resumed = FunctionalTranslatorModule.load_from_checkpoint(
        str(best), sender_model=SENDER, receiver_model=RECEIVER, weights_only=True
    )
    assert torch.equal(resumed.translate(x), expected)
    # `fit --ckpt_path last` resumes through the functional CLI (the checkpoint holds no LM weights).
    again = train_main([*args[:-2], "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert again.trainer.current_epoch == 2 and again.trainer.global_step == 4


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match=f"data.train_seed={EVAL_SEED} is EVAL_SEED"):
        QATrainingDataModule(train_seed=EVAL_SEED)
    with pytest.raises(ValueError, match="data.val_source='clean_eval' is one of the paper's evaluation files"):
        QATrainingDataModule(val_source="clean_eval")
    with pytest.raises(ValueError, match="train_seed and data.val_seed must differ"):
        QATrainingDataModule(train_seed=3, val_seed=3)
    with pytest.raises(ValueError, match="model.objective must be one of answer_ce, distill, got 'mse'"):
        FunctionalTranslatorModule(SENDER, RECEIVER, objective="mse")
    with pytest.raises(ValueError, match="model.distill_on must be one of gold, teacher_greedy, got 'labels'"):
        FunctionalTranslatorModule(SENDER, RECEIVER, objective="distill", distill_on="labels")
    with pytest.raises(ValueError, match="model.mse_weight must be >= 0"):
        FunctionalTranslatorModule(SENDER, RECEIVER, mse_weight=-1.0)


def test_training_contexts_cut_at_max_context_tokens_are_warned_once_with_the_count(monkeypatch):
    # Issue 20 item 11: evaluation warned about contexts cut at slots.max_context_tokens, training cut them silently.
    from types import SimpleNamespace

    import lightning_modules.functional_translator as ft
    from datamodules.multihop_qa import QADataset

    dm = QATrainingDataModule(num_train_samples=12, num_val_samples=4)
    dm.setup("fit")
    warnings = []
    monkeypatch.setattr(ft.log, "warning", lambda msg, *args: warnings.append(msg % args))
    for max_context, expected in ((8, len(dm.train_set)), (500, None)):
        module = FunctionalTranslatorModule(SENDER, RECEIVER, slots={"max_context_tokens": max_context})
        module._trainer = SimpleNamespace(
            datamodule=SimpleNamespace(train_set=QADataset(dm.train_set.samples)), is_global_zero=True
        )
        warnings.clear()
        module.on_fit_start()
        if expected is None:
            assert warnings == []
        else:
            (line,) = warnings
            assert (
                f"{expected} of {len(dm.train_set)} training context parts are cut at model.slots.max_context_tokens=8"
                in line
            )
