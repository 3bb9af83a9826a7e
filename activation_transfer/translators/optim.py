"""THE translator optimizer: AdamW with linear warmup, then linear decay or a constant rate (the paper's recipe).

Both translator trainers (aligned and functional) take the same six optimizer arguments: :class:`OptimizerArgs`
holds their defaults, their documentation (:data:`OPTIMIZER_ARGS_DOC`, inserted into each trainer's ``--help``), their
validation and the optimizer they build, so the schedule has one home.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from activation_transfer.errors import UsageError

DECAYS = ("linear", "constant")

# The six arguments' documentation, as the trainers' ``Args:`` lines (jsonargparse reads them for ``--help``).
OPTIMIZER_ARGS_DOC = """\
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: Steps of linear warmup from 0 to ``lr``.
        decay: ``linear`` (to ``min_lr_ratio * lr`` at the last step, the paper's) or ``constant`` after warmup.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` for linear decay."""
OPTIMIZER_ARGS_MARKER = "        <optimizer args>"


def document_optimizer_args(cls: type) -> type:
    """Class decorator: replace the ``<optimizer args>`` line of ``cls``'s docstring by :data:`OPTIMIZER_ARGS_DOC`."""
    if OPTIMIZER_ARGS_MARKER not in (cls.__doc__ or ""):
        raise ValueError(f"{cls.__name__}'s docstring has no {OPTIMIZER_ARGS_MARKER.strip()!r} line")
    cls.__doc__ = cls.__doc__.replace(OPTIMIZER_ARGS_MARKER, OPTIMIZER_ARGS_DOC)
    return cls


@dataclass(frozen=True)
class OptimizerArgs:
    """The translator trainers' optimizer arguments (documented in :data:`OPTIMIZER_ARGS_DOC`); the defaults are
    the aligned trainer's. Invalid values raise ``ValueError`` naming the ``model.`` option."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    decay: str = "linear"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise UsageError(f"model.decay must be 'linear' or 'constant', got {self.decay!r}")
        if not self.lr > 0:
            raise UsageError(f"model.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise UsageError(f"model.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UsageError(f"model.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0:
            raise UsageError(f"model.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UsageError(f"model.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    @classmethod
    def of(cls, hparams: Mapping) -> OptimizerArgs:
        """The arguments among ``hparams`` (a trainer's ``__init__`` arguments; other keys are ignored)."""
        args = {f.name: hparams[f.name] for f in dataclasses.fields(cls)}
        return cls(**{**args, "betas": tuple(args["betas"])})

    def configure(self, params: Iterable[torch.nn.Parameter], total_steps: int) -> dict:
        """AdamW and a per-step LambdaLR, as Lightning's ``configure_optimizers`` return value.

        Args:
            params: The parameters to optimize (the translator's only).
            total_steps: Optimizer steps of the whole run (``trainer.estimated_stepping_batches``).
        """
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=tuple(self.betas))
        total, warmup, decay, floor = max(1, int(total_steps)), int(self.warmup_steps), self.decay, self.min_lr_ratio

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if decay == "constant":
                return 1.0
            # Decay from the peak step (the warm-up's last, or step 0 without one) so the peak is used once and the
            # last step (total - 1, the last the optimizer takes) runs at the floor.
            peak = max(warmup - 1, 0)
            frac = min(1.0, (step - peak) / max(1, total - 1 - peak))
            return max(floor, 1.0 - frac * (1.0 - floor))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
