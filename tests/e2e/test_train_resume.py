"""Training is reproducible: the same config gives the same weights, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from cli.lightning_cli import train_main as main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "train" / "tiny.yaml")

# A resumed run writes into the root of the run it continues; Lightning warns that the folder is not empty.
pytestmark = pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")


@pytest.fixture(autouse=True)
def _one_thread_plain_argv(monkeypatch):
    # Bit-identity is only meaningful with a fixed thread count (CPU reductions depend on it).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns when args= and pytest's argv are both present
    yield
    torch.set_num_threads(threads)


def _train(root: Path, *extra: str):
    """A small tiny.yaml training; constant lr after warmup, so stopping at 2 of 4 epochs changes no schedule."""
    quiet = "--trainer.enable_progress_bar false --trainer.enable_model_summary false".split()
    small = "--data.corpus.builtin_samples 60 --model.decay constant".split()
    cli = main(["fit", "-c", TINY, "--trainer.default_root_dir", str(root), *quiet, *small, *extra])
    return cli, {k: v.clone() for k, v in cli.model.translator.state_dict().items()}


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by up to {(a[k] - b[k]).abs().max().item():.3g}"


def test_same_config_gives_bit_identical_weights(tmp_path):
    # The first run extracts the activations (cache miss), the second reuses them: neither may change the weights.
    cache = ["--data.cache_dir", str(tmp_path / "cache")]
    _, a = _train(tmp_path / "a", "--trainer.max_epochs", "2", *cache)
    _, b = _train(tmp_path / "b", "--trainer.max_epochs", "2", *cache)
    _assert_identical(a, b)


def test_resume_from_last_ckpt_equals_an_uninterrupted_run(tmp_path):
    _, full = _train(tmp_path / "full", "--trainer.max_epochs", "4")
    _train(tmp_path / "part", "--trainer.max_epochs", "2", "--trainer.callbacks.save_last", "true")
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    _, resumed = _train(tmp_path / "part", "--trainer.max_epochs", "4", "--ckpt_path", str(last))
    _assert_identical(full, resumed)


@pytest.mark.parametrize("stop", [55, 57])
def test_ckpt_path_last_resumes_mid_epoch(tmp_path, stop):
    # A checkpoint every 5 steps, the run stopped mid-epoch (step 55 or 57 of about 40 per epoch): `--ckpt_path last`
    # finds the default callback's last.ckpt and the stream skips exactly the steps already taken. Stopped between
    # two of them (57), last.ckpt was written in the cut-short epoch's end hooks and resumed at epoch 2, skipping 21
    # steps of epoch 1.
    _, full = _train(tmp_path / "full", "--trainer.max_epochs", "3")
    every = ["--trainer.callbacks.every_n_train_steps", "5", "--trainer.callbacks.monitor", "null"]
    part, _ = _train(tmp_path / "part", "--trainer.max_epochs", "3", "--trainer.max_steps", str(stop), *every)
    assert part.trainer.global_step == stop and 0 < part.trainer.fit_loop.epoch_loop.batch_progress.current.ready
    cli, resumed = _train(tmp_path / "part", "--trainer.max_epochs", "3", "--ckpt_path", "last", *every)
    assert Path(cli.trainer.ckpt_path) == tmp_path / "part" / "checkpoints" / "last.ckpt"
    _assert_identical(full, resumed)


def test_last_ckpt_is_the_last_epoch_even_when_the_monitor_does_not_improve(tmp_path):
    # Lightning 2.6 writes last.ckpt only when a top-k checkpoint is written at the same step: with mode max on a
    # falling val/loss only epoch 0 is "best", and last.ckpt stayed at epoch 0, so `--ckpt_path last` after an
    # interruption silently retrained every later epoch.
    cli, _ = _train(tmp_path, "--trainer.max_epochs", "3", "--trainer.callbacks.mode", "max")
    saver = cli.trainer.checkpoint_callback
    assert Path(saver.best_model_path).name.startswith("best-00-")  # the premise: no improvement after epoch 0
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, cli.trainer.global_step)
    # Still one best and one last file: the fix adds no checkpoint files.
    assert sorted((tmp_path / "checkpoints").glob("*.ckpt")) == sorted(
        [Path(saver.best_model_path), Path(saver.last_model_path)]
    )


def test_a_resume_with_max_steps_from_an_epoch_end_checkpoint_is_refused(tmp_path, capsys):
    # Lightning 2.6 restarts a fit with max_steps at the checkpoint's epoch end and counts that epoch again: resumed
    # from epoch 1's end with 3 epochs and room for 200 steps, the fit stopped at once ("max_epochs=3 reached").
    _train(tmp_path, "--trainer.max_epochs", "2")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _train(tmp_path, "--trainer.max_epochs", "3", "--trainer.max_steps", "200", "--ckpt_path", "last")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "with --trainer.max_steps 200: it was written at the end of epoch 1" in line
    # Without steps left (max_steps at most the checkpoint's step) Lightning stops at once, as it should.
    step = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    cli, _ = _train(tmp_path, "--trainer.max_epochs", "3", "--trainer.max_steps", str(step), "--ckpt_path", "last")
    assert cli.trainer.global_step == step


# ------------------------------------------------------------------------------------------ issue 20 (items 6, 7)

FUNCTIONAL = str(ROOT / "configs" / "train" / "functional_demo.yaml")
KV = str(ROOT / "configs" / "train" / "kv_functional_demo.yaml")


def _train_functional(root: Path, *extra: str, config: str = FUNCTIONAL):
    """A few steps of functional_demo.yaml (or ``config``) on the tiny presets: 3 batches of 4 per epoch, constant
    lr."""
    args = [
        *["fit", "-c", config, "--trainer.default_root_dir", str(root), "--trainer.logger", "false"],
        *"--model.sender_model.name tiny-neox --model.receiver_model.name tiny-neox-large".split(),
        *"--data.num_train_samples 12 --data.num_val_samples 4 --data.batch_size 4 --model.decay constant".split(),
        *"--model.warmup_steps 0 --trainer.enable_progress_bar false --trainer.enable_model_summary false".split(),
        *"--trainer.callbacks.monitor null".split(),
        *extra,
    ]
    cli = main(args)
    return cli, {k: v.clone() for k, v in cli.model.translator.state_dict().items()}


def test_functional_resume_equals_an_uninterrupted_run(tmp_path):
    # Item 6: the sampler's generator was reseeded on every fit, so a resumed run saw epoch 0's order again.
    _, full = _train_functional(tmp_path / "full", "--trainer.max_epochs", "3")
    _train_functional(tmp_path / "part", "--trainer.max_epochs", "1")
    _, resumed = _train_functional(tmp_path / "part", "--trainer.max_epochs", "3", "--ckpt_path", "last")
    _assert_identical(full, resumed)


def test_a_functional_resume_mid_epoch_or_with_workers_equals_an_uninterrupted_run(tmp_path):
    # The sampler restarted its epoch's order, so a mid-epoch resume was refused; and with loader workers, which ask
    # for indices as soon as Lightning creates an iterator (before it restores the loop state), a run resumed at an
    # epoch's end replayed epoch 0's order (weights off by up to 0.011).
    _, full = _train_functional(tmp_path / "full", "--trainer.max_epochs", "3")
    every = ["--trainer.callbacks.every_n_train_steps", "2"]
    for workers, at in (("0", "4"), ("2", "4"), ("2", "3")):  # step 4: batch 1 of epoch 1; step 3: epoch 0's end
        run, more = tmp_path / f"w{workers}-{at}", ["--data.num_workers", workers, *every]
        _train_functional(run, "--trainer.max_epochs", "3" if at == "4" else "1", "--trainer.max_steps", at, *more)
        _, resumed = _train_functional(run, "--trainer.max_epochs", "3", "--ckpt_path", "last", *more)
        _assert_identical(full, resumed)


@pytest.mark.parametrize(
    "trainer, first, changed, expected",
    [
        ("functional", [], ["--model.slots.scheme", "last", "--model.slots.k", "8"], "slots: saved {"),
        ("functional", [], ["--model.objective", "distill"], "objective: saved 'answer_ce' vs given 'distill'"),
        (
            "aligned",
            [],
            ["--model.lr", "0.5", "--model.loss", "mse"],
            "model.loss: saved 'cosine' vs given 'mse'; model.lr: saved",
        ),
        # The data's order and batches decide the weights as much as the model's options do.
        ("aligned", [], ["--data.seed", "7"], "(data.seed: saved 42 vs given 7)"),
        (
            "functional",
            [],
            ["--data.batch_size", "2", "--data.shuffle_seed", "3"],
            "(data.shuffle_seed: saved 0 vs given 3; data.batch_size: saved 4 vs given 2)",
        ),
        # Another block of the sender (same hidden size) would relabel the translator as reading it.
        ("aligned", [], ["--data.sender_model.layer", "0"], "sender: saved {"),
        ("functional", [], ["--model.sender_site", "embeddings"], "sender_site: saved 'block' vs given 'embeddings'"),
        # The data's contexts reach the training spec in setup(): own vs mismatched is what the control checks.
        ("functional", [], ["--data.mismatched_contexts", "true"], "'contexts': 'mismatched'"),
        (
            "kv",
            ["--model.max_context_tokens", "224"],
            ["--model.max_context_tokens", "8"],
            "max_context_tokens: saved 224",
        ),
    ],
)
def test_a_resume_with_other_decisive_options_is_refused(tmp_path, capsys, trainer, first, changed, expected):
    # Item 7: the record claimed the given options for the whole run while the checkpoint ran with the saved ones.
    train = {"functional": _train_functional, "kv": partial(_train_functional, config=KV), "aligned": _train}[trainer]
    train(tmp_path / "run", "--trainer.max_epochs", "1", *first)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train(tmp_path / "run", "--trainer.max_epochs", "2", "--ckpt_path", "last", *changed)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and line.startswith("train.py: error: cannot resume from") and expected in line


# ------------------------------------------------------------------------------------------------ organisms


def _fit_organism(root: Path, *extra: str) -> dict:
    """40 steps of a 1-block sender organism on 256 samples: 16 batches per epoch, the cosine schedule over 40 steps."""
    from cli.organism_cli import main as organism_main
    from cli.organisms import organism_config

    small = "--model.hidden_size 32 --model.num_layers 1 --model.num_heads 2 --model.intermediate_size 64".split()
    data = "--data.num_train_samples 256 --data.num_val_samples 16 --data.batch_size 16".split()
    run = ["--trainer.max_steps", "40", "--trainer.val_check_interval", "12", "--trainer.logger", "false"]
    cli = organism_main(
        ["fit", "-c", str(organism_config("sender")), *small, *data, *run, "--trainer.default_root_dir", str(root)]
        + list(extra)
    )
    assert cli.trainer.global_step == 40 and cli.trainer.num_training_batches == 16
    return {k: v.clone() for k, v in cli.model.state_dict().items()}


# The resumed runs need no checkpoints of their own: Lightning warns that the callbacks that wrote them are missing.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_an_organism_resumed_mid_epoch_or_at_an_epoch_end_equals_an_uninterrupted_run(tmp_path):
    # The batch sampler counted its own passes from 0 in every process: a resumed run replayed epoch 0's order, and
    # one resumed mid-epoch restarted the epoch's order from its first batch.
    saves = [
        {"every_n_train_steps": 20, "filename": "mid-{step}"},  # batch 4 of epoch 1
        {"save_on_train_epoch_end": True, "filename": "end-{step}"},  # the end of epoch 0 (and 1)
    ]
    callbacks = [
        {"class_path": "ModelCheckpoint", "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_top_k": -1, **kw}}
        for kw in saves
    ]
    full = _fit_organism(
        tmp_path / "full", "--trainer.enable_checkpointing", "true", "--trainer.callbacks", json.dumps(callbacks)
    )
    for ckpt in ("end-step=16.ckpt", "mid-step=20.ckpt"):
        resumed = _fit_organism(tmp_path / ckpt, "--ckpt_path", str(tmp_path / "ckpt" / ckpt))
        _assert_identical(full, resumed)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_an_organism_resume_with_other_recipe_options_is_refused(tmp_path, capsys):
    # Nothing compared an organism's recipe with its checkpoint's: another data seed or learning rate trained on.
    save = {
        "class_path": "ModelCheckpoint",
        "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 20},
    }
    _fit_organism(tmp_path / "run", "--trainer.enable_checkpointing", "true", "--trainer.callbacks", json.dumps([save]))
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _fit_organism(tmp_path / "resumed", "--ckpt_path", str(ckpt), "--data.shuffle_seed", "1", "--model.lr", "0.01")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "cannot resume from" in line
    assert "(model.lr: saved 0.003 vs given 0.01; data.shuffle_seed: saved 0 vs given 1)" in line
