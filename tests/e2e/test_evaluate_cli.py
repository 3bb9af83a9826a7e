"""``evaluate.py`` through ``cli.lightning_cli.eval_main``: files written, DDP, W&B logging, bad input surfacing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from lightning_helpers import save_weights

from activation_transfer.models.frozen_lm import ModelRef, load_ref
from activation_transfer.report import records as rio
from activation_transfer.translators.loading import load_translator
from cli.lightning_cli import eval_main as main
from lightning_modules.translator import TranslatorModule

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "eval" / "tiny.yaml")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI warns when both args= and sys.argv (here: pytest's own arguments) are present.
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])
    yield
    import wandb

    if wandb.run is not None:  # the tiny config's WandbLogger (disabled mode) leaves its run open
        wandb.finish()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    s, r = load_ref(ModelRef("tiny-neox")), load_ref(ModelRef("tiny-neox-large"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = TranslatorModule(32, 48, sender=s.identity(), receiver=r.identity())
    return save_weights(module, tmp_path_factory.mktemp("ckpt") / "translator.ckpt")


def small(tmp, ckpt, *extra):
    return [
        *["test", "-c", TINY, "--model.translator_ckpt", ckpt, "--trainer.default_root_dir", str(tmp / "out")],
        *["--trainer.logger.init_args.save_dir", str(tmp / "wandb"), "--data.num_samples", "6", "--data.batch_size"],
        *"4 --model.generation.max_new_tokens 3 --model.generation.relay_max_new_tokens 4".split(),
        *["--model.report_resamples", "50", *extra],
    ]


def test_tiny_config_writes_every_file(tmp_path, ckpt, capsys):
    cli = main(small(tmp_path, ckpt))
    run_dir = cli.model.run_dir
    assert f"run folder: {run_dir}" in capsys.readouterr().out
    assert run_dir.parent == tmp_path / "out" and run_dir.name.startswith("eval-")
    stems = {p.stem for p in (run_dir / "records").glob("*.jsonl")}
    assert len(stems) == 4 + 7 * 3  # 4 deterministic conditions + 7 seeded ones x 3 seeds
    assert "shuffled_translation_strict_matched__seed456" in stems and "nl_relay__deterministic" in stems
    meta = json.loads((run_dir / "meta.json").read_text())
    for key in ("models", "translators", "dataset", "fingerprint", "precision"):
        assert meta[key] is not None, key
    for key in ("libraries", "device", "elapsed_seconds", "started_at", "computed"):
        assert meta["invocations"][-1][key] is not None, key
    assert meta["translators"][0]["sha256"] == load_translator(ckpt).weights_sha256()  # the weights' digest
    config = (run_dir / "config.yaml").read_text()
    assert "translator_ckpt: " + ckpt in config and "tiny-neox-large" in config
    assert (run_dir / "report" / "comparisons.json").exists()
    metrics = cli.trainer.callback_metrics
    # Grouped by condition (one W&B chart section each), the numbers the report's summary has.
    assert (
        metrics["eval/no_inject/word_boundary_contains"]
        == cli.model.summary_metrics["eval/word_boundary_contains/condition=no_inject"]
    )
    assert len([k for k in metrics if k.startswith("eval/")]) == 11 * 5 and not any("condition=" in k for k in metrics)


def test_print_config_loads_no_model(tmp_path, monkeypatch, capsys):
    import lightning_modules.injection_eval as ie

    monkeypatch.setattr(ie, "load_ref", lambda *a, **k: pytest.fail("--print_config loaded a model"))
    with pytest.raises(SystemExit) as exc:
        main(["test", "-c", TINY, "--print_config"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "translator_ckpt" in out and "shuffled_translation_strict_matched" in out


def test_only_test_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", TINY])
    assert exc.value.code != 0


def test_ckpt_path_is_refused(tmp_path, ckpt, capsys):
    # The translator is --model.translator_ckpt; a ckpt_path would restore the evaluation module itself.
    with pytest.raises(SystemExit) as exc:
        main(small(tmp_path, ckpt, "--ckpt_path", ckpt))
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "evaluate.py test: error: evaluate.py does not take --ckpt_path: pass the translator checkpoint as "
        "--model.translator_ckpt\n"
    )


def test_unknown_condition_via_cli(tmp_path, ckpt, monkeypatch):
    monkeypatch.setenv("ACTIVATION_TRANSFER_DEBUG", "1")  # the UsageError itself, not its one line and exit 2
    with pytest.raises(ValueError, match="unknown condition 'nope'"):
        main(small(tmp_path, ckpt, "--model.conditions", "[no_inject, nope]"))


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"context": "A is in B.", "question": "Where is A?", "answer": "B", "id": "x1"}', "{not json"], "JSON"),
        (['{"context": "A is in B.", "question": "Where is A?", "id": "x1"}'], "answer"),
        (
            [
                '{"context": "A is in B.", "question": "Where?", "answer": "B", "id": "x1"}',
                '{"context": "C is in D.", "question": "Where?", "answer": "D", "id": "x1"}',
            ],
            "x1",
        ),
        (['{"context": "A is in B.", "question": "Where is A?", "answer": "  ", "id": "x1"}'], "empty|answer"),
    ],
    ids=["not-json", "missing-field", "duplicate-id", "empty-answer"],
)
def test_bad_qa_file_surfaces_through_evaluate(tmp_path, ckpt, lines, match, monkeypatch):
    monkeypatch.setenv("ACTIVATION_TRANSFER_DEBUG", "1")  # the UsageError itself, not its one line and exit 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match) as exc:
        main(small(tmp_path, ckpt, "--data.source", str(bad), "--data.num_samples", "null"))
    assert "bad.jsonl" in str(exc.value)


def test_paper_file_sha_mismatch_surfaces_through_evaluate(tmp_path, ckpt, multihop_dir, monkeypatch):
    monkeypatch.setenv("ACTIVATION_TRANSFER_DEBUG", "1")  # the UsageError itself, not its one line and exit 2
    data = tmp_path / "data"
    data.mkdir()
    for p in multihop_dir.iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    with open(data / "clean_eval.jsonl", "a") as f:
        f.write("\n")
    with pytest.raises(ValueError, match="(?i)sha-?256"):
        options = "--data.source clean_eval --data.num_samples null --data.limit 2".split()
        main(small(tmp_path, ckpt, "--data.data_dir", str(data), *options))


def test_ddp_two_processes_gather_complete_duplicate_free_results(tmp_path, ckpt):
    conds = "[no_inject, additive, same_norm_random, shuffled_translation_strict_matched]"
    args = small(tmp_path, ckpt, "--model.conditions", conds, *"--model.seeds [42] --data.num_samples 5".split())
    args += "--data.batch_size 2 --trainer.logger false --trainer.callbacks null".split()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ddp = [sys.executable, str(ROOT / "evaluate.py"), *args, *"--trainer.strategy ddp --trainer.devices 2".split()]
    ddp += ["--trainer.default_root_dir", str(tmp_path / "ddp")]
    proc = subprocess.run(ddp, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = main([*args, "--trainer.default_root_dir", str(tmp_path / "one")])
    ddp_dir = next(p for p in (tmp_path / "ddp").iterdir() if p.name.startswith("eval-"))
    assert ddp_dir.name == single.model.run_dir.name  # world size is not part of the run identity
    assert json.loads((ddp_dir / "meta.json").read_text())["invocations"][-1]["world_size"] == 2
    for path in (single.model.run_dir / "records").glob("*.jsonl"):
        one = rio.read_records(path)
        two = rio.read_records(ddp_dir / "records" / path.name)
        ids = [r["sample_id"] for r in two]
        assert len(ids) == len(set(ids)) == len(one)  # complete and duplicate-free (5 samples on 2 ranks pads one)
        assert [r["prediction"] for r in two] == [r["prediction"] for r in one]


class _FakeRun:
    offline = False
    disabled = False

    def __init__(self):
        self.artifacts, self.used = [], []

    def log_artifact(self, art):
        self.artifacts.append(art)

    def use_artifact(self, art):
        self.used.append(art)
        return art


class _FakeWandbLogger(pl.loggers.Logger):
    """Duck-typed WandbLogger: records what the callback logs."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.run = {}, {}, _FakeRun()

    name = "fake"
    version = "0"

    @property
    def experiment(self):
        return self.run

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_table(self, key, columns, data):
        self.tables[key] = (columns, data)

    def log_image(self, key, images, **kwargs):
        self.images[key] = images
