"""How well an offline model organism answers: held-out accuracy with the paper's decoding, and chance rates.

- :func:`evaluate_organism` decodes held-out generated questions with the paper's settings and scores them.
- :func:`chance_rate` is the accuracy of guessing, to put those numbers in context.
"""

from __future__ import annotations

from pathlib import Path

import torch

from activation_transfer.models.frozen_lm import load_model, load_tokenizer
from activation_transfer.models.generation import GenerationSettings, generate_texts
from activation_transfer.task.entities import ENTITY_TYPES, answer_type, entities_in
from activation_transfer.task.generator import (
    EVAL_NUM_SAMPLES,
    EVAL_SEED,
    MultiHopSample,
    generate_samples,
    training_keys,
)
from activation_transfer.task.prompts import format_prompt
from activation_transfer.task.scoring import METRICS, score

# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], batch_size: int = 64, **settings) -> list[str]:
    """Greedy continuations of ``prompts`` with the paper's decoding, batched with left padding.

    The same code path as the evaluation (:func:`~activation_transfer.models.generation.generate_texts`).

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer (pad = EOS).
        prompts: Full prompts.
        batch_size: Prompts per ``generate`` call.
        **settings: Overrides of :class:`~activation_transfer.models.generation.GenerationSettings`.

    Returns:
        The decoded continuations (special tokens removed), in order.
    """
    cfg = GenerationSettings(**settings)
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        out += generate_texts(model, tokenizer, prompts[i : i + batch_size], cfg)
    return out


def evaluate_organism(
    path: str | Path,
    num_samples: int = EVAL_NUM_SAMPLES,
    seed: int = EVAL_SEED,
    batch_size: int = 64,
    return_predictions: bool = False,
) -> dict:
    """Accuracy of an organism on held-out generated questions with the paper's decoding and metrics.

    Args:
        path: The organism's folder (or any model name ``load_model`` accepts).
        num_samples: Questions to decode (the first ``num_samples`` of the set that ``seed`` generates).
        seed: Generator seed; the default is the held-out evaluation set, which no organism trains on. Another
            seed, or more than ``EVAL_NUM_SAMPLES`` of it, drops the questions a shipped recipe trains on
            (``generator.training_keys``), as the evaluation's generated source does.
        batch_size: Prompts per ``generate`` call.
        return_predictions: Also return the per-sample records.

    Returns:
        ``{"n": ..., <metric>: accuracy for each of METRICS, "by_hops": {hops: word-boundary accuracy},
        "two_candidates": {"n", "word_boundary_contains", "other_candidate"} over the questions whose context names
        two entities of the answer's type (``other_candidate``: the share whose prediction names the other one),
        "chance": chance_rate(samples), "dropped_seen_in_training"}`` plus ``"predictions"`` when asked for.
    """
    model = load_model(str(path), dtype="float32")
    tokenizer = load_tokenizer(str(path))
    samples = generate_samples(num_samples, seed)
    # Other seeds hold questions of the organisms' own training text (4 of seed 777's first 600): an organism that
    # saw a question with its answer is not tested on it. The first EVAL_NUM_SAMPLES of EVAL_SEED hold none.
    if seed != EVAL_SEED or num_samples > EVAL_NUM_SAMPLES:
        samples = [s for s in samples if s.key not in training_keys()]
    dropped = num_samples - len(samples)
    prompts = [format_prompt(s.context, s.question) for s in samples]
    preds = generate_answers(model, tokenizer, prompts, batch_size=batch_size)
    scores = [score(p, s.answer) for p, s in zip(preds, samples)]
    n = len(samples)
    result: dict = {"n": n, **{m: sum(sc[m] for sc in scores) / max(n, 1) for m in METRICS}}
    by_hops: dict[int, list[bool]] = {}
    for s, sc in zip(samples, scores):
        by_hops.setdefault(s.hops, []).append(sc["word_boundary_contains"])
    result["by_hops"] = {h: sum(v) / len(v) for h, v in sorted(by_hops.items())}
    # Questions whose context names a second entity of the answer's type (a distractor chain) need the chain itself.
    two = [
        (s, sc, p)
        for s, sc, p in zip(samples, scores, preds)
        if len(entities_in(s.context, answer_type(s.answer))) == 2
    ]
    result["two_candidates"] = {
        "n": len(two),
        "word_boundary_contains": sum(sc["word_boundary_contains"] for _, sc, _ in two) / max(len(two), 1),
        "other_candidate": sum(_names_other(s, p) for s, _, p in two) / max(len(two), 1),
    }
    result["chance"] = chance_rate(samples)
    result["dropped_seen_in_training"] = dropped
    if return_predictions:
        result["predictions"] = [
            {"sample_id": s.sample_id, "gold": s.answer, "prediction": p, "hops": s.hops, "metrics": sc}
            for s, p, sc in zip(samples, preds, scores)
        ]
    return result


def _names_other(sample: MultiHopSample, prediction: str) -> bool:
    """Whether ``prediction`` names (word-bounded) an entity of the answer's type from the context other than gold."""
    others = [e for e in entities_in(sample.context, answer_type(sample.answer)) if e != sample.answer]
    return any(score(prediction, e)["word_boundary_contains"] for e in others)


# --------------------------------------------------------------------------------------------- chance


CHANCE_MODES = ("type_pool", "context_same_type", "context_entity")


def chance_rate(
    samples: list[MultiHopSample] | None = None, mode: str = "type_pool", metric: str = "word_boundary_contains"
) -> float:
    """Expected accuracy of a guesser that answers with one uniformly random entity, averaged over ``samples``.

    Modes (the guess is scored with ``score`` against the gold, so partial overlaps count as the metric says):

    - ``type_pool``: a random entity of the answer's type from the generator's pool (26 countries, 6 continents,
      56 counts): the rate of a model that knows what kind of answer is asked for but reads nothing.
    - ``context_same_type``: a random entity of the answer's type among those the context mentions (one or two
      per type, as distractor chains add a second): a model that finds the candidates but not the chain.
    - ``context_entity``: a random entity of any type that the context mentions.

    Args:
        samples: The questions (default: the built-in evaluation set).
        mode: One of :data:`CHANCE_MODES`.
        metric: Which of ``METRICS`` scores a guess.

    Returns:
        The mean over samples of the per-sample expected accuracy.
    """
    if mode not in CHANCE_MODES:
        raise ValueError(f"unknown chance mode {mode!r}; choose one of {', '.join(CHANCE_MODES)}")
    samples = generate_samples(EVAL_NUM_SAMPLES, EVAL_SEED) if samples is None else samples
    total = 0.0
    for s in samples:
        if mode == "type_pool":
            guesses = list(ENTITY_TYPES[answer_type(s.answer)])
        elif mode == "context_same_type":
            guesses = entities_in(s.context, answer_type(s.answer))
        else:
            guesses = [e for kind in ENTITY_TYPES for e in entities_in(s.context, kind)]
        total += sum(score(g, s.answer)[metric] for g in guesses) / len(guesses)
    return total / max(len(samples), 1)
