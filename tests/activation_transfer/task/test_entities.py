"""Entity types of the questions: candidates per context and the counterfactual substitution."""

from __future__ import annotations

import re

from activation_transfer.task.entities import ENTITY_TYPES, answer_type, candidates, counterfactual, entities_in
from activation_transfer.task.generator import generate_samples

TWO = "Bob lives in Tokyo. Tokyo is located in Japan. Ana works in Lima. Lima is part of Peru."


def test_candidates_count_the_distinct_entities_of_the_answers_type() -> None:
    assert answer_type("Japan") == "country" and answer_type("Asia") == "continent" and answer_type("48") == "count"
    assert answer_type("United Kingdom") is None  # the paper's files: outside every pool, untyped
    assert candidates(TWO, "Japan") == 2  # Japan and Peru
    assert candidates(TWO, "Tokyo") == 2  # Tokyo (twice: counted once) and Lima
    assert candidates("Bob lives in Oslo. Oslo is located in Norway.", "Norway") == 1
    # Counts are word-bounded: "45" names 45, not 5 or 4.
    assert candidates("Asia has about 45 countries.", "45") == 1
    assert candidates("X", "United Kingdom") is None
    assert entities_in(TWO, "city") == ["Tokyo", "Lima"]  # pool order


def test_generated_hops_and_candidates_agree_with_the_generator() -> None:
    for s in generate_samples(60, seed=7):
        n = candidates(s.context, s.answer)
        assert n is not None and n >= 1
        # The generator's distractor chain never reuses the main chain's entities: one more candidate at most.
        assert n <= 2
        assert s.hops == 2 + int(s.sample_id[-6:]) % 3


def test_counterfactual_replaces_every_occurrence_by_a_new_entity_of_the_type() -> None:
    context = "Bob lives in Tokyo. Tokyo is located in Japan. Japan is on the continent of Asia. Ana works in Lima."
    new_context, new = counterfactual(context, "Japan", seed=3, key="q1")
    assert new in ENTITY_TYPES["country"] and new != "Japan"
    assert new not in entities_in(context, "country")  # not otherwise in the context
    assert "Japan" not in new_context
    assert new_context == context.replace("Japan", new)  # every occurrence, nothing else
    assert len(re.findall(rf"\b{new}\b", new_context)) == 2
    # Deterministic per (seed, key); another key or seed may draw another entity.
    assert counterfactual(context, "Japan", 3, "q1") == (new_context, new)
    draws = {counterfactual(context, "Japan", seed, "q1")[1] for seed in range(20)}
    assert len(draws) > 1 and "Japan" not in draws
    # Never the gold, never an entity the context already names (over many draws).
    for seed in range(50):
        ctx, sub = counterfactual(TWO, "Japan", seed, "k")
        assert sub not in ("Japan", "Peru") and "Japan" not in ctx and "Peru" in ctx


def test_counterfactual_of_a_count_is_word_bounded_and_untyped_answers_have_none() -> None:
    context = "Asia has about 5 countries. There are about 45 countries in Europe."
    new_context, new = counterfactual(context, "5", seed=0, key="c")
    assert "45" in new_context and new not in ("5", "45")
    assert new_context == f"Asia has about {new} countries. There are about 45 countries in Europe."
    assert counterfactual(context, "United Kingdom", 0, "c") is None
    assert counterfactual("Bob lives in Oslo.", "Japan", 0, "c") is None  # the gold is not in the context


def test_counterfactual_leaves_a_longer_name_that_starts_with_the_gold() -> None:
    # The paper's v1 files (test, val, train): "Mexico City" is a city of the country "Mexico".
    context = "Carlos was born in Mexico City. Mexico City is a city in Mexico."
    new_context, new = counterfactual(context, "Mexico", seed=0, key="t")
    assert new_context == f"Carlos was born in Mexico City. Mexico City is a city in {new}."
    assert f"{new} City" not in new_context
    # Only inside the longer name: nothing to replace.
    assert counterfactual("Carlos lives in Mexico City.", "Mexico", 0, "t") is None
