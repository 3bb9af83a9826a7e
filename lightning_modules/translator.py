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

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, R2Score

from activation_transfer.translators.architectures import (
    LinearTranslator,
    Translator,
    build_translator,
    translator_spec,
)
from activation_transfer.translators.export import (
    PretrainedTranslator,
    apply_translator,
    checkpoint_translator,
    from_pretrained,
    is_functional_checkpoint,
    is_pretrained_folder,
)
from activation_transfer.translators.optim import adamw_warmup_decay, check_decay

log = logging.getLogger(__name__)

STAGES = ("val", "test")


class TranslatorModule(pl.LightningModule):
    """Learn a map from sender hidden states to receiver hidden states.

    Args:
        sender_dim: Sender hidden size (linked from the data module by the CLI).
        receiver_dim: Receiver hidden size (linked from the data module by the CLI).
        translator: Translator architecture, built as ``translator(sender_dim, receiver_dim)``: a class from
            ``activation_transfer.translators.architectures`` with its options (``LinearTranslator``, the paper's, or
            ``MLPTranslator``).
        normalize: L2-normalize inputs and targets per vector (the paper's normalized space).
        loss: ``cosine`` (1 - cosine; the project's default) or ``mse`` (on normalized vectors; the paper's).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: Steps of linear warmup from 0 to ``lr``.
        decay: ``linear`` (to ``min_lr_ratio * lr`` at the last step, the paper's) or ``constant`` after warmup.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` for linear decay.
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
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        decay: Literal["linear", "constant"] = "linear",
        min_lr_ratio: float = 0.0,
        sender: dict | None = None,
        receiver: dict | None = None,
    ):
        super().__init__()
        if loss not in ("cosine", "mse"):
            raise ValueError(f"model.loss must be 'cosine' or 'mse', got {loss!r}")
        check_decay(decay)
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
        self.train_loss(loss.detach())
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
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "cos_norm",
                     batch_size=len(pred))  # fmt: skip

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_train_start(self) -> None:
        # The sanity-check batches must not count towards the first epoch's metrics or the best value.
        for metric in self.metrics["val"].values():
            metric.reset()
        self.val_cos_norm_best.reset()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_cos_norm_best(self.metrics["val"]["cos_norm"].compute())
        # Log the computed value, not the object, so Lightning does not reset the running best each epoch.
        # sync_dist: the value is already global (synced metric); this only silences the per-rank-value warning.
        self.log("val/cos_norm_best", self.val_cos_norm_best.compute(), prog_bar=True, sync_dist=True)

    # -- optimization -------------------------------------------------------------------------------------------

    def configure_optimizers(self):
        h = self.hparams
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        return adamw_warmup_decay(self.translator.parameters(), lr=h.lr, weight_decay=h.weight_decay, betas=h.betas,
                                  warmup_steps=h.warmup_steps, decay=h.decay, min_lr_ratio=h.min_lr_ratio,
                                  total_steps=total)  # fmt: skip


# --------------------------------------------------------------------------------------------- evaluation helpers

# Identity fields that must agree between the models a translator was trained on and the models it is used with.
MATCH_KEYS = ("name", "model_type", "hidden_size", "num_layers", "layer", "layer_index", "preset_seed", "revision",
              "weights_sha256")  # fmt: skip
# Recorded only for some models (Hub commits, local folders' digests): compared when both sides have a value.
OPTIONAL_KEYS = ("revision", "weights_sha256")


def check_translator_matches(module: TranslatorModule, sender_identity: dict, receiver_identity: dict,
                             slots: dict | None = None) -> None:  # fmt: skip
    """Raise ``ValueError`` listing every difference between the translator's recorded models and the given ones.

    A ``revision`` or ``weights_sha256`` recorded as None on either side is not compared (a local folder has no
    revision, a Hub model or preset no folder digest, and checkpoints from before the digest have none). ``slots``
    (the evaluation's slot spec) is compared with the slots a functional translator was trained with, if any: it
    learnt what K slots at those positions mean.
    """
    h = module.hparams
    problems = []
    trained = (h.get("training") or {}).get("slots")
    if slots is not None and trained is not None and dict(trained) != dict(slots):
        problems.append(f"slots: trained with {dict(trained)}, evaluated with {dict(slots)}")
    for role, recorded, given, dim in (
        ("sender", h.get("sender"), sender_identity, h.get("sender_dim")),
        ("receiver", h.get("receiver"), receiver_identity, h.get("receiver_dim")),
    ):
        if given.get("hidden_size") is not None and dim is not None and int(given["hidden_size"]) != int(dim):
            problems.append(f"{role} hidden size: translator {dim}, model {given['hidden_size']}")
        if recorded is None:
            problems.append(f"{role}: the translator checkpoint records no model identity")
            continue
        for key in MATCH_KEYS:
            a, b = recorded.get(key), given.get(key)
            if key in OPTIONAL_KEYS and (a is None or b is None):
                continue
            if key in recorded and key in given and a != b:
                problems.append(f"{role} {key}: translator {a!r}, model {b!r}")
    if problems:
        raise ValueError("translator does not match the models it is used with: " + "; ".join(problems))


def load_translator(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> TranslatorModule | PretrainedTranslator:
    """Load a TranslatorModule checkpoint safely (``weights_only=True``), an exported folder, or the translator of a
    FunctionalTranslatorModule checkpoint (as a PretrainedTranslator), in eval mode.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable TranslatorModule checkpoint, or holds NaN/infinite weights.
    """
    path = Path(path)
    if is_pretrained_folder(path):  # save_pretrained output (safetensors + config.json): same translations
        module = from_pretrained(path, map_location=str(map_location))
    elif not path.is_file():
        raise FileNotFoundError(f"translator checkpoint {path} does not exist")
    elif is_functional_checkpoint(path):  # FunctionalTranslatorModule: the translator alone, without its LMs
        module = checkpoint_translator(path)
    else:
        try:
            module = TranslatorModule.load_from_checkpoint(str(path), map_location=map_location, weights_only=True)
        except Exception as err:  # torch/zip/pickle/Lightning raise many types for bad files: report them alike
            raise ValueError(f"cannot load translator checkpoint {path}: {type(err).__name__}: {err}") from err
    # A diverged training run saves NaN weights; they would turn every answer into "" and score as accuracy 0.
    bad = [k for k, t in module.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"translator checkpoint {path} holds NaN or infinite weights ({', '.join(bad[:5])}); "
                         "retrain it or pick an earlier checkpoint")  # fmt: skip
    module.eval()
    return module


def load_translator_for(
    path: str | Path,
    sender_identity: dict,
    receiver_identity: dict,
    allow_mismatch: bool = False,
    slots: dict | None = None,
) -> TranslatorModule | PretrainedTranslator:
    """Load a frozen translator for the given models: names and layers must match, hidden sizes always.

    Args:
        path: The checkpoint.
        sender_identity: ``LoadedModel.identity()`` of the sender it will read.
        receiver_identity: ``LoadedModel.identity()`` of the receiver it will write into.
        allow_mismatch: Log a warning instead of raising when names, layers or slots differ.
        slots: The evaluation's slot spec (split protocol), checked against a functional translator's training slots.
    """
    module = load_translator(path, map_location="cpu")
    module.requires_grad_(False)
    try:
        check_translator_matches(module, sender_identity, receiver_identity, slots)
    except ValueError as err:
        if not allow_mismatch:
            raise ValueError(f"{err} (translator checkpoint {path}; set --model.allow_mismatch true to "
                             "evaluate it anyway)") from err  # fmt: skip
        log.warning("translator %s does not match the models (allowed by allow_mismatch): %s", path, err)
    # Whatever the names say, the translator must map sender-sized vectors to receiver-sized ones.
    d_s, d_r = sender_identity["hidden_size"], receiver_identity["hidden_size"]
    dims = (module.hparams.get("sender_dim"), module.hparams.get("receiver_dim"))
    if dims != (d_s, d_r):
        raise ValueError(
            f"translator checkpoint {path} maps {dims[0]} -> {dims[1]} dims, but the sender has {d_s} and the "
            f"receiver {d_r} (allow_mismatch cannot bridge different hidden sizes)"
        )
    return module


__all__ = ["TranslatorModule", "check_translator_matches", "load_translator", "load_translator_for"]
