"""The split half of ``make demo``: the layer is chosen on validation questions, everything after uses it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from activation_transfer.task.generator import EVAL_SEED
from cli import demo, split_demo

# slots_self per receiver block on the validation questions: block 1 carries most.
SWEEP = {0: 0.30, 1: 0.45, 2: 0.10}


def opt(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_choose_layer_takes_the_best_slots_self_and_the_shallowest_tie() -> None:
    rows = [{"layer": 0, "slots_self": 0.2}, {"layer": 1, "slots_self": 0.4}, {"layer": 2, "slots_self": 0.4}]
    assert split_demo.choose_layer(rows) == 1
    with pytest.raises(ValueError, match="empty"):
        split_demo.choose_layer([])


def test_split_demo_sweeps_on_validation_questions_and_uses_the_chosen_block(
    tmp_path: Path, monkeypatch, capsys, fake_demo
) -> None:
    def fake_eval(args):
        run_dir = Path(opt(args, "--trainer.default_root_dir")) / "run"
        layer = int(opt(args, "--model.receiver.layer") or 0)
        conds = {"receiver_alone": 0.05, "skyline": 0.7, "slots_self": SWEEP[layer], "slots_zero": 0.06}
        summary = {"conditions": {c: {"n": 30, "word_boundary_contains": {"mean": v}} for c, v in conds.items()}}
        (run_dir / "report").mkdir(parents=True)
        (run_dir / "report" / "summary.json").write_text(json.dumps(summary))
        gap = [{"condition": "slots_functional", "fraction": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 30, "runs": 3}]
        (run_dir / "report" / "gap_recovered.json").write_text(json.dumps(gap))
        return SimpleNamespace(model=SimpleNamespace(report_result=None, run_dir=run_dir))

    fake_demo.evaluate = fake_eval
    trained, evaluated = fake_demo.trained, fake_demo.evaluated
    monkeypatch.setattr(split_demo, "receiver_blocks", lambda folder: len(SWEEP))
    assert demo.main(["--out", str(tmp_path / "demo")]) == 0

    paper_eval, *sweep, split_eval = evaluated
    # The sweep: every block, on the validation questions (never the evaluation seed), no translators.
    assert [opt(a, "--model.receiver.layer") for a in sweep] == ["0", "1", "2"]
    assert {opt(a, "--data.generator_seed") for a in sweep} == {str(split_demo.SELECTION_SEED)} != {str(EVAL_SEED)}
    assert all(opt(a, "--model.translator_ckpt") is None for a in sweep)
    # The evaluation: held-out questions (the config's default seed), the chosen block, one translator per seed.
    assert opt(split_eval, "--data.generator_seed") is None and opt(split_eval, "--model.receiver.layer") == "1"
    aligned = json.loads(opt(split_eval, "--model.translator_ckpt"))
    functional = json.loads(opt(split_eval, "--model.functional_translator_ckpt"))
    assert len(aligned) == len(functional) == 3
    for ckpt, seed in zip(aligned, (42, 123, 456)):
        used = Path(ckpt).read_text()
        assert f"--seed_everything {seed}" in used and "--data.receiver_model.layer 1" in used
        assert str(split_demo.ALIGNED_CONFIG) in used
    for ckpt, seed in zip(functional, (42, 123, 456)):
        used = Path(ckpt).read_text()
        assert f"--seed_everything {seed}" in used and "--model.init_args.receiver_model.layer 1" in used
        assert str(split_demo.FUNCTIONAL_CONFIG) in used
    assert len(trained) == 3 + 6  # paper translators, then aligned and functional at the chosen block

    report = Path(opt(split_eval, "--trainer.default_root_dir")) / "run" / "report"
    sweep_json = json.loads((report / "slots_self_layer_sweep.json").read_text())
    assert sweep_json["chosen_layer"] == 1 and [r["slots_self"] for r in sweep_json["rows"]] == [0.30, 0.45, 0.10]
    assert (report / "slots_self_layer_sweep.png").read_bytes().startswith(b"\x89PNG")
    out = capsys.readouterr().out
    assert f"[demo] split report and plots: {report}" in out
    assert "slots_functional" in out and "+0.500 [+0.400, +0.600]" in out
    assert "| 1 (chosen) | 0.050 | 0.700 | 0.450 | 0.060 |" in out
