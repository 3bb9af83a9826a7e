"""Issue 20 items 15-16: bad input to ``train.py``/``evaluate.py`` is one line ``<prog>: error: ...`` and exit status 2
(``ACTIVATION_TRANSFER_DEBUG=1``: the traceback), real bugs keep their traceback, and two evaluations cannot share
one run folder (a lock naming its holder)."""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from test_evaluate_cli import small
from test_injection_eval import make_ckpt

from activation_transfer.errors import DEBUG_ENV, UsageError
from activation_transfer.run_lock import RunFolderLock
from cli.lightning_cli import eval_main, train_main, usage_errors

ROOT = Path(__file__).resolve().parents[2]
TINY_TRAIN = str(ROOT / "configs" / "train" / "tiny.yaml")
FUNCTIONAL = str(ROOT / "configs" / "train" / "functional_demo.yaml")
TINY_MODELS = "--model.sender_model.name tiny-neox --model.receiver_model.name tiny-neox-large".split()


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x.py"])
    monkeypatch.delenv(DEBUG_ENV, raising=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_ckpt(tmp_path_factory.mktemp("usage") / "t.ckpt")


def _one_line_exit(capsys, run, prog: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        run()
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # Lightning's own lines (seed, devices) may come before
    assert exit_.value.code == 2 and line.startswith(f"{prog}: error: ") and "Error: " not in line, err
    return line


def test_train_bad_option_value_is_one_line(tmp_path, capsys):
    args = ["fit", "-c", TINY_TRAIN, "--trainer.default_root_dir", str(tmp_path), "--data.extract_batch_size", "0"]
    line = _one_line_exit(capsys, lambda: train_main(args), "train.py")
    assert "data.extract_batch_size must be >= 1, got 0" in line


def test_a_bad_optimizer_option_is_reported_before_organisms_are_trained(tmp_path, capsys, monkeypatch):
    # The functional demo names organisms: on a cold cache they train for minutes before the model is instantiated.
    def trained(*_args, **_kwargs):
        raise AssertionError("organisms were trained before the options were checked")

    monkeypatch.setattr("cli.lightning_cli.ensure_organisms", trained)
    args = ["fit", "-c", FUNCTIONAL, "--trainer.default_root_dir", str(tmp_path), "--model.lr", "-1"]
    line = _one_line_exit(capsys, lambda: train_main(args), "train.py")
    assert "model.lr must be > 0, got -1" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_accelerator_on_a_machine_without_one_is_one_line(tmp_path, capsys):
    args = ["fit", "-c", TINY_TRAIN, "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cuda"]
    line = _one_line_exit(capsys, lambda: train_main(args), "train.py")
    assert "`CUDAAccelerator` can not run on your system" in line


def test_a_dataclass_check_is_shown_without_jsonargparse_subtypes(tmp_path, capsys):
    # Item 15: "Does not validate against any of the Union subtypes / Subtypes: [NoneType, ...]" before the message.
    args = ["fit", "-c", FUNCTIONAL, "--trainer.default_root_dir", str(tmp_path), *TINY_MODELS, "--model.slots.k", "0"]
    line = _one_line_exit(capsys, lambda: train_main(args), "train.py")
    assert "slots.k must be >= 1, got 0" in line and "Subtypes" not in line and "NoneType" not in line


def test_evaluate_bad_organism_name_is_one_line(tmp_path, ckpt, capsys):
    args = small(tmp_path, ckpt, "--model.sender.name", "organism:nope")
    line = _one_line_exit(capsys, lambda: eval_main(args), "evaluate.py")
    assert "unknown organism 'nope'" in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.conditions", "[no_inject, bogus]"], "unknown condition 'bogus' in model.conditions"),
        (["--model.conditions", "[no_inject, no_inject]"], "condition 'no_inject' is listed twice"),
    ],
)
def test_evaluate_bad_model_options_are_one_line(tmp_path, ckpt, capsys, extra, message):
    # These are checked in the library, past the parser: they were tracebacks once.
    line = _one_line_exit(capsys, lambda: eval_main(small(tmp_path, ckpt, *extra)), "evaluate.py")
    assert message in line


def test_evaluate_missing_translator_checkpoint_is_one_line(tmp_path, ckpt, capsys):
    missing = tmp_path / "missing.ckpt"
    line = _one_line_exit(capsys, lambda: eval_main(small(tmp_path, str(missing))), "evaluate.py")
    assert f"translator checkpoint {missing} does not exist" in line


def test_evaluate_translator_folder_that_is_not_an_export_is_one_line(tmp_path, ckpt, capsys):
    folder = tmp_path / "not_exported"
    folder.mkdir()
    line = _one_line_exit(capsys, lambda: eval_main(small(tmp_path, str(folder))), "evaluate.py")
    assert f"translator checkpoint {folder} is a folder but not an exported translator" in line


def test_organism_bad_model_size_is_one_line(tmp_path, capsys):
    from cli.organism_cli import main as organism_main

    recipe = str(ROOT / "configs" / "organisms" / "sender.yaml")
    args = ["fit", "-c", recipe, "--model.num_heads", "5", "--trainer.default_root_dir", str(tmp_path)]
    line = _one_line_exit(capsys, lambda: organism_main(args), "organism.py")
    assert "num_heads=5 must divide hidden_size=96" in line


def test_evaluate_into_another_configurations_run_folder_is_one_line(tmp_path, ckpt, capsys):
    run_dir = tmp_path / "out" / "mine"
    run_dir.mkdir(parents=True)
    (run_dir / "fingerprint.json").write_text(json.dumps({"fingerprint": "0" * 64, "identity": {}}))
    args = small(tmp_path, ckpt, "--model.run_name", "mine", "--model.conditions", "[no_inject]")
    line = _one_line_exit(capsys, lambda: eval_main(args), "evaluate.py")
    assert f"run folder {run_dir} holds results of another configuration" in line


def _other_process_lock(folder: Path, pid: int = 4242) -> int:
    """Hold ``folder``'s lock as another process would: its own open file, flocked, holding its pid."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, f"{pid}\n".encode(), 0)
    return fd


def test_a_second_evaluation_of_one_run_folder_is_refused_naming_the_holder(tmp_path, ckpt, capsys):
    run_dir = tmp_path / "out" / "busy"
    run_dir.mkdir(parents=True)
    holder = _other_process_lock(run_dir)
    try:
        args = small(tmp_path, ckpt, "--model.run_name", "busy", "--model.conditions", "[no_inject]")
        line = _one_line_exit(capsys, lambda: eval_main(args), "evaluate.py")
        assert f"run folder {run_dir} is in use by process 4242" in line
    finally:
        os.close(holder)
    # Released: the evaluation runs, and releases the folder when it ends.
    cli = eval_main(small(tmp_path, ckpt, "--model.run_name", "busy", "--model.conditions", "[no_inject]"))
    assert (run_dir / "records" / "no_inject__deterministic.jsonl").is_file() and cli.model.run_lock is None
    RunFolderLock(run_dir).acquire().release()


def test_the_lock_is_exclusive_until_released(tmp_path):
    holder = _other_process_lock(tmp_path)
    with pytest.raises(UsageError, match="in use by process 4242"):
        RunFolderLock(tmp_path).acquire()
    os.close(holder)
    mine = RunFolderLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    # A lock this process still holds is an earlier, crashed evaluation's: taken over, not refused.
    RunFolderLock(tmp_path).acquire().release()
    mine.release()  # already taken over: a no-op
    held = RunFolderLock(tmp_path).acquire()
    with pytest.raises(BlockingIOError):  # while held here, another process cannot take it
        _other_process_lock(tmp_path)
    held.release()


def test_debug_shows_the_traceback_and_bugs_keep_theirs(monkeypatch, capsys):
    def fail(exc):
        with usage_errors("x.py"):
            raise exc

    with pytest.raises(SystemExit):
        fail(UsageError("bad option"))
    with pytest.raises(SystemExit):
        fail(PermissionError(13, "Permission denied", "/ro/out"))
    assert "x.py: error: cannot write /ro/out (Permission denied)" in capsys.readouterr().err
    with pytest.raises(RuntimeError):  # a bug: its traceback, not a line
        fail(RuntimeError("bug"))
    with pytest.raises(ValueError, match="plain"):  # a ValueError outside the input checks is a bug too
        fail(ValueError("plain"))
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UsageError, match="bad option"):
        fail(UsageError("bad option"))


def test_an_output_folder_that_cannot_be_made_is_one_line_before_anything_runs(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    args = ["fit", "-c", TINY_TRAIN, "--trainer.default_root_dir", str(tmp_path / "afile" / "run")]
    line = _one_line_exit(capsys, lambda: train_main(args), "train.py")
    assert f"--trainer.default_root_dir {tmp_path / 'afile' / 'run'}: cannot create the folder" in line


@pytest.mark.parametrize("kind", ["missing", "random bytes", "truncated"])
def test_a_bad_resume_checkpoint_is_one_line_before_extraction(tmp_path, ckpt, capsys, monkeypatch, kind):
    def extracted(*_args, **_kwargs):
        raise AssertionError("activations were extracted before the checkpoint was checked")

    monkeypatch.setattr("datamodules.activation_pairs.ActivationPairDataModule.setup", extracted)
    path = tmp_path / "resume.ckpt"
    if kind == "random bytes":
        path.write_bytes(os.urandom(1000))
    elif kind == "truncated":  # a torch checkpoint cut short, as by a full disk
        path.write_bytes(Path(ckpt).read_bytes()[:-100])
    args = ["fit", "-c", TINY_TRAIN, "--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path", str(path)]
    line = _one_line_exit(capsys, lambda: train_main(args), "train.py")
    assert f"--ckpt_path {path} " in line and ("does not exist" if kind == "missing" else "is not a Lightning") in line


def test_wandb_without_a_login_is_one_line_and_other_wandb_errors_keep_their_traceback(capsys):
    # wandb's own UsageError (no API key and no WANDB_MODE) is bad input; its other errors are not ours to hide.
    def wandb_error(name: str) -> Exception:
        return type(name, (Exception,), {"__module__": "wandb.errors.errors"})("No API key configured.")

    with pytest.raises(SystemExit) as exit_, usage_errors("train.py"):
        raise wandb_error("UsageError")
    line = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and line.startswith("train.py: error: W&B: No API key configured.")
    assert "WANDB_MODE=offline" in line
    with pytest.raises(Exception, match="No API key") as other, usage_errors("train.py"):
        raise wandb_error("CommError")
    assert type(other.value).__name__ == "CommError"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        # max_documents 0 or below kept one document and trained on it, silently; builtin_samples < 0 was a traceback.
        ("--data.corpus.max_documents", "0", "data.corpus.max_documents must be >= 1 or null (all documents), got 0"),
        ("--data.corpus.max_documents", "-3", "data.corpus.max_documents must be >= 1 or null (all documents), got -3"),
        ("--data.corpus.builtin_samples", "-1", "data.corpus.builtin_samples must be >= 1, got -1"),
    ],
)
def test_a_corpus_size_out_of_range_is_one_line(tmp_path, capsys, option, value, message):
    args = ["fit", "-c", TINY_TRAIN, "--trainer.default_root_dir", str(tmp_path), option, value]
    line = _one_line_exit(capsys, lambda: train_main(args), "train.py")
    assert message in line


def test_a_bad_report_resamples_is_one_line_before_evaluating(tmp_path, ckpt, capsys):
    # The report's own check came after every condition was computed, as a traceback.
    args = small(tmp_path, ckpt, "--model.report_resamples", "0", "--model.conditions", "[no_inject]")
    line = _one_line_exit(capsys, lambda: eval_main(args), "evaluate.py")
    assert "model.report_resamples must be >= 1, got 0" in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*/records"))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        # Tracebacks: an empty batch's IndexError, the sampler's ZeroDivisionError, torch's "Invalid learning rate",
        # "integer modulo by zero", a rotary tensor shape; distractor_prob 1.5 trained as 1, silently.
        ("--data.num_train_samples", "0", "data.num_train_samples must be >= 1, got 0"),
        ("--data.batch_size", "0", "data.batch_size must be >= 1, got 0"),
        ("--data.distractor_prob", "1.5", "data.distractor_prob must be in [0, 1], got 1.5"),
        ("--model.lr", "-1", "model.lr must be > 0, got -1.0"),
        ("--model.num_heads", "0", "model.num_heads must be >= 1, got 0"),
        ("--model.rotary_pct", "2", "model.rotary_pct must be in [0, 1]"),
        ("--model.beta2", "1.5", "model.beta2 must be in [0, 1), got 1.5"),
    ],
)
def test_organism_option_out_of_range_is_one_line(tmp_path, capsys, option, value, message):
    from cli.organism_cli import main as organism_main

    recipe = str(ROOT / "configs" / "organisms" / "sender.yaml")
    args = ["fit", "-c", recipe, option, value, "--trainer.default_root_dir", str(tmp_path)]
    line = _one_line_exit(capsys, lambda: organism_main(args), "organism.py")
    assert message in line


@pytest.mark.parametrize("under", [False, True])
def test_an_organism_export_dir_that_cannot_be_made_is_one_line_before_training(tmp_path, capsys, monkeypatch, under):
    # Found at the export, after training (the recipes keep no checkpoint): a traceback that lost the trained model.
    from cli.organism_cli import main as organism_main

    def trained(*_args, **_kwargs):
        raise AssertionError("the organism trained before --export_dir was checked")

    monkeypatch.setattr("pytorch_lightning.Trainer._run", trained)
    (tmp_path / "afile").write_text("")
    export = tmp_path / "afile" / "sub" if under else tmp_path / "afile"
    recipe = str(ROOT / "configs" / "organisms" / "sender.yaml")
    args = ["fit", "-c", recipe, "--export_dir", str(export), "--trainer.default_root_dir", str(tmp_path / "run")]
    args += ["--data.num_train_samples", "64", "--data.num_val_samples", "8"]
    line = _one_line_exit(capsys, lambda: organism_main(args), "organism.py")
    assert f"--export_dir {export} " in line and ("cannot be made" if under else "is a file") in line


@pytest.mark.parametrize("count", ["0", "-3"])
def test_the_demo_refuses_a_question_count_below_one_before_anything_runs(tmp_path, monkeypatch, capsys, count):
    # 0 silently ran the configs' 300 questions; -3 reached evaluate.py after organisms and translators had trained.
    import cli.demo

    def started(*_args, **_kwargs):
        raise AssertionError("the demo started before checking --num-samples")

    monkeypatch.setattr(cli.demo, "_run", started)
    with pytest.raises(SystemExit) as exit_:
        cli.demo.main(["--out", str(tmp_path / "demo"), "--num-samples", count])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and line.endswith(
        f"error: --num-samples must be >= 1, got {count} (leave it out for the configs' count)"
    ), line


def test_a_negative_generator_seed_is_one_line(tmp_path, ckpt, capsys):
    # random.Random(-1234) draws what random.Random(1234) draws: the evaluation set under other ids, unsaid.
    args = small(tmp_path, ckpt, "--data.generator_seed", "-1234", "--model.conditions", "[no_inject]")
    line = _one_line_exit(capsys, lambda: eval_main(args), "evaluate.py")
    assert "data.generator_seed must be >= 0, got -1234" in line


def test_negative_training_and_corpus_seeds_are_refused():
    from datamodules.corpora import CorpusSpec
    from datamodules.organism_text import OrganismTextDataModule
    from datamodules.qa_training import QATrainingDataModule

    with pytest.raises(UsageError, match="data.train_seed must be >= 0, got -1234"):
        OrganismTextDataModule(train_seed=-1234)  # past the EVAL_SEED check, which compares 1234
    with pytest.raises(UsageError, match="data.val_seed must be >= 0, got -2"):
        QATrainingDataModule(val_seed=-2)
    with pytest.raises(UsageError, match="data.corpus.builtin_seed must be >= 0, got -3"):
        CorpusSpec(builtin_seed=-3)
