"""bench/gpu_session.sh, dry run: one device call's whole path, and what comes back fits the device's limits.

The device returns at most 8 files of at most 16 MiB each, named in letters, digits, '.', '_' and '-'
(/work/.library/device/README.md). A session's GPU results are lost if the packing breaks, and it cannot be checked
on a GPU in CI, so this runs the shell path on CPU with the project's own packages (no carried wheels)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_session_script_brings_back_the_check_and_shippable_organisms_in_few_files(tmp_path):
    out, wheels, scratch = tmp_path / "out", tmp_path / "no_wheels", tmp_path / "tmp"
    wheels.mkdir()
    scratch.mkdir()
    env = os.environ | {
        "PYTHON": sys.executable,
        "OUT": str(out),
        "GPU_WHEELS": str(wheels),  # none: the test's interpreter and packages, not /tmp/site
        "GPU_CHECK_ARGS": "--steps 4 --skip paper split",  # no data files needed
        "GPU_ORGANISMS_ARGS": "--variants sender-4x96-b1024-fitted --parallel 1",
        "TMPDIR": str(scratch),  # the scripts' run folders (mktemp -d) stay inside the test's folder
    }
    run = subprocess.run(
        ["bash", "bench/gpu_session.sh", "300", "120", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "[gpu_env] no wheels in" in run.stdout
    left = int(re.search(r"organisms train for at most (\d+) s", run.stdout).group(1))
    assert 0 < left < 300 - 70

    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert 0 < len(files) <= 8
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) and p.stat().st_size <= 16 * 2**20 for p in files)
    check = json.loads((out / "gpu_check.json").read_text())
    assert [r["step"] for r in check["rows"]] == ["train aligned (extract + fit)", "train functional"]

    parts = sorted(out.glob("gpu_organisms.tar.part-*"))
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        names = set(tar.getnames())
        result = json.load(tar.extractfile("./sender-4x96-b1024-fitted/result.json"))
    for name in ("sender.safetensors", "manifest.json", "metrics.csv"):
        assert f"./sender-4x96-b1024-fitted/{name}" in names
    assert "./gpu_organisms.json" in names and not any(n.startswith("./cache") for n in names)
    # The time limit the session gave is in the training overrides, and so is the callback that fits the schedule to
    # it; the recipe that ships has neither, but the length the callback chose (here the dry run's ceiling, 6).
    assert f"--trainer.max_time=00:00:{left // 60:02d}:{left % 60:02d}" in result["overrides"]
    (fit,) = [json.loads(o.split("=", 1)[1]) for o in result["overrides"] if o.startswith("--trainer.callbacks=")]
    assert fit[0]["class_path"] == "callbacks.time_budget.FitStepsToTime" and fit[0]["init_args"]["seconds"] == left
    assert result["fit_steps_to_time"]["max_steps"] == result["global_step"] == result["max_steps"] == 6
    assert not any(o.startswith(("--trainer.max_time", "--trainer.callbacks")) for o in result["recipe_overrides"])
    assert result["recipe_overrides"][-1] == "--trainer.max_steps=6"
    assert any(scratch.iterdir())
