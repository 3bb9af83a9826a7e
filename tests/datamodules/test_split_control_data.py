"""The data options of the split controls: mismatched training contexts and counterfactual evaluation contexts."""

from __future__ import annotations

import re

import pytest

from activation_transfer.task.entities import ENTITY_TYPES, answer_type, entities_in
from datamodules.multihop_qa import MultiHopQADataModule
from datamodules.qa_training import QATrainingDataModule, context_derangement


def _dm(**kw) -> QATrainingDataModule:
    dm = QATrainingDataModule(num_train_samples=60, num_val_samples=12, **kw)
    dm.setup("fit")
    return dm


def test_mismatched_training_never_pairs_a_sample_with_its_own_context_and_is_seeded() -> None:
    own, mis = _dm(), _dm(mismatched_contexts=True, mismatch_seed=5)
    for a, b in ((own.train_set.samples, mis.train_set.samples), (own.val_set.samples, mis.val_set.samples)):
        assert [(s.sample_id, s.question, s.answer) for s in a] == [(s.sample_id, s.question, s.answer) for s in b]
        assert all(x.context != y.context for x, y in zip(a, b))  # nobody keeps its own context
        assert sorted(x.context for x in a) == sorted(y.context for y in b)  # contexts only move between samples
    again = _dm(mismatched_contexts=True, mismatch_seed=5).train_set.samples
    other = _dm(mismatched_contexts=True, mismatch_seed=6).train_set.samples
    assert [s.context for s in again] == [s.context for s in mis.train_set.samples]
    assert [s.context for s in other] != [s.context for s in again]


def test_the_derangement_also_avoids_an_equal_context_of_another_sample() -> None:
    contexts = ["a", "a", "b", "c", "d", "a"]  # three samples share one context
    for seed in range(30):
        perm = context_derangement(contexts, seed)
        assert sorted(perm) == list(range(len(contexts)))
        assert all(contexts[p] != contexts[i] for i, p in enumerate(perm))
    with pytest.raises(ValueError, match="same context"):
        context_derangement(["a", "a"], 0)
    with pytest.raises(ValueError, match="at least 2"):
        context_derangement(["a"], 0)


def test_counterfactual_evaluation_data_swap_the_gold_everywhere_and_keep_it_as_gold_original() -> None:
    plain = MultiHopQADataModule(num_samples=40).samples
    dm = MultiHopQADataModule(num_samples=40, counterfactual=True, counterfactual_seed=1)
    cf = dm.samples
    assert len(cf) == len(plain) and dm.source_info["counterfactual"] == {"seed": 1, "dropped_untyped": 0}
    for p, c in zip(plain, cf):
        kind = answer_type(p.answer)
        assert c.gold_original == p.answer and c.answer != p.answer and c.answer in ENTITY_TYPES[kind]
        assert c.answer not in entities_in(p.context, kind)  # a new entity, not one the context named
        assert p.answer not in entities_in(c.context, kind) and c.context == re.sub(
            rf"(?<!\w){p.answer}(?!\w)", c.answer, p.context
        )
        assert c.question == p.question and c.sample_id == p.sample_id
        assert "gold_original" in c.to_dict() and "gold_original" not in p.to_dict()
    assert [
        s.context for s in MultiHopQADataModule(num_samples=40, counterfactual=True, counterfactual_seed=1).samples
    ] == [s.context for s in cf]
