"""Prompt strings of the paper (arXiv 2606.03280, section 1.4) and the tokenization helpers the evaluation module uses.

Everything here is pure: no model, no file, no global state. The evaluation module owns the two models'
tokenizers and calls :func:`tokenize_left_padded` itself; replacement-mode conditions call
:func:`check_same_tokens` because they overwrite the receiver's states position by position with the sender's
translated ones, which is only meaningful when both models read the very same token ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from activation_transfer.errors import UsageError

# The paper's prompt: both models get it in the activation-transfer and no-injection conditions.
PROMPT_TEMPLATE = "Context: {context}\nQ: {question}\nA:"
# The natural-language relay baseline: the sender writes a relay from the context alone, the receiver answers
# from the relay and the question and never sees the original context.
RELAY_SENDER_TEMPLATE = "{context}\n\nKey facts:"
RELAY_RECEIVER_TEMPLATE = "{relay}\nQ: {question}\nA:"
# The paper tokenizes prompts with truncation at 256 tokens.
MAX_PROMPT_TOKENS = 256


def format_prompt(context: str, question: str) -> str:
    """The paper's prompt ``Context: {context}\\nQ: {question}\\nA:``."""
    return PROMPT_TEMPLATE.format(context=context, question=question)


def split_prompt(context: str, question: str) -> tuple[str, str]:
    """The paper's prompt in two parts, ``Context: {context}\n`` and ``Q: {question}\nA:`` (the split protocol's
    sender reads both, its receiver only the second); their concatenation is :func:`format_prompt`'s output."""
    full = format_prompt(context, question)
    cut = full.rindex("Q: " + question)
    return full[:cut], full[cut:]


def format_relay_sender_prompt(context: str) -> str:
    """The relay sender's prompt ``{context}\\n\\nKey facts:``."""
    return RELAY_SENDER_TEMPLATE.format(context=context)


def format_relay_receiver_prompt(relay: str, question: str) -> str:
    """The relay receiver's prompt ``{relay}\\nQ: {question}\\nA:``, built from the stripped relay.

    A decoded relay usually starts with a space (the sender continues ``Key facts:``); the paper's runner strips
    every generated text before using it (arXiv 2606.03280, section 1.4), so the receiver's prompt starts with the
    relay's first word.
    """
    return RELAY_RECEIVER_TEMPLATE.format(relay=relay.strip(), question=question)


def tokenize_left_padded(tokenizer, texts: Sequence[str], max_length: int = MAX_PROMPT_TOKENS) -> dict:
    """Tokenize a batch of prompts, truncate each to ``max_length`` tokens and pad it on the left with EOS.

    Truncation is Hugging Face's own (``truncation=True, max_length=max_length``) with the default
    ``truncation_side="right"``, as in the paper: an over-long prompt keeps its first ``max_length`` tokens (for a
    tokenizer that adds special tokens, HF keeps them and cuts the text). A tokenizer set to truncate on the left
    is refused rather than silently changed, because it would drop the start of the context instead. Padding is
    done here, on the left (decoder-only generation continues from the last column), with pad id = EOS as in the
    paper, so the tokenizer's ``padding_side`` and ``pad_token`` do not matter and the tokenizer is not modified.

    Args:
        tokenizer: A Hugging Face tokenizer with an EOS token.
        texts: The prompts.
        max_length: Most tokens kept per prompt.

    Returns:
        ``{"input_ids": LongTensor (B, T), "attention_mask": LongTensor (B, T)}`` where ``T`` is the longest
        truncated prompt and ``attention_mask`` is 0 exactly on the left padding.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of prompts, not a single string")
    side = getattr(tokenizer, "truncation_side", "right")
    if side != "right":
        raise UsageError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has truncation_side={side!r}; prompts are truncated "
            "on the right (the paper's Hugging Face default), set tokenizer.truncation_side = 'right'"
        )
    pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise UsageError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token to pad with")
    if not texts:
        empty = torch.zeros((0, 0), dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone()}
    rows = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _rows(ids, mask) -> list[list[int]]:
    """Token rows as lists, with the padding removed where a mask is given."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else [list(r) for r in ids]
    if mask is None:
        return [[int(t) for t in r] for r in ids]
    mask = mask.tolist() if isinstance(mask, torch.Tensor) else [list(m) for m in mask]
    if len(mask) != len(ids):
        raise ValueError(f"attention mask has {len(mask)} rows for {len(ids)} rows of token ids")
    return [[int(t) for t, m in zip(r, mr, strict=True) if m] for r, mr in zip(ids, mask, strict=True)]


def check_same_tokens(
    ids_a,
    ids_b,
    sample_ids: Sequence[str],
    mask_a=None,
    mask_b=None,
    names: tuple[str, str] = ("sender", "receiver"),
) -> None:
    """Raise when the two models' token ids for the same prompts differ (the paper's runner checks this too).

    Replacement-style injection writes translated sender states into the receiver position by position, so both
    models must see the same sequence. This catches different tokenizers and prompts that the two sides truncate
    differently (a different ``max_length`` or truncation side), since the ids are compared after truncation.

    Args:
        ids_a: Token ids of the first model: a LongTensor (B, T) or a list of rows.
        ids_b: Token ids of the second model, same prompts in the same order.
        sample_ids: The B sample ids, named in the error.
        mask_a: Optional attention mask of ``ids_a``; padding (mask 0) is dropped before comparing.
        mask_b: Optional attention mask of ``ids_b``.
        names: What to call the two models in the error.

    Raises:
        ValueError: Naming the first sample whose ids differ, both lengths and the first differing position.
    """
    rows_a, rows_b = _rows(ids_a, mask_a), _rows(ids_b, mask_b)
    if not len(rows_a) == len(rows_b) == len(sample_ids):
        raise ValueError(
            f"cannot compare token ids: {len(rows_a)} {names[0]} rows, {len(rows_b)} {names[1]} rows and "
            f"{len(sample_ids)} sample ids"
        )
    for sid, a, b in zip(sample_ids, rows_a, rows_b, strict=True):
        if a == b:
            continue
        pos = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        got_a = a[pos] if pos < len(a) else "end of prompt"
        got_b = b[pos] if pos < len(b) else "end of prompt"
        raise UsageError(
            f"sample {sid!r}: the {names[0]} and the {names[1]} tokenize the prompt differently ({len(a)} vs "
            f"{len(b)} tokens, first difference at position {pos}: {got_a} vs {got_b}); replacement-mode "
            "conditions need identical token ids (same tokenizer, same truncation)"
        )


def over_length(tokenizer, sample_ids: Sequence[str], texts: Sequence[str], max_length: int) -> list[str]:
    """Ids of the prompts that :func:`tokenize_left_padded` cuts: longer than ``max_length`` tokens.

    Tokenizing to ``max_length + 1`` tells them apart without encoding a huge context in full; ``max_length`` counts
    special tokens as Hugging Face's truncation does.
    """
    rows = tokenizer(list(texts), truncation=True, max_length=max_length + 1, padding=False)["input_ids"]
    return [sid for sid, row in zip(sample_ids, rows, strict=True) if len(row) > max_length]


def truncation_check(checks: dict[str, tuple], sample_ids: Sequence[str], max_length: int) -> tuple[dict, str | None]:
    """Which prompts are cut at ``max_length`` tokens, per kind, and one warning line (None when none is).

    Args:
        checks: Prompt kind (``receiver``, ``sender``...) -> (its tokenizer, one prompt per sample).
        sample_ids: The samples' ids, in the prompts' order.
        max_length: ``generation.max_prompt_tokens``.

    Returns:
        ``({"max_prompt_tokens": n, kind: {"count": c, "ids": [...]}}, warning)``.
    """
    cut = {kind: over_length(tok, sample_ids, texts, max_length) for kind, (tok, texts) in checks.items()}
    info = {"max_prompt_tokens": max_length, **{k: {"count": len(v), "ids": v} for k, v in cut.items()}}
    some = sorted({sid for v in cut.values() for sid in v})
    if not some:
        return info, None
    counts = ", ".join(f"{k} {len(v)}" for k, v in cut.items() if v)
    # Truncation keeps the start: the question at the end of the prompt is what gets lost.
    return info, (
        f"{len(some)} of {len(sample_ids)} prompts are longer than generation.max_prompt_tokens={max_length} tokens "
        f"({counts}) and are cut at the end, dropping their question, e.g. {', '.join(map(str, some[:5]))}; raise "
        "--model.generation.max_prompt_tokens"
    )
