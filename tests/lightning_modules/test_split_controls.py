"""The split controls on tiny offline models: the lexical site in training and evaluation, the training spec they
record, and the evaluation refusing a translator trained otherwise than its condition reads it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning_helpers import save_weights
from test_injection_eval import RECEIVER, SENDER, make_ckpt, run_eval

from activation_transfer.injection.sources import capture_block
from activation_transfer.task.entities import candidates
from datamodules.multihop_qa import MultiHopQADataModule
from datamodules.qa_sources import generated_samples
from datamodules.qa_training import QATrainingDataModule
from lightning_modules.functional_translator import FunctionalTranslatorModule
from lightning_modules.injection_eval import InjectionEvalModule


def control_ckpt(path, sender_site: str = "block", contexts: str = "own", seed: int = 0) -> str:
    """An (untrained) functional checkpoint for the tiny models, trained "at" ``sender_site`` on ``contexts``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = FunctionalTranslatorModule(SENDER, RECEIVER, sender_site=sender_site)
    module.hparams.training["contexts"] = contexts
    return save_weights(module, path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controls")
    return {
        "aligned": make_ckpt(folder / "aligned.ckpt"),
        "own": control_ckpt(folder / "own.ckpt", seed=1),
        "lexical": control_ckpt(folder / "lexical.ckpt", sender_site="embeddings", seed=2),
        "mismatched": control_ckpt(folder / "mismatched.ckpt", contexts="mismatched", seed=3),
    }


def test_the_lexical_functional_translator_trains_on_the_token_embeddings() -> None:
    module = FunctionalTranslatorModule(SENDER, RECEIVER, sender_site="embeddings")
    assert module.hparams.training["sender_site"] == "embeddings" and module.hparams.training["contexts"] == "own"
    samples, _ = generated_samples(3, seed=5)
    from activation_transfer.translators.functional_loss import build_batch

    batch = build_batch(samples, module.sender_lm.tokenizer, module.receiver_lm.tokenizer, module.slot_spec, 64, 16)
    got = module.slot_vectors(batch)
    s = batch["sender"]
    embeddings = module.sender.get_input_embeddings()(s["input_ids"])  # tiny-neox: hidden_states[0]
    block = capture_block(module.sender, module.sender_lm.layer.path, s["input_ids"], s["attention_mask"])
    for i, sl in enumerate(s["context_slices"]):
        torch.testing.assert_close(got[i], module.slot_spec.pick(module.translate(embeddings[i, sl])))
        assert not torch.allclose(got[i], module.slot_spec.pick(module.translate(block[i, sl])))
    with pytest.raises(ValueError, match="model.sender_site must be one of block, embeddings"):
        FunctionalTranslatorModule(SENDER, RECEIVER, sender_site="logits")


def test_the_training_spec_records_mismatched_contexts_from_the_data_module() -> None:
    module = FunctionalTranslatorModule(SENDER, RECEIVER)
    for mismatched, expected in ((True, "mismatched"), (False, "own")):
        module._trainer = SimpleNamespace(datamodule=QATrainingDataModule(mismatched_contexts=mismatched))
        module.setup("fit")
        assert module.hparams.training["contexts"] == expected


def test_the_lexical_control_runs_at_the_embeddings_and_records_carry_candidates(tmp_path, ckpts) -> None:
    module = run_eval(
        tmp_path,
        None,
        conditions=["receiver_alone", "slots_functional_lexical"],
        protocol="split",
        sender_site="embeddings",
        functional_translator_ckpt=ckpts["lexical"],
    )
    samples = {s.sample_id: s for s in MultiHopQADataModule(num_samples=8).samples}
    records = module.results["slots_functional_lexical__seed42"]
    assert len(records) == 8
    for r in records:
        assert r["diagnostics"]["candidates"] == candidates(samples[r["sample_id"]].context, r["gold"])
        assert "gold_original" not in r["diagnostics"]
    assert module.run_identity["sender_site"] == "embeddings"


def test_counterfactual_records_carry_the_substituted_gold_and_the_original(tmp_path, ckpts) -> None:
    dm = MultiHopQADataModule(num_samples=8, counterfactual=True, batch_size=8)
    module = run_eval(tmp_path, None, conditions=["skyline"], protocol="split", dm=dm)
    by_id = {s.sample_id: s for s in dm.samples}
    records = module.results["skyline__deterministic"]
    assert len(records) == 8
    for r in records:
        s = by_id[r["sample_id"]]
        assert r["gold"] == s.answer != s.gold_original == r["diagnostics"]["gold_original"]


@pytest.mark.parametrize(
    ("site", "condition", "ckpt", "message"),
    [
        ("embeddings", "slots_functional_lexical", "own", "trained on the sender's block but the evaluation reads"),
        ("block", "slots_functional", "lexical", "trained on the sender's embeddings but the evaluation reads"),
        ("block", "slots_functional", "mismatched", "slots_functional needs a functional translator trained on own"),
        ("block", "slots_functional_mismatched", "own", "needs a functional translator trained on mismatched"),
    ],
)
def test_a_translator_trained_otherwise_than_its_condition_reads_it_is_refused(
    tmp_path, ckpts, site, condition, ckpt, message
) -> None:
    with pytest.raises(ValueError, match=message):
        run_eval(
            tmp_path,
            None,
            conditions=[condition],
            protocol="split",
            sender_site=site,
            functional_translator_ckpt=ckpts[ckpt],
        )


def test_site_and_conditions_are_checked_when_the_module_is_built(ckpts) -> None:
    for site, condition in (("block", "slots_functional_lexical"), ("embeddings", "slots_functional")):
        with pytest.raises(ValueError, match=f"cannot run with model.sender_site {site}"):
            InjectionEvalModule(
                SENDER,
                RECEIVER,
                conditions=[condition],
                protocol="split",
                sender_site=site,
                functional_translator_ckpt=ckpts["own"],
            )
    with pytest.raises(ValueError, match="model.sender_site embeddings is not an option of the paper protocol"):
        InjectionEvalModule(SENDER, RECEIVER, conditions=["no_inject"], sender_site="embeddings")
    # The default (block) leaves the split run's identity as it was.
    module = InjectionEvalModule(SENDER, RECEIVER, conditions=["receiver_alone"], protocol="split")
    assert "sender_site" not in module.protocol.identity()
