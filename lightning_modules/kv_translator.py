"""KVTranslatorModule: trains a KV projector *for use*, through the frozen receiver (KV protocol).

Per batch: the frozen sender reads context + question; its block-Ls states at the context tokens go through the
:class:`KVProjector` to a key and a value per head at each chosen receiver layer; the frozen receiver reads
``question + answer`` after that attention prefix (keys rotated at the context positions, the question continuing
after them, exactly as ``protocols/kv.py`` answers), and the functional objectives (``answer_ce`` on the gold answer,
or ``distill`` from the receiver that reads the whole prompt) backpropagate through the receiver into the projector.
The frozen LMs, the steps, the logging and the optimizer are the functional trainer's (a subclass); only the student
differs. The hparams carry the identities the loader checks and ``training.kind: kv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Literal

import pytorch_lightning as pl
import torch

from activation_transfer.injection.kv_prefix import assemble, geometry, prefixed_forward, resolve_layers
from activation_transfer.injection.slots import SlotSpec, left_padded
from activation_transfer.injection.sources import left_grid
from activation_transfer.models.frozen_lm import ModelRef, as_ref, load_ref
from activation_transfer.translators.architectures import build_translator
from activation_transfer.translators.functional_loss import (
    IGNORE,
    answer_accuracy,
    answer_ce,
    answer_labels,
    answer_logits,
    build_batch,
    check_training_options,
    distill_kl,
)
from activation_transfer.translators.optim import OptimizerArgs, document_optimizer_args
from callbacks.val_metrics import validation_means
from lightning_modules.functional_translator import DEFAULTS, FunctionalTranslatorModule

PROJECTOR_CLASS = "activation_transfer.translators.kv_projector.KVProjector"


def kv_batch(
    samples,
    sender_tokenizer,
    receiver_tokenizer,
    max_context_tokens: int,
    max_q: int,
    max_a: int,
    answers=None,
    memo: dict | None = None,
):
    """The functional trainer's layouts (:func:`build_batch`: sender ``context + question``, teacher full prompt +
    answer; ``memo`` its token memo) and the KV student: the teacher's rows without their context part, i.e.
    ``question + answer + EOS`` left padded, with the same answer labels."""
    spec = SlotSpec(max_context_tokens=max_context_tokens)
    batch = build_batch(samples, sender_tokenizer, receiver_tokenizer, spec, max_q, max_a, answers, memo)
    teacher = batch["teacher"]
    rows = [teacher["input_ids"][i, sl.stop :].tolist() for i, sl in enumerate(teacher["context_slices"])]
    ids, mask = left_padded(rows, receiver_tokenizer.eos_token_id)
    lengths = teacher["labels"].ne(IGNORE).sum(dim=1).tolist()
    batch["student"] = {"input_ids": ids, "attention_mask": mask, "labels": answer_labels(ids, lengths)}
    return batch


@document_optimizer_args
class KVTranslatorModule(FunctionalTranslatorModule, pl.LightningModule):  # named: tests/test_architecture.py
    """Learn a sender -> receiver KV projector whose attention prefix makes the frozen receiver answer.

    Args:
        sender_model: Sender model and block Ls whose context states are projected; frozen.
        receiver_model: Receiver model (its ``layer`` is only recorded: the prefix goes to attention layers); frozen.
        layers: Receiver attention layers that get a prefix (None: all; negative: from the end).
        gate: A learned sigmoid gate per layer on the projected values (C2C-like).
        objective: ``answer_ce`` (gold answer cross-entropy) or ``distill`` (KL from the full-context receiver).
        distill_on: What ``distill`` teacher-forces both receivers on: ``gold`` or ``teacher_greedy``.
        distill_temperature: Softmax temperature of ``distill`` (the KL is scaled by T^2).
        max_context_tokens: Context tokens kept (right truncation): prefix entries per sample.
        max_question_tokens: Question-part tokens kept (right truncation).
        max_answer_tokens: Answer tokens kept before the EOS (right truncation).
        sender_site: Where the sender is read: ``block`` (the output of ``sender_model.layer``) or ``embeddings``
            (its token embeddings: the ``kv_functional_lexical`` control). Recorded in the training spec; the
            evaluation refuses a projector read at another site.
        sender_cache_mb: Most MiB of frozen sender context states computed once at the start of fit and reused every
            epoch (0: the sender runs on every batch), as the functional trainer's.
        <optimizer args>
        cache_dir: Project cache folder (offline tokenizer, organisms).
    """

    def __init__(
        self,
        sender_model: ModelRef,
        receiver_model: ModelRef,
        layers: Sequence[int] | None = None,
        gate: bool = False,
        objective: Literal["answer_ce", "distill"] = "answer_ce",
        distill_on: Literal["gold", "teacher_greedy"] = "gold",
        distill_temperature: float = 1.0,
        max_context_tokens: int = 224,
        max_question_tokens: int = 64,
        max_answer_tokens: int = 16,
        sender_site: Literal["block", "embeddings"] = "block",
        sender_cache_mb: float = 1024.0,
        lr: float = DEFAULTS.lr,
        weight_decay: float = DEFAULTS.weight_decay,
        betas: tuple[float, float] = DEFAULTS.betas,
        warmup_steps: int = DEFAULTS.warmup_steps,
        decay: Literal["linear", "constant"] = DEFAULTS.decay,
        min_lr_ratio: float = DEFAULTS.min_lr_ratio,
        cache_dir: str | None = None,
    ):
        args = {k: v for k, v in locals().items() if k not in ("self", "sender_model", "receiver_model", "layers")}
        pl.LightningModule.__init__(self)  # not the functional trainer's: it builds a slot translator
        self.val_means = validation_means()
        check_training_options(
            objective,
            distill_on,
            distill_temperature,
            sender_site,
            sender_cache_mb,
            max_context_tokens=max_context_tokens,
            max_question_tokens=max_question_tokens,
            max_answer_tokens=max_answer_tokens,
        )
        self.optimizer_args = OptimizerArgs.of(locals())
        # The inherited teacher reads the full prompt with this context bound (teacher_answers, full_prompts).
        self.slot_spec = SlotSpec(max_context_tokens=max_context_tokens)
        # Given explicitly: Lightning collects a subclass's arguments only from an __init__ that calls super().
        self.save_hyperparameters(args, logger=False)
        self.sender_lm = load_ref(sender_model, cache_dir)
        self.receiver_lm = load_ref(receiver_model, cache_dir)
        for lm in (self.sender, self.receiver):
            lm.requires_grad_(False).eval()
        d_s, d_r = int(self.sender_lm.identity()["hidden_size"]), int(self.receiver_lm.identity()["hidden_size"])
        num_layers, heads, _ = geometry(self.receiver)
        self.layers = resolve_layers(layers, num_layers)
        spec = {"class_path": PROJECTOR_CLASS, "init_args": {"num_heads": heads, "layers": self.layers, "gate": gate}}
        option = None if layers is None else [int(i) for i in layers]
        self.hparams.update(
            sender_model=asdict(as_ref(sender_model)),
            receiver_model=asdict(as_ref(receiver_model)),
            layers=option,
            translator=spec,
            normalize=False,  # the projector layer-normalizes its input itself
            mse_weight=0.0,
            betas=[float(b) for b in betas],
            sender_dim=d_s,
            receiver_dim=d_r,
            sender=self.sender_lm.identity(),
            receiver=self.receiver_lm.identity(),
            loss=f"kv:{objective}",
            training={
                "kind": "kv",
                "protocol": "kv",
                "objective": objective,
                "distill_on": distill_on if objective == "distill" else None,
                "max_context_tokens": max_context_tokens,
                "sender_site": sender_site,
                "contexts": "own",  # set from the data module at setup (the functional trainer's setup)
                "slots": {"layers": option},  # what the evaluation's KVProtocol.translator_slots() must equal
            },
        )
        self.translator = build_translator(spec, d_s, d_r)

    # -- one batch ------------------------------------------------------------------------------------------------

    def projected(self, sender_layout: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unrotated keys and values ``(S, B, H, P, hd)`` of the context tokens (differentiable in the projector)
        and the prefix mask ``(B, P)``, as ``KVProtocol.project`` builds them."""
        rows = self.sender_states(sender_layout)  # frozen: no grad
        grid = left_grid(rows, max(len(r) for r in rows), rows[0].shape[-1], rows[0].dtype, self.device)
        keys, values = self.translator(grid)
        return keys, values, left_padded([[0] * len(r) for r in rows], 0)[1].to(self.device)

    def prefixed_logits(self, layout: dict, keys, values, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The receiver's logits at the positions predicting the layout's answer tokens after the prefix, and the
        tokens (only the last ``longest answer + 1`` columns go through the LM head)."""
        labels = layout["labels"].to(self.device)
        keep = int(labels.ne(IGNORE).sum(dim=1).max()) + 1
        prefix = assemble(self.receiver, self.layers, keys, values, mask, rotate=True)
        out = prefixed_forward(
            self.receiver, prefix, layout["input_ids"], layout["attention_mask"], logits_to_keep=keep, use_cache=False
        )
        return answer_logits(out.logits, labels[:, -keep:])

    def losses(self, samples) -> dict[str, torch.Tensor]:
        """Every loss term and metric of a batch (``ce``, ``token_acc``, ``exact``, ``kl`` under distill; ``loss``
        is what is optimized), as the functional trainer's."""
        h = self.hparams
        greedy = h.objective == "distill" and h.distill_on == "teacher_greedy"
        answers = self.teacher_answers(samples) if greedy else None
        batch = kv_batch(
            samples,
            self.sender_lm.tokenizer,
            self.receiver_lm.tokenizer,
            h.max_context_tokens,
            h.max_question_tokens,
            h.max_answer_tokens,
            answers,
            self.token_memo,
        )
        student, targets = self.prefixed_logits(batch["student"], *self.projected(batch["sender"]))
        lengths = batch["student"]["labels"].ne(IGNORE).sum(dim=1).tolist()
        out = {"ce": answer_ce(student, targets), **answer_accuracy(student.detach(), targets, lengths)}
        out["loss"] = out["ce"]
        if h.objective == "distill":
            with torch.no_grad():
                teacher_logits, _ = self.answer_logits(batch["teacher"])
            out["kl"] = distill_kl(student, teacher_logits, h.distill_temperature)
            out["loss"] = out["kl"]
        return out

    # The functional trainer's, and the context bound that decides the prefix each sample trains with.
    RESUME_KEYS = (*FunctionalTranslatorModule.RESUME_KEYS, "max_context_tokens")


__all__ = ["KVTranslatorModule", "kv_batch"]
