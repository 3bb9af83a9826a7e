"""The receiver's answers for one sub-batch of one condition, with each record's diagnostics.

Every answer is one batched greedy ``generate`` under a prefill-only hook that writes the condition's source (or
nothing) and measures the norms every record carries; a NaN or infinity there stops the run, naming the condition
and samples, since it would decode to an empty answer and score as wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from activation_transfer.injection.conditions import ConditionSpec
from activation_transfer.injection.prefill_hook import PrefillInjection, prefill_injection
from activation_transfer.models.frozen_lm import LoadedModel
from activation_transfer.models.generation import GenerationSettings, NonFiniteLogits, decode, generate_ids
from activation_transfer.task.prompts import (
    format_relay_receiver_prompt,
    format_relay_sender_prompt,
    tokenize_left_padded,
)


def _generate(
    receiver: LoadedModel, ids, mask, settings: GenerationSettings, inj: PrefillInjection, condition: str, sample_ids
) -> list[str]:
    try:
        with prefill_injection(receiver.model, receiver.layer.path, inj):
            new_ids = generate_ids(
                receiver.model, receiver.tokenizer, ids, mask, settings, model_name=f"the receiver {receiver.ref.name}"
            )
    except NonFiniteLogits as err:
        check_finite_states(inj, condition, sample_ids)  # the more precise cause first: the injection block
        raise NonFiniteLogits(f"condition {condition}: {err}") from None
    # Stripped as the paper stores every generated text (scoring strips anyway).
    return [p.strip() for p in decode(receiver.tokenizer, new_ids)]


def check_finite_states(inj: PrefillInjection, condition: str, sample_ids: Sequence[str]) -> None:
    """Raise ``FloatingPointError`` when the receiver's block output or the injected state of a sample is not finite.

    The norms are fp32 means over each row's real positions, so one NaN or infinity anywhere in a row shows.
    """
    for what, norms in (
        ("receiver's block output", inj.receiver_norm_mean),
        ("injected state", inj.injected_norm_mean),
    ):
        bad = [] if norms is None else [sid for sid, ok in zip(sample_ids, torch.isfinite(norms).tolist()) if not ok]
        if bad:
            raise FloatingPointError(
                f"condition {condition}: the {what} at the injection block is NaN or infinite for {len(bad)} "
                f"sample(s), e.g. {', '.join(map(str, bad[:5]))}; a model or translator weight is broken or the "
                "precision overflows (try --trainer.precision 32-true)"
            )


def _diagnostics(inj: PrefillInjection, mask: torch.Tensor) -> list[dict]:
    return [
        {
            "prompt_len": int(n),
            "translated_norm_mean": None,
            "receiver_norm_mean": float(inj.receiver_norm_mean[i]),
            "injected_norm_mean": None if inj.injected_norm_mean is None else float(inj.injected_norm_mean[i]),
        }
        for i, n in enumerate(mask.sum(1).tolist())
    ]


def answer_injected(
    receiver: LoadedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    settings: GenerationSettings,
    spec: ConditionSpec,
    sample_ids: Sequence[str],
    source: torch.Tensor | None,
    translated_rows: Sequence[torch.Tensor] | None = None,
    donor_ids: Sequence[str] | None = None,
    write_mask: torch.Tensor | None = None,
) -> tuple[list[str], list[dict]]:
    """Answer the prompts ``ids`` while ``spec`` writes ``source`` at prefill.

    Args:
        receiver: The frozen receiver and its block.
        ids: Receiver token ids (B, T), left padded.
        mask: Their attention mask.
        settings: Decoding settings.
        spec: The condition (mode, alpha, scale).
        sample_ids: One id per row (named when a state is not finite).
        source: What :func:`sources.condition_source` returned for this sub-batch.
        translated_rows: Per-sample translated sequences behind ``source`` (``translated_norm_mean`` is the norm of
            what was written, as the paper records it; ``translated_norm_mean_all_positions`` their mean norm).
        donor_ids: Per-sample shuffled donor (recorded as ``donor_id``).
        write_mask: Where the hook writes (and measures its norms), (B, T); default ``mask``. The split protocol
            passes its slot mask, so only the slots are written.
    """
    inj = PrefillInjection(
        mask if write_mask is None else write_mask, mode=spec.mode, source=source, alpha=spec.alpha, scale=spec.scale
    )
    preds = _generate(receiver, ids, mask, settings, inj, spec.name, sample_ids)
    check_finite_states(inj, spec.name, sample_ids)
    diags = _diagnostics(inj, mask)
    for i, d in enumerate(diags):
        if translated_rows is not None:
            # The paper's field: the norm of what the translator contributed (additive: the last-token vector).
            d["translated_norm_mean"] = float(inj.source_norm[i])
            d["translated_norm_mean_all_positions"] = float(translated_rows[i].float().norm(dim=-1).mean())
        if donor_ids is not None:
            d["donor_id"] = donor_ids[i]
    return preds, diags


def answer_relay(
    sender: LoadedModel,
    receiver: LoadedModel,
    sample_ids: Sequence[str],
    contexts: Sequence[str],
    questions: Sequence[str],
    settings: GenerationSettings,
) -> tuple[list[str], list[dict]]:
    """``nl_relay``: the sender continues ``{context}\\n\\nKey facts:``, the receiver answers from that relay alone.

    The receiver runs under a hook that writes nothing, so its norms are recorded (and checked) as in every other
    condition.
    """
    stok = tokenize_left_padded(
        sender.tokenizer, [format_relay_sender_prompt(c) for c in contexts], settings.max_prompt_tokens
    )
    try:
        relay_ids = generate_ids(
            sender.model,
            sender.tokenizer,
            stok["input_ids"],
            stok["attention_mask"],
            settings,
            settings.relay_max_new_tokens,
            model_name=f"the sender {sender.ref.name}",
        )
    except NonFiniteLogits as err:
        raise NonFiniteLogits(f"condition nl_relay (the relay): {err}") from None
    relays = [r.strip() for r in decode(sender.tokenizer, relay_ids)]  # the paper strips the relay before use
    rtok = tokenize_left_padded(
        receiver.tokenizer,
        [format_relay_receiver_prompt(r, q) for r, q in zip(relays, questions)],
        settings.max_prompt_tokens,
    )
    inj = PrefillInjection(rtok["attention_mask"])
    preds = _generate(receiver, rtok["input_ids"], rtok["attention_mask"], settings, inj, "nl_relay", sample_ids)
    check_finite_states(inj, "nl_relay", sample_ids)
    diags = _diagnostics(inj, rtok["attention_mask"])
    for d, relay in zip(diags, relays):
        d["injected_norm_mean"] = None
        d["relay"] = relay
    return preds, diags
