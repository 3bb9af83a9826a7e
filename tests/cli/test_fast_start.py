"""Issue 22 item 3: ``train.py``/``evaluate.py`` answer their top-level --help and a missing config file without
importing Lightning, and say what the LightningCLI says."""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli.fast_start import USAGES, answer_early, missing_config, run_command, top_help
from cli.lightning_cli import eval_main, train_main
from cli.organism_cli import main as organism_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("prog", "main"), [("evaluate.py", eval_main), ("train.py", train_main), ("organism.py", organism_main)]
)
def test_the_lightning_free_help_names_the_clis_subcommands_and_description(prog, main, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [prog])
    with pytest.raises(SystemExit):
        main(["--help"])
    full = capsys.readouterr().out
    description, subcommands = USAGES[prog]
    listed = full.split("Available subcommands:")[1]
    assert re.findall(r"^    (\w+) ", listed, re.M) == list(subcommands)
    assert " ".join(description.split()) in " ".join(full.split())
    fast = top_help(prog)
    assert description in fast and all(f"  {name} " in fast for name in subcommands)


def test_a_missing_config_file_is_found_before_the_cli(tmp_path, capsys):
    config = tmp_path / "here.yaml"
    config.write_text("model: {}\n")
    assert missing_config(["test", "-c", str(config), "--config", str(tmp_path / "gone.yaml")]) == str(
        tmp_path / "gone.yaml"
    )
    assert missing_config([f"--config={tmp_path / 'x.yaml'}"]) == str(tmp_path / "x.yaml")
    assert missing_config(["test", "-c", str(config), "--model.config", "nope"]) is None
    assert missing_config(["fit", "-c", '{"trainer": {"max_epochs": 1}}']) is None  # an inline config
    assert answer_early("evaluate.py", ["test", "-c", "nope.yaml"]) == 2
    assert (
        capsys.readouterr().err == "evaluate.py: error: config file nope.yaml does not exist (-c takes a YAML file)\n"
    )
    assert answer_early("evaluate.py", ["test", "-c", str(config)]) is None
    assert answer_early("train.py", ["fit", "--help"]) is None  # a subcommand's help needs the classes


@pytest.mark.parametrize("args", [["--help"], ["test", "-c", "nope.yaml"]])
def test_the_entry_points_answer_without_importing_lightning_or_torch(args):
    code = (
        "import runpy, sys; sys.argv = ['evaluate.py', *sys.argv[1:]]\n"
        "try:\n    runpy.run_path('evaluate.py', run_name='__main__')\n"
        "except SystemExit as e:\n    print('exit', e.code)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pytorch_lightning', 'transformers')))"
    )
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-2:] == [f"exit {0 if args == ['--help'] else 2}", "[]"]


def test_a_command_that_ran_leaves_its_objects_out_of_the_shutdown_collection(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "test", "-c", "nope.yaml"])
    with pytest.raises(SystemExit) as exc:  # answered early: main is not run
        run_command("evaluate.py", lambda: ran.append(1))
    assert exc.value.code == 2 and not ran and gc.get_freeze_count() == 0
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "test"])
    try:
        run_command("evaluate.py", lambda: ran.append(gc.get_freeze_count()))
        assert ran == [0] and gc.get_freeze_count() > 0  # frozen after main, not before
    finally:
        gc.unfreeze()  # this test process goes on


FAULTS = """
import resource, sys
from cli.fast_start import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def churn():  # two 24 MiB blocks allocated, filled and freed, as a decoding step's activations are
    a, b = bytearray(24 << 20), bytearray(24 << 20)
    a[::4096] = b[::4096] = b"x" * len(range(0, 24 << 20, 4096))
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_is_not_faulted_in_again():
    # Page faults counted, not time: by default every 24 MiB block is mapped afresh (~6k faults each); kept, the
    # blocks of the first round are reused.
    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", FAULTS, mode], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("default", "keep")
    }
    assert faults["default"] > 10 * 2 * 5000 and faults["keep"] < 2000, faults


def test_sigterm_ends_a_command_with_the_shells_status_and_how_to_resume(monkeypatch, capsys):
    # Lightning turns SIGTERM into SIGTERMException, a SystemExit without a code: a shell read status 0.
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    def stopped():
        raise SIGTERMException

    monkeypatch.setattr(sys, "argv", ["train.py", "fit"])
    with pytest.raises(SystemExit) as exc:
        run_command("train.py", stopped)
    assert exc.value.code == 143
    assert capsys.readouterr().err == (
        "train.py: interrupted by SIGTERM; rerun the same command with --ckpt_path last to resume from the last "
        "checkpoint\n"
    )
    with pytest.raises(SystemExit) as exc:  # any other exit keeps its status
        run_command("train.py", lambda: sys.exit(3))
    assert exc.value.code == 3 and gc.get_freeze_count() == 0


def test_matplotlib_writes_into_the_project_cache_not_the_home_folder(tmp_path):
    # torchmetrics imports matplotlib, which makes its config and font cache folders on import.
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    env.update(HOME=str(tmp_path / "home"), ACTIVATION_TRANSFER_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "organism.py", "fit", "--help"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cache" / "matplotlib").is_dir() and not (tmp_path / "home").exists()
