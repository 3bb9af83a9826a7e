"""The paper protocol's answers are locked: adding the split protocol (and later changes) must not move them.

The fixture holds every prediction of ``configs/eval/tiny.yaml`` (all eleven conditions, seeds 42/123/456, 24
generated questions) with the translator fixture written before the architecture move, produced by commit 595908c,
the last commit before the split-context protocol (and identical at 1 and 2 torch threads). A deliberate change of
the paper protocol regenerates it and says why in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cli.lightning_cli import eval_main

pytestmark = pytest.mark.cross_machine

FIXTURES = Path(__file__).parents[1] / "fixtures"
ROOT = Path(__file__).resolve().parents[2]


def test_paper_protocol_predictions_are_those_before_the_split_protocol(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])  # pytest's own arguments are not the CLI's
    expected = json.loads((FIXTURES / "paper_protocol_predictions_595908c.json").read_text())
    ev = eval_main(
        [
            "test",
            "-c",
            str(ROOT / "configs/eval/tiny.yaml"),
            "--model.translator_ckpt",
            str(FIXTURES / "translator_pre_move.ckpt"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "false",
        ]
    )
    got = {}
    for path in sorted((ev.model.run_dir / "records").rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            got[f"{r['condition']}|{r['seed']}|{r['sample_id']}"] = r["prediction"]
    assert set(got) == set(expected)
    moved = sorted(k for k in expected if got[k] != expected[k])
    assert not moved, f"{len(moved)} paper-protocol answers changed, e.g. {moved[:3]}"
