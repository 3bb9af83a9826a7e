"""The split-context protocol's slots: where the receiver receives what only the sender has read.

Both sides tokenize the prompt as a context part and a question part (together the paper's prompt), so the sender's
context positions are known exactly; the receiver reads K slot tokens then the question part. :class:`SlotSpec`
says which context positions feed the slots: every one, the last ``k``, or their mean repeated ``k`` times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from activation_transfer.errors import UsageError
from activation_transfer.task.prompts import split_prompt

SLOT_SCHEMES = ("all", "last", "pooled")


@dataclass(frozen=True)
class SlotSpec:
    """Which sender states go into how many receiver slots.

    Args:
        scheme: ``all`` (one slot per context token), ``last`` (the last ``k`` context positions) or ``pooled``
            (the mean over the context positions, in ``k`` slots).
        k: Slots of ``last``/``pooled`` (ignored by ``all``).
        token_id: Token id of a slot (None: the receiver tokenizer's EOS, as in the measurement the protocol is
            built on).
        max_context_tokens: Context tokens kept (right truncation), which bounds K for ``all``.
    """

    scheme: str = "all"
    k: int = 1
    token_id: int | None = None
    max_context_tokens: int = 224

    def __post_init__(self) -> None:
        if self.scheme not in SLOT_SCHEMES:
            raise UsageError(f"slots.scheme must be one of {', '.join(SLOT_SCHEMES)}, got {self.scheme!r}")
        if self.k < 1:
            raise UsageError(f"slots.k must be >= 1, got {self.k}")
        if self.max_context_tokens < 1:
            raise UsageError(f"slots.max_context_tokens must be >= 1, got {self.max_context_tokens}")

    def to_dict(self) -> dict:
        return asdict(self)

    def count(self, n_context: int) -> int:
        """K for a context of ``n_context`` tokens."""
        if self.scheme == "all":
            return n_context
        return min(self.k, n_context) if self.scheme == "last" else self.k

    def pick(self, states: torch.Tensor) -> torch.Tensor:
        """The slot vectors ``(K, H)`` from a sample's context states ``(n_context, H)``."""
        if self.scheme == "all":
            return states
        if self.scheme == "last":
            return states[-self.k :]
        return states.mean(dim=0, keepdim=True).expand(self.k, -1)


def check_slots_fit(spec: SlotSpec, receiver, option: str = "--model.slots") -> None:
    """Raise :class:`UsageError` when ``spec`` does not fit the receiver: a slot ``token_id`` outside its vocabulary
    (an ``IndexError`` deep in the embedding), or more slots than its positions leave room for (a question after
    them): both would otherwise fail late or run on positions the model never saw.

    Args:
        spec: The slot spec.
        receiver: The receiver (a ``LoadedModel``).
        option: The option prefix named in the message (``--model.slots``).
    """
    model = receiver.model
    name = receiver.ref.name
    vocab = int(model.get_input_embeddings().num_embeddings)
    if spec.token_id is not None and not 0 <= int(spec.token_id) < vocab:
        raise UsageError(
            f"{option}.token_id {spec.token_id} is not a token of the receiver {name}: pick an id in 0..{vocab - 1}, "
            "or null (its EOS token)"
        )
    limit = getattr(model.config, "max_position_embeddings", None)
    most = {"all": spec.max_context_tokens, "last": min(spec.k, spec.max_context_tokens), "pooled": spec.k}
    if limit is not None and most[spec.scheme] >= int(limit):
        by_context = spec.scheme == "all" or (spec.scheme == "last" and spec.max_context_tokens <= spec.k)
        what = f"{option}.max_context_tokens {spec.max_context_tokens}" if by_context else f"{option}.k {spec.k}"
        raise UsageError(
            f"{what} gives up to {most[spec.scheme]} slots ({option}.scheme {spec.scheme}), but the receiver {name} "
            f"has {limit} positions and the question must follow the slots: use fewer than {limit}"
        )


def encode_parts(
    tokenizer, contexts: Sequence[str], questions: Sequence[str], max_context_tokens: int, max_question_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the context parts and of the question parts (no special tokens, right truncation)."""
    parts = [split_prompt(c, q) for c, q in zip(contexts, questions, strict=True)]
    enc = dict(add_special_tokens=False, truncation=True)
    ctx = tokenizer([p for p, _ in parts], max_length=max_context_tokens, **enc)["input_ids"]
    qst = tokenizer([q for _, q in parts], max_length=max_question_tokens, **enc)["input_ids"]
    return [list(r) for r in ctx], [list(r) for r in qst]


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token rows, left padded with ``pad_id``."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def sender_batch(context_rows: Sequence[Sequence[int]], question_rows: Sequence[Sequence[int]], pad_id: int) -> dict:
    """The sender's full prompts (context part + question part), left padded, and where each context part sits.

    Returns:
        ``input_ids``, ``attention_mask`` (B, T) and ``context_slices``: per row the ``slice`` of its context
        positions in the padded batch.
    """
    rows = [list(c) + list(q) for c, q in zip(context_rows, question_rows, strict=True)]
    ids, mask = left_padded(rows, pad_id)
    width = ids.shape[1]
    slices = [slice(width - len(r), width - len(r) + len(c)) for r, c in zip(rows, context_rows)]
    return {"input_ids": ids, "attention_mask": mask, "context_slices": slices}


def receiver_batch(
    question_rows: Sequence[Sequence[int]], slot_counts: Sequence[int], slot_id: int, pad_id: int
) -> dict:
    """The receiver's prompts ``[slot] * K_i + question part``, left padded, and the slot positions.

    Returns:
        ``input_ids``, ``attention_mask`` and ``slot_mask`` (B, T): 1 exactly on each row's K_i slot tokens.
    """
    rows = [[slot_id] * int(k) + list(q) for q, k in zip(question_rows, slot_counts, strict=True)]
    ids, mask = left_padded(rows, pad_id)
    slot_mask = torch.zeros_like(mask)
    width = ids.shape[1]
    for i, (row, k) in enumerate(zip(rows, slot_counts)):
        start = width - len(row)
        slot_mask[i, start : start + int(k)] = 1
    return {"input_ids": ids, "attention_mask": mask, "slot_mask": slot_mask}


def slot_grid(vectors: Sequence[torch.Tensor], slot_mask: torch.Tensor, dtype=None, device=None) -> torch.Tensor:
    """Place each row's slot vectors ``(K_i, H)`` at its slot positions of a zero ``(B, T, H)`` grid.

    Differentiable in ``vectors`` (functional training backpropagates through it).
    """
    if len(vectors) != slot_mask.shape[0]:
        raise ValueError(f"{len(vectors)} rows of slot vectors for a batch of {slot_mask.shape[0]}")
    hidden = vectors[0].shape[-1]
    dtype = dtype or vectors[0].dtype
    device = device or slot_mask.device
    rows = []
    for v, m in zip(vectors, slot_mask):
        k = int(m.sum())
        if v.shape[0] != k:
            raise ValueError(f"a row has {k} slots but {v.shape[0]} slot vectors")
        row = torch.zeros((slot_mask.shape[1], hidden), dtype=dtype, device=device)
        rows.append(row.index_put((m.nonzero(as_tuple=True)[0].to(device),), v.to(device=device, dtype=dtype)))
    return torch.stack(rows)
