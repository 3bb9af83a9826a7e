"""Every YAML under configs/ parses with its entry point's ``--print_config`` (which exits before instantiation)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# The organism recipes are package data (configs/organisms), the rest are user configs.
ORGANISM_CONFIGS = ROOT / "configs" / "organisms"
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml")) + sorted(ORGANISM_CONFIGS.glob("*.yaml"))

# configs/<folder> -> (entry point "module:function", subcommand)
ENTRY_POINTS = {
    "train": ("cli.lightning_cli:train_main", "fit"),
    "eval": ("cli.lightning_cli:eval_main", "test"),
    "organisms": ("cli.organism_cli:main", "fit"),
}


def _folder(path: Path) -> str:
    return "organisms" if path.parent == ORGANISM_CONFIGS else path.relative_to(ROOT / "configs").parts[0]


def test_every_config_folder_has_an_entry_point():
    folders = {_folder(p) for p in CONFIGS}
    assert folders <= set(ENTRY_POINTS), f"configs/ folders without an entry point: {folders - set(ENTRY_POINTS)}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses(path, monkeypatch, capsys):
    folder = _folder(path)
    target, subcommand = ENTRY_POINTS[folder]
    module_name, func = target.split(":")
    # Not importorskip: a missing entry point is a failure, never a skip.
    main = getattr(importlib.import_module(module_name), func)

    def no_models(*args, **kwargs):
        raise AssertionError("--print_config must not load models")

    import activation_transfer.models.frozen_lm as models

    monkeypatch.setattr(models, "load_model", no_models)
    monkeypatch.setattr(sys, "argv", [f"{folder}.py"])  # LightningCLI warns when args= and sys.argv both carry args
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "-c", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert isinstance(printed, dict) and "trainer" in printed and "model" in printed
