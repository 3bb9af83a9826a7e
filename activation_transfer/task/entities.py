"""Entity types of the multi-hop questions: how many entities of the answer's type a context names, and the
counterfactual context where the gold answer is replaced by another entity of its type.

Types are the generator's pools (person, city, country, continent, count). The paper's files carry no entity types
(``answer_type`` is only entity/phrase): an answer outside every pool has no type, so its ``candidates`` is None and
it has no counterfactual.
"""

from __future__ import annotations

import random
import re

from activation_transfer.task.generator import CITIES, CONTINENTS, COUNTRIES, PEOPLE

# The generator draws continent counts from 5..60 (generator._chain).
COUNTS = tuple(str(m) for m in range(5, 61))
ENTITY_TYPES: dict[str, tuple[str, ...]] = {
    "person": PEOPLE,
    "city": CITIES,
    "country": COUNTRIES,
    "continent": CONTINENTS,
    "count": COUNTS,
}


def _pattern(entity: str) -> re.Pattern:
    # Word boundaries: "5" must not match inside "45", "Lima" not inside a longer word.
    return re.compile(rf"(?<!\w){re.escape(entity)}(?!\w)")


def _standalone(entity: str) -> re.Pattern:
    # Word-bounded and not the first word of a longer name: the paper's files say "Mexico City is a city in Mexico",
    # and the city must stay "Mexico City" when the country is replaced (not "Ghana City", which names the substitute
    # a second time).
    return re.compile(rf"(?<!\w){re.escape(entity)}(?!\w)(?! [A-Z])")


def answer_type(answer: str) -> str | None:
    """The type whose pool holds ``answer`` (stripped), or None."""
    answer = answer.strip()
    return next((t for t, pool in ENTITY_TYPES.items() if answer in pool), None)


def entities_in(context: str, kind: str) -> list[str]:
    """The distinct entities of type ``kind`` that ``context`` names (word-bounded), in pool order."""
    return [e for e in ENTITY_TYPES[kind] if _pattern(e).search(context)]


def candidates(context: str, answer: str) -> int | None:
    """How many distinct entities of the answer's type the context names (the gold included); None if untyped."""
    kind = answer_type(answer)
    return None if kind is None else len(entities_in(context, kind))


def counterfactual(context: str, answer: str, seed: int, key: str) -> tuple[str, str] | None:
    """``(context', answer')``: every occurrence of the gold ``answer`` in ``context`` (word-bounded, not the start of
    a longer name such as "Mexico City") replaced by another entity of its type that the context does not name; None
    when the answer is untyped, absent, or no such entity is left.

    The substitute is drawn by ``random.Random(f"{seed}:{key}")`` (``key``: the sample id): deterministic, and a
    sample's substitute does not depend on the rest of the dataset.
    """
    kind, gold = answer_type(answer), answer.strip()
    if kind is None or not _standalone(gold).search(context):
        return None
    present = set(entities_in(context, kind))
    pool = [e for e in ENTITY_TYPES[kind] if e != gold and e not in present]
    if not pool:
        return None
    new = random.Random(f"{seed}:{key}").choice(pool)
    return _standalone(gold).sub(new, context), new
