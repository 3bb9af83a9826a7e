"""Batched greedy generation with the paper's decoding settings.

Many prompts go through one ``generate`` call, left padded (pad id = EOS) with the attention mask passed, so every
row continues from its own last real token. On fp32 this equals one-prompt-at-a-time decoding (tests check it); in
bf16 small numeric differences between batch shapes can flip a greedy choice.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from activation_transfer.errors import UsageError
from activation_transfer.task.prompts import tokenize_left_padded


@dataclass
class GenerationSettings:
    """Decoding settings (defaults: the paper's frozen runner).

    Args:
        max_new_tokens: New tokens of every receiver answer.
        relay_max_new_tokens: New tokens of the sender's relay in ``nl_relay``.
        do_sample: Sample instead of greedy decoding (the paper decodes greedily).
        repetition_penalty: Repetition penalty (1 = off), HF's rule applied to real tokens only (see
            :class:`MaskedRepetitionPenalty`).
        no_repeat_ngram_size: Ban repeating n-grams of this size (0 = off); the prompt counts, as in HF.
        max_prompt_tokens: Prompts are truncated to this many tokens (right truncation, as in the paper).
    """

    max_new_tokens: int = 64
    relay_max_new_tokens: int = 128
    do_sample: bool = False
    repetition_penalty: float = 1.3
    no_repeat_ngram_size: int = 3
    max_prompt_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "relay_max_new_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"generation.{name} must be >= 1, got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise UsageError(f"generation.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise UsageError(f"generation.no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")

    def to_dict(self) -> dict:
        return asdict(self)


class MaskedRepetitionPenalty:
    """Hugging Face's repetition penalty, counting the real tokens of each row only (never its left padding).

    A logit of a token the row has already seen (in its real prompt tokens or its generated tokens) is divided by
    ``penalty`` when positive and multiplied by it when negative, as in ``RepetitionPenaltyLogitsProcessor``.

    Why not Hugging Face's own: a penalty that counts every id of the sequence also counts the left padding, and
    since pad = EOS a padded row would have its EOS logit penalized where a one-at-a-time run's is not. Recent
    transformers (5.24) skip the left padding themselves (``prompt_ignore_length`` from the attention mask), older
    ones penalize it; applying our own rule keeps the answers independent of the installed version. HF's
    ``no_repeat_ngram_size`` needs no fix: an n-gram that contains padding starts with EOS, so it can only match a
    row whose last tokens include EOS, i.e. a row that has already finished (prompts carry no EOS).

    Args:
        penalty: The penalty (> 0; 1 changes nothing).
        prompt_mask: Attention mask (B, T) of the prompt batch, 0 on padding. Columns from T on are generated
            tokens, which are always real.
    """

    def __init__(self, penalty: float, prompt_mask: torch.Tensor) -> None:
        if penalty <= 0:
            raise UsageError(f"repetition penalty must be > 0, got {penalty}")
        self.penalty = float(penalty)
        self.prompt_mask = prompt_mask.bool()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        width = self.prompt_mask.shape[1]
        if input_ids.shape[0] != self.prompt_mask.shape[0] or input_ids.shape[1] < width:
            raise ValueError(
                f"sequences {tuple(input_ids.shape)} do not extend the prompt mask {tuple(self.prompt_mask.shape)}"
            )
        vocab = scores.shape[-1]
        real = torch.ones_like(input_ids, dtype=torch.bool)
        real[:, :width] = self.prompt_mask.to(input_ids.device)
        # Padding goes to a spare column past the vocabulary, which is cut off again below.
        ids = torch.where(real, input_ids.clamp(max=vocab), vocab)
        seen = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
        seen.scatter_(1, ids.to(scores.device), True)
        penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen[:, :vocab], penalized, scores)


class NonFiniteLogits(FloatingPointError):
    """A forward pass of ``generate`` gave NaN or +infinite logits (broken weights or an overflow): decoding them
    would give empty answers scored as wrong."""


class FiniteLogitsCheck:
    """A logits processor that raises :class:`NonFiniteLogits` naming ``model_name`` on NaN or +inf scores (-inf is
    a legitimate mask, e.g. ``no_repeat_ngram_size``'s), at every decoding step."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = torch.isnan(scores).any(dim=-1) | torch.isposinf(scores).any(dim=-1)
        if bool(bad.any()):
            raise NonFiniteLogits(
                f"the logits of {self.model_name} are NaN or infinite for {int(bad.sum())} prompt(s) at generated "
                f"token {input_ids.shape[1]}; a weight of the model is broken or the precision overflows "
                "(try --trainer.precision 32-true)"
            )
        return scores


def generation_config(tokenizer, settings: GenerationSettings, max_new_tokens: int):
    """An explicit ``GenerationConfig`` (never the model's own, which could carry sampling defaults).

    Its ``repetition_penalty`` is 1 (off): :func:`generate_ids` applies :class:`MaskedRepetitionPenalty` instead, so
    the penalty is applied once and never to padding.
    """
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=settings.do_sample,
        num_beams=1,
        pad_token_id=eos,  # pad = EOS, as in the paper
        eos_token_id=eos,
        repetition_penalty=1.0,
    )
    if settings.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = settings.no_repeat_ngram_size
    return GenerationConfig(**kwargs)


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    max_new_tokens: int | None = None,
    model_name: str | None = None,
    drop_finished_every: int | None = None,
    penalty_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate for a left-padded batch; returns only the new token ids (B, <= max_new_tokens), EOS-padded.

    ``penalty_mask`` (B, T): the prompt columns the repetition penalty counts, default ``attention_mask``; the split
    protocol's slot tokens (EOS ids the receiver never reads as text) are attended to but not counted.

    Hugging Face appends the custom penalty after its own processors (here no_repeat_ngram_size, and the sampling
    warpers when ``do_sample``); for greedy decoding the order does not change the chosen token. Every step's logits
    are checked (:class:`FiniteLogitsCheck`, naming ``model_name``).

    ``drop_finished_every``: greedy decoding in phases of this many tokens; after each phase the rows that have
    emitted EOS leave the batch (with their KV cache rows) and the others continue from the cache. A finished row
    would only append EOS padding, and a row's states do not depend on the other rows, so the ids are the same.
    """
    if input_ids.shape[0] == 0:
        return torch.zeros((0, 0), dtype=torch.long)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("the prompt batch is not left-padded: some row's last column is padding")
    device = next(model.parameters()).device
    total = max_new_tokens or settings.max_new_tokens
    ids, mask = input_ids.to(device), attention_mask.to(device)
    if settings.do_sample or not drop_finished_every or drop_finished_every >= total:
        prompt_mask = mask if penalty_mask is None else penalty_mask.to(device)
        return _generate_phase(model, tokenizer, ids, mask, prompt_mask, settings, total, model_name)[
            :, ids.shape[1] :
        ].cpu()
    from activation_transfer.models.kv_cache import phase_cache

    # KV buffers as long as the prompt and its answer: no per-step copy of the whole cache (kv_cache's docstring)
    eos = int(tokenizer.eos_token_id)
    prompt_mask = mask if penalty_mask is None else penalty_mask.to(device)
    cache = phase_cache(model.config, capacity=ids.shape[1] + total)
    rows = torch.arange(ids.shape[0], device=device)  # the rows still decoding
    out = torch.full((ids.shape[0], total), eos, dtype=torch.long, device=device)
    done = length = 0
    while done < total:
        n = min(drop_finished_every, total - done)
        got = _generate_phase(model, tokenizer, ids, mask, prompt_mask[rows], settings, n, model_name, cache)
        got = got[:, ids.shape[1] :]
        out[rows, done : done + got.shape[1]] = got
        length, done = done + got.shape[1], done + n
        going = ~(got == eos).any(1)
        if got.shape[1] < n or not bool(going.any()):  # every row has ended
            break
        ids, mask = torch.cat([ids, got], 1)[going], torch.cat([mask, torch.ones_like(got)], 1)[going]
        if not bool(going.all()):
            rows = rows[going]
            cache.batch_select_indices(going.nonzero().flatten())
    return out[:, :length].cpu()


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model`` takes a KV cache: transformers renamed ``past_key_values`` to ``cache`` (5.2x)."""
    return (
        "cache" if "cache" in inspect.signature(model.prepare_inputs_for_generation).parameters else "past_key_values"
    )


def _generate_phase(model, tokenizer, ids, mask, prompt_mask, settings, n, model_name, cache=None) -> torch.Tensor:
    """One ``generate`` of up to ``n`` new tokens (the sequences, prompt included); with ``cache``, which holds the
    KV of all but ``ids``' last column after the first phase, it continues from there and keeps the cache."""
    from transformers import LogitsProcessorList

    cfg = generation_config(tokenizer, settings, n)
    processors = LogitsProcessorList([FiniteLogitsCheck(model_name or str(model.config.name_or_path))])
    if settings.repetition_penalty != 1.0:
        processors.append(MaskedRepetitionPenalty(settings.repetition_penalty, prompt_mask))
    kwargs = {} if cache is None else {cache_argument(model): cache}
    return model.generate(
        input_ids=ids, attention_mask=mask, generation_config=cfg, logits_processor=processors, **kwargs
    )


def decode(tokenizer, new_ids: torch.Tensor) -> list[str]:
    """Decoded continuations (special tokens, i.e. EOS and its padding, dropped)."""
    return tokenizer.batch_decode(new_ids.tolist(), skip_special_tokens=True)


def generate_texts(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    settings: GenerationSettings,
    max_new_tokens: int | None = None,
) -> list[str]:
    """Tokenize (left padded, truncated), generate and decode a batch of prompts."""
    batch = tokenize_left_padded(tokenizer, list(prompts), max_length=settings.max_prompt_tokens)
    ids = generate_ids(model, tokenizer, batch["input_ids"], batch["attention_mask"], settings, max_new_tokens)
    return decode(tokenizer, ids)
