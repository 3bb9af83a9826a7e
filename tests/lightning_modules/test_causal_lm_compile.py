"""The organism's training step under torch.compile: the same computation as eager, fused (CPU inductor here)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from cli.organism_cli import main
from cli.organisms import organism_config

# A 1-block, 32-wide organism, one sequence length (no trimming: one compiled graph), 3 steps.
TINY = [
    "--model.hidden_size=32",
    "--model.num_layers=1",
    "--model.num_heads=2",
    "--model.intermediate_size=64",
    "--data.num_train_samples=64",
    "--data.num_val_samples=8",
    "--data.batch_size=8",
    "--data.trim_padding=false",
    "--trainer.max_steps=3",
    "--trainer.val_check_interval=100",
    "--trainer.log_every_n_steps=1",
]


def _fit(tmp_path, name: str, extra: list[str]):
    logger = {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / name)}}
    cli = main(["fit", "-c", str(organism_config("sender")), *TINY, f"--trainer.logger={json.dumps(logger)}", *extra])
    rows = next((tmp_path / name).rglob("metrics.csv")).read_text().splitlines()
    col = rows[0].split(",").index("train/loss")
    losses = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    return cli, losses


def test_compiled_training_computes_what_eager_training_does(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["organism.py"])
    eager, eager_losses = _fit(tmp_path, "eager", [])
    compiled, compiled_losses = _fit(tmp_path, "compiled", ["--model.compile=default"])
    assert compiled.model._compiled_losses is not None and eager.model._compiled_losses is None
    assert len(eager_losses) == 3
    # Fused kernels round differently; three steps of the same computation agree far below what a bug would change.
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    a, b = eager.model.model.state_dict(), compiled.model.model.state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)


def test_an_unknown_compile_mode_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["organism.py"])
    with pytest.raises(SystemExit) as exit_:
        _fit(tmp_path, "bad", ["--model.compile=fast"])
    assert exit_.value.code == 2
    assert "model.compile='fast': use one of default, reduce-overhead" in capsys.readouterr().err
