"""The resume checks' option lists: every option of a trainer is either decisive (compared on resume) or named here
as one that only changes where or how the same computation runs; a new option must be sorted into one of the two."""

from __future__ import annotations

import inspect

import pytest

from activation_transfer.resume_checks import resume_differences
from datamodules.activation_pairs import ActivationPairDataModule
from datamodules.organism_text import OrganismTextDataModule
from datamodules.qa_training import QATrainingDataModule
from lightning_modules.causal_lm import CausalLMModule

# Options left out of the comparison, and why: folders, workers and extraction batching change where and how, not
# what; the activation store's models are compared through the translator's identities (model.sender/receiver);
# compile runs the same computation fused.
NOT_DECISIVE = {
    QATrainingDataModule: {"data_dir", "cache_dir", "num_workers"},
    OrganismTextDataModule: {"cache_dir", "num_workers"},
    ActivationPairDataModule: {
        *("sender_model", "receiver_model", "store_dir", "cache_dir", "extract_batch_size", "shard_rows"),
        *("extract_device", "rebuild", "verify", "num_workers"),
    },
    CausalLMModule: {"compile"},
}


@pytest.mark.parametrize("cls", list(NOT_DECISIVE), ids=lambda c: c.__name__)
def test_every_option_is_compared_on_resume_or_named_as_not_decisive(cls):
    options = set(inspect.signature(cls.__init__).parameters) - {"self"}
    keys = set(cls.RESUME_KEYS)
    assert len(keys) == len(cls.RESUME_KEYS), "a key listed twice"
    assert keys <= options, f"RESUME_KEYS names no option: {sorted(keys - options)}"  # a typo is never compared
    assert options - keys == NOT_DECISIVE[cls]


def test_differences_name_the_option_and_skip_keys_one_side_lacks():
    saved = {"lr": 0.1, "betas": (0.9, 0.99), "old": 1, "seed": 3}
    given = {"lr": 0.2, "betas": [0.9, 0.99], "seed": 3, "new": 2}
    # Tuples saved and lists given (YAML) are the same value; keys absent on one side (older checkpoints) are skipped.
    diff = resume_differences(saved, given, ("lr", "betas", "old", "new", "seed"), prefix="model.")
    assert diff == ["model.lr: saved 0.1 vs given 0.2"]
