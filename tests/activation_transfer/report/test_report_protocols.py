"""The report reads each run folder's protocol and refuses to mix protocols (issue 20 item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_report import _records, main  # report.py's main, loaded by path

from activation_transfer.report import ReportInputError, input_protocol, run_report


def _run_folder(root: Path, name: str, conditions: dict, meta: dict, config: str | None = None) -> Path:
    """A run folder as the evaluation module writes it: records/<condition>__<run>.jsonl, meta.json, config.yaml."""
    run = root / name
    for cond, (seed, correct) in conditions.items():
        stem = f"{cond}__deterministic" if seed is None else f"{cond}__seed{seed}"
        path = run / "records" / f"{stem}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in _records(cond, seed, correct)))
    (run / "meta.json").write_text(json.dumps(meta))
    if config is not None:
        (run / "config.yaml").write_text(config)
    return run


CORRECT = [True, False, True, False, False, True, False, False]


def _paper(root: Path) -> Path:
    conds = {"no_inject": (None, CORRECT), "nl_relay": (None, CORRECT[::-1]), "additive": (42, CORRECT)}
    # The paper protocol adds nothing to meta.json (older folders keep their fingerprint); config.yaml names it.
    return _run_folder(root, "eval-paper", conds, {"fingerprint": "p"}, "model:\n  protocol: paper\n")


def _split(root: Path, meta_protocol: bool = True) -> Path:
    conds = {"receiver_alone": (None, CORRECT), "skyline": (None, [True] * 8), "nl_relay": (None, CORRECT[::-1])}
    conds["slots_functional"] = (42, CORRECT[:4] + [True] * 4)
    meta = {"fingerprint": "s", **({"protocol": "split"} if meta_protocol else {})}
    return _run_folder(root, "eval-split", conds, meta, "model:\n  protocol: split\n  seeds: [42]\n")


def test_paper_and_split_run_folders_together_are_refused_naming_both(tmp_path: Path, capsys) -> None:
    paper, split = _paper(tmp_path), _split(tmp_path)
    # Folders, their records/ folders, or a file inside: each is traced to its run folder.
    for inputs in ([paper, split], [paper / "records", split / "records" / "slots_functional__seed42.jsonl"]):
        with pytest.raises(ReportInputError, match="mix evaluation protocols") as err:
            run_report(inputs, tmp_path / "out", resamples=20)
        assert f"{paper}: paper" in str(err.value) and f"{split}: split" in str(err.value)
    with pytest.raises(SystemExit) as exc:
        main([str(paper), str(split), "--out", str(tmp_path / "cli")])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "report each protocol separately" in lines[0] and str(split) in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()


def test_each_protocol_alone_is_reported_with_its_own_baselines(tmp_path: Path) -> None:
    paper, split = _paper(tmp_path), _split(tmp_path)
    p = run_report([paper], tmp_path / "p", resamples=20)
    s = run_report([split], tmp_path / "s", resamples=20)
    assert (p.summary["meta"]["protocol"], p.summary["meta"]["baselines"]) == ("paper", ["no_inject", "nl_relay"])
    assert (s.summary["meta"]["protocol"], s.summary["meta"]["baselines"]) == ("split", ["receiver_alone", "skyline"])
    assert {c["baseline"] for c in s.comparisons} == {"receiver_alone", "skyline"} and s.gap_recovered
    # Loose records carry no protocol: the conditions decide, as before.
    loose = run_report(_records("no_inject", None, CORRECT) + _records("c", 1, CORRECT), tmp_path / "l", resamples=20)
    assert loose.summary["meta"]["protocol"] is None


def test_the_protocol_comes_from_meta_json_then_config_yaml(tmp_path: Path) -> None:
    split = _split(tmp_path, meta_protocol=False)  # only config.yaml says split
    assert input_protocol([split]) == "split"
    (split / "config.yaml").unlink()
    assert input_protocol([split / "records"]) == "paper"  # meta.json names only non-paper protocols
    assert input_protocol([_split(tmp_path / "b")]) == "split"
    assert input_protocol([tmp_path / "b" / "eval-split" / "meta.json"]) is None  # not an input of records
    # An explicit protocol must agree with the folders.
    with pytest.raises(ReportInputError, match="protocol 'paper' given"):
        run_report([_split(tmp_path / "c")], tmp_path / "o", protocol="paper")


def test_run_folders_of_different_configurations_are_reported_with_a_warning(tmp_path: Path, capsys) -> None:
    # One experiment's baseline, another's condition: both paper protocol, so only the fingerprints tell them apart.
    base = _run_folder(tmp_path, "eval-a", {"no_inject": (None, CORRECT)}, {"fingerprint": "a" * 64})
    other = _run_folder(tmp_path, "eval-b", {"additive": (42, CORRECT[::-1])}, {"fingerprint": "b" * 64})
    (other / "fingerprint.json").write_text(json.dumps({"fingerprint": "b" * 64, "identity": {"receiver": "x"}}))
    res = run_report([base, other], tmp_path / "o", resamples=20, permutations=20)
    warning = [n for n in res.notes if "different configurations" in n]
    assert len(warning) == 1 and f"{base}: aaaaaaaaaaaa" in warning[0] and "differ in receiver" in warning[0]
    assert warning[0] in res.summary["meta"]["notes"]
    main([str(base), str(other), "--out", str(tmp_path / "cli")])
    assert "note: WARNING the inputs come from run folders of different configurations" in capsys.readouterr().out
    # Folders of one configuration: no warning.
    same = _run_folder(tmp_path, "eval-c", {"additive": (42, CORRECT)}, {"fingerprint": "a" * 64})
    res = run_report([base, same], tmp_path / "o2", resamples=20, permutations=20)
    assert not any("different configurations" in n for n in res.notes)


def test_unfinished_runs_of_a_run_folder_are_named(tmp_path: Path) -> None:
    # A crash mid-run leaves partial/<key>/ and no records/<key>.jsonl: the condition would show fewer runs, unsaid.
    run = _paper(tmp_path)
    (run / "partial" / "additive__seed123").mkdir(parents=True)
    (run / "partial" / "additive__seed123" / "rank0.jsonl").write_text("")
    (run / "partial" / "additive__seed42").mkdir()  # finished (its records file exists): not named
    res = run_report([run / "records"], tmp_path / "o", resamples=20, permutations=20)
    assert res.summary["conditions"]["additive"]["runs"] == 1
    named = [n for n in res.notes if "unfinished run(s)" in n]
    assert len(named) == 1 and f"{run}: unfinished run(s) additive__seed123 (partial/" in named[0]
