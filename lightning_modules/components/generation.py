"""Batched greedy generation with the paper's decoding settings, and the natural-language relay.

Many prompts go through one ``generate`` call: left padding (pad id = EOS) with the attention mask passed, so every
row continues from its own last real token at column -1. On fp32 this equals one-prompt-at-a-time decoding (a test
checks it); in bf16 small numeric differences between batch shapes can flip a greedy choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lightning_modules.components.prompts import tokenize_left_padded


@dataclass
class GenerationSettings:
    """Decoding settings (defaults: the paper's frozen runner).

    Args:
        max_new_tokens: New tokens of every receiver answer.
        relay_max_new_tokens: New tokens of the sender's relay in ``nl_relay``.
        do_sample: Sample instead of greedy decoding (the paper decodes greedily).
        repetition_penalty: Hugging Face repetition penalty (1 = off).
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
                raise ValueError(f"generation.{name} must be >= 1, got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"generation.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"generation.no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def generation_config(tokenizer, settings: GenerationSettings, max_new_tokens: int):
    """An explicit ``GenerationConfig`` (never the model's own, which could carry sampling defaults)."""
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=settings.do_sample,
        num_beams=1,
        pad_token_id=eos,  # pad = EOS, as in the paper
        eos_token_id=eos,
        repetition_penalty=settings.repetition_penalty,
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
) -> torch.Tensor:
    """Generate for a left-padded batch; returns only the new token ids (B, <= max_new_tokens), EOS-padded."""
    if input_ids.shape[0] == 0:
        return torch.zeros((0, 0), dtype=torch.long)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("the prompt batch is not left-padded: some row's last column is padding")
    device = next(model.parameters()).device
    cfg = generation_config(tokenizer, settings, max_new_tokens or settings.max_new_tokens)
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=cfg
    )
    return out[:, input_ids.shape[1] :].cpu()


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


def relay_texts(sender: nn.Module, sender_tokenizer, sender_prompts: Sequence[str], settings: GenerationSettings):
    """The sender's relays (``{context}\\n\\nKey facts:`` continued for ``relay_max_new_tokens``)."""
    return generate_texts(sender, sender_tokenizer, sender_prompts, settings, settings.relay_max_new_tokens)
