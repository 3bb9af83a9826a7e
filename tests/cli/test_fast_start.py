"""Issue 22 item 3: ``train.py``/``evaluate.py`` answer their top-level --help and a missing config file without
importing Lightning, and say what the LightningCLI says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli.fast_start import USAGES, answer_early, missing_config, top_help
from cli.lightning_cli import eval_main, train_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("prog", "main"), [("evaluate.py", eval_main), ("train.py", train_main)])
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
