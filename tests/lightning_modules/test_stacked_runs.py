"""Issue 22 item 1: the pending runs of a sub-batch answered by one stacked ``generate`` per prompt width give the
very records of one ``generate`` per run (fp32), for every condition of the paper, split and KV protocols."""

from __future__ import annotations

import pytest
from test_injection_eval import make_ckpt, run_eval
from test_kv_translator import make_kv_ckpt
from test_translator_loading import make_functional_ckpt

import activation_transfer.injection.answering as answering
from activation_transfer.errors import UsageError
from activation_transfer.injection.conditions import CONDITION_NAMES, FUNCTIONAL_VARIANTS
from activation_transfer.injection.protocols.kv import CONDITION_NAMES as KV_CONDITION_NAMES
from activation_transfer.injection.protocols.split import CONDITION_NAMES as SPLIT_CONDITION_NAMES
from lightning_modules.injection_eval import InjectionEvalModule

SEEDS = [42, 123]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    return {
        # One aligned translator per seed (the paper's way), so the translator conditions are runs of their own.
        "aligned": [make_ckpt(folder / f"aligned{s}.ckpt", seed=i) for i, s in enumerate(SEEDS)],
        "functional": make_functional_ckpt(folder / "functional.ckpt", seed=5),
        "kv": make_kv_ckpt(folder / "kv.ckpt", seed=3),
    }


PROTOCOLS = {
    "paper": dict(conditions=[*CONDITION_NAMES, *FUNCTIONAL_VARIANTS], protocol="paper", translator="functional"),
    "split": dict(conditions=SPLIT_CONDITION_NAMES, protocol="split", translator="functional"),
    "kv": dict(conditions=KV_CONDITION_NAMES, protocol="kv", translator="kv"),
}


def _run(tmp_path, ckpts, name: str, monkeypatch, **kw):
    """One evaluation of protocol ``name``; returns its results and the row counts of its receiver generates."""
    spec = PROTOCOLS[name]
    rows: list[int] = []
    real = answering.generate_ids
    monkeypatch.setattr(answering, "generate_ids", lambda *a, **k: rows.append(a[2].shape[0]) or real(*a, **k))
    module = run_eval(
        tmp_path,
        ckpts["aligned"] if name != "kv" else None,
        conditions=spec["conditions"],
        seeds=SEEDS,
        protocol=name,
        functional_translator_ckpt=ckpts[spec["translator"]],
        batch_size=5,  # 8 samples: a full and a partial sub-batch
        **kw,
    )
    monkeypatch.undo()
    return module, rows


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_stacked_runs_give_the_per_run_records(tmp_path, ckpts, name, monkeypatch):
    per_run, per_run_rows = _run(tmp_path / "per_run", ckpts, name, monkeypatch, stack_runs=False)
    stacked, stacked_rows = _run(tmp_path / "stacked", ckpts, name, monkeypatch)
    capped, capped_rows = _run(tmp_path / "capped", ckpts, name, monkeypatch, max_generate_rows=7)
    assert per_run.generate_rows is None and stacked.generate_rows == 2 * 5 and capped.generate_rows == 7
    assert per_run.run_dir != stacked.run_dir  # separate folders: each computed everything
    assert set(per_run.results) == set(stacked.results) == set(capped.results)
    for key, records in per_run.results.items():
        assert stacked.results[key] == records, key  # predictions, relays, norms, donors: every field
        assert capped.results[key] == records, key
    # The same rows were generated, in fewer and larger calls (the relay's sender generates by itself). KV: its
    # prefix runs generate by themselves; its two text runs (question alone, full prompt) differ in width.
    assert sum(per_run_rows) == sum(stacked_rows) == sum(capped_rows)
    if name == "kv":
        assert len(stacked_rows) == len(per_run_rows)
    else:
        assert len(stacked_rows) < len(capped_rows) < len(per_run_rows)
    assert max(capped_rows) <= max(7, 5)  # one run (5 rows at most) never splits


def test_bad_max_generate_rows_is_one_clear_error():
    with pytest.raises(UsageError, match="model.max_generate_rows must be >= 1 or auto, got 0"):
        InjectionEvalModule("tiny-neox", "tiny-neox-large", conditions=["no_inject"], max_generate_rows=0)


@pytest.mark.parametrize("stack_runs", [True, False])
def test_a_sub_batch_s_runs_show_progress_in_the_log(tmp_path, ckpts, monkeypatch, caplog, stack_runs):
    # On a GPU one sub-batch can hold the whole evaluation (71 s on an H200), one step of Lightning's loop.
    monkeypatch.setattr(answering, "PROGRESS_EVERY_S", 0.0)  # a line after every generate
    caplog.set_level("INFO", logger=answering.__name__)
    _run(tmp_path, ckpts, "split", monkeypatch, stack_runs=stack_runs)
    lines = [r.getMessage() for r in caplog.records if r.name == answering.__name__]
    done = [tuple(map(int, line.split()[1].split("/"))) for line in lines if line.startswith("answered ")]
    assert done and all(0 < d <= n for d, n in done)
    # Each sub-batch (8 samples in batches of 5: two) counts up to its pending runs.
    assert [d for d, n in done if d == n] and sum(d == n for d, n in done) == 2
    assert len({n for _, n in done}) == 1 and done[0][1] > 1  # both sub-batches answer the same runs
