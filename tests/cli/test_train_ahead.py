"""The demo's trainings side by side: every translator a plan asks for is trained in a worker process with its share
of the cores, and nothing is trained ahead with one job."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli.train_ahead import JOBS_ENV, cores, demo_jobs, train_ahead


def fake_translator(out, organisms, seed, config, extra=None, steps=None) -> Path:
    """Writes which process trained it and at how many threads (a worker imports this module by name)."""
    import torch

    path = Path(out) / f"seed{seed}-{'-'.join(extra or [])}.txt"
    path.write_text(f"{os.getpid()} {torch.get_num_threads()} {config} {sorted(organisms)}")
    return path


def _plans(folder: Path):
    organisms = {"sender": folder / "s", "receiver": folder / "r"}
    return [
        lambda t: [t(folder, organisms, s, "c.yaml", ["--x", str(s)]) for s in (1, 2)],
        lambda t: {"control": [t(folder, organisms, 3, "k.yaml", ["--y"], steps=None)]},
    ]


def test_every_planned_translator_trains_in_a_worker(tmp_path) -> None:
    wanted = train_ahead(fake_translator, _plans(tmp_path), jobs=2)
    assert [(w[2], w[3], w[4]) for w in wanted] == [
        (1, "c.yaml", ["--x", "1"]),
        (2, "c.yaml", ["--x", "2"]),
        (3, "k.yaml", ["--y"]),
    ]
    written = {p.name: p.read_text().split() for p in tmp_path.glob("*.txt")}
    assert set(written) == {"seed1---x-1.txt", "seed2---x-2.txt", "seed3---y.txt"}
    assert all(int(w[0]) != os.getpid() and int(w[1]) == max(1, cores() // 2) for w in written.values())


def test_one_job_trains_nothing_ahead(tmp_path) -> None:
    assert len(train_ahead(fake_translator, _plans(tmp_path), jobs=1)) == 3
    assert not list(tmp_path.glob("*.txt"))


def test_jobs_come_from_the_environment_or_the_cores(monkeypatch) -> None:
    monkeypatch.delenv(JOBS_ENV, raising=False)
    assert demo_jobs() == max(1, min(4, cores()))
    monkeypatch.setenv(JOBS_ENV, "3")
    assert demo_jobs() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(JOBS_ENV, bad)
        with pytest.raises(ValueError, match=f"{JOBS_ENV}="):
            demo_jobs()


def test_the_demo_refuses_a_bad_jobs_setting_at_once_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    import cli.demo

    def organisms(*_args):
        raise AssertionError("the demo started before checking its settings")

    monkeypatch.setattr(cli.demo, "_organisms", organisms)
    monkeypatch.setenv(JOBS_ENV, "two")
    with pytest.raises(SystemExit) as exit_:
        cli.demo.main(["--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"demo: error: {JOBS_ENV}='two': ") and err.count("\n") == 1
