"""What the commands print and offer: the evaluation's own summary table, a readable --help."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
from test_evaluate_cli import ckpt, small  # noqa: F401 (ckpt: the module-scoped fixture)

from cli.lightning_cli import eval_main, train_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TRAIN_TINY, EVAL_TINY = str(CONFIGS / "train" / "tiny.yaml"), str(CONFIGS / "eval" / "tiny.yaml")


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


def _help(main, args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*args, "--help"] if "--help-full" not in args else args)
    assert exc.value.code in (0, None)
    return capsys.readouterr().out


def test_help_lists_the_projects_translators_and_no_optimizer_options(capsys):
    text = _help(train_main, ["fit"], capsys)
    assert "LinearTranslator" in text and "MLPTranslator" in text
    assert "torch.nn.Linear" not in text and "TransformerEncoder" not in text  # not every torch module
    assert "--optimizer" not in text and "--lr_scheduler" not in text  # the module's AdamW schedule is the one
    assert "--optimizer" not in _help(eval_main, ["test"], capsys)


def test_a_wandb_run_without_a_group_is_grouped_by_its_config_name(tmp_path):
    # train.py -c configs/train/X.yaml and evaluate.py -c configs/eval/X.yaml then share the group X (both CLIs
    # share ProjectCLI.before_instantiate_classes).
    import shutil

    root = Path(__file__).resolve().parents[2] / "configs"
    (tmp_path / "train").mkdir()
    shutil.copy(root / "train" / "tiny.yaml", tmp_path / "train" / "exp-7.yaml")
    args = ["-c", str(tmp_path / "train" / "exp-7.yaml"), "--trainer.default_root_dir", str(tmp_path / "t")]
    train = train_main(args, run=False)
    assert train.trainer.logger._wandb_init["group"] == "exp-7"
    # An explicit group wins.
    other = train_main([*args, "--trainer.logger.init_args.group", "mine"], run=False)
    assert other.trainer.logger._wandb_init["group"] == "mine"


def test_a_trainings_wandb_run_name_ends_in_its_seed(tmp_path):
    # The three seeds of one config were three runs of one name in one group, told apart only by their config.
    root = Path(__file__).resolve().parents[2] / "configs"
    args = ["-c", str(root / "train" / "tiny.yaml"), "--trainer.default_root_dir", str(tmp_path / "t")]
    names = {
        s: train_main([*args, "--seed_everything", str(s)], run=False).trainer.logger._wandb_init["name"]
        for s in (42, 123)
    }
    assert names == {42: "tiny-seed42", 123: "tiny-seed123"}
    named = train_main([*args, "--trainer.logger.init_args.name", "mine-seed7", "--seed_everything", "7"], run=False)
    assert named.trainer.logger._wandb_init["name"] == "mine-seed7"  # not mine-seed7-seed7


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


# --- the command line's own mistakes: one line naming the fix, exit status 2 ------------------------------------


def _error(main, args: list[str], capsys, prog: str, monkeypatch) -> str:
    monkeypatch.setattr(sys, "argv", [prog])  # the parser names the program after argv[0]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no page of usage
    return err


def test_a_config_before_the_subcommand_names_the_fix(capsys, monkeypatch):
    err = _error(train_main, ["-c", TRAIN_TINY, "fit"], capsys, "train.py", monkeypatch)
    assert err == f"train.py: error: put -c after the subcommand: python train.py fit -c {TRAIN_TINY}\n"
    err = _error(eval_main, ["-c", EVAL_TINY, "test", "--data.num_samples", "3"], capsys, "evaluate.py", monkeypatch)
    fixed = f"python evaluate.py test -c {EVAL_TINY} --data.num_samples 3"
    assert err == f"evaluate.py: error: put -c after the subcommand: {fixed}\n"


@pytest.mark.parametrize(
    ("config", "option", "expected"),
    [
        ("tiny", "--trainer.max_epochz", "--trainer.max_epochs or --trainer.min_epochs"),
        ("tiny", "--model.lrr", "--model.lr"),  # subclass mode: the default module's arguments
        ("tiny", "--data.sed", "--data.seed"),
        ("functional_demo", "--model.objectiv", "--model.objective"),  # the module the config names
    ],
)
def test_a_typo_gets_the_closest_options(capsys, monkeypatch, config, option, expected):
    args = ["fit", "-c", str(CONFIGS / "train" / f"{config}.yaml"), option, "3"]
    err = _error(train_main, args, capsys, "train.py", monkeypatch)
    assert err == f"train.py fit: error: unknown option {option}; did you mean {expected}?\n"


def test_a_typo_in_evaluate_and_an_unknown_option(capsys, monkeypatch):
    err = _error(
        eval_main, ["test", "-c", EVAL_TINY, "--model.translator_ckp", "x"], capsys, "evaluate.py", monkeypatch
    )
    assert err == (
        "evaluate.py test: error: unknown option --model.translator_ckp; did you mean --model.translator_ckpt or "
        "--model.functional_translator_ckpt?\n"
    )
    err = _error(eval_main, ["test", "-c", EVAL_TINY, "--zzz", "1"], capsys, "evaluate.py", monkeypatch)
    assert err == "evaluate.py test: error: unknown option --zzz; --help lists the options\n"


def test_a_config_files_unknown_key_and_bad_yaml_name_the_file(capsys, monkeypatch, tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  conditons: [no_inject]\n")
    err = _error(eval_main, ["test", "-c", EVAL_TINY, "-c", str(typo)], capsys, "evaluate.py", monkeypatch)
    fix = "unknown key model.conditons; did you mean model.conditions?"
    assert err == f"evaluate.py test: error: config {typo}: {fix}\n"
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_epochs: 3\nmodel: [\n")
    err = _error(train_main, ["fit", "-c", TRAIN_TINY, "--config", str(broken)], capsys, "train.py", monkeypatch)
    assert err.startswith(f"train.py fit: error: config {broken}: not valid YAML (") and "line 4, column 1)" in err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "is empty, not a mapping of options"),
        ("# nothing yet\n", "is empty, not a mapping of options"),
        ("x", "holds a str, not a mapping of options"),
        ("- 1\n- 2\n", "holds a list, not a mapping of options"),
        (None, "is a folder; -c takes a YAML file"),
    ],
)
def test_a_config_file_without_options_names_the_file(capsys, monkeypatch, tmp_path, content, expected):
    # jsonargparse's line was "Unexpected config: <the file's text>" (for an empty file: nothing), naming no file.
    config = tmp_path / "run.yaml"
    config.mkdir() if content is None else config.write_text(content)
    err = _error(train_main, ["fit", "-c", TRAIN_TINY, "-c", str(config)], capsys, "train.py", monkeypatch)
    assert err.startswith(f"train.py fit: error: config {config} {expected}"), err


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--trainer.max_epochs", "abc", "--trainer.max_epochs: expected null or int; got abc"),
        ("--data.extract_batch_size", "x", "--data.extract_batch_size: expected int; got x"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_option_and_the_types(capsys, monkeypatch, option, value, expected):
    err = _error(train_main, ["fit", "-c", TRAIN_TINY, option, value], capsys, "train.py", monkeypatch)
    assert err == f"train.py fit: error: {expected}\n"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (
            "lightning_modules.translator.TranslatorModul",
            "(module 'lightning_modules.translator' has no attribute 'TranslatorModul'); did you mean "
            "lightning_modules.translator.TranslatorModule or lightning_modules.translator.Translator?",
        ),
        ("foo.Bar", "(No module named 'foo'); give a class as module.ClassName"),
    ],
)
def test_a_class_path_that_does_not_import_names_the_option_and_the_reason(
    capsys, monkeypatch, tmp_path, given, expected
):
    # The line was "Expected a path but ... either not accessible or invalid; Problem with given class_path '...':",
    # without the option or the reason (on jsonargparse's next line); from a config file, only its last part.
    err = _error(train_main, ["fit", "-c", TRAIN_TINY, "--model", given], capsys, "train.py", monkeypatch)
    assert err == f"train.py fit: error: --model {given}: cannot import it {expected}\n"
    config = tmp_path / "model.yaml"
    config.write_text(f"model:\n  class_path: {given}\n")
    err = _error(train_main, ["fit", "-c", TRAIN_TINY, "-c", str(config)], capsys, "train.py", monkeypatch)
    assert err == f"train.py fit: error: --model {given}: cannot import it {expected}\n"


def test_a_list_option_given_one_value_names_the_list_type(capsys, monkeypatch):
    # model.seeds: None | Sequence[int]; the list type was dropped, so "expected null" was all the line said.
    err = _error(eval_main, ["test", "-c", EVAL_TINY, "--model.seeds", "42"], capsys, "evaluate.py", monkeypatch)
    assert err == "evaluate.py test: error: --model.seeds: expected null or a list of int; got 42\n"


def test_a_union_of_literals_lists_their_values(capsys, monkeypatch):
    # Lightning's precision: None | Literal[64, 32, 16] | Literal["16-mixed", ...] | Literal["64", ...]; jsonargparse's
    # own errors call the first Literal "int".
    err = _error(train_main, ["fit", "-c", TRAIN_TINY, "--trainer.precision", "foo"], capsys, "train.py", monkeypatch)
    assert err.startswith("train.py fit: error: --trainer.precision: expected null or one of 64, 32, 16, ")
    assert "'bf16-mixed', " in err and err.endswith("; got foo\n") and " int" not in err


def test_abbreviated_options_are_refused(capsys, monkeypatch):
    # argparse would take --trainer.max_epoch as --trainer.max_epochs (a unique prefix) without a word.
    args = ["fit", "-c", TRAIN_TINY, "--trainer.max_epoch", "3", "--print_config"]
    err = _error(train_main, args, capsys, "train.py", monkeypatch)
    assert err.startswith("train.py fit: error: unknown option --trainer.max_epoch; did you mean --trainer.max_epochs")
    err = _error(eval_main, ["test", "-c", EVAL_TINY, "--data.num_sample", "3"], capsys, "evaluate.py", monkeypatch)
    assert "unknown option --data.num_sample; did you mean --data.num_samples" in err


# --- --help: the project's options first, short; --help-full for everything -------------------------------------


def _options(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if line.startswith("  --")]


@pytest.mark.parametrize(
    ("main", "args", "first_model_option"),
    [
        (train_main, ["fit"], "--model.translator"),
        (train_main, ["fit", "-c", str(CONFIGS / "train" / "functional_demo.yaml")], "--model.sender_model.name"),
        (eval_main, ["test"], "--model.sender.name"),
    ],
    ids=["train", "train-functional", "evaluate"],
)
def test_help_is_short_and_leads_with_the_projects_options(capsys, monkeypatch, main, args, first_model_option):
    monkeypatch.setenv("COLUMNS", "80")
    short = _help(main, args, capsys)
    full = _help(main, [*args[:1], "--help-full", *args[1:]], capsys)
    # The project's options grow with each protocol (the full help was 626-689 lines before the split): the short one
    # stays under half the full one and within four screens.
    assert len(short.splitlines()) <= 240 and 2 * len(short.splitlines()) < len(full.splitlines())
    options = _options(short)
    assert first_model_option in options and "--data.batch_size" in options
    assert not any(o.startswith("--trainer.") for o in options)  # Lightning's are named in one closing paragraph
    assert short.index("--model.") < short.index("--data.") < short.index("--trainer.")  # the project's first
    assert "--trainer.max_epochs" in short.split("\n\n")[-1] and "--help-full" in short.split("\n\n")[-1]
    assert "--trainer.max_epochs" in _options(full)
    assert not any(o in {"--model.sender_dim", "--model.sender"} for o in options if main is train_main)  # linked


def test_setup_logging_drops_lightnings_advertisements_and_the_weight_loading_bars():
    import logging

    from transformers.utils import logging as hf_logging

    from cli.console import setup_logging

    setup_logging()
    assert not hf_logging.is_progress_bar_enabled()
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")

    def kept(message: str) -> bool:
        record = logging.LogRecord(rank_zero.name, logging.INFO, __file__, 1, message, None, None)
        return all(f.filter(record) for f in rank_zero.filters)

    assert not kept("💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](...)")
    assert not kept("💡 Tip: ... try installing [litlogger](https://pypi.org/project/litlogger/) ...")
    assert kept("GPU available: False, used: False")


@pytest.mark.parametrize("main", [train_main, eval_main], ids=["train", "evaluate"])
def test_a_cli_called_inside_another_program_does_not_warn_about_its_command_line(main, monkeypatch, capsys):
    # The demo calls train_main/eval_main with args= while sys.argv holds its own options: LightningCLI would warn
    # (four times in every `make demo`) that both are given.
    monkeypatch.setattr(sys, "argv", ["demo.py", "--skip-split", "--out", "/tmp/x"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _help(main, ["fit" if main is train_main else "test"], capsys)
    assert sys.argv == ["demo.py", "--skip-split", "--out", "/tmp/x"]  # given back
