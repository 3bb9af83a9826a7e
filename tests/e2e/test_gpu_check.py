"""bench/gpu_check.py, dry run: the GPU check's real commands run end to end on CPU, and what it reports is what the
runs wrote (the check cannot run in CI on a GPU; this keeps it from rotting between the sessions that have one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_reports_each_step_and_the_records_it_wrote(tmp_path, multihop_dir, monkeypatch, bench_script):
    monkeypatch.chdir(ROOT)  # the configs are named relative to the repo root, as on the GPU machine
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])  # as when run as a script (the CLIs get their args in-process)
    out = tmp_path / "check"
    assert bench_script("gpu_check").main(["--dry-run", "--data-dir", str(multihop_dir), "--out", str(out)]) == 0
    result = json.loads((out / "gpu_check.json").read_text())
    steps = [r["step"] for r in result["rows"]]
    assert steps == ["train aligned (extract + fit)", "paper fp32", "paper bf16", "train functional", "split fp32"]
    fp32 = sum(len(f.read_text().splitlines()) for f in (out / "eval" / "paper_fp32").rglob("records/*.jsonl"))
    assert result["rows"][1]["samples"] == fp32 > 0
    assert result["paper_bf16_vs_fp32"]["records"] == fp32
    assert 0 <= result["paper_bf16_vs_fp32"]["same"] <= fp32
    assert (out / "cache").is_dir()  # caches cold, inside the check's folder


def test_a_used_folder_is_refused(tmp_path, multihop_dir, bench_script):
    (tmp_path / "old").mkdir()
    with pytest.raises(SystemExit) as err:
        bench_script("gpu_check").main(["--dry-run", "--data-dir", str(multihop_dir), "--out", str(tmp_path)])
    assert err.value.code == 2


def test_the_shell_script_falls_back_to_the_shared_data_and_removes_its_scratch_folder(tmp_path, multihop_dir):
    # A stand-in interpreter records what bench/gpu_check.sh passes to gpu_check.py and writes the report it copies:
    # the script's own logic in seconds, without the check's runs.
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'echo "$@" > "$ARGS_FILE"\n'
        'while [ $# -gt 0 ]; do [ "$1" = --out ] && run="$2"; shift; done\n'
        'mkdir -p "$run" && echo "{}" > "$run/gpu_check.json" && touch "$run/scratch.bin"\n'
    )
    fake.chmod(0o755)
    scratch, wheels, out = tmp_path / "tmp", tmp_path / "no_wheels", tmp_path / "out"
    scratch.mkdir()
    wheels.mkdir()
    env = os.environ | {
        "PYTHON": str(fake),
        "ARGS_FILE": str(tmp_path / "args"),
        "OUT": str(out),
        "GPU_WHEELS": str(wheels),
        "TMPDIR": str(scratch),
    }
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    args = (tmp_path / "args").read_text().split()
    # A fresh clone has no .gpu/data (bench/gpu_wheels.sh makes it for the GPU machine): the shared folder it copies.
    data = ".gpu/data" if (ROOT / ".gpu" / "data").is_dir() else "../shared/data/multihop"
    assert args[args.index("--data-dir") + 1] == data and (ROOT / data / "clean_eval.jsonl").is_file()
    assert args[-1] == "--dry-run"
    assert {p.name for p in out.iterdir()} == {"gpu_check.json", "gpu_check.log"}
    assert not any(scratch.iterdir())  # the run folder (mktemp -d) is gone once its report is copied
