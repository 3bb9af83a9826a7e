"""The validation mean: weighted by samples, NaN kept (what Lightning's sync_dist mean and MeanMetric get wrong)."""

from __future__ import annotations

import math

import torch

from callbacks.val_metrics import LOSS_KEYS, WeightedMean, validation_means


def test_weighted_mean_weights_each_batch_by_its_samples():
    m = WeightedMean()
    m.update(torch.tensor(1.0), 2)
    m.update(torch.tensor(4.0), 1)
    assert float(m.compute()) == 2.0  # (1 * 2 + 4 * 1) / 3; unweighted it would be 2.5


def test_weighted_mean_keeps_a_nan_loss_visible():
    m = WeightedMean()
    m.update(torch.tensor(1.0), 2)
    m.update(torch.tensor(float("nan")), 1)
    assert math.isnan(float(m.compute()))


def test_one_mean_per_loss_key():
    assert sorted(validation_means()) == sorted(LOSS_KEYS)
