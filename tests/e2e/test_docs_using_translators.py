"""The Python blocks of ``docs/using_translators.md`` run as written (paths swapped for test files; no Hub push)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_evaluate_cli import ckpt  # noqa: F401 (the module-scoped tiny translator checkpoint fixture)

from activation_transfer.report import records as rio
from activation_transfer.task.scoring import METRICS
from activation_transfer.translators.export import export_from_checkpoint

DOC = Path(__file__).resolve().parents[2] / "docs" / "using_translators.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_load_export_and_inject_blocks_run(tmp_path, ckpt):  # noqa: F811
    folder = export_from_checkpoint(ckpt, tmp_path / "best")
    subs = {"runs/tiny/checkpoints/best-02-15.ckpt": ckpt, "runs/tiny/checkpoints/best-02-15": str(folder),
            "exported/tiny-translator": str(tmp_path / "again")}  # fmt: skip
    blocks = [b for b in _blocks() if "records_to_dataframe" not in b]
    assert len(blocks) == 4
    ns: dict = {}
    for block in blocks:
        for old, new in subs.items():
            block = block.replace(old, new)
        block = "\n".join(line for line in block.splitlines() if "push_to_hub" not in line)  # no network here
        exec(compile(block, str(DOC), "exec"), ns)
    assert (tmp_path / "again" / "model.safetensors").is_file()
    assert isinstance(ns["answer"], str) and ns["injection"].fired
    assert ns["translated"].shape[-1] == 48 and torch.isfinite(ns["injection"].injected_norm_mean).all()


def test_records_block_runs(tmp_path):
    pytest.importorskip("pandas", reason="pandas is optional (not a dependency of the project)")
    rec = {"sample_id": "a", "condition": "no_inject", "seed": None, "gold": "X", "prediction": "X", "hops": 2,
           "metrics": dict.fromkeys(METRICS, True), "diagnostics": {}}  # fmt: skip
    rio.write_records(rio.records_path(tmp_path, "no_inject", None), [rec])
    (block,) = [b for b in _blocks() if "records_to_dataframe" in b]
    ns: dict = {}
    exec(compile(block.replace("runs/eval/eval-0123456789ab", str(tmp_path)), str(DOC), "exec"), ns)
    assert len(ns["df"]) == 1
