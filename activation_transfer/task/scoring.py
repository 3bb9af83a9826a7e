"""Answer scoring: the five string-match metrics of the paper (arXiv 2606.03280, section 1.4), as pure functions.

Every metric compares one decoded continuation (``prediction``) with one gold answer and returns a bool. An empty gold
answer (or one that is empty once normalized, e.g. ``"?!"``) raises ``ValueError``: an empty string is contained in
every prediction, so it would otherwise count as correct everywhere.
"""

from __future__ import annotations

import re
import string

METRICS: tuple[str, ...] = (
    "exact_match",
    "normalized_exact_match",
    "word_boundary_contains",
    "first_answer_span_match",
    "legacy_contains",
)
MAIN_METRIC = "word_boundary_contains"

# Prefixes stripped (repeatedly, in this order of preference, longest first) from the start of the first-answer span.
# The paper lists "the answer is", "a:" and "it is" "such as"; the others are their obvious variants.
ANSWER_PREFIXES: tuple[str, ...] = (
    "the answer is",
    "the answer:",
    "answer is",
    "answer:",
    "it is",
    "it's",
    "a:",
)

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
# A sentence ends at ., ! or ? followed by whitespace or the end of the text; "U.S.A" or "3.5" stay in one sentence.
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def _check(prediction: str, gold: str) -> None:
    if not isinstance(prediction, str) or not isinstance(gold, str):
        raise TypeError(f"prediction and gold must be str, got {type(prediction).__name__} and {type(gold).__name__}")
    if not normalize_answer(gold):
        raise ValueError(f"gold answer {gold!r} is empty after normalization; an empty answer would match everything")


def normalize_answer(s: str) -> str:
    """Lowercase, remove ASCII punctuation (``string.punctuation``), collapse whitespace and strip the ends.

    Args:
        s: Any text.

    Returns:
        The normalized text; punctuation is deleted without inserting a space (``"U.S."`` -> ``"us"``).
    """
    return " ".join(s.lower().translate(_PUNCT_TABLE).split())


def exact_match(prediction: str, gold: str) -> bool:
    """Strip + lowercase equality.

    Args:
        prediction: The decoded continuation.
        gold: The gold answer (non-empty).
    """
    _check(prediction, gold)
    return prediction.strip().lower() == gold.strip().lower()


def normalized_exact_match(prediction: str, gold: str) -> bool:
    """Equality after :func:`normalize_answer`.

    Args:
        prediction: The decoded continuation.
        gold: The gold answer (non-empty).
    """
    _check(prediction, gold)
    return normalize_answer(prediction) == normalize_answer(gold)


def word_boundary_contains(prediction: str, gold: str) -> bool:
    """The main metric: the normalized gold appears in the normalized prediction, not glued to word characters on
    either side (a standalone word or phrase).

    Args:
        prediction: The decoded continuation.
        gold: The gold answer (non-empty).
    """
    _check(prediction, gold)
    pattern = r"(?<!\w)" + re.escape(normalize_answer(gold)) + r"(?!\w)"
    return re.search(pattern, normalize_answer(prediction)) is not None


def _strip_prefixes(span: str) -> str:
    # Repeat so that stacked prefixes ("A: the answer is Paris") are all removed.
    changed = True
    while changed:
        changed = False
        for prefix in ANSWER_PREFIXES:
            if span.startswith(prefix):
                rest = span[len(prefix) :]
                # A prefix ending in a letter must end at a word boundary: "it is" must not eat "it isn't",
                # and "it's" must not eat "it'sy"; "a:" and "answer:" end in the colon and need no check.
                if prefix[-1].isalnum() and rest[:1] and (rest[0].isalnum() or rest[0] == "_"):
                    continue
                span = rest.lstrip(" \t" + string.punctuation.replace("'", ""))
                changed = True
                break
    return span


def first_answer_span(prediction: str) -> str:
    """The answer-bearing span at the start of a continuation, lowercased and with answer prefixes removed.

    Steps, in order: strip the ends; take the first non-empty line (continuations after ``"A:"`` often start with
    a newline); lowercase; cut at the first sentence end (``.``, ``!`` or ``?`` followed by whitespace or the end);
    strip surrounding whitespace; then repeatedly remove a leading prefix from :data:`ANSWER_PREFIXES` (at a word
    boundary) together with the whitespace/punctuation after it.

    Args:
        prediction: The decoded continuation.

    Returns:
        The span (not yet normalized; :func:`first_answer_span_match` normalizes it).
    """
    lines = [line for line in prediction.strip().splitlines() if line.strip()]
    first_line = lines[0].strip().lower() if lines else ""
    end = _SENTENCE_END.search(first_line)
    sentence = first_line[: end.start()] if end else first_line
    return _strip_prefixes(sentence.strip())


def first_answer_span_match(prediction: str, gold: str) -> bool:
    """The normalized :func:`first_answer_span` equals the normalized gold.

    Args:
        prediction: The decoded continuation.
        gold: The gold answer (non-empty).
    """
    _check(prediction, gold)
    return normalize_answer(first_answer_span(prediction)) == normalize_answer(gold)


def legacy_contains(prediction: str, gold: str) -> bool:
    """Lowercase substring match (the historical, lenient metric: "Japan" matches "Japanese").

    Args:
        prediction: The decoded continuation.
        gold: The gold answer (non-empty).
    """
    _check(prediction, gold)
    return gold.strip().lower() in prediction.lower()


METRIC_FUNCTIONS = {
    "exact_match": exact_match,
    "normalized_exact_match": normalized_exact_match,
    "word_boundary_contains": word_boundary_contains,
    "first_answer_span_match": first_answer_span_match,
    "legacy_contains": legacy_contains,
}


def score(prediction: str, gold: str) -> dict[str, bool]:
    """All five metrics for one prediction.

    Args:
        prediction: The decoded continuation.
        gold: The gold answer; empty (after normalization) raises ``ValueError``.

    Returns:
        ``{metric_name: bool}`` with exactly the keys of :data:`METRICS`, in that order.
    """
    _check(prediction, gold)
    return {name: METRIC_FUNCTIONS[name](prediction, gold) for name in METRICS}
