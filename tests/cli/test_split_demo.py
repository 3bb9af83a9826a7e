"""The split half of ``make demo``: the layer is chosen on validation questions, everything after uses it."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

import report
from activation_transfer.task.generator import EVAL_SEED
from cli import demo, kv_demo, split_demo
from cli.lightning_cli import eval_main, train_main  # the real CLIs (fake_demo replaces them inside the demo)
from cli.organism_cli import main as organism_main

# slots_self per receiver block on the validation questions: block 1 carries most.
SWEEP = {0: 0.30, 1: 0.45, 2: 0.10}


def opt(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_choose_layer_takes_the_best_slots_self_and_the_shallowest_tie() -> None:
    rows = [{"layer": 0, "slots_self": 0.2}, {"layer": 1, "slots_self": 0.4}, {"layer": 2, "slots_self": 0.4}]
    assert split_demo.choose_layer(rows) == 1
    with pytest.raises(ValueError, match="empty"):
        split_demo.choose_layer([])


def fake_kv_eval(args):
    """A KV evaluation: the layer-subset sweep's runs write a summary, the held-out run kv_functional records (a
    control's run: its condition's)."""
    run_dir = Path(opt(args, "--trainer.default_root_dir")) / "run"
    (run_dir / "report").mkdir(parents=True)
    conds = {"receiver_alone": 0.05, "skyline": 0.7, "kv_self": 0.65, "kv_functional": 0.5}
    summary = {"conditions": {c: {"n": 30, "word_boundary_contains": {"mean": v}} for c, v in conds.items()}}
    (run_dir / "report" / "summary.json").write_text(json.dumps(summary))
    cond = (json.loads(opt(args, "--model.conditions") or '["kv_functional"]') + ["kv_functional"])[0]
    rows = [
        {"sample_id": q, "condition": cond, "seed": s, "gold": "Peru", "prediction": "Peru"}
        | {"diagnostics": {"bytes_sent": 1024}}
        for q in ("q1", "q2")
        for s in (42, 123, 456)
    ]
    (run_dir / "records").mkdir()
    (run_dir / "records" / f"{cond}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(model=SimpleNamespace(report_result=None, run_dir=run_dir))


def fake_eval(args):
    """An evaluation that writes a run folder with the report files the demo reads (slots_self per SWEEP block)."""
    if opt(args, "-c") == str(kv_demo.KV_EVAL_CONFIG):
        return fake_kv_eval(args)
    run_dir = Path(opt(args, "--trainer.default_root_dir")) / "run"
    layer = int(opt(args, "--model.receiver.layer") or 0)
    conds = {"receiver_alone": 0.05, "skyline": 0.7, "slots_self": SWEEP[layer], "slots_zero": 0.06}
    summary = {"conditions": {c: {"n": 30, "word_boundary_contains": {"mean": v}} for c, v in conds.items()}}
    (run_dir / "report").mkdir(parents=True)
    (run_dir / "report" / "summary.json").write_text(json.dumps(summary))
    gap = [{"condition": "slots_functional", "fraction": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 30, "runs": 3}]
    (run_dir / "report" / "gap_recovered.json").write_text(json.dumps(gap))
    # Records: two two-candidate questions per condition; right on q1 only (counterfactual: the old answer on q2).
    (run_dir / "records").mkdir()
    cf = opt(args, "--data.counterfactual") == "true"
    for cond in json.loads(opt(args, "--model.conditions") or '["skyline", "slots_functional"]'):
        rows = [
            {
                "sample_id": q,
                "condition": cond,
                "seed": None,
                "hops": 2,
                "gold": "Peru",
                "prediction": pred,
                "metrics": {"word_boundary_contains": pred == "Peru"},
                "diagnostics": {"candidates": 2, **({"gold_original": "Japan"} if cf else {})},
            }
            for q, pred in (("q1", "Peru"), ("q2", "Japan"))
        ]
        (run_dir / "records" / f"{cond}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(model=SimpleNamespace(report_result=None, run_dir=run_dir))


def test_split_demo_sweeps_on_validation_questions_and_uses_the_chosen_block(
    tmp_path: Path, monkeypatch, capsys, fake_demo
) -> None:
    monkeypatch.setenv("ACTIVATION_TRANSFER_DEMO_JOBS", "1")  # the fakes live in this process
    fake_demo.evaluate = fake_eval
    trained, evaluated = fake_demo.trained, fake_demo.evaluated
    monkeypatch.setattr(split_demo, "receiver_blocks", lambda folder: len(SWEEP))
    monkeypatch.setattr(kv_demo, "receiver_hidden", lambda folder: 16)
    assert demo.main(["--out", str(tmp_path / "demo")]) == 0

    paper_eval, *rest = evaluated
    sweep, split_eval, controls = rest[: len(SWEEP)], rest[len(SWEEP)], rest[len(SWEEP) + 1 : -7]
    assert [opt(a, "-c") for a in rest[-7:]] == [str(kv_demo.KV_EVAL_CONFIG)] * 7  # the KV channel's, tested there
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
    # paper translators, aligned and functional at the chosen block, the controls, the KV sweep, two more seeds and
    # the KV controls
    assert len(trained) == 3 + 6 + 6 + 4 + 2 + 6
    lexical, mismatched = trained[9:12], trained[12:15]
    for args, seed in zip(lexical, (42, 123, 456)):
        assert opt(args, "--model.init_args.sender_site") == "embeddings" and opt(args, "--seed_everything") == str(
            seed
        )
        assert opt(args, "--model.init_args.receiver_model.layer") == "1"
    for args, seed in zip(mismatched, (42, 123, 456)):
        assert opt(args, "--data.init_args.mismatched_contexts") == "true"
        assert opt(args, "--data.init_args.mismatch_seed") == str(seed)
    # The controls in runs of their own, then the counterfactual contexts; each control reads its own translators.
    conds = [json.loads(opt(a, "--model.conditions")) for a in controls]
    assert conds == [
        ["slots_functional_lexical"],
        ["slots_functional_mismatched"],
        list(split_demo.COUNTERFACTUAL_CONDITIONS),
        ["slots_functional_lexical"],
        ["slots_functional_mismatched"],
    ]
    assert [opt(a, "--data.counterfactual") for a in controls] == [None, None, "true", "true", "true"]
    assert [opt(a, "--model.sender_site") for a in controls] == ["embeddings", None, None, "embeddings", None]
    assert all(opt(a, "--model.receiver.layer") == "1" for a in controls)
    for args, expected in ((controls[0], lexical), (controls[1], mismatched), (controls[4], mismatched)):
        used = [Path(c).read_text() for c in json.loads(opt(args, "--model.functional_translator_ckpt"))]
        assert used == [" ".join(a) for a in expected]

    report = Path(opt(split_eval, "--trainer.default_root_dir")) / "run" / "report"
    sweep_json = json.loads((report / "slots_self_layer_sweep.json").read_text())
    assert sweep_json["chosen_layer"] == 1 and [r["slots_self"] for r in sweep_json["rows"]] == [0.30, 0.45, 0.10]
    assert (report / "slots_self_layer_sweep.png").read_bytes().startswith(b"\x89PNG")
    out = capsys.readouterr().out
    assert f"[demo] split report and plots: {report}" in out
    assert "slots_functional" in out and "+0.500 [+0.400, +0.600]" in out
    assert "| 1 (chosen) | 0.050 | 0.700 | 0.450 | 0.060 |" in out
    # subgroups.json and its printout: every condition of the original runs, the counterfactual rates.
    sub = json.loads((report / "subgroups.json").read_text())
    assert [r["condition"] for r in sub["all"]] == [
        "skyline",
        "slots_functional",
        "slots_functional_lexical",
        "slots_functional_mismatched",
    ]
    assert all(r["accuracy"] == 0.5 and r["n"] == 2 for r in sub["candidates"])
    assert len(sub["counterfactual"]) == 7 and all(r["follows"] == r["keeps_old"] == 0.5 for r in sub["counterfactual"])
    assert "receiver full prompt (skyline) on two-candidate questions: 0.500" in out
    assert "| slots_functional_mismatched | 0.500" in out


def _resolved(args: list[str]) -> list[str]:
    """Arguments with every existing path made absolute, so a printed command compares with the one executed."""
    return [str(Path(a).resolve()) if os.path.exists(a) else a for a in args]


def test_demo_prints_the_commands_it_ran_with_paths_that_exist_and_that_parse(
    tmp_path: Path, monkeypatch, capsys, fake_demo
) -> None:
    monkeypatch.chdir(Path(demo.ROOT))  # a newcomer runs `make demo` in the repository: paths print relative to it
    monkeypatch.setenv("ACTIVATION_TRANSFER_DEMO_JOBS", "1")  # the fakes live in this process
    fake_demo.evaluate = fake_eval
    monkeypatch.setattr(split_demo, "receiver_blocks", lambda folder: len(SWEEP))
    monkeypatch.setattr(kv_demo, "receiver_hidden", lambda folder: 16)
    assert demo.main(["--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out.split("[demo] each step on its own")[1].split("\n[demo] total wall time")[0]
    lines = printed.splitlines()[2:]  # after the two header lines
    env = dict(kv.split("=", 1) for kv in shlex.split(lines[0])[1:])
    assert Path(env["ACTIVATION_TRANSFER_CACHE"]).is_dir() and env["WANDB_MODE"] == "disabled"  # conftest's
    titles = [line.split(".")[0] for line in lines if line.startswith("# ") and line[2].isdigit()]
    assert titles == [f"# {i}" for i in range(1, 13)]
    for role, folder in fake_demo.organisms.items():  # the organisms' cache folders are named, one a line
        assert f"#    {role}: {folder}" in lines
    commands = [shlex.split(line) for line in lines[1:] if not line.startswith("#")]
    by_script = {}
    for words in commands:
        assert Path(words[1]).is_file() and not Path(words[1]).is_absolute(), words[:2]  # the entry script, here
        by_script.setdefault(Path(words[1]).name, []).append(words[2:])

    # Exactly the commands the demo executed (a reused translator's too), in order.
    assert [_resolved(a) for a in by_script["train.py"]] == [_resolved(a) for a in fake_demo.trained]
    assert [_resolved(a) for a in by_script["evaluate.py"]] == [_resolved(a) for a in fake_demo.evaluated]
    assert len(by_script["organism.py"]) == 2 and len(by_script["report.py"]) == 2

    # Every path a command reads exists after the demo; every folder it writes into is the demo's.
    for args in by_script["train.py"] + by_script["evaluate.py"] + by_script["organism.py"]:
        assert Path(opt(args, "-c")).is_file() and not Path(opt(args, "-c")).is_absolute()
    for args in by_script["train.py"] + by_script["evaluate.py"]:
        assert Path(opt(args, "--trainer.default_root_dir")).is_dir()
        for name in ("--model.translator_ckpt", "--model.functional_translator_ckpt"):
            for ckpt in json.loads(opt(args, name) or "[]"):
                assert Path(ckpt).is_file() and ckpt.endswith("translator.ckpt"), ckpt
    for args in by_script["report.py"]:
        assert (Path(args[0]) / "report" / "summary.json").is_file() and opt(args, "--out") == f"{args[0]}/report"

    # Every command parses with its own CLI (--print_config stops before anything is loaded or trained).
    for main, key in ((train_main, "train.py"), (eval_main, "evaluate.py"), (organism_main, "organism.py")):
        for args in by_script[key]:
            with pytest.raises(SystemExit) as exit_:
                main([*args, "--print_config"])
            assert exit_.value.code in (None, 0), (key, args)
    for args in by_script["report.py"]:
        assert report.build_parser().parse_args(args).out == opt(args, "--out")
