"""THE translator optimizer: AdamW with linear warmup, then linear decay or a constant rate (the paper's recipe).

Both translator trainers (aligned and functional) call :func:`adamw_warmup_decay` with their own hparams, so the
schedule has one home.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

DECAYS = ("linear", "constant")


def check_decay(decay: str) -> None:
    if decay not in DECAYS:
        raise ValueError(f"model.decay must be 'linear' or 'constant', got {decay!r}")


def adamw_warmup_decay(
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    betas: Sequence[float],
    warmup_steps: int,
    decay: str,
    min_lr_ratio: float,
    total_steps: int,
) -> dict:
    """AdamW and a per-step LambdaLR, as Lightning's ``configure_optimizers`` return value.

    Args:
        params: The parameters to optimize (the translator's only).
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: Steps of linear warmup from 0 to ``lr``.
        decay: ``linear`` (to ``min_lr_ratio * lr`` at the last step) or ``constant`` after warmup.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` for linear decay.
        total_steps: Optimizer steps of the whole run (``trainer.estimated_stepping_batches``).
    """
    check_decay(decay)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    total = max(1, int(total_steps))
    warmup = max(0, int(warmup_steps))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        span = max(1, total - warmup)
        frac = min(1.0, (step - warmup) / span)
        return max(min_lr_ratio, 1.0 - frac * (1.0 - min_lr_ratio))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
