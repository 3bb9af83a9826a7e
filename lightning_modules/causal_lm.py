"""Training module for the offline model organisms: a small GPT-NeoX causal LM trained to answer multi-hop QA.

The loss is the cross-entropy of the answer tokens and the EOS after them (batches from
``datamodules.organism_text``), plus an optional down-weighted language-modelling loss on the prompt tokens. The
prompt loss teaches the model to copy entities that the context repeats ("Tokyo is in Japan. Japan lies in Asia."),
which are exactly the induction-style lookups the answer needs, so a small weight speeds training up.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MaxMetric, MeanMetric

from activation_transfer.errors import UsageError
from activation_transfer.resume_checks import ResumeChecks
from datamodules.organism_text import ANSWER, PROMPT

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def build_neox(
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    rotary_pct: float,
    tie_word_embeddings: bool,
):
    """A randomly initialised ``GPTNeoXForCausalLM`` with Pythia's conventions (id 0 = bos = eos = pad)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from activation_transfer.models.frozen_lm import PYTHIA_CONVENTIONS

    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        rotary_pct=rotary_pct,
        tie_word_embeddings=tie_word_embeddings,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=0,
        **PYTHIA_CONVENTIONS,
    )
    return GPTNeoXForCausalLM(config)


class CausalLMModule(ResumeChecks, pl.LightningModule):
    """Trains a GPT-NeoX causal LM, built from size arguments, on prompt + answer batches."""

    # What decides the weights a resumed fit continues (refused when the resuming config differs): every option but
    # compile, which runs the same computation fused (the organism cache's recipe hash leaves it out too).
    RESUME_KEYS = (
        *("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "max_position_embeddings"),
        *("rotary_pct", "tie_word_embeddings", "lr", "weight_decay", "beta1", "beta2", "warmup_steps"),
        *("min_lr_ratio", "prompt_loss_weight"),
    )

    def __init__(
        self,
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        intermediate_size: int = 512,
        vocab_size: int = 1024,
        max_position_embeddings: int = 256,
        rotary_pct: float = 0.25,
        tie_word_embeddings: bool = False,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.98,
        warmup_steps: int = 30,
        min_lr_ratio: float = 0.05,
        prompt_loss_weight: float = 0.1,
        compile: str | None = None,
    ) -> None:
        """Build the model (weights drawn from the global seed that the CLI sets before instantiation).

        Args:
            hidden_size: Residual width d.
            num_layers: Number of GPT-NeoX blocks.
            num_heads: Attention heads (must divide ``hidden_size``).
            intermediate_size: MLP width (Pythia uses 4 d).
            vocab_size: Embedding rows; the organism CLI links it from the data module's tokenizer.
            max_position_embeddings: Longest sequence the config admits (the paper truncates prompts at 256).
            rotary_pct: Fraction of each head's dimensions that get rotary position embeddings (Pythia: 0.25).
            tie_word_embeddings: Share input and output embeddings (Pythia: no).
            lr: Peak AdamW learning rate.
            weight_decay: AdamW weight decay, applied to matrices only (not to biases, LayerNorms or embeddings).
            beta1: AdamW first-moment decay.
            beta2: AdamW second-moment decay; below 0.999 for short runs with a large learning rate.
            warmup_steps: Linear warmup steps before the cosine decay.
            min_lr_ratio: Learning rate at the end of the cosine decay, as a fraction of ``lr``.
            prompt_loss_weight: Weight of the next-token loss on prompt tokens (0 trains on the answer only).
            compile: ``torch.compile`` mode of the training step's forward and loss (``default``,
                ``reduce-overhead``: CUDA graphs, ``max-autotune``, ``max-autotune-no-cudagraphs``); null runs eagerly.
                It changes how the same computation runs, not what it computes (the float rounding differs, as it
                does between CPUs), so it stays out of the organism cache's recipe hash. On an accelerator a small
                model's step is bound by Python's per-op overhead, which fused kernels remove; on a CPU it gains
                little. Pair it with ``data.trim_padding: false``: one sequence length, one compiled graph.
        """
        super().__init__()
        # Each of these was a traceback (a ZeroDivisionError, a tensor shape, torch's "Invalid learning rate") or a
        # silent run (lr 0, a negative loss weight, a model without blocks) instead of one line naming the option.
        for name, value in (
            *(("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads)),
            *(("intermediate_size", intermediate_size), ("max_position_embeddings", max_position_embeddings)),
        ):
            if value < 1:
                raise UsageError(f"model.{name} must be >= 1, got {value}")
        if not lr > 0:
            raise UsageError(f"model.lr must be > 0, got {lr}")
        if not 0 <= rotary_pct <= 1:  # 0 trains (no rotary dimensions); above 1 was a tensor shape traceback
            raise UsageError(f"model.rotary_pct must be in [0, 1] (of each head's dimensions), got {rotary_pct}")
        for name, value in (("warmup_steps", warmup_steps), ("weight_decay", weight_decay)):
            if value < 0:
                raise UsageError(f"model.{name} must be >= 0, got {value}")
        if prompt_loss_weight < 0:  # a negative weight trains the prompt's loss upwards, silently
            raise UsageError(f"model.prompt_loss_weight must be >= 0, got {prompt_loss_weight}")
        if not 0 <= min_lr_ratio <= 1:
            raise UsageError(f"model.min_lr_ratio must be in [0, 1] (a fraction of model.lr), got {min_lr_ratio}")
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= value < 1:
                raise UsageError(f"model.{name} must be in [0, 1), got {value}")
        if hidden_size % num_heads:
            raise UsageError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
        if compile is not None and compile not in COMPILE_MODES:
            raise UsageError(f"model.compile={compile!r}: use one of {', '.join(COMPILE_MODES)}, or null (eager)")
        self.save_hyperparameters()
        self.model = build_neox(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            rotary_pct=rotary_pct,
            tie_word_embeddings=tie_word_embeddings,
        )
        self.val_loss = MeanMetric()
        self.val_answer_acc = MeanMetric()
        self.val_answer_acc_best = MaxMetric()
        # Persistent: a resumed fit restores the best so far instead of forgetting the epochs before the checkpoint.
        self.val_answer_acc_best.persistent(True)
        self.val_answer_acc_two = MeanMetric()
        self._compiled_losses = None
        # The cosine decay's length; configure_optimizers sets it, FitStepsToTime may set it once during warm-up.
        self.schedule_steps: int | None = None

    def set_schedule_steps(self, steps: int) -> None:
        """Set the length of the learning-rate schedule (warm-up, then cosine decay to ``min_lr_ratio``).

        The warm-up's rates do not depend on it, so a run that sets it during warm-up takes the same steps as one
        configured with ``trainer.max_steps = steps`` from the start (``callbacks.time_budget.FitStepsToTime``).
        """
        self.schedule_steps = max(int(steps), 1)

    def _train_losses(self, input_ids: torch.Tensor, token_type: torch.Tensor):
        mode = self.hparams.compile
        if mode is None:
            return self._losses(input_ids, token_type)
        if self._compiled_losses is None:
            self._compiled_losses = torch.compile(self._losses, mode=mode)
        torch.compiler.cudagraph_mark_step_begin()  # one step, one generation of CUDA graphs (a no-op without them)
        # Copies: a CUDA graph's outputs are overwritten by its next replay, and Lightning keeps the logged values.
        return tuple(t.clone() for t in self._compiled_losses(input_ids, token_type))

    def _losses(self, input_ids: torch.Tensor, token_type: torch.Tensor):
        # No attention mask: rows are right-padded, so under causal attention real tokens never see the padding and
        # SDPA can take its fused causal path. No KV cache: training never decodes, and building one costs each step.
        logits = self.model(input_ids=input_ids, use_cache=False).logits[:, :-1]
        target, kind = input_ids[:, 1:], token_type[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), reduction="none")
        nll = nll.view_as(target)
        answer, prompt = (kind == ANSWER).float(), (kind == PROMPT).float()
        answer_loss = (nll * answer).sum() / answer.sum().clamp_min(1)
        prompt_loss = (nll * prompt).sum() / prompt.sum().clamp_min(1)
        # A sample counts as answered when every answer token (and the EOS) is the argmax.
        wrong = ((logits.argmax(-1) != target) & (kind == ANSWER)).any(dim=1)
        return answer_loss, prompt_loss, (~wrong).float()

    def on_train_start(self) -> None:
        # The sanity-check validation batches must not leak into the first epoch's validation metrics.
        self.val_loss.reset()
        self.val_answer_acc.reset()
        self.val_answer_acc_two.reset()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        input_ids, token_type = batch[:2]
        answer_loss, prompt_loss, correct = self._train_losses(input_ids, token_type)
        loss = answer_loss + self.hparams.prompt_loss_weight * prompt_loss
        self.log_dict(
            {
                "train/loss": loss,
                "train/answer_loss": answer_loss,
                "train/prompt_loss": prompt_loss,
                "train/answer_acc": correct.mean(),
            },
            prog_bar=False,
        )
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        input_ids, token_type, *rest = batch
        answer_loss, _, correct = self._losses(input_ids, token_type)
        # Weighted by the batch's answer tokens, not its rows: answer_loss is a mean over them, so val/loss is the
        # mean over every answer token of the set, the same whatever the batch size or which rows share a batch.
        self.val_loss.update(answer_loss, weight=(token_type[:, 1:] == ANSWER).sum())
        self.val_answer_acc.update(correct)
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True)
        self.log("val/answer_acc", self.val_answer_acc, on_epoch=True, prog_bar=True)
        if rest:  # candidate counts: the questions whose context names two entities of the answer's type
            two = (rest[0] == 2).float()
            if two.any():
                self.val_answer_acc_two.update(correct, weight=two)
                self.log("val/answer_acc_two_candidates", self.val_answer_acc_two, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        # The sanity check's few batches never reach the best (it is not reset at train start: a resume restored it).
        if self.trainer.sanity_checking:
            return
        # Logged through .compute() so Lightning does not reset the running maximum.
        self.val_answer_acc_best.update(self.val_answer_acc.compute())
        self.log("val/answer_acc_best", self.val_answer_acc_best.compute())

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=(hp.beta1, hp.beta2),
        )
        self.set_schedule_steps(self.trainer.estimated_stepping_batches)
        warmup = min(hp.warmup_steps, self.schedule_steps)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            total = self.schedule_steps  # read at each step: FitStepsToTime may set it during the warm-up
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, folder: str | Path, tokenizer) -> Path:
        """Write the model and tokenizer in Hugging Face format (``from_pretrained``-loadable) into ``folder``."""
        return export_model(self.model, tokenizer, folder)


def export_model(model, tokenizer, folder: str | Path) -> Path:
    """Write ``model`` (a ``build_neox`` model) and ``tokenizer`` in Hugging Face format into ``folder``.

    Shared by training (:meth:`CausalLMModule.export`) and by the organisms shipped as package data, so both write
    the same files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    # Generation defaults matching Pythia: id 0 ends and pads.
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = 0
    model.generation_config.bos_token_id = 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model.train(was_training)
    return folder
