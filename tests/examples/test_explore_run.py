"""``examples/explore_run.py`` on a small evaluation made here (tiny presets, W&B off): the records' DataFrame, the
printed accuracies (checked against the records themselves), the figure, and one translated vector."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_evaluate_cli import ckpt, small  # noqa: F401 (ckpt: the module-scoped fixture)

from activation_transfer.translators.loading import load_translator
from cli.lightning_cli import eval_main

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "explore_run.py"
METRIC = "word_boundary_contains"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])


def test_explore_run_prints_the_records_accuracies_saves_the_figure_and_translates(tmp_path, ckpt):  # noqa: F811
    import torch

    conditions = "[no_inject, additive, replace]"
    run_dir = eval_main(
        small(tmp_path, ckpt, "--model.conditions", conditions, "--model.seeds", "[42, 123]")
    ).model.run_dir
    figure = tmp_path / "figs" / "comparison.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(run_dir), "--plot", str(figure)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert figure.read_bytes().startswith(b"\x89PNG")

    # Each printed accuracy is the condition's records pooled over seeds, counted here from the files.
    expected = {}
    for path in (run_dir / "records").glob("*.jsonl"):
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        hits, n = expected.get(recs[0]["condition"], (0, 0))
        expected[recs[0]["condition"]] = (hits + sum(bool(r["metrics"][METRIC]) for r in recs), n + len(recs))
    printed = {
        m[1]: (float(m[2]), int(m[3])) for m in re.finditer(rf"^(\w+) +{METRIC} ([\d.]+) \((\d+) records\)$", out, re.M)
    }
    assert set(printed) == {"no_inject", "additive", "replace"}
    for condition, (hits, n) in expected.items():
        assert printed[condition] == (round(hits / n, 4), n), condition
    assert printed["additive"][1] == 2 * printed["no_inject"][1]  # two seeds of a seeded condition
    assert f"{sum(n for _, n in expected.values())} records, 3 conditions" in out

    # The translated vector is what the library's loader gives for the run's first translator.
    translator = load_translator(ckpt)
    norm = translator.translate(torch.ones(translator.hparams["sender_dim"])).norm().item()
    assert f"translator: {ckpt} (aligned, tiny-neox -> tiny-neox-large)" in out
    assert f"translated vector: (32,) -> (48,), norm {norm:.4f}" in out


def test_explore_run_refuses_an_unknown_metric(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--plot", str(tmp_path / "x.png"), "--metric", "accuracy"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2 and "--metric accuracy: not a metric" in done.stderr


@pytest.mark.parametrize("torn", [False, True])
def test_explore_run_bad_folder_is_one_line_and_exit_2(tmp_path, torn):
    # A folder that is not a run, or a record file cut mid-line, is bad input: one line naming it, no traceback.
    if torn:
        (tmp_path / "records").mkdir()
        (tmp_path / "records" / "no_inject.jsonl").write_text('{"sample_id": "s0", "cond')
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--plot", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    expected = "no_inject.jsonl:1: not valid JSON" if torn else f"no records/*.jsonl in {tmp_path}"
    assert done.returncode == 2 and done.stderr.startswith("explore_run.py: error: "), done.stderr
    assert expected in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
