"""KV projector training through the frozen receiver: only the projector gets gradients, the answer CE falls, the
student reads exactly what the KV evaluation builds, the export projects identically, and train.py trains it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lightning_helpers import save_weights

from activation_transfer.errors import UsageError
from activation_transfer.injection.kv_prefix import assemble, generate_after_prefix
from activation_transfer.injection.slots import left_padded
from activation_transfer.models.frozen_lm import ModelRef
from activation_transfer.models.generation import GenerationSettings
from activation_transfer.translators.export import export_from_checkpoint, from_pretrained
from activation_transfer.translators.loading import load_translator, load_translator_for
from cli.lightning_cli import TrainCLI, train_main
from datamodules.multihop_qa import MultiHopQADataModule
from lightning_modules.kv_translator import KVTranslatorModule, kv_batch

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "train" / "kv_functional_demo.yaml")
SENDER = ModelRef("tiny-neox", layer=0.67)  # the evaluation tests' models (test_injection_eval.py)
RECEIVER = ModelRef("tiny-neox-large", layer=0.67)


def make_kv_ckpt(path, seed: int = 0, **kwargs) -> str:
    """An (untrained) KVTranslatorModule checkpoint for the tiny evaluation models."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = KVTranslatorModule(SENDER, RECEIVER, **kwargs)
    return save_weights(module, path)


@pytest.fixture(scope="module")
def samples():
    return MultiHopQADataModule(source="synthetic", num_samples=8).load_samples()


def test_gradients_reach_only_the_projector(samples):
    module = KVTranslatorModule(SENDER, RECEIVER, gate=True, objective="distill")
    out = module.losses(samples)
    out["loss"].backward()
    assert {n for n, p in module.named_parameters() if p.grad is not None} == {
        "translator.proj.weight",
        "translator.proj.bias",
        "translator.gate",
    }
    assert all(p.grad.abs().sum() > 0 for p in module.translator.parameters())
    frozen = [*module.sender.parameters(), *module.receiver.parameters()]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    assert set(out) == {"ce", "token_acc", "exact", "kl", "loss"} and torch.equal(out["loss"], out["kl"])


def test_answer_ce_falls_when_only_the_sender_reads_the_context(samples):
    # The receiver reads only the question: the answer (an entity of the context) reaches it through the prefix.
    torch.manual_seed(0)
    module = KVTranslatorModule(SENDER, RECEIVER, max_answer_tokens=4)
    opt = torch.optim.Adam(module.translator.parameters(), lr=1e-2)
    ces = []
    for _ in range(30):
        out = module.losses(samples)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        ces.append(float(out["ce"].detach()))
    assert ces[-1] < ces[0] - 0.3, ces


def test_the_student_reads_what_the_kv_evaluation_builds(samples):
    # Teacher-forced logits of the student = the logits greedy decoding sees after the same prefix.
    module = KVTranslatorModule(SENDER, RECEIVER, layers=[0, -1], max_answer_tokens=4)
    tok = module.receiver_lm.tokenizer
    batch = kv_batch(samples, module.sender_lm.tokenizer, tok, 224, 64, 4)
    student = batch["student"]
    teacher = batch["teacher"]
    for i, sl in enumerate(teacher["context_slices"]):  # the student is the teacher's row without its context
        real = student["input_ids"][i][student["attention_mask"][i].bool()].tolist()
        assert real == teacher["input_ids"][i, sl.stop :].tolist()
    with torch.no_grad():
        keys, values, mask = module.projected(batch["sender"])
        logits, targets = module.prefixed_logits(student, keys, values, mask)
        prefix = assemble(module.receiver, module.layers, keys, values, mask, rotate=True)
    assert mask.sum(1).tolist() == [sl.stop - sl.start for sl in batch["sender"]["context_slices"]]
    assert all(not prefix.keys[i].any() for i in (1, 2)) and prefix.keys[3].any()
    # The first answer token: greedy decoding of the question after the prefix picks the logits' argmax.
    lengths = student["labels"].ne(-100).sum(1).tolist()
    firsts = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))])
    qst = [r[: len(r) - n] for r, n in zip(_rows(student), lengths)]
    ids, qmask = left_padded(qst, tok.eos_token_id)
    settings = GenerationSettings(max_new_tokens=1, repetition_penalty=1.0, no_repeat_ngram_size=0)
    greedy = generate_after_prefix(module.receiver, tok, prefix, ids, qmask, settings)[:, 0]
    assert torch.equal(greedy, logits[firsts].argmax(-1))
    assert targets.shape[0] == sum(lengths)


def _rows(layout):
    return [r[m.bool()].tolist() for r, m in zip(layout["input_ids"], layout["attention_mask"])]


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="kv layers must be distinct"):
        KVTranslatorModule(SENDER, RECEIVER, layers=[9])
    # The options the KV and functional modules share are checked by one function, as bad input (UsageError).
    for option, message in (
        ({"max_context_tokens": 0}, "model.max_context_tokens must be >= 1"),
        ({"objective": "mse"}, "model.objective must be one of"),
        ({"distill_temperature": 0.0}, "model.distill_temperature must be > 0"),
        ({"distill_on": "silver"}, "model.distill_on must be one of gold, teacher_greedy"),
        ({"sender_cache_mb": -1.0}, "model.sender_cache_mb must be >= 0"),
    ):
        with pytest.raises(UsageError, match=message):
            KVTranslatorModule(SENDER, RECEIVER, **option)


def test_checkpoint_and_export_load_as_a_kv_translator(tmp_path):
    ckpt = make_kv_ckpt(tmp_path / "kv.ckpt", layers=[1, 3], gate=True)
    folder = export_from_checkpoint(ckpt, tmp_path / "kv")
    x = torch.randn(2, 5, 32)
    loaded = [load_translator(ckpt), load_translator(folder), from_pretrained(folder)]
    expected = loaded[0].translate(x)
    for t in loaded:
        assert t.kind == "kv" and t.training_spec["slots"] == {"layers": [1, 3]}
        assert t.translator.layers == [1, 3] and all(torch.equal(a, b) for a, b in zip(t.translate(x), expected))
    ids = load_translator(ckpt).hparams
    assert ids["sender_dim"] == 32 and ids["receiver_dim"] == 48 and ids["loss"] == "kv:answer_ce"
    sender, receiver = ids["sender"], ids["receiver"]
    assert load_translator_for(folder, sender, receiver, slots={"layers": [1, 3]}, kind="kv").kind == "kv"
    with pytest.raises(ValueError, match=r"slots: trained with \{'layers': \[1, 3\]\}, evaluated with"):
        load_translator_for(folder, sender, receiver, slots={"layers": None}, kind="kv")
    with pytest.raises(ValueError, match="trained as kv, but --model.functional_translator_ckpt takes functional"):
        load_translator_for(folder, sender, receiver, kind="functional")


@pytest.fixture
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])


# The resumed run writes into the first run's checkpoint folder on purpose; Lightning says so.
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_train_cli_fits_the_kv_config_and_exports_it(tmp_path, _plain_argv):
    args = ["fit", "-c", DEMO, "--trainer.default_root_dir", str(tmp_path / "runs")]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.limit_train_batches", "2"]
    args += ["--trainer.log_every_n_steps", "1", "--model.init_args.sender_model.name", "tiny-neox"]
    args += ["--model.init_args.receiver_model.name", "tiny-neox-large", "--model.init_args.layers", "[0, 2]"]
    args += ["--data.init_args.num_train_samples", "16", "--data.init_args.num_val_samples", "8"]
    args += ["--data.init_args.batch_size", "8", "--trainer.max_epochs", "1"]
    cli = train_main(args)
    assert isinstance(cli, TrainCLI) and isinstance(cli.model, KVTranslatorModule)
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    ckpt = torch.load(best, weights_only=True)
    assert set(ckpt["state_dict"]) == {"translator.proj.weight", "translator.proj.bias"}
    exported = from_pretrained(best.with_suffix(""))
    assert exported.kind == "kv" and exported.translator.layers == [0, 2]
    x = torch.randn(1, 3, 32)
    cli.model.cpu().eval()
    assert all(torch.equal(a, b) for a, b in zip(exported.translate(x), cli.model.translator(x)))
    # `fit --ckpt_path` resumes through the functional trainer's path (the checkpoint holds no LM weights).
    again = train_main([*args[:-2], "--trainer.max_epochs", "2", "--ckpt_path", str(best)])
    assert again.trainer.current_epoch == 2 and again.trainer.global_step == 4
