"""torchmetrics wrappers around :mod:`scoring`: accuracies of decoded answers, synced across DDP ranks.

Strings cannot be synced between processes, so each rank scores its own predictions at ``update`` time and only the
counts (``correct``, ``total``) are kept as states, reduced with ``sum``. That makes ``compute`` exact under DDP: the
synced accuracy is total correct over total samples, not a mean of per-rank means.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric, MetricCollection

from lightning_modules.components.scoring import METRIC_FUNCTIONS, METRICS


class AnswerAccuracy(Metric):
    """Fraction of predictions that one of the five answer metrics counts as correct.

    Args:
        metric_name: One of :data:`scoring.METRICS`.
        **kwargs: Passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, metric_name: str = "word_boundary_contains", **kwargs) -> None:
        super().__init__(**kwargs)
        if metric_name not in METRIC_FUNCTIONS:
            raise ValueError(f"unknown answer metric {metric_name!r}; choose one of {', '.join(METRICS)}")
        self.metric_name = metric_name
        self._fn = METRIC_FUNCTIONS[metric_name]
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], golds: Sequence[str]) -> None:
        """Score a batch.

        Args:
            predictions: Decoded continuations.
            golds: Gold answers, one per prediction (an empty gold raises ``ValueError``).
        """
        if isinstance(predictions, str) or isinstance(golds, str):
            raise TypeError("AnswerAccuracy.update expects sequences of strings, not a single string")
        if len(predictions) != len(golds):
            raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold answers")
        hits = sum(bool(self._fn(p, g)) for p, g in zip(predictions, golds))
        self.correct += hits
        self.total += len(golds)

    def compute(self) -> torch.Tensor:
        """Accuracy as a float tensor; 0 when nothing was scored (rather than nan)."""
        if self.total == 0:
            return torch.tensor(0.0)
        return self.correct.float() / self.total


def answer_metric_collection(prefix: str = "", metrics: Sequence[str] = METRICS) -> MetricCollection:
    """A :class:`MetricCollection` with one :class:`AnswerAccuracy` per metric, keyed by the metric name.

    Args:
        prefix: Prepended to every key (e.g. ``"eval/"`` gives ``eval/word_boundary_contains``).
        metrics: Which metrics to include (default: all five).
    """
    # compute_groups=False: the members share no state, and grouping would merge them because their states look
    # identical at construction time.
    return MetricCollection({name: AnswerAccuracy(name) for name in metrics}, prefix=prefix, compute_groups=False)
