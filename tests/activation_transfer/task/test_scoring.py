"""Answer scorers (PAPER.md 1.4) and their torchmetrics wrappers."""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, given
from hypothesis import strategies as hs

from activation_transfer.task import scoring
from activation_transfer.task.scoring import (
    ANSWER_PREFIXES,
    MAIN_METRIC,
    METRICS,
    exact_match,
    first_answer_span,
    first_answer_span_match,
    legacy_contains,
    normalize_answer,
    normalized_exact_match,
    score,
    word_boundary_contains,
)

# ASCII only: the metrics lowercase with str.lower and strip ASCII punctuation, and some non-ASCII letters do not
# survive a case round trip ("ß".upper() == "SS"), which is a property of Unicode, not of the scorers.
LETTERS = string.ascii_letters + string.digits
words = hs.text(alphabet=LETTERS, min_size=1, max_size=8)
phrases = hs.lists(words, min_size=1, max_size=3).map(" ".join)
texts = hs.lists(words, min_size=0, max_size=8).map(" ".join)


def test_public_names() -> None:
    assert METRICS == (
        "exact_match",
        "normalized_exact_match",
        "word_boundary_contains",
        "first_answer_span_match",
        "legacy_contains",
    )
    assert MAIN_METRIC == "word_boundary_contains"
    result = score("Paris", "Paris")
    assert list(result) == list(METRICS)
    assert all(v is True for v in result.values())


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        # exact: strip + lowercase only, punctuation counts
        (" Paris \n", "paris", dict(exact_match=True, normalized_exact_match=True)),
        ("Paris.", "Paris", dict(exact_match=False, normalized_exact_match=True)),
        ("Paris   France", "paris france", dict(exact_match=False, normalized_exact_match=True)),
        # word boundary vs legacy: the audit's "Japanese" counted as "Japan"
        ("Japanese people", "Japan", dict(word_boundary_contains=False, legacy_contains=True)),
        ("They live in Japan, mostly.", "Japan", dict(word_boundary_contains=True, legacy_contains=True)),
        ('called "Asia". This', "Asia", dict(word_boundary_contains=True, exact_match=False)),
        ("the United  Kingdom is", "United Kingdom", dict(word_boundary_contains=True, legacy_contains=False)),
        # punctuation is deleted, not spaced: "Japan's" normalizes to "japans" (the paper's definition)
        ("Japan's capital", "Japan", dict(word_boundary_contains=False, legacy_contains=True)),
        ("U.S.A. and more", "USA", dict(word_boundary_contains=True, legacy_contains=False)),
    ],
)
def test_metric_examples(prediction: str, gold: str, expected: dict) -> None:
    result = score(prediction, gold)
    for name, value in expected.items():
        assert result[name] is value, (name, prediction, gold)


def test_normalize_answer() -> None:
    assert normalize_answer("  The  U.S.A.!\n\tis   BIG ") == "the usa is big"
    assert normalize_answer("") == ""


@pytest.mark.parametrize("gold", ["", "   ", "?!", "..."])
def test_empty_gold_is_invalid(gold: str) -> None:
    for fn in (exact_match, normalized_exact_match, word_boundary_contains, first_answer_span_match, legacy_contains):
        with pytest.raises(ValueError, match="empty"):
            fn("anything at all", gold)


def test_non_string_input_raises() -> None:
    with pytest.raises(TypeError, match="must be str"):
        score(None, "Paris")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prediction", "span"),
    [
        ("The answer is Paris. It is big.", "paris"),
        ("\n  A: Paris\nLondon", "paris"),
        ("A: the answer is: Paris!", "paris"),
        ("It's Paris? Yes", "paris"),
        ("it isn't Paris", "it isn't paris"),  # "it is" must end at a word boundary
        ("Answer: U.S.A. is large", "u.s.a"),  # "U.S.A." ends the sentence only at the final dot
        ("", ""),
    ],
)
def test_first_answer_span(prediction: str, span: str) -> None:
    assert first_answer_span(prediction) == span


def test_first_answer_span_uses_first_line_and_sentence_only() -> None:
    assert not first_answer_span_match("Europe\nParis", "Paris")
    assert not first_answer_span_match("Europe. Paris", "Paris")
    assert first_answer_span_match("Paris. Europe", "Paris")


def _perturb(text: str, data, punct: bool = True) -> str:
    """Random case flips and ASCII punctuation inserted at random positions."""
    chars = []
    for ch in text:
        if punct and data.draw(hs.booleans()):
            chars.append(data.draw(hs.sampled_from(string.punctuation)))
        chars.append(ch.upper() if data.draw(hs.booleans()) else ch.lower())
    return "".join(chars)


@given(pred=texts, gold=phrases, data=hs.data())
def test_punctuation_and_case_never_change_normalized_matches(pred: str, gold: str, data) -> None:
    # Half the time the gold is planted in the prediction so that both outcomes are exercised.
    if data.draw(hs.booleans()):
        pred = f"{pred} {gold} {data.draw(texts)}"
    before = score(pred, gold)
    pred2, gold2 = _perturb(pred, data), _perturb(gold, data)
    assume(normalize_answer(gold2))
    after = score(pred2, gold2)
    for name in ("normalized_exact_match", "word_boundary_contains"):
        assert after[name] == before[name], (name, pred2, gold2)


def test_underscore_is_punctuation_not_a_word_character() -> None:
    # The paper normalizes (removing string.punctuation, "_" included) before the (?<!\w)gold(?!\w) regex.
    assert word_boundary_contains("aaa_", "aaa") and not word_boundary_contains("aaab", "aaa")


@given(
    gold=hs.text(alphabet=string.ascii_lowercase, min_size=3, max_size=8),
    # Word characters that survive normalization: "_" is \w for the regex but string.punctuation, so the
    # paper's normalization deletes it first ("aaa_" really is the word "aaa").
    left=hs.text(alphabet=LETTERS, max_size=4),
    right=hs.text(alphabet=LETTERS, max_size=4),
    filler=hs.lists(hs.text(alphabet=string.ascii_lowercase, min_size=1, max_size=2), max_size=4),
)
def test_gold_inside_a_longer_word_is_not_a_word_boundary_match(gold, left, right, filler) -> None:
    assume(left or right)
    pred = " ".join([*filler, f"{left}{gold}{right}", *filler])  # fillers are shorter than the gold
    assert legacy_contains(pred, gold)
    assert not word_boundary_contains(pred, gold)
    # The same gold as a standalone word does match.
    assert word_boundary_contains(" ".join([*filler, gold, *filler]), gold)


@given(
    prefixes=hs.lists(hs.sampled_from(ANSWER_PREFIXES), min_size=1, max_size=2),
    gold=phrases,
    tail=texts,
    data=hs.data(),
)
def test_first_answer_span_strips_the_listed_prefixes(prefixes, gold, tail, data) -> None:
    # A gold that itself begins with a prefix ("it is x") would be stripped too: not this property's concern.
    assume(first_answer_span(gold) == gold.lower())
    head = " ".join(_perturb(p, data, punct=False) for p in prefixes)
    pred = f"{head} {gold}. {tail}"
    assert first_answer_span(pred) == gold.lower()
    assert first_answer_span_match(pred, gold)
    # Without stripping, the span would have been different: the prefix really was there.
    assert not normalized_exact_match(pred.split(".")[0], gold)


def test_module_has_one_function_per_metric() -> None:
    assert set(scoring.METRIC_FUNCTIONS) == set(METRICS)
