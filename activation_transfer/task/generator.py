"""Built-in offline generator of synthetic multi-hop QA chains (a pure function of ``(num_samples, seed)``).

It follows the paper's v1 "geography" batch (person -> city -> country -> continent -> country count, 2 to 4 hops,
tail and mid-chain questions), with one deliberate change: the links of each chain are drawn per sample instead of
coming from one fixed knowledge graph. A model can then only answer by reading the context (the paper's task is
extractive too: the gold answer is always in the context), which makes the offline model organisms a meaningful test.
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import asdict, dataclass

from activation_transfer.errors import UsageError
from activation_transfer.task.prompts import format_prompt

# Generator seed of the built-in evaluation set. Anything trained on generated data (the model organisms) must
# hold this seed out and drop samples whose key also occurs in the evaluation set.
EVAL_SEED = 1234
EVAL_NUM_SAMPLES = 300
# The generated sets the shipped recipes train on, as (seed, samples): the organisms' text (configs/organisms: seed 1,
# 40,000; the functional translators' and KV projectors' seed-1 samples are its first 6,000) and the aligned
# translators' built-in corpus (configs/train/demo.yaml: seed 0, 3,000). Their training drops the first
# EVAL_NUM_SAMPLES of EVAL_SEED; an evaluation of other generated questions drops the samples these sets hold
# (tests/activation_transfer/task/test_training_sets.py checks every shipped config against this list).
TRAINING_SETS = ((1, 40_000), (0, 3_000))

PEOPLE = (
    "Alice",
    "Bob",
    "Carlos",
    "Dana",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kofi",
    "Lena",
    "Marco",
    "Nadia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
    "Wei",
    "Ximena",
    "Yuki",
    "Zara",
    "Amir",
    "Bianca",
    "Chen",
    "Diego",
)
CITIES = (
    "Tokyo",
    "London",
    "Paris",
    "Cairo",
    "Lima",
    "Oslo",
    "Rome",
    "Madrid",
    "Berlin",
    "Vienna",
    "Dublin",
    "Lagos",
    "Nairobi",
    "Seoul",
    "Hanoi",
    "Quito",
    "Bogota",
    "Sydney",
    "Toronto",
    "Denver",
    "Osaka",
    "Milan",
    "Lyon",
    "Porto",
    "Krakow",
    "Prague",
    "Mumbai",
    "Delhi",
    "Perth",
    "Austin",
)
COUNTRIES = (
    "Japan",
    "France",
    "Egypt",
    "Peru",
    "Norway",
    "Italy",
    "Spain",
    "Germany",
    "Austria",
    "Ireland",
    "Nigeria",
    "Kenya",
    "Korea",
    "Vietnam",
    "Ecuador",
    "Colombia",
    "Australia",
    "Canada",
    "Mexico",
    "Brazil",
    "India",
    "Poland",
    "Portugal",
    "Chile",
    "Ghana",
    "Sweden",
)
CONTINENTS = ("Asia", "Europe", "Africa", "Oceania", "North America", "South America")

# (statement person -> city, verb phrase of a country question, relative clause naming that country)
PERSON_CITY = (
    ("{p} lives in {c}.", "does {p} live in", "where {p} lives"),
    ("{p} works in {c}.", "does {p} work in", "where {p} works"),
    ("{p} was born in {c}.", "was {p} born in", "where {p} was born"),
    ("{p} moved to {c}.", "did {p} move to", "that {p} moved to"),
)
CITY_COUNTRY = ("{c} is located in {k}.", "{c} is a city in {k}.", "{c} is part of {k}.")
COUNTRY_CONTINENT = ("{k} is on the continent of {n}.", "{k} is a nation in {n}.", "{k} lies in {n}.")
CONTINENT_COUNT = ("{n} has about {m} countries.", "There are about {m} countries in {n}.")


@dataclass(frozen=True)
class MultiHopSample:
    """One QA sample: ``context`` holds every fact needed, ``answer`` appears verbatim in it."""

    sample_id: str
    context: str
    question: str
    answer: str
    hops: int
    question_type: str  # "tail" (last link of the chain) or "mid" (a link before it; later facts distract)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> str:
        """Exact-match key used for de-duplication, as the paper's clean-eval builder does."""
        return f"{self.context}\n{self.question}\n{self.answer}"


def _pick(rng: random.Random, pool: tuple[str, ...], avoid: dict[str, str]) -> str:
    return rng.choice([x for x in pool if x not in avoid.values()])


def _chain(
    rng: random.Random, person: str, hops: int, avoid: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str], tuple[str, str]]:
    # A distractor chain never reuses the main chain's entities, so every question has exactly one answer.
    avoid = avoid or {}
    city, country, continent = _pick(rng, CITIES, avoid), _pick(rng, COUNTRIES, avoid), _pick(rng, CONTINENTS, avoid)
    count = rng.choice([str(m) for m in range(5, 61) if str(m) not in avoid.values()])
    pc, q_verb, q_rel = rng.choice(PERSON_CITY)
    facts = [pc.format(p=person, c=city), rng.choice(CITY_COUNTRY).format(c=city, k=country)]
    if hops >= 3:
        facts.append(rng.choice(COUNTRY_CONTINENT).format(k=country, n=continent))
    if hops >= 4:
        facts.append(rng.choice(CONTINENT_COUNT).format(n=continent, m=count))
    links = {"city": city, "country": country, "continent": continent, "count": count}
    return facts, links, (q_verb.format(p=person), q_rel.format(p=person))


def _question(hops: int, qtype: str, phrases: tuple[str, str], links: dict[str, str]) -> tuple[str, str]:
    verb, rel = phrases
    if hops == 2 or (hops == 3 and qtype == "mid"):
        return f"What country {verb}?", links["country"]
    if hops == 3 or (hops == 4 and qtype == "mid"):
        return f"What continent is the country {rel} located on?", links["continent"]
    return f"About how many countries are there on the continent of the country {rel}?", links["count"]


def check_seed(option: str, seed: int) -> None:
    """Refuse a negative generator seed in one line naming ``option``: ``random.Random`` seeds an int by its absolute
    value, so -S would draw seed S's questions under other ids, silently, and past the EVAL_SEED / training-seed
    checks."""
    if seed < 0:
        raise UsageError(f"{option} must be >= 0, got {seed}")


def generate_samples(
    num_samples: int, seed: int, distractor_prob: float = 0.5, id_prefix: str = "syn"
) -> list[MultiHopSample]:
    """Generate ``num_samples`` multi-hop samples deterministically from ``seed``.

    Args:
        num_samples: How many samples to draw.
        seed: Seed of the ``random.Random`` that draws everything.
        distractor_prob: Probability that a sample also states a chain about another person.
        id_prefix: Prefix of the sample ids (``{prefix}_s{seed}_{index:06d}``).

    Returns:
        Samples with hop counts cycling 2, 3, 4 and question types alternating tail / mid-chain.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    rng = random.Random(seed)
    out = []
    for i in range(num_samples):
        hops = 2 + i % 3
        qtype = "tail" if hops == 2 or (i // 3) % 2 == 0 else "mid"
        person = rng.choice(PEOPLE)
        facts, links, verb = _chain(rng, person, hops)
        question, answer = _question(hops, qtype, verb, links)
        if rng.random() < distractor_prob:
            other = rng.choice([p for p in PEOPLE if p != person])
            d_facts, _, _ = _chain(rng, other, rng.randint(2, hops), avoid=links)
            # Interleave the distractor chain without breaking the order inside each chain.
            merged, a, b = [], list(facts), list(d_facts)
            while a or b:
                src = a if (a and (not b or rng.random() < 0.5)) else b
                merged.append(src.pop(0))
            facts = merged
        out.append(
            MultiHopSample(
                sample_id=f"{id_prefix}_s{seed}_{i:06d}",
                context=" ".join(facts),
                question=question,
                answer=answer,
                hops=hops,
                question_type=qtype,
            )
        )
    return out


def sample_text(sample: MultiHopSample) -> str:
    """One sample as plain text: its paper-format prompt followed by its answer."""
    return f"{format_prompt(sample.context, sample.question)} {sample.answer}"


def corpus_text(num_samples: int = 2000, seed: int = 0) -> list[str]:
    """Plain-text lines (prompt plus answer) from the generator: the offline tokenizer's training text.

    The translators' built-in corpus (``datamodules.corpora``) holds the evaluation set out; the tokenizer's text
    does not (its merges would change, and with them every cached model).
    """
    return [sample_text(s) for s in generate_samples(num_samples, seed)]


def eval_keys(num_samples: int = EVAL_NUM_SAMPLES, seed: int = EVAL_SEED) -> set[str]:
    """Keys of the built-in evaluation set: no organism or translator may train or validate on these."""
    return {s.key for s in generate_samples(num_samples, seed)}


@functools.lru_cache(maxsize=1)
def training_keys() -> frozenset[str]:
    """Keys of the samples of :data:`TRAINING_SETS` that training keeps, i.e. all but the held-out evaluation set's
    (about 1 s, once per process)."""
    return frozenset(s.key for seed, n in TRAINING_SETS for s in generate_samples(n, seed)) - eval_keys()


def fingerprint(samples: list[MultiHopSample]) -> str:
    """SHA-256 over the samples' keys, to record which generated set was used."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.key.encode())
        h.update(b"\0")
    return h.hexdigest()
