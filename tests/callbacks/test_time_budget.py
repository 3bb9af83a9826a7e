"""FitStepsToTime: a schedule fitted to a time budget is the schedule a plain recipe of that length runs."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from activation_transfer.errors import UsageError
from callbacks import time_budget
from callbacks.time_budget import RECORD, FitStepsToTime, steps_within
from cli.organism_cli import main
from cli.organisms import organism_config

# A 1-block, 32-wide organism, 40 steps at most, warm-up 6 steps: seconds on 2 CPU cores.
TINY = [
    "--model.hidden_size=32",
    "--model.num_layers=1",
    "--model.num_heads=2",
    "--model.intermediate_size=64",
    "--model.warmup_steps=6",
    "--data.num_train_samples=256",
    "--data.num_val_samples=16",
    "--data.batch_size=8",
    "--trainer.max_steps=40",
    "--trainer.val_check_interval=100",
]


def test_steps_within_rounds_down_and_keeps_what_ran():
    # 400 steps done, 50 steps/s, 100 s left, 0.8 of it planned: 400 + 4,000 = 4,400 -> 4,000 in steps of 1,000.
    assert steps_within(100, 50, 400, round_to=1000, margin=0.8) == 4000
    assert steps_within(100, 50, 400, round_to=500, margin=0.8) == 4000 + 0  # 4,400 -> 4,000 in steps of 500
    assert steps_within(100, 50, 400, round_to=100, margin=0.8) == 4400
    assert steps_within(100, 50, 400, round_to=1000, margin=0.8, ceiling=3000) == 3000
    # No time left: never fewer steps than the run already took (the next multiple).
    assert steps_within(-5, 50, 400, round_to=500, margin=0.8) == 500
    # Nor than the warm-up: a shorter schedule is clamped at configure time, unlike the plain recipe's.
    assert steps_within(-5, 50, 400, round_to=500, margin=0.8, floor=1000) == 1000
    assert steps_within(-5, 50, 400, round_to=500, margin=0.8, ceiling=800, floor=1000) == 800


def test_the_chosen_length_never_ends_inside_the_warm_up(monkeypatch):
    # 400 steps measured at 1 step/s with 100 s left: 500 steps fit, but the module warms up for 1,000.
    clock = iter([0.0, 0.0, 300.0])
    monkeypatch.setattr(time_budget.time, "perf_counter", lambda: next(clock))
    chosen = []
    module = SimpleNamespace(hparams=SimpleNamespace(warmup_steps=1000), set_schedule_steps=chosen.append)
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(max_steps=-1))
    trainer = SimpleNamespace(global_step=100, max_steps=-1, fit_loop=loop, is_global_zero=False, log_dir=None)
    cb = FitStepsToTime(400, measure_from=100, measure_to=400, round_to=500, margin=1.0)
    cb.on_train_start(trainer, module)
    cb.on_train_batch_end(trainer, module)
    trainer.global_step = 400
    cb.on_train_batch_end(trainer, module)
    assert chosen == [1000] and loop.epoch_loop.max_steps == 1000


def _fit(tmp_path, name: str, extra: list[str]):
    logger = {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / name)}}
    cli = main(["fit", "-c", str(organism_config("sender")), *TINY, f"--trainer.logger={json.dumps(logger)}", *extra])
    return cli, {k: v.detach().clone() for k, v in cli.model.model.state_dict().items()}


def test_a_fitted_schedule_trains_the_weights_of_the_plain_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["organism.py"])
    # A clock for the callback: fit starts at 0 s, step 2 at 0 s, step 4 at 2 s: 1 step/s, 12 s left of 14.
    clock = iter([0.0, 0.0, 2.0])
    monkeypatch.setattr(time_budget.time, "perf_counter", lambda: next(clock))
    budget = {"class_path": "callbacks.time_budget.FitStepsToTime"}
    budget["init_args"] = {"seconds": 14, "measure_from": 2, "measure_to": 4, "round_to": 2, "margin": 1.0}
    fitted, fitted_w = _fit(tmp_path, "fitted", [f"--trainer.callbacks=[{json.dumps(budget)}]"])
    assert fitted.trainer.global_step == 16  # 4 + 12 s x 1 step/s, a multiple of 2
    record = json.loads(next((tmp_path / "fitted").rglob(RECORD)).read_text())
    assert record["max_steps"] == 16 and record["steps_per_s"] == 1.0
    monkeypatch.undo()
    monkeypatch.setattr(sys, "argv", ["organism.py"])
    plain, plain_w = _fit(tmp_path, "plain", ["--trainer.max_steps=16"])
    assert plain.trainer.global_step == 16
    assert all(torch.equal(fitted_w[k], plain_w[k]) for k in plain_w)
    # The schedule was shortened, not cut: the rate ends at its floor (a 40-step cosine would be at 0.68 of its peak).
    for cli in (fitted, plain):
        hp = cli.model.hparams
        assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(hp.lr * hp.min_lr_ratio)


def test_measuring_after_the_warm_up_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["organism.py"])
    budget = {
        "class_path": "callbacks.time_budget.FitStepsToTime",
        "init_args": {"seconds": 5, "measure_from": 2, "measure_to": 8},
    }
    with pytest.raises(SystemExit) as exit_:
        _fit(tmp_path, "late", [f"--trainer.callbacks=[{json.dumps(budget)}]"])
    assert exit_.value.code == 2 and "measure_to=8 is after the warm-up (6 steps)" in capsys.readouterr().err
    with pytest.raises(UsageError, match="measure_from"):
        FitStepsToTime(5, measure_from=4, measure_to=4)
