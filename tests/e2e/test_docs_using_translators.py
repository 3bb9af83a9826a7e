"""The Python blocks of ``docs/using_translators.md`` run as written (paths swapped for test files; no Hub push)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_evaluate_cli import ckpt  # noqa: F401 (the module-scoped tiny translator checkpoint fixture)

from activation_transfer.models.generation import decode, generate_ids
from activation_transfer.models.hooks import block_hook, capture_hidden
from activation_transfer.report import records as rio
from activation_transfer.task.scoring import METRICS
from activation_transfer.translators.export import export_from_checkpoint
from lightning_modules.translator import load_translator

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
    # What the blocks computed, checked against a second path that shares none of their helpers.
    direct = load_translator(ckpt)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the exported folder holds the checkpoint's translator
        torch.testing.assert_close(ns["translator"].translate(x), direct.translate(x), atol=0, rtol=0)
    sender, receiver = ns["sender"], ns["receiver"]
    ids = ns["r"]["input_ids"]
    assert ns["r"]["attention_mask"].all()  # one prompt, no padding: plain forward passes are the reference
    with torch.no_grad():
        want = direct.translate(capture_hidden(sender.model, sender.layer.path, ids))
        own = capture_hidden(receiver.model, receiver.layer.path, ids)
    torch.testing.assert_close(ns["translated"], want, atol=1e-6, rtol=1e-5)
    inj = ns["injection"]
    assert inj.fired and float(inj.injected_norm_mean[0]) == pytest.approx(_mean_norm(want[0]), rel=1e-5)
    assert float(inj.receiver_norm_mean[0]) == pytest.approx(_mean_norm(own[0]), rel=1e-5)
    # The answer of `replace`, by a bare hook that swaps the block output for the translation on the prefill pass.
    calls = []

    def swap(h):
        calls.append(h.shape[1])
        return want.to(h.dtype) if len(calls) == 1 else None

    with block_hook(receiver.model, receiver.layer.path, swap):
        out = generate_ids(receiver.model, receiver.tokenizer, ids, ns["r"]["attention_mask"], ns["settings"])
    assert calls[0] == ids.shape[1] and ns["answer"] == decode(receiver.tokenizer, out)[0].strip()


def _mean_norm(rows: torch.Tensor) -> float:
    return sum(float(torch.sqrt((v.double() ** 2).sum())) for v in rows) / len(rows)


def test_records_block_runs(tmp_path):
    # The block needs pandas, which the project does not install; record_rows (tests/test_records_frame.py) checks
    # the same rows without it.
    pytest.importorskip("pandas", reason="pandas is optional (not a dependency of the project)")

    def rec(sid, prediction):
        return {"sample_id": sid, "condition": "no_inject", "seed": None, "gold": "X", "prediction": prediction,
                "hops": 2, "metrics": dict.fromkeys(METRICS, prediction == "X"), "diagnostics": {}}  # fmt: skip

    rio.write_records(rio.records_path(tmp_path, "no_inject", None), [rec("a", "X"), rec("b", "Y")])
    (block,) = [b for b in _blocks() if "records_to_dataframe" in b]
    *body, last = block.replace("runs/eval/eval-0123456789ab", str(tmp_path)).strip().splitlines()
    ns: dict = {}
    exec(compile("\n".join(body), str(DOC), "exec"), ns)
    assert len(ns["df"]) == 2
    assert eval(last, ns).tolist() == [0.5]  # one of the two samples is right
