"""Batched generation: the repetition penalty counts real tokens only, so a left-padded row decodes as if alone."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from activation_transfer.models.frozen_lm import load_model, load_tokenizer
from activation_transfer.models.generation import (
    GenerationSettings,
    MaskedRepetitionPenalty,
    generate_ids,
    generation_config,
)
from activation_transfer.task.prompts import tokenize_left_padded

SHORT = "Context: Bob works in Lima.\nQ: Where?\nA:"
LONG = "Context: Alice lives in Tokyo. Tokyo is located in Japan.\nQ: What country does Alice live in?\nA:"
SETTINGS = GenerationSettings(max_new_tokens=8)  # the paper's penalty 1.3 and no_repeat_ngram_size 3


def test_penalty_skips_padding_on_hand_made_logits():
    prompt_mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    input_ids = torch.tensor([[0, 0, 5, 7], [0, 3, 5, 9]])  # column 3 is a generated token; id 0 is the pad (EOS)
    scores = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0, 4.0, -2.0, -6.0, 1.5, 2.5]] * 2)
    out = MaskedRepetitionPenalty(2.0, prompt_mask)(input_ids, scores.clone())
    expected = scores.clone()
    expected[0, 5], expected[0, 7] = 2.0, -12.0  # row 0: real tokens 5 and 7 only, never the pads
    expected[1, 0], expected[1, 3], expected[1, 5], expected[1, 9] = 1.0, 1.5, 2.0, 1.25  # row 1: a real id 0 counts
    assert torch.equal(out, expected)
    # Without padding it is Hugging Face's processor; with padding HF's also penalizes the pad id.
    hf = RepetitionPenaltyLogitsProcessor(2.0)(input_ids, scores.clone())
    assert torch.equal(out[1], hf[1]) and hf[0, 0] == 1.0 and out[0, 0] == 2.0


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer("tiny-neox", cache_dir=str(tmp_path_factory.mktemp("tok_cache")))


def _eos_model(tokenizer):
    """tiny-neox whose EOS logit is 1.02 x that of the token it would write third after SHORT (absent so far)."""
    model = load_model("tiny-neox")
    t = tokenize_left_padded(tokenizer, [SHORT])
    third = generate_ids(model, tokenizer, t["input_ids"], t["attention_mask"], SETTINGS)[0, 2]
    assert int(third) not in t["input_ids"][0].tolist()  # so only EOS, not this token, is penalized by the pads
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 1.02 * model.lm_head.weight[third]
    return model


def _until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


def _batched_and_single(model, tokenizer, settings):
    eos = tokenizer.eos_token_id
    batch = tokenize_left_padded(tokenizer, [SHORT, LONG])
    assert batch["attention_mask"][0, 0] == 0  # SHORT's row is padded with EOS
    batched = generate_ids(model, tokenizer, batch["input_ids"], batch["attention_mask"], settings).tolist()
    single = []
    for p in (SHORT, LONG):
        t = tokenize_left_padded(tokenizer, [p])
        single.append(generate_ids(model, tokenizer, t["input_ids"], t["attention_mask"], settings)[0].tolist())
    return [_until_eos(r, eos) for r in batched], [_until_eos(r, eos) for r in single]


def test_padded_row_ending_with_eos_decodes_as_if_alone(tokenizer):
    model = _eos_model(tokenizer)
    eos = tokenizer.eos_token_id
    batched, single = _batched_and_single(model, tokenizer, SETTINGS)
    assert single[0][-1] == eos and len(single[0]) == 3  # the constructed case: SHORT's answer ends with EOS
    assert batched == single
    # The case is sensitive: a penalty that also counts the pads (HF's processor without prompt_ignore_length, as
    # generate applied it before transformers learnt to skip left padding) makes the padded row miss its EOS.
    batch = tokenize_left_padded(tokenizer, [SHORT, LONG])
    out = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        generation_config=generation_config(tokenizer, SETTINGS, SETTINGS.max_new_tokens),
        logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(SETTINGS.repetition_penalty)]),
    )[:, batch["input_ids"].shape[1] :].tolist()
    assert out[0][:2] == single[0][:2] and out[0][2] != eos


def test_no_repeat_ngram_is_unaffected_by_padding(tokenizer):
    # An n-gram with padding starts with EOS, so it can only match a finished row: batched equals single without
    # the penalty too, for a model that does emit EOS.
    model = _eos_model(tokenizer)
    settings = GenerationSettings(max_new_tokens=8, repetition_penalty=1.0, no_repeat_ngram_size=3)
    batched, single = _batched_and_single(model, tokenizer, settings)
    assert batched == single and any(r and r[-1] == tokenizer.eos_token_id for r in single)


def test_non_finite_logits_stop_generation_naming_the_model(tokenizer):
    # Issue 20 item 5: NaN in the LM head gave every answer "" (accuracy 0, exit 0); now every step's logits are
    # checked and the error names the model.
    from activation_transfer.models.generation import NonFiniteLogits

    model = load_model("tiny-neox")
    with torch.no_grad():
        model.get_output_embeddings().weight[3] = float("nan")
    batch = tokenize_left_padded(tokenizer, ["Alice lives in", "Bob"], 16)
    with pytest.raises(NonFiniteLogits, match="the logits of the sender tiny-neox are NaN or infinite for 2 prompt"):
        generate_ids(
            model,
            tokenizer,
            batch["input_ids"],
            batch["attention_mask"],
            GenerationSettings(max_new_tokens=2),
            model_name="the sender tiny-neox",
        )


@pytest.mark.parametrize("every", [1, 2, 3])
def test_dropping_finished_rows_gives_the_same_ids(tokenizer, every):
    """Decoding in phases that drop the rows which have emitted EOS returns exactly one ``generate``'s ids (shape
    included), with rows ending at their third token between rows that run on."""
    model = _eos_model(tokenizer)
    omar = "Context: Omar moved to Oslo. Oslo is part of Norway.\nQ: What continent?\nA:"
    batch = tokenize_left_padded(tokenizer, [SHORT, omar, LONG, "Hello there"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    whole = generate_ids(model, tokenizer, ids, mask, SETTINGS)
    phased = generate_ids(model, tokenizer, ids, mask, SETTINGS, drop_finished_every=every)
    ended = (whole == tokenizer.eos_token_id).any(1).tolist()
    assert ended == [True, False, True, False] and whole.shape[1] == SETTINGS.max_new_tokens
    assert torch.equal(phased, whole)
    short = tokenize_left_padded(tokenizer, [SHORT])  # every row ends: the ids stop where generate stops
    alone = generate_ids(model, tokenizer, short["input_ids"], short["attention_mask"], SETTINGS)
    assert alone.shape[1] == 3
    assert torch.equal(
        generate_ids(
            model, tokenizer, short["input_ids"], short["attention_mask"], SETTINGS, drop_finished_every=every
        ),
        alone,
    )
