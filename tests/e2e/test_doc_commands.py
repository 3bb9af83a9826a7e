"""Every ``python train.py|evaluate.py|organism.py|report.py`` command the README and docs/*.md show parses.

The commands of ```bash blocks (continuation lines joined) and of inline code spans, with their placeholders
(``<key>``, ``<L>``, ``<hash>``, ``$seed``, ...) filled in, run through their CLI with ``--print_config`` (which
validates every option's name and type, then exits before any model is loaded); ``report.py``'s through its parser.
Commands that still hold a placeholder this module cannot fill (``<config>``) are left out.
"""

from __future__ import annotations

import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENTRY_POINTS = {
    "train.py": "cli.lightning_cli:train_main",
    "evaluate.py": "cli.lightning_cli:eval_main",
    "organism.py": "cli.organism_cli:main",
}
PLACEHOLDERS = {
    "<key>": "k",
    "<L>": "0",
    "<hash>": "h",
    "<e>": "1",
    "<s>": "2",
    "<epoch>": "1",
    "<step>": "2",
    "<folder>": "runs/doc_folder",
    "<recipe>": "configs/organisms/receiver.yaml",
    "$seed": "42",
    ", ...]": "]",
}
COMMAND = re.compile(r"^python (train|evaluate|organism|report)\.py\s")


def _fill(command: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    return command


def doc_commands() -> list[tuple[str, str]]:
    """``(where, command)`` of every command line of the four CLIs in the documents, placeholders filled."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for block in re.findall(r"^```bash\n(.*?)^```$", text, flags=re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if COMMAND.match(line):
                    found.append((f"{path.name} (bash)", line))
        prose = re.sub(r"^```.*?^```$", "", text, flags=re.S | re.M)
        for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose):
            span = " ".join(span.split())
            if COMMAND.match(span):
                found.append((f"{path.name} (inline)", span))
    return [(where, _fill(c)) for where, c in found if "<" not in _fill(c) and "..." not in _fill(c)]


COMMANDS = doc_commands()


def test_the_documents_show_commands_of_every_cli():
    scripts = {shlex.split(c)[1] for _, c in COMMANDS}
    assert scripts == {"train.py", "evaluate.py", "organism.py", "report.py"}, scripts


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}: {c[:70]}" for w, c in COMMANDS])
def test_doc_command_parses(where, command, monkeypatch, capsys):
    argv = shlex.split(command, comments=True)
    script, args = argv[1], argv[2:]
    if script == "report.py":
        import report

        report.build_parser().parse_args(args)  # exits with status 2 on an unknown or malformed option
        return

    def no_models(*_args, **_kwargs):
        raise AssertionError("--print_config must not load models")

    import activation_transfer.models.frozen_lm as models

    monkeypatch.setattr(models, "load_model", no_models)
    monkeypatch.setattr(sys, "argv", [script])  # LightningCLI warns when args= and sys.argv both carry args
    module, func = ENTRY_POINTS[script].split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), f"{where}: {command}\n{capsys.readouterr().err[-2000:]}"
