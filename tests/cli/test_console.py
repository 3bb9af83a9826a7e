"""What the commands print and offer: the evaluation's own summary table, a readable --help."""

from __future__ import annotations

import sys

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
