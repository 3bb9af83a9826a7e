"""The demo's evaluation cache (``cli/eval_cache.py``): an identical evaluation is copied from the cache and printed,
not recomputed; another translator, other questions or other organisms are evaluated anew."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from test_evaluate_cli import ckpt, small  # noqa: F401 (ckpt: the module-scoped fixture)

import cli.lightning_cli
from callbacks.wandb_artifacts import RUN_ID_FILE
from cli import eval_cache


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])


def _counting_eval(monkeypatch) -> list:
    calls, real = [], cli.lightning_cli.eval_main

    def counted(args):
        calls.append(args)
        return real(args)

    monkeypatch.setattr(cli.lightning_cli, "eval_main", counted)
    return calls


def test_a_second_identical_evaluation_is_loaded_from_the_cache(tmp_path, ckpt, monkeypatch, capsys):  # noqa: F811
    calls, cache = _counting_eval(monkeypatch), tmp_path / "cache"
    conditions = ("--model.conditions", "[no_inject, additive]", "--model.seeds", "[42]")
    first = eval_cache.cached_eval(small(tmp_path / "a", ckpt, *conditions), cache_dir=cache)
    assert len(calls) == 1 and (first / "meta.json").is_file()
    (entry,) = (cache / "evaluations").iterdir()
    assert entry.name.startswith("tiny-") and not (entry / "run" / RUN_ID_FILE).exists()
    capsys.readouterr()

    # A fresh clone: another output folder, a copy of the translator elsewhere (same content), the same cache.
    copy = tmp_path / "clone" / "translator.ckpt"
    copy.parent.mkdir()
    shutil.copyfile(ckpt, copy)
    second = eval_cache.cached_eval(small(tmp_path / "b", str(copy), *conditions), cache_dir=cache)
    assert len(calls) == 1 and second.parent == tmp_path / "b" / "out" and second.name == first.name
    for path in sorted((first / "records").glob("*.jsonl")):
        assert (second / "records" / path.name).read_bytes() == path.read_bytes()
    out = capsys.readouterr().out
    assert f"run folder: {second}" in out and "  additive__seed42: word_boundary_contains " in out
    assert "| no_inject | 1 | 6 |" in out  # the report's summary table, as evaluate.py prints it

    # What changes the answers is evaluated anew: other questions, another translator, other organisms.
    eval_cache.cached_eval(small(tmp_path / "c", ckpt, *conditions, "--data.num_samples", "5"), cache_dir=cache)
    assert len(calls) == 2
    copy.write_bytes(copy.read_bytes() + b"\0")  # other content under the same name
    assert eval_cache.eval_key(small(tmp_path / "b", str(copy), *conditions)) != eval_cache.eval_key(
        small(tmp_path / "b", ckpt, *conditions)
    )
    organism = tmp_path / "organism"
    organism.mkdir()
    (organism / "model.safetensors").write_text("weights")
    keyed = eval_cache.eval_key(small(tmp_path / "a", ckpt, *conditions), {"sender": organism})
    (organism / "model.safetensors").write_text("retrained")
    assert eval_cache.eval_key(small(tmp_path / "a", ckpt, *conditions), {"sender": organism}) != keyed


def test_an_unfinished_run_folder_is_not_cached(tmp_path, monkeypatch):
    run_dir = tmp_path / "out" / "run"
    run_dir.mkdir(parents=True)  # no meta.json: the evaluation did not finish

    class _Done:
        model = type("M", (), {"run_dir": run_dir})

    monkeypatch.setattr(cli.lightning_cli, "eval_main", lambda args: _Done())
    monkeypatch.setattr(eval_cache, "samples_sha256", lambda args: "s")
    args = ["test", "-c", str(Path(eval_cache.__file__)), "--trainer.default_root_dir", str(tmp_path / "out")]
    assert eval_cache.cached_eval(args, cache_dir=tmp_path / "cache") == run_dir
    assert not (tmp_path / "cache" / "evaluations").exists()


def test_the_questions_of_a_counterfactual_evaluation_are_its_substituted_ones():
    # The key read the original questions: a change of how counterfactual contexts are made kept the cached answers.
    from activation_transfer.io import fingerprint
    from datamodules.multihop_qa import MultiHopQADataModule

    args = ["test", "--data.num_samples", "8", "--data.counterfactual", "true", "--data.counterfactual_seed", "3"]
    dm = MultiHopQADataModule(num_samples=8, counterfactual=True, counterfactual_seed=3)
    expected = fingerprint([(s.sample_id, s.context, s.question, s.answer, s.hops) for s in dm.samples])
    assert eval_cache.samples_sha256(args) == expected != eval_cache.samples_sha256(args[:3])
    assert eval_cache.samples_sha256(args[:-1] + ["4"]) != expected
