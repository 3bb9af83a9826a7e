"""Sample-weighted validation means that stay right under DDP when ranks hold different numbers of samples.

Lightning glue like the callbacks (a torchmetrics metric the trainers log), so it lives beside them.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

# Every key the functional and KV trainers' ``losses`` may return.
LOSS_KEYS = ("loss", "ce", "token_acc", "exact", "kl", "mse")


class WeightedMean(Metric):
    """``sum(value * weight) / sum(weight)``, both sums synced by summing across ranks; NaN stays NaN.

    Not Lightning's ``self.log(..., sync_dist=True)`` mean: it floors the integer sample count when ranks logged
    different counts (Lightning #21859: 5 validation samples on 2 ranks gave a loss 5/4 too high). Not torchmetrics'
    ``MeanMetric`` either: it drops NaN values, and with ``nan_strategy="disable"`` it ignores the weights.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: int) -> None:
        self.total = self.total + value.detach().float() * weight
        self.weight = self.weight + weight

    def compute(self) -> torch.Tensor:
        return self.total / self.weight


def validation_means() -> torch.nn.ModuleDict:
    """One :class:`WeightedMean` per loss key (attributes of the module, so they move devices and sync)."""
    return torch.nn.ModuleDict({key: WeightedMean() for key in LOSS_KEYS})
