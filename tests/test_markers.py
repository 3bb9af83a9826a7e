"""The cross-machine rerun of ``make test`` catches what it is for: files from another machine compared exactly.

Two checks: every test module that reads ``tests/fixtures`` is marked ``cross_machine`` (so ``make test`` reruns it
under the Makefile's ``OTHER_CPU`` settings), and those settings really change fp32 results on this machine (so an
exact comparison with a stored float would fail in the rerun, as it would on another CPU).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def other_cpu_env() -> dict[str, str]:
    """The ``OTHER_CPU`` settings of the Makefile, as a dict."""
    line = re.search(r"^OTHER_CPU := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert line, "Makefile has no OTHER_CPU line"
    return dict(pair.split("=", 1) for pair in line.group(1).split())


def test_modules_reading_fixture_files_are_marked_cross_machine():
    unmarked = [
        str(path.relative_to(ROOT))
        for path in sorted(TESTS.rglob("test_*.py"))
        if re.search(r"""["']fixtures["']""", path.read_text())
        and "pytestmark = pytest.mark.cross_machine" not in path.read_text()
    ]
    assert not unmarked, f"these read tests/fixtures but are not marked cross_machine: {unmarked}"


_MATMUL = (
    "import hashlib, torch; torch.manual_seed(0); a, b = torch.randn(64, 333), torch.randn(333, 77); "
    "print(hashlib.sha256((a @ b).numpy().tobytes()).hexdigest())"
)


def _matmul_digest(extra_env: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in other_cpu_env()} | extra_env
    out = subprocess.run([sys.executable, "-c", _MATMUL], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="this CPU has no SIMD kernels to switch off"
)
def test_other_cpu_settings_change_fp32_results():
    assert set(other_cpu_env()) >= {"ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS"}
    assert _matmul_digest(other_cpu_env()) != _matmul_digest({})
