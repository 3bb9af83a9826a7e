"""What the commands print and offer: the evaluation's own summary table, a readable --help."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_evaluate_cli import ckpt, small  # noqa: F401 (ckpt: the module-scoped fixture)

from cli.lightning_cli import eval_main, train_main


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])


def test_evaluate_prints_the_condition_table_and_folders_not_lightnings_metrics(tmp_path, ckpt, capsys):  # noqa: F811
    cli = eval_main(small(tmp_path, ckpt, "--model.conditions", "[no_inject, additive]", "--model.seeds", "[42]"))
    out = capsys.readouterr().out
    assert f"run folder: {cli.model.run_dir}" in out
    assert "  additive__seed42: word_boundary_contains " in out and " on 6 samples (" in out
    assert "| no_inject | 1 | 6 |" in out and "| additive | 1 | 6 |" in out
    assert f"report (tables, CIs, plots): {cli.model.run_dir / 'report'}" in out
    assert "Test metric" not in out and "DataLoader 0" not in out  # Lightning's wide table is off (verbose=False)


def _help(main, subcommand: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([subcommand, "--help"])
    return capsys.readouterr().out


def test_help_lists_the_projects_translators_and_no_optimizer_options(capsys):
    text = _help(train_main, "fit", capsys)
    assert "LinearTranslator" in text and "MLPTranslator" in text
    assert "torch.nn.Linear" not in text and "TransformerEncoder" not in text  # not every torch module
    assert "--optimizer" not in text and "--lr_scheduler" not in text  # the module's AdamW schedule is the one
    assert "--optimizer" not in _help(eval_main, "test", capsys)


def test_a_wandb_run_without_a_group_is_grouped_by_its_config_name(tmp_path):
    # train.py -c configs/train/X.yaml and evaluate.py -c configs/eval/X.yaml then share the group X (both CLIs
    # share ProjectCLI.before_instantiate_classes).
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    (tmp_path / "train").mkdir()
    shutil.copy(root / "train" / "tiny.yaml", tmp_path / "train" / "exp-7.yaml")
    train = train_main(["-c", str(tmp_path / "train" / "exp-7.yaml"), "--trainer.default_root_dir",
                        str(tmp_path / "t")], run=False)  # fmt: skip
    assert train.trainer.logger._wandb_init["group"] == "exp-7"
    # An explicit group wins.
    other = train_main(["-c", str(tmp_path / "train" / "exp-7.yaml"), "--trainer.default_root_dir",
                        str(tmp_path / "t"), "--trainer.logger.init_args.group", "mine"], run=False)  # fmt: skip
    assert other.trainer.logger._wandb_init["group"] == "mine"


def test_project_lines_print_once_when_someone_installs_a_root_handler():
    # wandb's logging.warning("Images sizes do not match") calls basicConfig: a root handler. A project line must
    # still print once (by the project's handler), not a second time through the root.
    import ast
    import io
    import logging

    from cli.console import PROJECT_LOGGERS, setup_logging

    setup_logging()
    root_stream = io.StringIO()
    root_handler = logging.StreamHandler(root_stream)
    logging.getLogger().addHandler(root_handler)
    try:
        for name in PROJECT_LOGGERS:
            logging.getLogger(f"{name}.some_module").info("a project line")
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert root_stream.getvalue() == ""
    for name in PROJECT_LOGGERS:
        # (tests may add pytest's capture handlers beside it; those are not printing handlers)
        assert sum(type(h) is logging.StreamHandler for h in logging.getLogger(name).handlers) == 1

    # Every package whose modules log is one of them (a new package would otherwise be silent).
    root = Path(__file__).resolve().parents[2]
    logging_packages = set()
    for path in root.glob("*/**/*.py"):
        top = path.relative_to(root).parts[0]
        if top in ("tests", "bench", ".venv") or top.startswith("."):
            continue
        if any(isinstance(n, ast.Attribute) and n.attr == "getLogger" for n in ast.walk(ast.parse(path.read_text()))):
            logging_packages.add(top)
    assert logging_packages and logging_packages <= set(PROJECT_LOGGERS)
