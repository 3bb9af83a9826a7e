"""Prompt strings of the paper (arXiv 2606.03280, section 1.4), left-padded tokenization, the token-id check."""

from __future__ import annotations

import pytest
import torch

from activation_transfer.task.prompts import (
    MAX_PROMPT_TOKENS,
    check_same_tokens,
    format_prompt,
    format_relay_receiver_prompt,
    format_relay_sender_prompt,
    tokenize_left_padded,
)
from activation_transfer.task.tokenizer import offline_tokenizer
from datamodules.qa_sources import QASample


@pytest.fixture(scope="module")
def tok(cache_dir):
    return offline_tokenizer(str(cache_dir))


LONG = " ".join(f"Person{i} lives in City{i}. City{i} is located in Country{i}." for i in range(80))


def test_paper_prompt_is_exact():
    assert format_prompt("Bob works in Tokyo.", "Where does Bob work?") == (
        "Context: Bob works in Tokyo.\nQ: Where does Bob work?\nA:"
    )


def test_relay_prompts_are_exact():
    assert format_relay_sender_prompt("Bob works in Tokyo.") == "Bob works in Tokyo.\n\nKey facts:"
    assert format_relay_receiver_prompt("Bob is in Tokyo.", "Where?") == "Bob is in Tokyo.\nQ: Where?\nA:"


def test_relay_receiver_prompt_uses_the_stripped_relay():
    # A decoded relay continues "Key facts:" and so starts with a space; the paper strips it before use.
    assert format_relay_receiver_prompt(" Bob is in Tokyo.\n\n", "Where?") == "Bob is in Tokyo.\nQ: Where?\nA:"
    sample = QASample(sample_id="s0", context="Bob works in Tokyo.", question="Where?", answer="Tokyo", hops=1)
    assert sample.relay_receiver_prompt("  Bob is in Tokyo. ") == "Bob is in Tokyo.\nQ: Where?\nA:"


def test_braces_in_text_are_kept_verbatim():
    # str.format only parses the template, so user text with braces must come through unchanged.
    assert format_prompt("{context}", "{0}?") == "Context: {context}\nQ: {0}?\nA:"
    assert format_relay_receiver_prompt("{question}", "q") == "{question}\nQ: q\nA:"


def test_left_padding_puts_eos_pads_on_the_left_with_mask_zero(tok):
    texts = [format_prompt("Bob works in Tokyo. Tokyo is located in Japan.", "What country?"), "Hi"]
    out = tokenize_left_padded(tok, texts)
    assert set(out) == {"input_ids", "attention_mask"}
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long
    plain = [tok(t)["input_ids"] for t in texts]
    assert ids.shape == (2, max(map(len, plain)))
    for i, row in enumerate(plain):
        n_pad = ids.shape[1] - len(row)
        assert n_pad > 0 or i == 0
        assert ids[i, n_pad:].tolist() == row
        assert mask[i, n_pad:].eq(1).all() and mask[i, :n_pad].eq(0).all()
        assert ids[i, :n_pad].eq(tok.eos_token_id).all()
    # The shorter prompt really is padded, and the tokenizer's own settings are left alone.
    assert mask[1, 0] == 0
    assert tok.padding_side == "right" and tok.truncation_side == "right"


def test_truncation_keeps_the_first_max_length_tokens(tok):
    full = tok(LONG)["input_ids"]
    assert len(full) > MAX_PROMPT_TOKENS
    out = tokenize_left_padded(tok, [LONG, "short"])
    assert out["input_ids"].shape[1] == MAX_PROMPT_TOKENS
    assert out["input_ids"][0].tolist() == full[:MAX_PROMPT_TOKENS]
    assert out["attention_mask"][0].eq(1).all()
    # Same as Hugging Face's default (right) truncation, which the paper used.
    assert out["input_ids"][0].tolist() == tok(LONG, truncation=True, max_length=MAX_PROMPT_TOKENS)["input_ids"]
    assert tokenize_left_padded(tok, [LONG], max_length=7)["input_ids"][0].tolist() == full[:7]


def test_left_truncation_tokenizer_is_refused(tok, monkeypatch):
    monkeypatch.setattr(tok, "truncation_side", "left")
    with pytest.raises(ValueError, match="truncation_side='left'"):
        tokenize_left_padded(tok, ["a b c"])


def test_bad_arguments(tok):
    with pytest.raises(TypeError, match="not a single string"):
        tokenize_left_padded(tok, "one prompt")
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        tokenize_left_padded(tok, ["x"], max_length=0)
    empty = tokenize_left_padded(tok, [])
    assert empty["input_ids"].shape == (0, 0) and empty["attention_mask"].shape == (0, 0)


def test_check_same_tokens_passes_on_identical_ids(tok):
    texts = [format_prompt("A is in B.", "Where is A?"), "x"]
    a = tokenize_left_padded(tok, texts)
    b = tokenize_left_padded(tok, texts)
    check_same_tokens(a["input_ids"], b["input_ids"], ["s0", "s1"])
    # With masks, padding to different widths does not count as a difference.
    c = tokenize_left_padded(tok, texts + ["a much longer prompt than the others in this batch"])
    check_same_tokens(
        a["input_ids"], c["input_ids"][:2], ["s0", "s1"], mask_a=a["attention_mask"], mask_b=c["attention_mask"][:2]
    )


def test_check_same_tokens_names_the_differing_sample():
    a = [[1, 2, 3], [4, 5, 6], [7, 8]]
    b = [[1, 2, 3], [4, 9, 6], [7, 8]]
    with pytest.raises(ValueError, match=r"sample 'q1'.*first difference at position 1: 5 vs 9"):
        check_same_tokens(a, b, ["q0", "q1", "q2"])
    with pytest.raises(ValueError, match="3 sender rows, 2 receiver rows"):
        check_same_tokens(a, b[:2], ["q0", "q1", "q2"])


def test_check_same_tokens_catches_different_truncation(tok):
    # Same tokenizer, but one side would cut the long prompt one token earlier.
    a = tokenize_left_padded(tok, ["short", LONG])
    b = tokenize_left_padded(tok, ["short", LONG], max_length=MAX_PROMPT_TOKENS - 1)
    with pytest.raises(ValueError, match=r"sample 'long_one'.*256 vs 255 tokens"):
        check_same_tokens(
            a["input_ids"], b["input_ids"], ["s", "long_one"], mask_a=a["attention_mask"], mask_b=b["attention_mask"]
        )
