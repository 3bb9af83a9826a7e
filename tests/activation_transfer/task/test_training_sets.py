"""Generated evaluation questions never include one a shipped recipe trains on."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from activation_transfer.errors import UsageError
from activation_transfer.task.generator import (
    EVAL_NUM_SAMPLES,
    EVAL_SEED,
    TRAINING_SETS,
    generate_samples,
    training_keys,
)
from datamodules.corpora import BUILTIN, CorpusSpec
from datamodules.multihop_qa import MultiHopQADataModule
from datamodules.qa_sources import generated_eval_samples
from datamodules.qa_training import QATrainingDataModule

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def _generated_training_sets() -> dict[str, tuple[int, int]]:
    """(seed, samples) of every generated training set a shipped config asks for, by config file."""
    corpus_defaults = {f.name: f.default for f in fields(CorpusSpec)}
    qa_defaults = {k: p.default for k, p in inspect.signature(QATrainingDataModule).parameters.items()}
    out = {}
    for path in sorted(CONFIGS.glob("*/*.yaml")):
        data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
        name = f"{path.parent.name}/{path.name}"
        if path.parent.name == "organisms":
            out[name] = (data["train_seed"], data["num_train_samples"])
        elif path.parent.name == "train" and "class_path" in data:
            args = {**qa_defaults, **(data.get("init_args") or {})}
            if args["train_source"] == "synthetic":
                out[name] = (args["train_seed"], args["num_train_samples"])
        elif path.parent.name == "train":
            corpus = {**corpus_defaults, **(data.get("corpus") or {})}
            if corpus["source"] == BUILTIN:
                out[name] = (corpus["builtin_seed"], corpus["builtin_samples"])
    return out


def test_every_shipped_training_set_is_in_training_sets():
    # TRAINING_SETS is what an evaluation drops; a recipe training on more (or on another seed) would go unseen.
    found = _generated_training_sets()
    assert {"organisms/receiver.yaml", "train/demo.yaml", "train/functional_demo.yaml"} <= set(found)
    covered = dict(TRAINING_SETS)
    for name, (seed, n) in found.items():
        assert seed in covered and n <= covered[seed], f"{name} trains on generator seed {seed} x {n}"


def test_the_evaluation_set_is_unchanged():
    # The first EVAL_NUM_SAMPLES of EVAL_SEED are held out of every training set: nothing to drop, same questions.
    samples, _, dropped = generated_eval_samples(EVAL_NUM_SAMPLES, EVAL_SEED)
    assert dropped == 0
    assert [s.sample_id for s in samples] == [s.sample_id for s in generate_samples(EVAL_NUM_SAMPLES, EVAL_SEED)]
    assert not {s.key for s in generate_samples(EVAL_NUM_SAMPLES, EVAL_SEED)} & training_keys()


@pytest.mark.parametrize(("seed", "n"), [(EVAL_SEED, 3000), (5, 3000)])
def test_more_or_other_generated_questions_drop_those_trained_on(seed, n):
    everything = generate_samples(n, seed)
    seen = [s.sample_id for s in everything if s.key in training_keys()]
    assert seen  # the premise: 12 (EVAL_SEED) and 15 (seed 5) of 3,000 occur in the organisms' training text
    dm = MultiHopQADataModule(num_samples=n, generator_seed=seed)
    kept = [s.sample_id for s in dm.samples]
    assert kept == [s.sample_id for s in everything if s.sample_id not in set(seen)]
    assert dm.source_info["dropped_seen_in_training"] == len(seen) and dm.source_info["n"] == n - len(seen)


@pytest.mark.parametrize("seed", [seed for seed, _ in TRAINING_SETS])
def test_a_training_seed_is_refused(seed):
    with pytest.raises(UsageError, match=f"--data.generator_seed {seed} generates the shipped recipes' training"):
        generated_eval_samples(10, seed)


def test_an_organism_is_not_evaluated_on_questions_it_trained_on(monkeypatch):
    # bench/gpu_organisms.py validates on 600 questions of seed 777: 4 of them are in the organisms' training text.
    from activation_transfer.task import organism_eval

    monkeypatch.setattr(organism_eval, "load_model", lambda *a, **k: None)
    monkeypatch.setattr(organism_eval, "load_tokenizer", lambda *a, **k: None)
    # A model that answers every prompt with the same word: only which questions are asked matters here.
    monkeypatch.setattr(organism_eval, "generate_answers", lambda model, tok, prompts, **k: ["Asia"] * len(prompts))
    everything = generate_samples(600, 777)
    seen = {s.sample_id for s in everything if s.key in training_keys()}
    assert len(seen) == 4
    result = organism_eval.evaluate_organism("unused", num_samples=600, seed=777, return_predictions=True)
    assert result["n"] == 596 and result["dropped_seen_in_training"] == 4
    assert not seen & {p["sample_id"] for p in result["predictions"]}
    held_out = organism_eval.evaluate_organism("unused", num_samples=EVAL_NUM_SAMPLES)
    assert held_out["n"] == EVAL_NUM_SAMPLES and held_out["dropped_seen_in_training"] == 0
