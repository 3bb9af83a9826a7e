"""TranslatorModule: trains a translator from sender to receiver hidden states on paired activations.

Normalization, loss and metrics follow the paper (arXiv 2606.03280, section 3); the defaults are its values except
the loss, where the project's default is the cosine loss of its design and the reproduction configs set ``mse``:

- Inputs and targets are L2-normalized per vector (``normalize=True``, the paper's "normalized space").
- Loss ``cosine`` (1 - mean cosine, the default) or ``mse`` (``nn.MSELoss`` between the translated normalized
  input and the normalized target; the paper's loss, set by ``configs/train/pythia-160m_to_410m.yaml``).
- Metrics per stage (val, test), all streaming (fixed-size states, whatever the epoch length):

  - ``cos_norm``: mean per-row cosine between ``translate(x)`` and the normalized target;
  - ``r2_norm``: R² in normalized space, ``multioutput="variance_weighted"`` (1 - total residual sum of squares
    over total variance summed over dimensions: the fraction of the target's variance explained);
  - ``cos_raw`` / ``r2_raw``: the same translator applied to the *raw* sender vector, compared with the *raw*
    receiver vector (our reading of the paper's "raw" columns, whose exact definition it does not give);
  - ``norm_ratio``: mean of ``||translate(x)|| / ||y||`` with y the target as the loss sees it (normalized when
    normalization is on, so the paper's translator would show about 0.85);
  - ``cos_norm_best``: best ``cos_norm`` so far (validation only).

``translate(x)`` is what evaluation calls: normalize (if on) and map, with no re-normalization of the output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, R2Score

from activation_transfer.errors import UsageError
from activation_transfer.translators.architectures import (
    LinearTranslator,
    Translator,
    build_translator,
    translator_spec,
)
from activation_transfer.translators.export import apply_translator
from activation_transfer.translators.loading import ResumableTraining
from activation_transfer.translators.optim import OptimizerArgs, document_optimizer_args

DEFAULTS = OptimizerArgs()  # the optimizer arguments' defaults

STAGES = ("val", "test")


@document_optimizer_args
class TranslatorModule(ResumableTraining, pl.LightningModule):
    """Learn a map from sender hidden states to receiver hidden states.

    Args:
        sender_dim: Sender hidden size (linked from the data module by the CLI).
        receiver_dim: Receiver hidden size (linked from the data module by the CLI).
        translator: Translator architecture, built as ``translator(sender_dim, receiver_dim)``: a class from
            ``activation_transfer.translators.architectures`` with its options (``LinearTranslator``, the paper's, or
            ``MLPTranslator``).
        normalize: L2-normalize inputs and targets per vector (the paper's normalized space).
        loss: ``cosine`` (1 - cosine; the project's default) or ``mse`` (on normalized vectors; the paper's).
        <optimizer args>
        sender: Identity of the sender model and layer (linked from the store manifest; checked at evaluation).
        receiver: Identity of the receiver model and layer (linked from the store manifest).
    """

    def __init__(
        self,
        sender_dim: int,
        receiver_dim: int,
        translator: Callable[[int, int], Translator] = LinearTranslator,
        normalize: bool = True,
        loss: Literal["cosine", "mse"] = "cosine",
        lr: float = DEFAULTS.lr,
        weight_decay: float = DEFAULTS.weight_decay,
        betas: tuple[float, float] = DEFAULTS.betas,
        warmup_steps: int = DEFAULTS.warmup_steps,
        decay: Literal["linear", "constant"] = DEFAULTS.decay,
        min_lr_ratio: float = DEFAULTS.min_lr_ratio,
        sender: dict | None = None,
        receiver: dict | None = None,
    ):
        super().__init__()
        if loss not in ("cosine", "mse"):
            raise UsageError(f"model.loss must be 'cosine' or 'mse', got {loss!r}")
        self.optimizer_args = OptimizerArgs.of(locals())  # checks the six optimizer arguments
        spec = translator_spec(translator)
        self.save_hyperparameters(logger=False)  # the logger gets the nested CLI config (save_config), once
        # Plain dicts/lists only, so checkpoints load with weights_only=True (no classes, partials or tuples).
        self.hparams["translator"] = spec
        self.hparams["betas"] = [float(b) for b in betas]
        self.translator = build_translator(spec, int(sender_dim), int(receiver_dim))
        self.train_loss = MeanMetric()
        # Metric objects are attributes (not a plain dict) so they move devices and sync under DDP.
        self.metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict(
                    {
                        "loss": MeanMetric(),
                        "cos_norm": MeanMetric(),
                        "cos_raw": MeanMetric(),
                        "r2_norm": R2Score(multioutput="variance_weighted"),
                        "r2_raw": R2Score(multioutput="variance_weighted"),
                        "norm_ratio": MeanMetric(),
                    }
                )
                for stage in STAGES
            }
        )
        self.val_cos_norm_best = MaxMetric()
        # Persistent: a resumed fit restores the best so far instead of forgetting the epochs before the checkpoint.
        self.val_cos_norm_best.persistent(True)

    # -- the map ------------------------------------------------------------------------------------------------

    def _prep(self, v: torch.Tensor) -> torch.Tensor:
        return F.normalize(v, dim=-1) if self.hparams.normalize else v

    def translate(self, x: torch.Tensor) -> torch.Tensor:
        """Map sender vectors ``(..., d_s)`` to ``(..., d_r)``: L2-normalize (if on), then apply the translator."""
        return apply_translator(self.translator, x, self.hparams.normalize)

    forward = translate

    def _loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.hparams.loss == "mse":
            return F.mse_loss(pred, target)
        return 1.0 - F.cosine_similarity(pred, target, dim=-1).mean()

    # -- steps --------------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pred = self.translate(batch["sender"])
        loss = self._loss(pred, self._prep(batch["receiver"].to(pred.dtype)))
        # Weighted by rows, as validation's loss: the short last batch must not count as a full one.
        self.train_loss(loss.detach(), weight=len(pred))
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(pred))
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True, batch_size=len(pred))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, stage: str, batch: dict) -> None:
        x, y = batch["sender"], batch["receiver"]
        pred = self.translate(x)
        y = y.to(pred.dtype)
        target = self._prep(y)
        m = self.metrics[stage]
        m["loss"].update(self._loss(pred, target), weight=len(pred))
        m["cos_norm"].update(F.cosine_similarity(pred, target, dim=-1))
        m["r2_norm"].update(pred, target)
        m["norm_ratio"].update(pred.norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-12))
        raw_pred = self.translator(x.to(pred.dtype))
        m["cos_raw"].update(F.cosine_similarity(raw_pred, y, dim=-1))
        m["r2_raw"].update(raw_pred, y)
        for name, metric in m.items():
            # Logging the metric object lets Lightning compute (and sync) it at epoch end and reset it.
            prog_bar = name == "cos_norm"
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=prog_bar, batch_size=len(pred))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_train_start(self) -> None:
        # The sanity-check batches must not count towards the first epoch's metrics. The best value never sees them
        # (on_validation_epoch_end skips the sanity check) and is not reset: a resumed fit restored it.
        for metric in self.metrics["val"].values():
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_cos_norm_best(self.metrics["val"]["cos_norm"].compute())
        # Log the computed value, not the object, so Lightning does not reset the running best each epoch.
        # sync_dist: the value is already global (synced metric); this only silences the per-rank-value warning.
        self.log("val/cos_norm_best", self.val_cos_norm_best.compute(), prog_bar=True, sync_dist=True)

    # -- optimization -------------------------------------------------------------------------------------------

    # What decides the weights a resumed run continues: refused when the resuming config differs.
    RESUME_KEYS = (
        "sender_dim",
        "receiver_dim",
        "translator",
        "normalize",
        "loss",
        "lr",
        "weight_decay",
        "betas",
        "warmup_steps",
        "decay",
        "min_lr_ratio",
        # The store's models and layers: a resume on another block's activations would relabel the translator.
        "sender",
        "receiver",
    )


__all__ = ["TranslatorModule"]
