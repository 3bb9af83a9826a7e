"""The split protocol's controls in KV form on tiny offline models: ``kv_functional_lexical``'s projector is trained and
applied on the sender's token embeddings, ``kv_functional_mismatched``'s is trained on swapped contexts, and the KV
evaluation refuses a projector trained otherwise than its condition reads it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from lightning_helpers import quiet_trainer
from test_injection_eval import RECEIVER, SENDER, N, run_eval

from activation_transfer.injection.sources import capture_block, left_grid
from activation_transfer.report import records as rio
from datamodules.multihop_qa import MultiHopQADataModule
from datamodules.qa_training import QATrainingDataModule
from lightning_modules.injection_eval import InjectionEvalModule
from lightning_modules.kv_translator import KVTranslatorModule, kv_batch


def train_projector(folder, seed: int, **options) -> tuple[str, dict]:
    """A KV projector for the tiny models trained two steps by Lightning with ``options`` (``sender_site`` for the
    module, ``mismatched_contexts`` for the data); its checkpoint path and training spec."""
    data_options = {k: options.pop(k) for k in ("mismatched_contexts",) if k in options}
    pl.seed_everything(seed, verbose=False)
    module = KVTranslatorModule(SENDER, RECEIVER, max_answer_tokens=4, **options)
    data = QATrainingDataModule(num_train_samples=8, num_val_samples=4, batch_size=4, **data_options)
    trainer = quiet_trainer(folder, max_steps=2)
    trainer.fit(module, datamodule=data)
    path = folder / f"kv-{seed}.ckpt"
    trainer.save_checkpoint(str(path), weights_only=True)
    return str(path), dict(module.hparams.training)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv_controls")
    return {
        "own": train_projector(folder, 1),
        "lexical": train_projector(folder, 2, sender_site="embeddings"),
        "mismatched": train_projector(folder, 3, mismatched_contexts=True),
    }


def embeddings_grid(sender, layout: dict) -> torch.Tensor:
    """The sender's token embeddings (tiny-neox: ``hidden_states[0]``) at each row's context tokens, left padded."""
    h = sender.get_input_embeddings()(layout["input_ids"])
    rows = [h[i, sl] for i, sl in enumerate(layout["context_slices"])]
    return left_grid(rows, max(len(r) for r in rows), h.shape[-1], h.dtype, h.device)


def test_the_controls_are_trained_with_their_option(trained) -> None:
    assert trained["own"][1]["sender_site"] == "block" and trained["own"][1]["contexts"] == "own"
    assert trained["lexical"][1]["sender_site"] == "embeddings" and trained["lexical"][1]["contexts"] == "own"
    assert trained["mismatched"][1]["sender_site"] == "block" and trained["mismatched"][1]["contexts"] == "mismatched"
    module = KVTranslatorModule(SENDER, RECEIVER)
    for mismatched, expected in ((True, "mismatched"), (False, "own")):
        module._trainer = SimpleNamespace(datamodule=QATrainingDataModule(mismatched_contexts=mismatched))
        module.setup("fit")
        assert module.hparams.training["contexts"] == expected
    with pytest.raises(ValueError, match="model.sender_site must be one of block, embeddings"):
        KVTranslatorModule(SENDER, RECEIVER, sender_site="logits")


@pytest.mark.parametrize("cache", [False, True])
def test_the_lexical_projector_trains_on_the_token_embeddings(cache) -> None:
    module = KVTranslatorModule(SENDER, RECEIVER, sender_site="embeddings", sender_cache_mb=1024 if cache else 0)
    samples = MultiHopQADataModule(source="synthetic", num_samples=6).load_samples()
    if cache:
        module.fill_context_cache(samples)
        assert len(module.context_cache) == len({s.context for s in samples})
    tok_s, tok_r = module.sender_lm.tokenizer, module.receiver_lm.tokenizer
    layout = kv_batch(samples, tok_s, tok_r, 224, 64, 4)["sender"]
    keys, values, _ = module.projected(layout)
    expected = module.translator(embeddings_grid(module.sender, layout))
    torch.testing.assert_close((keys, values), expected)
    block = capture_block(module.sender, module.sender_lm.layer.path, layout["input_ids"], layout["attention_mask"])
    rows = [block[i, sl] for i, sl in enumerate(layout["context_slices"])]
    at_block = module.translator(left_grid(rows, keys.shape[-2], block.shape[-1], block.dtype, block.device))
    assert not torch.allclose(keys, at_block[0])


def test_the_lexical_control_is_applied_at_the_embeddings(tmp_path, trained) -> None:
    module = run_eval(
        tmp_path,
        None,
        conditions=["receiver_alone", "kv_functional_lexical"],
        seeds=[42],
        protocol="kv",
        sender_site="embeddings",
        functional_translator_ckpt=trained["lexical"][0],
        report=False,
    )
    records = module.results[rio.run_key("kv_functional_lexical", 42)]
    assert len(records) == N and all(r["diagnostics"]["bytes_sent"] > 0 for r in records)
    assert module.run_identity["sender_site"] == "embeddings"
    protocol = module.protocol
    ids = sorted(module.samples_by_id)[:3]
    projector = next(iter(protocol.projectors.values()))
    keys, values, _ = protocol.project(projector, ids)
    from activation_transfer.injection.slots import sender_batch

    ctx, qst = zip(*(protocol.parts["sender"][sid] for sid in ids))
    layout = sender_batch(ctx, qst, protocol.sender.tokenizer.eos_token_id)
    torch.testing.assert_close((keys, values), projector.translate(embeddings_grid(protocol.sender.model, layout)))


def test_the_mismatched_control_reads_a_projector_trained_on_swapped_contexts(tmp_path, trained) -> None:
    module = run_eval(
        tmp_path,
        None,
        conditions=["kv_functional_mismatched"],
        seeds=[42],
        protocol="kv",
        functional_translator_ckpt=trained["mismatched"][0],
        report=False,
    )
    assert len(module.results[rio.run_key("kv_functional_mismatched", 42)]) == N


@pytest.mark.parametrize(
    ("site", "condition", "ckpt", "message"),
    [
        ("embeddings", "kv_functional_lexical", "own", "trained on the sender's block but the evaluation reads"),
        ("block", "kv_functional", "lexical", "trained on the sender's embeddings but the evaluation reads"),
        ("block", "kv_functional", "mismatched", "kv_functional needs a functional translator trained on own"),
        ("block", "kv_functional_mismatched", "own", "needs a functional translator trained on mismatched"),
    ],
)
def test_a_projector_trained_otherwise_than_its_condition_reads_it_is_refused(
    tmp_path, trained, site, condition, ckpt, message
) -> None:
    with pytest.raises(ValueError, match=message):
        run_eval(
            tmp_path,
            None,
            conditions=[condition],
            seeds=[42],
            protocol="kv",
            sender_site=site,
            functional_translator_ckpt=trained[ckpt][0],
        )


def test_the_lexical_condition_needs_the_embeddings_site(trained) -> None:
    for site, condition in (("block", "kv_functional_lexical"), ("embeddings", "kv_functional")):
        with pytest.raises(ValueError, match=f"cannot run with model.sender_site {site}: kv_functional_lexical needs"):
            InjectionEvalModule(
                SENDER,
                RECEIVER,
                conditions=[condition],
                protocol="kv",
                sender_site=site,
                functional_translator_ckpt=trained["own"][0],
            )
    module = InjectionEvalModule(SENDER, RECEIVER, conditions=["kv_self"], protocol="kv")
    assert "sender_site" not in module.protocol.identity()
