"""Functional translator training, the tensor side: the token layouts of one batch (:func:`build_batch`: the
sender's ``context + question``, the student receiver's ``[slot] * K + question + answer + EOS``, the teacher
receiver's full prompt + answer + EOS, all left padded) and the losses on the positions that predict the answer,
which pair up one to one between student and teacher rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from activation_transfer.errors import UsageError
from activation_transfer.injection.slots import SlotSpec, encode_parts, receiver_batch, sender_batch
from activation_transfer.injection.sources import SENDER_SITES

IGNORE = -100
OBJECTIVES = ("answer_ce", "distill")
DISTILL_ON = ("gold", "teacher_greedy")


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise UsageError(f"model.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


def check_training_options(
    objective: str, distill_on: str, distill_temperature: float, sender_site: str, sender_cache_mb: float, **bounds
) -> None:
    """The options the functional and the KV translator modules share, checked as bad input (one line, exit 2).

    ``bounds``: token limits (``max_question_tokens=64``, ...), each of which must be >= 1.
    """
    check_objective(objective)
    if distill_on not in DISTILL_ON:
        raise UsageError(f"model.distill_on must be one of {', '.join(DISTILL_ON)}, got {distill_on!r}")
    if distill_temperature <= 0:
        raise UsageError(f"model.distill_temperature must be > 0, got {distill_temperature}")
    for name, n in bounds.items():
        if n < 1:
            raise UsageError(f"model.{name} must be >= 1, got {n}")
    if sender_site not in SENDER_SITES:
        raise UsageError(f"model.sender_site must be one of {', '.join(SENDER_SITES)}, got {sender_site!r}")
    if sender_cache_mb < 0:
        raise UsageError(f"model.sender_cache_mb must be >= 0, got {sender_cache_mb}")


def answer_rows(tokenizer, answers: Sequence[str], max_answer_tokens: int) -> list[list[int]]:
    """Token ids of `` {answer}`` (right truncation) followed by EOS: what the receiver must produce."""
    rows = tokenizer(
        [" " + a for a in answers], add_special_tokens=False, truncation=True, max_length=max_answer_tokens
    )["input_ids"]
    return [list(r) + [tokenizer.eos_token_id] for r in rows]


def answer_labels(input_ids: torch.Tensor, answer_lengths: Sequence[int]) -> torch.Tensor:
    """``input_ids`` on each row's last ``answer_lengths[i]`` columns (the answer and EOS), ``IGNORE`` elsewhere."""
    labels = torch.full_like(input_ids, IGNORE)
    width = input_ids.shape[1]
    for i, n in enumerate(answer_lengths):
        labels[i, width - int(n) :] = input_ids[i, width - int(n) :]
    return labels


def build_batch(
    samples,
    sender_tokenizer,
    receiver_tokenizer,
    spec: SlotSpec,
    max_question_tokens: int,
    max_answer_tokens: int,
    answer_ids: Sequence[Sequence[int]] | None = None,
    memo: dict | None = None,
) -> dict:
    """Tokenize QA samples (``context``, ``question``, ``answer``) into the three layouts of the module docstring.

    ``answer_ids`` (receiver token rows ending with EOS, e.g. the full-context receiver's own greedy answers) replace
    the gold answers as the teacher-forced sequence when given. ``memo`` (a dict kept by the caller for one set of
    tokenizers and bounds) holds each sample's token rows: every epoch then tokenizes nothing again.

    Returns:
        ``{"sender": sender_batch(...), "student": receiver_batch(...) + labels, "teacher": sender_batch(...) of the
        receiver's full prompt + labels, "slot_counts": [K_i]}``.

    Raises:
        ValueError: A sample whose context part has no token (no slot could carry it).
    """
    memo = {} if memo is None else memo
    keys = [(s.context, s.question, s.answer) for s in samples]
    new = [k for k in dict.fromkeys(keys) if k not in memo]
    if new:
        contexts, questions, answers = (list(col) for col in zip(*new, strict=True))
        s_ctx, s_q = encode_parts(sender_tokenizer, contexts, questions, spec.max_context_tokens, max_question_tokens)
        r_ctx, r_q = encode_parts(receiver_tokenizer, contexts, questions, spec.max_context_tokens, max_question_tokens)
        rows = answer_rows(receiver_tokenizer, answers, max_answer_tokens)
        memo.update(zip(new, zip(s_ctx, s_q, r_ctx, r_q, rows, strict=True), strict=True))
    s_ctx, s_q, r_ctx, r_q, answers = (list(col) for col in zip(*(memo[k] for k in keys), strict=True))
    if any(not c for c in s_ctx):
        raise ValueError("a sample's context part has no sender token; the split protocol needs a context")
    if answer_ids is not None:
        answers = [list(a) for a in answer_ids]
    lengths = [len(a) for a in answers]
    counts = [spec.count(len(c)) for c in s_ctx]
    slot_id = receiver_tokenizer.eos_token_id if spec.token_id is None else int(spec.token_id)
    qa = [q + a for q, a in zip(r_q, answers, strict=True)]
    student = receiver_batch(qa, counts, slot_id, receiver_tokenizer.eos_token_id)
    student["labels"] = answer_labels(student["input_ids"], lengths)
    teacher = sender_batch(r_ctx, qa, receiver_tokenizer.eos_token_id)
    teacher["labels"] = answer_labels(teacher["input_ids"], lengths)
    return {
        "sender": sender_batch(s_ctx, s_q, sender_tokenizer.eos_token_id),
        "student": student,
        "teacher": teacher,
        "slot_counts": counts,
    }


def full_prompts(samples, receiver_tokenizer, spec: SlotSpec, max_question_tokens: int) -> dict:
    """The receiver's full prompts ``context part + question part`` (left padded): what the teacher answers."""
    ctx, qst = encode_parts(
        receiver_tokenizer,
        [s.context for s in samples],
        [s.question for s in samples],
        spec.max_context_tokens,
        max_question_tokens,
    )
    return sender_batch(ctx, qst, receiver_tokenizer.eos_token_id)


def until_eos(rows: torch.Tensor, eos_id: int) -> list[list[int]]:
    """Generated token rows cut after their first EOS (one is appended where none was generated)."""
    out = []
    for row in rows.tolist():
        out.append(row[: row.index(eos_id) + 1] if eos_id in row else [*row, eos_id])
    return out


def context_vectors(states: torch.Tensor, slices: Sequence[slice], spec: SlotSpec) -> list[torch.Tensor]:
    """Per row the slot-source vectors ``(K_i, H)`` picked by ``spec`` from its context positions of ``states``."""
    return [spec.pick(states[i, sl]) for i, sl in enumerate(slices)]


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits ``(N, V)`` of the N positions that predict an answer token, and those tokens ``(N,)``."""
    shifted = labels[:, 1:]
    keep = shifted != IGNORE
    return logits[:, :-1][keep], shifted[keep]


# The fixed cost of one receiver pass, in padded tokens (measured on the organisms, 1 CPU thread): what splitting a
# batch into one more length group must save to pay off.
GROUP_COST_TOKENS = 48


def length_groups(lengths: Sequence[int], pass_cost: int = GROUP_COST_TOKENS) -> list[list[int]]:
    """Row indices in groups of similar length, each to be padded only to its own longest row.

    The rows sorted by length are cut into the contiguous groups that minimize ``sum(rows x longest) + pass_cost x
    groups`` (dynamic programming): the padded tokens a left-padded batch computes, plus the cost of each pass.
    """
    order = sorted(range(len(lengths)), key=lambda i: (int(lengths[i]), i))
    size = [int(lengths[i]) for i in order]
    best, cut = [0] + [None] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * size[j - 1] + pass_cost
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def grouped_answer_logits(layout: dict, run, pass_cost: int = GROUP_COST_TOKENS):
    """:func:`answer_logits` of a left-padded ``layout`` computed per :func:`length_groups` group, in row order.

    Args:
        layout: ``input_ids``, ``attention_mask``, ``labels`` and optional ``slot_mask`` ``(B, T)``.
        run: ``run(sub_layout, rows) -> (logits, targets)`` of the rows ``rows``, their columns cut to the group's
            longest row (a row keeps its positions: they count from its first real token).
        pass_cost: :func:`length_groups`'s cost of a pass (0 groups nothing: one pass per distinct length).

    Returns:
        The logits ``(N, V)`` and targets ``(N,)`` of one pass over the whole batch, up to float reassociation (each
        row's positions are the same, only the padded width differs): the same loss, less padding computed.
    """
    lengths = layout["attention_mask"].sum(dim=1).tolist()
    groups = length_groups(lengths, pass_cost)
    keys = [k for k in ("input_ids", "attention_mask", "labels", "slot_mask") if k in layout]
    if len(groups) == 1:
        return run({k: layout[k] for k in keys}, list(range(len(lengths))))
    parts: list = [None] * len(lengths)
    for rows in groups:
        width = int(max(lengths[i] for i in rows))
        sub = {k: layout[k][rows, -width:] for k in keys}
        logits, targets = run(sub, rows)
        counts = sub["labels"].ne(IGNORE).sum(dim=1).tolist()
        for i, lg, tg in zip(rows, logits.split(counts), targets.split(counts), strict=True):
            parts[i] = (lg, tg)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def answer_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the gold answer tokens (EOS included), over all answer tokens of the batch."""
    return F.cross_entropy(logits.float(), targets)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per answer position, averaged over positions (scaled by T^2, as usual)."""
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def answer_accuracy(logits: torch.Tensor, targets: torch.Tensor, answer_lengths: Sequence[int]) -> dict:
    """Teacher-forced token accuracy and the fraction of rows whose every answer token (EOS included) is the argmax:
    exactly the rows that greedy decoding answers with the gold answer, computed without decoding."""
    right = (logits.argmax(dim=-1) == targets).float()
    rows = torch.split(right, [int(n) for n in answer_lengths])
    return {"token_acc": right.mean(), "exact": torch.stack([r.min() for r in rows]).mean()}
