"""FunctionalTranslatorModule: trains a translator *for use*, through the frozen receiver (split-context protocol).

Per batch: the frozen sender reads context + question; its block-Ls context states are translated and picked by the
:class:`SlotSpec` as the split evaluation does; the frozen receiver reads ``[slot] * K + question + answer`` with a
hook at block Lr writing those vectors at the slots, and the loss (``answer_ce`` on the gold answer, or ``distill``
from the receiver that reads the whole prompt, plus an optional MSE to the receiver's own context states)
backpropagates through the receiver into the translator. Only the translator is trained: the LMs are frozen and no
submodules (absent from the optimizer and the checkpoints). The hparams hold TranslatorModule's identity fields plus
``training`` (objective, slot spec, protocol), which the loader and the evaluation's slot check read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from activation_transfer.errors import UsageError
from activation_transfer.injection.conditions import apply_injection
from activation_transfer.injection.slots import SlotSpec, check_slots_fit, encode_parts, slot_grid
from activation_transfer.injection.sources import capture_block, capture_site, position_ids
from activation_transfer.models.frozen_lm import ModelRef, as_ref, load_ref
from activation_transfer.models.hooks import block_hook
from activation_transfer.task.prompts import over_length, split_prompt
from activation_transfer.translators.architectures import (
    LinearTranslator,
    Translator,
    build_translator,
    translator_spec,
)
from activation_transfer.translators.context_cache import ContextStateCache, context_rows
from activation_transfer.translators.export import apply_translator
from activation_transfer.translators.functional_loss import (
    IGNORE,
    answer_accuracy,
    answer_ce,
    answer_logits,
    build_batch,
    check_training_options,
    context_vectors,
    distill_kl,
    full_prompts,
    grouped_answer_logits,
    until_eos,
)
from activation_transfer.translators.loading import ResumableTraining
from activation_transfer.translators.optim import OptimizerArgs, document_optimizer_args
from callbacks.val_metrics import validation_means

log = logging.getLogger(__name__)
# The optimizer arguments' defaults: a larger rate and a shorter warmup than the aligned trainer's.
DEFAULTS = OptimizerArgs(lr=1e-3, warmup_steps=50)


@document_optimizer_args
class FunctionalTranslatorModule(ResumableTraining, pl.LightningModule):
    """Learn a sender -> receiver translator whose slot vectors make the frozen receiver answer.

    Args:
        sender_model: Sender model and block Ls (``{name, layer, dtype, ...}``); frozen.
        receiver_model: Receiver model and block Lr whose slot outputs are overwritten; frozen.
        translator: Translator architecture, built as ``translator(sender_dim, receiver_dim)`` (as TranslatorModule).
        normalize: L2-normalize the sender vectors before the map (the aligned translators' ``translate()``).
        objective: ``answer_ce`` (gold answer cross-entropy) or ``distill`` (KL from the full-context receiver).
        distill_on: What ``distill`` teacher-forces both receivers on: ``gold`` (the gold answer) or
            ``teacher_greedy`` (the full-context receiver's own greedy answer: no labels needed).
        mse_weight: Weight of the MSE between slot vectors and the receiver's own block-Lr context states (0: off).
        distill_temperature: Softmax temperature of ``distill`` (the KL is scaled by T^2).
        slots: Which sender context states feed how many slots (``scheme`` all/last/pooled, ``k``, ``token_id``,
            ``max_context_tokens``).
        max_question_tokens: Question-part tokens kept (right truncation).
        max_answer_tokens: Answer tokens kept before the EOS (right truncation).
        sender_site: Where the sender is read: ``block`` (the output of ``sender_model.layer``) or ``embeddings``
            (its token embeddings, the input of block 0: the ``slots_functional_lexical`` control, which carries
            which tokens the context held and nothing the sender computed). Recorded in the training spec; the
            evaluation refuses a translator read at another site.
        sender_cache_mb: Most MiB of frozen sender context states computed once at the start of fit and reused every
            epoch (:class:`ContextStateCache`; 0: the sender runs on every batch). A data set over it is not cached.
        group_by_length: Run the receiver on each batch in groups of rows of similar length (:func:`length_groups`),
            each padded only to its own longest row: the same loss and gradients up to float reassociation, less
            padding computed (a CPU speed-up; a GPU may prefer one pass).
        <optimizer args>
        cache_dir: Project cache folder (offline tokenizer, organisms).
    """

    def __init__(
        self,
        sender_model: ModelRef,
        receiver_model: ModelRef,
        translator: Callable[[int, int], Translator] = LinearTranslator,
        normalize: bool = True,
        objective: Literal["answer_ce", "distill"] = "answer_ce",
        mse_weight: float = 0.0,
        distill_on: Literal["gold", "teacher_greedy"] = "gold",
        distill_temperature: float = 1.0,
        slots: SlotSpec | None = None,
        max_question_tokens: int = 64,
        max_answer_tokens: int = 16,
        sender_site: Literal["block", "embeddings"] = "block",
        sender_cache_mb: float = 1024.0,
        group_by_length: bool = True,
        lr: float = DEFAULTS.lr,
        weight_decay: float = DEFAULTS.weight_decay,
        betas: tuple[float, float] = DEFAULTS.betas,
        warmup_steps: int = DEFAULTS.warmup_steps,
        decay: Literal["linear", "constant"] = DEFAULTS.decay,
        min_lr_ratio: float = DEFAULTS.min_lr_ratio,
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.val_means = validation_means()
        check_training_options(
            objective,
            distill_on,
            distill_temperature,
            sender_site,
            sender_cache_mb,
            max_question_tokens=max_question_tokens,
            max_answer_tokens=max_answer_tokens,
        )
        self.optimizer_args = OptimizerArgs.of(locals())  # checks the six optimizer arguments
        if mse_weight < 0:
            raise UsageError(f"model.mse_weight must be >= 0, got {mse_weight}")
        spec = translator_spec(translator)
        self.slot_spec = slots if isinstance(slots, SlotSpec) else SlotSpec(**(slots or {}))
        self.save_hyperparameters(ignore=["sender_model", "receiver_model", "translator", "slots"], logger=False)
        self.sender_lm = load_ref(sender_model, cache_dir)
        self.receiver_lm = load_ref(receiver_model, cache_dir)
        for lm in (self.sender, self.receiver):
            lm.requires_grad_(False).eval()
        check_slots_fit(self.slot_spec, self.receiver_lm)
        d_s, d_r = int(self.sender_lm.identity()["hidden_size"]), int(self.receiver_lm.identity()["hidden_size"])
        loss = f"functional:{objective}" + (f"+mse*{mse_weight:g}" if mse_weight else "")
        # Plain dicts/lists only, so checkpoints load with weights_only=True; the identity fields are
        # TranslatorModule's, so load_translator, the export and the evaluation's identity check read them alike.
        self.hparams.update(
            sender_model=asdict(as_ref(sender_model)),
            receiver_model=asdict(as_ref(receiver_model)),
            translator=spec,
            slots=self.slot_spec.to_dict(),
            betas=[float(b) for b in betas],
            sender_dim=d_s,
            receiver_dim=d_r,
            sender=self.sender_lm.identity(),
            receiver=self.receiver_lm.identity(),
            loss=loss,
            training={
                "kind": "functional",
                "protocol": "split",
                "objective": objective,
                "mse_weight": mse_weight,
                "distill_on": distill_on if objective == "distill" else None,
                "slots": self.slot_spec.to_dict(),
                "sender_site": sender_site,
                "contexts": "own",  # set from the data module at setup (QATrainingDataModule.mismatched_contexts)
            },
        )
        self.translator = build_translator(spec, d_s, d_r)

    def setup(self, stage: str) -> None:
        # What the translator learnt from is part of its training spec: the evaluation's mismatched control checks it.
        data = (getattr(self.trainer.datamodule, "hparams", None) or {}) if self._trainer is not None else {}
        self.hparams.training["contexts"] = "mismatched" if data.get("mismatched_contexts") else "own"

    # -- the map: the same contract as TranslatorModule.translate ----------------------------------------------

    def translate(self, x: torch.Tensor) -> torch.Tensor:
        """Map sender vectors ``(..., d_s)`` to ``(..., d_r)``: L2-normalize (if on), then apply the translator."""
        return apply_translator(self.translator, x, self.hparams.normalize)

    forward = translate

    # The frozen LMs are not submodules: Lightning's train() leaves them in eval mode, the optimizer and the
    # checkpoints (state_dict) never see them, and __init__ reloads them by name. _apply moves them with the module.

    @property
    def sender(self) -> torch.nn.Module:
        return self.sender_lm.model

    @property
    def receiver(self) -> torch.nn.Module:
        return self.receiver_lm.model

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for lm in (self.sender, self.receiver):
            lm._apply(fn, *args, **kwargs)
        return self

    # -- one batch ------------------------------------------------------------------------------------------------

    # -- what the frozen sender gives: computed once per context when the cache holds it ----------------------------

    @property
    def token_memo(self) -> dict:
        """Each sample's token rows (:func:`build_batch`'s memo): tokenizers and bounds are fixed for the module."""
        return self.__dict__.setdefault("_token_memo", {})

    def _sender_pass(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        site = self.hparams.get("sender_site", "block")  # the KV trainer reads the block
        return capture_site(self.sender, self.sender_lm.layer.path, ids.to(self.device), mask.to(self.device), site)

    def fill_context_cache(self, samples) -> None:
        """Compute the frozen sender's context states of ``samples`` once (at the start of fit: every training and
        validation sample), in an order fixed by the contexts alone; nothing when ``sender_cache_mb`` is 0 or the
        states would pass it."""
        mb = self.hparams.get("sender_cache_mb", 0)
        if not mb or not samples:
            return
        if self.__dict__.get("context_cache") is None:
            size = int(self.sender_lm.identity()["hidden_size"]) * next(self.sender.parameters()).element_size()
            eos = self.sender_lm.tokenizer.eos_token_id
            self.context_cache = ContextStateCache(self._sender_pass, size, mb * 2**20, eos)
        contexts, questions = [s.context for s in samples], [s.question for s in samples]
        n_ctx, n_q = self.slot_spec.max_context_tokens, self.hparams.max_question_tokens
        self.context_cache.fill(encode_parts(self.sender_lm.tokenizer, contexts, questions, n_ctx, n_q)[0])

    def sender_states(self, layout: dict) -> list[torch.Tensor]:
        """Per row of a ``sender_batch`` layout its frozen sender states at the context tokens ``(n_i, d_s)`` (no
        grad): from the context cache when it holds every row, else one sender pass over the full prompts."""
        cache = self.__dict__.get("context_cache")
        held = None if cache is None else cache.get(context_rows(layout))
        if held is not None:
            return [h.to(self.device) for h in held]
        states = self._sender_pass(layout["input_ids"], layout["attention_mask"])
        return [states[i, sl] for i, sl in enumerate(layout["context_slices"])]

    def slot_vectors(self, batch: dict) -> list[torch.Tensor]:
        """Per sample the slot vectors ``(K_i, d_r)`` (differentiable in the translator): the context positions'
        states translated, then picked by the SlotSpec, in the order the split evaluation uses (it matters for
        ``pooled``: the mean of translations)."""
        context = self.sender_states(batch["sender"])
        translated = self.translate(torch.cat(context)).split([len(c) for c in context])
        return [self.slot_spec.pick(t) for t in translated]

    def answer_logits(self, layout: dict, slots: list[torch.Tensor] | None = None):
        """The receiver's logits ``(N, V)`` at the N positions that predict a layout's answer tokens, and those
        tokens ``(N,)``; ``slots`` are written at the layout's slot positions at block Lr when given. Under
        ``group_by_length`` the rows pass the receiver in groups of similar length (:func:`grouped_answer_logits`).

        The answer ends every (left-padded) row, so the LM head runs on the last ``longest answer + 1`` columns only
        (``logits_to_keep``): a full-vocabulary head on every position would dominate the memory of a Pythia batch.
        """
        if not self.hparams.get("group_by_length", False):
            return self._answer_logits(layout, slots)
        return grouped_answer_logits(
            layout, lambda sub, rows: self._answer_logits(sub, None if slots is None else [slots[i] for i in rows])
        )

    def _answer_logits(self, layout: dict, slots: list[torch.Tensor] | None):
        ids, mask = layout["input_ids"].to(self.device), layout["attention_mask"].to(self.device)
        labels = layout["labels"].to(self.device)
        keep = int(labels.ne(IGNORE).sum(dim=1).max()) + 1
        inputs = dict(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False, logits_to_keep=keep
        )
        if slots is None:
            return answer_logits(self.receiver(**inputs).logits, labels[:, -keep:])
        slot_mask = layout["slot_mask"].to(self.device)
        grid = slot_grid(slots, slot_mask, device=self.device)

        def write(h: torch.Tensor) -> torch.Tensor:
            return apply_injection("replace", h, slot_mask, source=grid)[0]

        with block_hook(self.receiver, self.receiver_lm.layer.path, write):
            return answer_logits(self.receiver(**inputs).logits, labels[:, -keep:])

    def losses(self, samples) -> dict[str, torch.Tensor]:
        """Every loss term and metric of a batch of QA samples; ``loss`` is what is optimized.

        ``exact`` is the fraction of samples whose every answer token and EOS is the argmax under teacher forcing,
        i.e. exactly the samples that greedy decoding answers with the gold answer (no decoding needed). Under
        ``distill_on: teacher_greedy``, ``ce``/``token_acc``/``exact`` compare with the teacher's answer instead.
        """
        h = self.hparams
        greedy = h.objective == "distill" and h.distill_on == "teacher_greedy"
        answers = self.teacher_answers(samples) if greedy else None
        batch = build_batch(
            samples,
            self.sender_lm.tokenizer,
            self.receiver_lm.tokenizer,
            self.slot_spec,
            h.max_question_tokens,
            h.max_answer_tokens,
            answer_ids=answers,
            memo=self.token_memo,
        )
        slots = self.slot_vectors(batch)
        student, targets = self.answer_logits(batch["student"], slots)
        lengths = batch["student"]["labels"].ne(IGNORE).sum(dim=1).tolist()
        out = {"ce": answer_ce(student, targets), **answer_accuracy(student.detach(), targets, lengths)}
        out["loss"] = out["ce"]
        teacher = batch["teacher"]
        if h.objective == "distill":
            with torch.no_grad():
                teacher_logits, _ = self.answer_logits(teacher)
            out["kl"] = distill_kl(student, teacher_logits, h.distill_temperature)
            out["loss"] = out["kl"]
        if h.mse_weight:
            out["mse"] = self._mse_to_receiver(slots, teacher)
            out["loss"] = out["loss"] + h.mse_weight * out["mse"]
        return out

    @torch.no_grad()
    def teacher_answers(self, samples) -> list[list[int]]:
        """The full-context receiver's greedy answers (token rows ending with EOS, at most ``max_answer_tokens``
        before it): ``distill``'s teacher-forced sequence under ``distill_on: teacher_greedy``."""
        h, tok = self.hparams, self.receiver_lm.tokenizer
        prompts = full_prompts(samples, tok, self.slot_spec, h.max_question_tokens)
        ids, mask = prompts["input_ids"].to(self.device), prompts["attention_mask"].to(self.device)
        out = self.receiver.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=h.max_answer_tokens,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
        return until_eos(out[:, ids.shape[1] :], tok.eos_token_id)

    def _mse_to_receiver(self, slots: list[torch.Tensor], teacher: dict) -> torch.Tensor:
        ids, mask = teacher["input_ids"].to(self.device), teacher["attention_mask"].to(self.device)
        states = capture_block(self.receiver, self.receiver_lm.layer.path, ids, mask)
        targets = context_vectors(states, teacher["context_slices"], self.slot_spec)
        if [len(t) for t in targets] != [len(s) for s in slots]:
            raise UsageError(
                "model.mse_weight needs as many receiver context states as slots, but the two tokenizers split a "
                "context differently; use model.slots.scheme last/pooled or model.mse_weight 0"
            )
        return F.mse_loss(torch.cat(slots).float(), torch.cat(targets).float())

    # -- steps ----------------------------------------------------------------------------------------------------

    def _log_all(self, stage: str, out: dict, n: int) -> None:
        for key, value in out.items():
            if stage == "train":  # this rank's batch and epoch means
                self.log(
                    f"train/{key}", value.detach(), on_step=True, on_epoch=True, prog_bar=key == "loss", batch_size=n
                )
                continue
            # Under DDP each rank holds a share of the validation samples: the metric object syncs at epoch end.
            self.val_means[key].update(value.detach(), weight=n)
            self.log(f"{stage}/{key}", self.val_means[key], on_step=False, on_epoch=True, prog_bar=key == "loss")

    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        parts = [list(getattr(getattr(data, name, None), "samples", None) or []) for name in ("train_set", "val_set")]
        self.fill_context_cache(parts[0] + parts[1])
        # As the split evaluation warns: a context cut at max_context_tokens loses its end, the slots never carry it.
        samples = parts[0]
        if samples and self.trainer.is_global_zero:
            contexts = [split_prompt(s.context, s.question)[0] for s in samples]
            n = self.slot_spec.max_context_tokens
            ids = [str(i) for i in range(len(samples))]
            cut = over_length(self.sender_lm.tokenizer, ids, contexts, n)
            if cut:
                log.warning(
                    "functional training: %d of %d training context parts are cut at model.slots.max_context_tokens="
                    "%d (their end is lost; raise it to keep them)",
                    len(cut),
                    len(samples),
                    n,
                )

    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor:
        out = self.losses(batch)
        self._log_all("train", out, len(batch))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return out["loss"]

    def validation_step(self, batch: list, batch_idx: int) -> None:
        self._log_all("val", self.losses(batch), len(batch))

    # What decides the weights a resumed run continues: refused when the resuming config differs.
    RESUME_KEYS = (
        *("sender", "receiver", "translator", "normalize", "objective", "mse_weight", "distill_on"),
        *("distill_temperature", "slots", "max_question_tokens", "max_answer_tokens", "lr", "weight_decay", "betas"),
        *("warmup_steps", "decay", "min_lr_ratio", "sender_site"),
        # The training spec also holds what setup() takes from the data (contexts: own or mismatched).
        "training",
    )


__all__ = ["FunctionalTranslatorModule"]
