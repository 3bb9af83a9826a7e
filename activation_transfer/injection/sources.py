"""What a paper-protocol condition writes into the receiver for one left-padded sub-batch of prompts.

The conditions differ only in those vectors (translated, shuffled, random, the receiver's own, zeros). Translations
are computed once per sample and translator (:func:`translate_prompts`) because a shuffled donor may sit in another
batch or rank; the functions here only look them up and lay them out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from activation_transfer.errors import UsageError
from activation_transfer.injection.conditions import (
    SOURCE_RANDOM,
    SOURCE_RECEIVER,
    SOURCE_SHUFFLED,
    SOURCE_TRANSLATED,
    SOURCE_ZEROS,
    ConditionSpec,
    Derangement,
    random_vectors,
    sequential_random_vectors,
)
from activation_transfer.injection.eval_plan import EvalPlan
from activation_transfer.models.frozen_lm import LoadedModel
from activation_transfer.models.hooks import capture_hidden, get_module
from activation_transfer.report.records import run_key
from activation_transfer.task.prompts import tokenize_left_padded


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as Hugging Face ``generate`` builds them (pads get 1)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def capture_block(model, path: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The block output for a left-padded batch, with the same position ids the ``generate`` prefill uses."""
    return capture_hidden(model, path, ids, mask, position_ids=position_ids(mask))


# Where the sender is read: its block output (``sender.layer``), or the token embeddings that enter block 0
# (``hidden_states[0]``): a translator on those sees which tokens the context held, nothing the sender computed.
SENDER_SITES = ("block", "embeddings")


class _Captured(Exception):
    """Raised in the block-0 pre-hook: nothing after the embeddings is needed."""


@torch.no_grad()
def capture_site(model, path: str, ids: torch.Tensor, mask: torch.Tensor, site: str = "block") -> torch.Tensor:
    """The sender states at ``site``: ``block`` (the output of the block at ``path``, :func:`capture_block`) or
    ``embeddings`` (the input of block 0 of the same stack, which is ``hidden_states[0]``)."""
    if site == "block":
        return capture_block(model, path, ids, mask)
    if site not in SENDER_SITES:
        raise UsageError(f"sender site must be one of {', '.join(SENDER_SITES)}, got {site!r}")
    captured: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Captured

    first = get_module(model, path.rsplit(".", 1)[0] + ".0")
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids(mask).to(device),
            use_cache=False,
        )
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured[0]


def left_grid(rows: list[torch.Tensor], width: int, hidden: int, dtype, device) -> torch.Tensor:
    """Place per-sample (L_i, H) tensors at the right end of a zero (B, width, H) grid (left padding)."""
    grid = torch.zeros((len(rows), width, hidden), dtype=dtype, device=device)
    for i, r in enumerate(rows):
        if len(r):
            grid[i, width - len(r) :] = r.to(device=device, dtype=dtype)
    return grid


@torch.no_grad()
def translate_prompts(
    sender: LoadedModel,
    translators: Sequence,
    sample_ids: Sequence[str],
    prompts: Sequence[str],
    batch_size: int,
    max_prompt_tokens: int,
    dtype: torch.dtype,
) -> list[dict[str, torch.Tensor]]:
    """Each translator's sequence (L_i, d_r) for every sample, in ``dtype``, on the sender's device: one dict per
    translator. The sender reads each batch once for all translators (its states do not depend on them).

    Args:
        sender: The frozen sender and its block.
        translators: Modules with ``translate(h)`` mapping (B, T, d_s) to (B, T, d_r).
        sample_ids: One id per prompt.
        prompts: The prompts, tokenized as the receiver's are (left padded, right truncated).
        batch_size: Prompts per sender forward pass.
        max_prompt_tokens: Prompt truncation length.
        dtype: Dtype of the returned rows (the receiver's).
    """
    out: list[dict[str, torch.Tensor]] = [{} for _ in translators]
    for start in range(0, len(prompts), batch_size):
        tok = tokenize_left_padded(sender.tokenizer, list(prompts[start : start + batch_size]), max_prompt_tokens)
        h = capture_block(sender.model, sender.layer.path, tok["input_ids"], tok["attention_mask"])
        lengths = tok["attention_mask"].sum(1).tolist()
        for translator, rows in zip(translators, out):
            tr = translator.translate(h.to(next(translator.parameters()).dtype)).to(dtype)
            width = tr.shape[1]
            for i, n in enumerate(lengths):
                rows[sample_ids[start + i]] = tr[i, width - int(n) :]
    return out


def random_draws(
    plan: EvalPlan, lengths: Sequence[tuple[str, int]], hidden: int, per_sample: bool = False
) -> dict[int, dict[str, torch.Tensor]]:
    """Per seed of a pending random run with samples left: every sample's Gaussian vectors (L_i, hidden), fp32, CPU.

    Args:
        plan: The evaluation plan.
        lengths: ``(sample_id, L_i)`` of every sample in dataset order: the sequential draw (the paper's) runs through
            all of them, also those a resumed run skips, since each draw advances the generator.
        hidden: The receiver's hidden size.
        per_sample: Draw with ``random_vectors`` (one generator per sample) instead.
    """
    seeds = {sd for s, sd in plan.pending if s.source == SOURCE_RANDOM and plan.todo[run_key(s.name, sd)]}
    if per_sample:
        return {seed: {sid: random_vectors(seed, sid, int(n), hidden) for sid, n in lengths} for seed in seeds}
    return {seed: sequential_random_vectors(seed, lengths, hidden) for seed in seeds}


def check_finite_rows(
    rows: Sequence[torch.Tensor], condition: str, sample_ids: Sequence[str], owners: Sequence[str]
) -> None:
    """Raise ``FloatingPointError`` naming the samples whose translated rows (of sample ``owners[i]``) hold NaN/inf."""
    bad = [(sid, o) for sid, o, r in zip(sample_ids, owners, rows) if not bool(torch.isfinite(r).all())]
    if bad:
        shown = ", ".join(str(sid) if sid == o else f"{sid} (donor {o})" for sid, o in bad[:5])
        raise FloatingPointError(
            f"condition {condition}: the translated states are NaN or infinite for {len(bad)} sample(s), e.g. "
            f"{shown}; the sender's states or the translator overflow (try --trainer.precision 32-true)"
        )


def condition_source(
    spec: ConditionSpec,
    seed: int | None,
    sample_ids: Sequence[str],
    ids: torch.Tensor,
    mask: torch.Tensor,
    receiver: LoadedModel,
    translated: Mapping[str, torch.Tensor] | None = None,
    derangement: Derangement | None = None,
    random_rows: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
    """The vectors ``spec`` writes for a sub-batch, and the translated rows it used (for diagnostics).

    Args:
        spec: The condition.
        seed: The run seed (random vectors; with ``derangement``, the shuffle).
        sample_ids: The sub-batch's sample ids, one per row of ``ids``.
        ids: Receiver token ids (B, T), left padded.
        mask: Their attention mask.
        receiver: The frozen receiver and its block (dtype, device, hidden size, own states).
        translated: Sample id -> translated sequence (L_i, d_r), for the translator conditions.
        derangement: The seed's donor map, for the shuffled conditions.
        random_rows: Sample id -> the seed's sequential random vectors (the paper's draw); None: the per-sample
            draw (``conditions.random_vectors``).

    Returns:
        ``(source, rows)``: ``source`` is (B, T, d_r), or (B, d_r) (the last translated vector) for ``additive``,
        or None when nothing is written; ``rows`` are the per-sample translated sequences or None.
    """
    width = ids.shape[1]
    hidden = receiver.identity()["hidden_size"]
    param = next(receiver.model.parameters())
    dtype, device = param.dtype, param.device
    if spec.source in (SOURCE_TRANSLATED, SOURCE_SHUFFLED):
        owners = [derangement.donors[sid] for sid in sample_ids] if spec.source == SOURCE_SHUFFLED else sample_ids
        rows = [translated[sid] for sid in owners]
        check_finite_rows(rows, spec.name, sample_ids, owners)
        if spec.source == SOURCE_TRANSLATED and spec.mode == "additive":
            return torch.stack([r[-1] for r in rows]), rows
        return left_grid(rows, width, hidden, dtype, device), rows
    if spec.source == SOURCE_RANDOM:
        if random_rows is not None:
            rows = [random_rows[sid] for sid in sample_ids]
        else:
            rows = [random_vectors(seed, sid, int(n), hidden) for sid, n in zip(sample_ids, mask.sum(1).tolist())]
        return left_grid(rows, width, hidden, dtype, device), None
    if spec.source == SOURCE_RECEIVER:
        return capture_block(receiver.model, receiver.layer.path, ids, mask), None
    if spec.source == SOURCE_ZEROS:
        return torch.zeros((len(sample_ids), width, hidden), dtype=dtype, device=device), None
    return None, None
