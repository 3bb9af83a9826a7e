"""The training CLI end to end: tiny.yaml, cache reuse, config saving, a linear ground truth, W&B offline, DDP."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from activation_transfer.translators.loading import load_translator
from cli.lightning_cli import train_main as main
from datamodules.store_format import write_pairs_store

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "train" / "tiny.yaml")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI warns (an error here) when both args= and command-line arguments (pytest's) are present.
    monkeypatch.setattr(sys, "argv", ["train.py"])


def _run_args(tmp_path: Path) -> list[str]:
    quiet = "--trainer.enable_progress_bar false --trainer.enable_model_summary false".split()
    return ["--trainer.default_root_dir", str(tmp_path / "runs"), *quiet]


def _store_args(tmp_path: Path) -> list[str]:
    """Train on the linear store in ``tmp_path/store`` instead of extracting activations."""
    return ["--data.sender_model", "null", "--data.receiver_model", "null", "--data.store_dir", str(tmp_path / "store")]


def _linear_store(folder: Path, n: int = 3000, seed: int = 0) -> None:
    """Pairs whose true map (in normalized space) is affine: y = W x/|x| + b."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g) * 5
    w, b = torch.randn(16, 12, generator=g), torch.randn(16, generator=g) * 0.1
    y = torch.nn.functional.normalize(x, dim=-1) @ w.T + b
    write_pairs_store(folder, x, y, shard_rows=700)


@pytest.fixture
def datamodules_log(caplog):
    """caplog on the ``datamodules`` logger itself: main() sets up the console, where the project's loggers print once
    and stop propagating to the root, where caplog listens (run alone, the test saw no line). Removed in teardown,
    also after a failure: a handler left behind writes to a closed stream in every later test."""
    caplog.set_level(logging.INFO, logger="datamodules")
    logger = logging.getLogger("datamodules")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


# A second run into the same root puts its checkpoint next to the first one's (a "-v1" name); Lightning says so.
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_tiny_config_trains_and_reuses_the_cache(tmp_path, datamodules_log):
    caplog = datamodules_log
    args = ["fit", "-c", TINY, *_run_args(tmp_path), "--trainer.max_epochs", "1", "--data.corpus.builtin_samples", "60"]
    cli = main(args)
    metrics = cli.trainer.callback_metrics
    for key in ("val/cos_norm", "val/r2_norm", "val/cos_raw", "val/r2_raw", "val/norm_ratio", "val/cos_norm_best"):
        assert key in metrics and torch.isfinite(metrics[key])
    # Learned something (an untrained map scores about 0): 0.2999 with 1 thread after the linear schedule's fix of
    # 2026-12-05, so 0.3 was a coin toss between CPUs.
    assert metrics["val/cos_norm"] > 0.2
    best = cli.trainer.checkpoint_callback.best_model_path
    assert best and Path(best).is_file()
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["hyper_parameters"]["sender"]["layer"] == "gpt_neox.layers.1"
    assert ckpt["hyper_parameters"]["receiver_dim"] == 48
    assert load_translator(best).translate(torch.randn(3, 32)).shape == (3, 48)
    assert "cache miss" in caplog.text
    caplog.clear()
    cli2 = main(args)
    assert "cache hit" in caplog.text and "cache miss" not in caplog.text
    # The resolved config was saved once per run, the second run next to the first without aborting.
    saved = sorted(p.name for p in (tmp_path / "runs").glob("config*.yaml"))
    assert saved == ["config-1.yaml", "config.yaml"]
    assert "builtin_samples: 60" in (tmp_path / "runs" / "config.yaml").read_text()
    assert cli2.trainer.checkpoint_callback.best_model_path != best


def test_linear_ground_truth_reaches_high_validation_cosine(tmp_path):
    _linear_store(tmp_path / "store")
    options = "--trainer.max_epochs 4 --model.lr 0.01 --model.warmup_steps 10".split()
    cli = main(["fit", "-c", TINY, *_run_args(tmp_path), *_store_args(tmp_path), *options])
    assert cli.model.hparams.sender_dim == 12 and cli.model.hparams.receiver_dim == 16
    assert cli.trainer.callback_metrics["val/cos_norm"] > 0.99
    assert cli.trainer.callback_metrics["val/cos_norm_best"] >= cli.trainer.callback_metrics["val/cos_norm"] - 1e-6


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (["--data.sender_model.name", "preset:no-such-model"], r"data\.sender_model.*unknown model preset"),
        (["--data.receiver_model.layer", "9"], r"data\.receiver_model.*out of range"),
        (["--data.corpus.source", "/nonexistent/corpus.txt"], r"/nonexistent/corpus\.txt"),
    ],
)
def test_bad_input_through_the_cli(tmp_path, override, match, monkeypatch):
    monkeypatch.setenv("ACTIVATION_TRANSFER_DEBUG", "1")  # the UsageError itself, not its one line and exit 2
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        main(["-c", TINY, *_run_args(tmp_path), *override], run=False)  # run=False: no subcommand


def _wandb_records(path: Path) -> list[bytes]:
    """Raw records of a ``run-<id>.wandb`` file: a 7-byte W&B header, then a LevelDB-style log (32 KiB blocks;
    each chunk has a 7-byte header crc32/length/type with types 1 full, 2 first, 3 middle, 4 last). wandb 0.31
    ships no Python reader (its core is in Go), hence this one."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B datastore file"
    block, off, out, buf = 32768, 7, [], b""
    while off < len(data):
        left = block - off % block
        if left < 7:  # block trailer padding
            off += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[off : off + 7])
        if length == 0 and kind == 0:
            off += left
            continue
        chunk, off = data[off + 7 : off + 7 + length], off + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            out.append(buf + chunk)
    return out


def test_wandb_offline_run_records_metrics_and_config(tmp_path, monkeypatch, request):
    from wandb.proto import wandb_internal_pb2

    _offline_wandb(monkeypatch, request)
    _linear_store(tmp_path / "store", n=600)
    options = "--trainer.max_epochs 1 --trainer.log_every_n_steps 2".split()
    main(["fit", "-c", TINY, *_run_args(tmp_path), *_store_args(tmp_path), *options])
    import wandb

    # An offline run's finish() returns before W&B's service has written the last records; teardown waits for it.
    wandb.teardown()
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (record_file,) = runs[0].glob("run-*.wandb")
    history_keys, config_keys = set(), set()
    for data in _wandb_records(record_file):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            history_keys |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
        elif rec.WhichOneof("record_type") == "config":
            config_keys |= {item.key for item in rec.config.update}
    assert {"val/cos_norm", "val/r2_norm", "train/loss"} <= history_keys
    assert {"model", "data", "trainer"} <= config_keys  # the full resolved config, from LoggerSaveConfigCallback
    # The resolved config sits beside W&B's own files/config.yaml (run.config), under a name W&B does not use.
    assert "builtin_samples" in (runs[0] / "files" / "resolved_config.yaml").read_text()


def _offline_wandb(monkeypatch, request) -> None:
    import wandb

    # wandb keeps process-wide settings (mode included) from its first setup: start and end with a fresh one.
    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    request.addfinalizer(wandb.teardown)


def test_default_root_dir_is_the_one_output_root(tmp_path, monkeypatch, request, capsys):
    _offline_wandb(monkeypatch, request)
    cwd, root = tmp_path / "cwd", tmp_path / "root"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # anything written to a relative path would land here
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    options = "--trainer.max_epochs 1 --data.corpus.builtin_samples 60".split()
    cli = main(["fit", "-c", TINY, "--trainer.default_root_dir", str(root), *options])
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert best.parent == root / "checkpoints" and best.is_file()
    # The exported translator folder sits beside it, and the command says where both are.
    exported = best.with_suffix("")
    assert (exported / "model.safetensors").is_file() and (exported / "config.json").is_file()
    printed = capsys.readouterr().out
    assert f"best checkpoint: {best} (val/loss " in printed
    assert f"exported translator (from_pretrained / --model.translator_ckpt): {exported}" in printed
    (run,) = (root / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb")) and (run / "files" / "resolved_config.yaml").is_file()
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    # W&B's per-user folders (settings, artifact cache) stand in for the home folder: not the run's output.
    outside = sorted(str(p) for p in written if not p.is_relative_to(root) and not p.is_relative_to(tmp_path / "_env"))
    assert not outside, f"written outside --trainer.default_root_dir: {outside}"
    assert not any(cwd.iterdir())


def test_ddp_two_cpu_ranks_see_disjoint_pairs(tmp_path):
    _linear_store(tmp_path / "store", n=1000)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "-c", TINY, *_run_args(tmp_path), *_store_args(tmp_path)]
    cmd += "--data.batch_size 32 --trainer.max_epochs 1 --trainer.strategy ddp --trainer.devices 2".split()
    cmd += ["--trainer.callbacks+=datamodules.activation_pairs.RecordPairIndices"]
    cmd += ["--trainer.callbacks.dirpath", str(tmp_path / "seen")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "seen" / "rank0_epoch0.json").read_text())
    r1 = json.loads((tmp_path / "seen" / "rank1_epoch0.json").read_text())
    assert not set(r0) & set(r1)
    assert sorted(r0 + r1) == list(range(900))  # every train pair once; the last 10% are validation


def test_paper_config_resolves_to_the_paper_recipe(capsys):
    # The config states only models, corpus and root; everything else must come out as the paper's recipe.
    import yaml

    with pytest.raises(SystemExit):
        main(["fit", "-c", str(ROOT / "configs/train/pythia-160m_to_410m.yaml"), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    # No class_path in the config: the aligned module and data module are the default.
    assert cfg["model"]["class_path"] == "lightning_modules.translator.TranslatorModule"
    assert cfg["data"]["class_path"] == "datamodules.activation_pairs.ActivationPairDataModule"
    model, data, trainer = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    recipe = ("mse", 1e-4, 100, "linear", True)
    assert (model["loss"], model["lr"], model["warmup_steps"], model["decay"], model["normalize"]) == recipe
    linear = "activation_transfer.translators.architectures.LinearTranslator"
    assert model["translator"] == {"class_path": linear, "init_args": {"bias": True}}
    data_recipe = (data["batch_size"], data["val_fraction"], data["max_length"], data["seed"], cfg["seed_everything"])
    assert data_recipe == (32, 0.1, 256, 42, 42)
    assert (trainer["max_epochs"], trainer["gradient_clip_val"]) == (30, 1.0)
    artifact, ckpt = trainer["callbacks"]
    assert artifact["class_path"] == "callbacks.model_artifact.TranslatorArtifactCallback"
    assert (ckpt["init_args"]["monitor"], ckpt["init_args"]["mode"]) == ("val/loss", "min")
    assert trainer["logger"]["init_args"]["save_dir"] == "."  # unset: becomes default_root_dir at instantiation


# The resumed run writes into the first run's checkpoint folder on purpose; Lightning says so.
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_functional_run_resumes_from_a_checkpoint_file(tmp_path):
    # Why TrainCLI keeps LightningCLI._parse_ckpt_path overridden: with a checkpoint *file* Lightning re-parses its
    # hparams over the config, and FunctionalTranslatorModule's (dims, digests) are no __init__ arguments.
    config = str(ROOT / "configs" / "train" / "functional_demo.yaml")
    models = "--model.sender_model.name tiny-neox --model.receiver_model.name tiny-neox-large".split()
    data = "--data.num_train_samples 32 --data.num_val_samples 8 --data.batch_size 8".split()
    args = [
        "fit",
        "-c",
        config,
        *_run_args(tmp_path),
        *models,
        *data,
        *"--trainer.limit_train_batches 2 --trainer.log_every_n_steps 1".split(),
    ]
    first = main([*args, "--trainer.max_epochs", "1"])
    last = first.trainer.checkpoint_callback.last_model_path
    assert Path(last).is_file()
    again = main([*args, "--trainer.max_epochs", "2", "--ckpt_path", last])
    assert type(again.model).__name__ == "FunctionalTranslatorModule"
    assert again.trainer.current_epoch == 2 and again.trainer.global_step == 4


def test_ddp_functional_validation_counts_every_sample_once(tmp_path):
    # 5 validation samples on 2 ranks: Lightning's padding sampler counted one twice (val/ce 6.8956 against 6.9072),
    # and its sync_dist mean then divided by a floored sample count (8.6341): val/loss chooses the best checkpoint.
    config = str(ROOT / "configs" / "train" / "functional_demo.yaml")
    cmd = [sys.executable, str(ROOT / "train.py"), "validate", "-c", config, *_run_args(tmp_path)]
    cmd += "--model.sender_model.name tiny-neox --model.receiver_model.name tiny-neox-large".split()
    cmd += "--data.num_train_samples 8 --data.num_val_samples 5 --data.batch_size 2 --trainer.logger false".split()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    values = []
    for ranks in ([], "--trainer.strategy ddp --trainer.devices 2".split()):
        proc = subprocess.run([*cmd, *ranks], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (line,) = [x for x in (proc.stdout + proc.stderr).splitlines() if "epoch 0 validation: val/ce" in x]
        values.append(float(line.split("val/ce ")[1].split(",")[0]))
    assert values[1] == pytest.approx(values[0], abs=2e-4), values
