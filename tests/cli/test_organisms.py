"""Offline model organisms: training through the CLI, HF export, cache reuse, held-out data, configs, quality."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from activation_transfer.models.frozen_lm import load_model, load_tokenizer
from activation_transfer.task.entities import answer_type, candidates
from activation_transfer.task.generator import EVAL_NUM_SAMPLES, EVAL_SEED, generate_samples
from activation_transfer.task.organism_eval import chance_rate, evaluate_organism
from activation_transfer.task.scoring import METRIC_FUNCTIONS
from activation_transfer.task.tokenizer import offline_tokenizer
from cli import organisms
from cli.organisms import (
    ORGANISM_CONFIG_DIR,
    config_hash,
    ensure_organism,
    organism_config,
    resolved_config,
)
from datamodules.organism_text import (
    ANSWER,
    PAD,
    PROMPT,
    OrganismTextDataModule,
    encode_samples,
    eval_keys,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(ORGANISM_CONFIG_DIR.glob("*.yaml"))
assert CONFIGS, f"no organism recipes in {ORGANISM_CONFIG_DIR}"
# A few dozen steps of a 1-block, 32-wide model on a small data set: seconds on 2 CPU cores.
TINY = [
    "--model.hidden_size",
    "32",
    "--model.num_layers",
    "1",
    "--model.num_heads",
    "2",
    "--model.intermediate_size",
    "64",
    "--data.num_train_samples",
    "512",
    "--data.num_val_samples",
    "32",
    "--data.batch_size",
    "16",
    "--trainer.max_steps",
    "24",
    "--trainer.val_check_interval",
    "12",
]


@pytest.fixture(scope="module")
def tiny_organism(cache_dir) -> Path:
    """One reduced sender trained through ensure_organism into the session cache (reused by several tests)."""
    with pytest.MonkeyPatch.context() as mp:
        # Module fixtures run before the autouse env isolation: point the cache at the test session's one here too.
        mp.setenv("ACTIVATION_TRANSFER_CACHE", str(cache_dir))
        return ensure_organism(str(organism_config("sender")), cache_dir=str(cache_dir), overrides=TINY)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_configs_parse(config):
    cfg = resolved_config(str(config))
    assert cfg["trainer"]["max_steps"] > 0
    assert cfg["data"]["train_seed"] != EVAL_SEED and cfg["data"]["val_seed"] != EVAL_SEED
    assert cfg["data"]["max_length"] <= cfg["model"]["max_position_embeddings"]
    assert cfg["model"]["hidden_size"] % cfg["model"]["num_heads"] == 0


def test_sender_and_receiver_differ_in_width_and_depth():
    sender = resolved_config(str(organism_config("sender")))["model"]
    receiver = resolved_config(str(organism_config("receiver")))["model"]
    assert sender["hidden_size"] < receiver["hidden_size"]
    assert sender["num_layers"] < receiver["num_layers"]


def test_cache_hash_follows_weight_relevant_settings_only():
    cfg = resolved_config(str(organism_config("sender")))
    same = resolved_config(str(organism_config("sender")), ["--trainer.enable_progress_bar=true"])
    compiled = resolved_config(str(organism_config("sender")), ["--model.compile=reduce-overhead"])
    other = resolved_config(str(organism_config("sender")), ["--model.lr", "0.001"])
    assert compiled["model"]["compile"] == "reduce-overhead"
    assert config_hash(cfg) == config_hash(same) == config_hash(compiled)
    assert config_hash(cfg) != config_hash(other)


def test_a_config_is_parsed_once_per_content(tmp_path, monkeypatch):
    config = tmp_path / "sender.yaml"
    config.write_text(organism_config("sender").read_text())
    calls = []
    parse = organisms._parse
    monkeypatch.setattr(organisms, "_parse", lambda *a: calls.append(a) or parse(*a))
    first = resolved_config(str(config))
    first["model"]["lr"] = -1.0  # callers get a copy: changing it changes nothing remembered
    assert resolved_config(str(config))["model"]["lr"] > 0 and len(calls) == 1
    resolved_config(str(config), ["--model.lr", "0.001"])  # other overrides: parsed
    assert len(calls) == 2
    config.write_text(config.read_text().replace("hidden_size: 96", "hidden_size: 64"))  # other content
    assert resolved_config(str(config))["model"]["hidden_size"] == 64 and len(calls) == 3


def test_training_data_excludes_the_evaluation_set():
    held_out = eval_keys()
    assert len(held_out) == len({s.key for s in generate_samples(EVAL_NUM_SAMPLES, EVAL_SEED)})
    dm = OrganismTextDataModule(num_train_samples=3000, num_val_samples=64)
    dm.setup("fit")
    assert dm.train_keys and not dm.train_keys & held_out
    assert len(dm.train_set) == 3000 - dm.num_dropped
    with pytest.raises(ValueError, match="EVAL_SEED"):
        OrganismTextDataModule(train_seed=EVAL_SEED)
    with pytest.raises(ValueError, match="EVAL_SEED"):
        OrganismTextDataModule(val_seed=EVAL_SEED)


def test_training_drops_samples_whose_key_is_in_the_evaluation_set(monkeypatch):
    # Seeds differ, so real collisions are rare: plant one to check the filter itself.
    train = generate_samples(50, 1)
    monkeypatch.setattr("datamodules.organism_text.eval_keys", lambda: {train[3].key, train[7].key})
    dm = OrganismTextDataModule(num_train_samples=50, num_val_samples=8)
    dm.setup("fit")
    assert dm.num_dropped == 2
    assert train[3].key not in dm.train_keys and train[7].key not in dm.train_keys


def test_encoding_marks_answer_and_eos_as_targets():
    tok = offline_tokenizer()
    sample = generate_samples(1, 5)[0]
    enc = encode_samples([sample], tok, max_length=96)
    ids, kind = enc["input_ids"][0], enc["token_type"][0]
    answer_ids = ids[kind == ANSWER].tolist()
    assert answer_ids[-1] == tok.eos_token_id
    assert tok.decode(answer_ids[:-1]) == " " + sample.answer
    assert tok.decode(ids[kind == PROMPT].tolist()).endswith(f"Q: {sample.question}\nA:")
    assert (kind[kind != PAD] != PAD).all() and kind[-1] == PAD  # right padding
    with pytest.raises(ValueError, match="max_length"):
        encode_samples([sample], tok, max_length=8)
    # Training rows skip the candidate count and are otherwise the same.
    bare = encode_samples([sample], tok, max_length=96, with_candidates=False)
    assert "candidates" not in bare and int(enc["candidates"][0]) >= 1
    assert torch.equal(bare["input_ids"], enc["input_ids"]) and torch.equal(bare["token_type"], enc["token_type"])


def test_tiny_organism_trains_exports_and_reloads(tiny_organism):
    path = tiny_organism
    for name in ("config.json", "model.safetensors", "tokenizer.json", organisms.MARKER):
        assert (path / name).exists(), name
    info = json.loads((path / organisms.MARKER).read_text())
    assert info["global_step"] == 24
    assert {"val/answer_acc", "val/answer_acc_two_candidates", "val/loss"} <= info["final_metrics"].keys()
    assert path.name.startswith("sender-")
    assert not list(path.parent.glob(".*tmp*"))  # the temporary folder was renamed away

    model = load_model(str(path))
    tok = load_tokenizer(str(path))
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    # The exported tokenizer is the project's offline tokenizer.
    ref_tok = offline_tokenizer()
    prompt = "Context: Alice lives in Oslo. Oslo is part of Norway.\nQ: What country does Alice live in?\nA:"
    assert tok(prompt)["input_ids"] == ref_tok(prompt)["input_ids"]
    assert tok.eos_token_id == tok.pad_token_id == 0

    # Trained weights are not the random init: the logits must differ from a fresh build's.
    from lightning_modules.causal_lm import build_neox

    cfg = info["config"]["model"]
    fresh = build_neox(
        vocab_size=model.config.vocab_size,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=cfg["max_position_embeddings"],
        rotary_pct=cfg["rotary_pct"],
        tie_word_embeddings=False,
    ).eval()
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, fresh(ids).logits, atol=1e-3)


def test_cli_fit_exports_a_model_with_identical_logits(tmp_path, monkeypatch):
    from cli.organism_cli import main

    monkeypatch.setattr(sys, "argv", ["organism.py"])  # LightningCLI warns when pytest's own argv is also present
    export = tmp_path / "export"
    logger = json.dumps({"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}})
    cli = main(
        [
            "fit",
            "-c",
            str(organism_config("receiver")),
            *TINY,
            "--trainer.max_steps",
            "4",
            "--trainer.default_root_dir",
            str(tmp_path),
            f"--trainer.logger={logger}",
            "--export_dir",
            str(export),
        ]
    )
    assert cli.trainer.global_step == 4
    assert cli.model.model.config.vocab_size == len(cli.datamodule.tokenizer)  # linked from the tokenizer
    trained = cli.model.model.eval()
    loaded = load_model(str(export))
    tok = load_tokenizer(str(export))
    ids = torch.tensor(
        [tok("Context: Bob moved to Lima. Lima is part of Peru.\nQ: What country did Bob move to?\nA:")["input_ids"]]
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # the project's loader freezes it


def test_cache_is_reused_without_training(tiny_organism, monkeypatch):
    cache = tiny_organism.parent.parent
    stamp = (tiny_organism / "model.safetensors").stat().st_mtime_ns

    def _no_training(*args, **kwargs):
        raise AssertionError("ensure_organism trained although the organism is cached")

    monkeypatch.setattr(organisms, "_train", _no_training)
    again = ensure_organism(str(organism_config("sender")), cache_dir=str(cache), overrides=TINY)
    assert again == tiny_organism
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    # A different config is a different entry, so it would have to train.
    with pytest.raises(AssertionError, match="trained although"):
        ensure_organism(
            str(organism_config("sender")), cache_dir=str(cache), overrides=[*TINY, "--trainer.max_steps", "25"]
        )
    assert not list(cache.glob("organisms/.*tmp*"))  # the failed attempt cleaned up after itself


def test_training_is_deterministic(tiny_organism, tmp_path, cache_dir):
    # Same config, fresh organism cache (the tokenizer is copied over, it is not what this test is about).
    shutil.copytree(cache_dir / "tokenizers", tmp_path / "tokenizers")
    other = ensure_organism(str(organism_config("sender")), cache_dir=str(tmp_path), overrides=TINY)
    assert other.name == tiny_organism.name
    from safetensors.torch import load_file

    a, b = load_file(str(tiny_organism / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_organism_reports_every_metric(tiny_organism):
    result = evaluate_organism(tiny_organism, num_samples=8, batch_size=4, return_predictions=True)
    assert result["n"] == 8
    assert [p["gold"] for p in result["predictions"]] == [s.answer for s in generate_samples(8, EVAL_SEED)]
    for metric in (
        "exact_match",
        "normalized_exact_match",
        "word_boundary_contains",
        "first_answer_span_match",
        "legacy_contains",
    ):
        # Each metric is the share of the 8 predictions it scores right, and each prediction is scored by that
        # metric's own definition (PAPER.md), recomputed here.
        assert [p["metrics"][metric] for p in result["predictions"]] == [
            METRIC_FUNCTIONS[metric](p["prediction"], p["gold"]) for p in result["predictions"]
        ]
        assert result[metric] == sum(p["metrics"][metric] for p in result["predictions"]) / 8
    # The two-candidate subgroup, recomputed from the predictions with the project's candidate count.
    two = [
        (p, s)
        for p, s in zip(result["predictions"], generate_samples(8, EVAL_SEED))
        if candidates(s.context, s.answer) == 2
    ]
    assert result["two_candidates"]["n"] == len(two) > 0
    assert result["two_candidates"]["word_boundary_contains"] == pytest.approx(
        sum(p["metrics"]["word_boundary_contains"] for p, _ in two) / len(two)
    )


def test_chance_rates():
    samples = generate_samples(EVAL_NUM_SAMPLES, EVAL_SEED)
    pool = chance_rate(samples, "type_pool")
    # By hand: answers are countries (1/26), continents (1/6) or counts (1/56), weighted by how often each is asked.
    kinds = [answer_type(s.answer) for s in samples]
    expected = sum({"country": 1 / 26, "continent": 1 / 6, "count": 1 / 56}[k] for k in kinds) / len(samples)
    assert pool == pytest.approx(expected)
    same_type = chance_rate(samples, "context_same_type")
    # One or two candidates of the answer's type in each context (distractor chains add the second).
    assert 0.5 < same_type < 1.0
    assert chance_rate(samples, "context_entity") < same_type
    with pytest.raises(ValueError, match="chance mode"):
        chance_rate(samples, "oracle")


@pytest.mark.slow
@pytest.mark.parametrize("role,threshold", [("receiver", 0.6), ("sender", None)])
def test_full_organism_quality(role, threshold):
    """The shipped organisms answer held-out questions with the paper's decoding: receiver >= 0.6, sender clearly
    above chance (guessing a random entity named in the context, or a random entity of the answer's type)."""
    path = ensure_organism(str(organism_config(role)))
    result = evaluate_organism(path)
    chance = max(chance_rate(mode="type_pool"), chance_rate(mode="context_entity"))
    info = json.loads((path / organisms.MARKER).read_text())
    print(role, json.dumps(result), f"chance={chance:.3f}", f"train_seconds={info['train_seconds']}")
    assert result["n"] == EVAL_NUM_SAMPLES
    if threshold is not None:
        assert result["word_boundary_contains"] >= threshold
    assert result["word_boundary_contains"] >= chance + 0.2


def test_validation_rows_carry_their_candidate_count(cache_dir):
    dm = OrganismTextDataModule(num_train_samples=200, num_val_samples=90, distractor_prob=1.0)
    dm.setup("fit")
    val = generate_samples(90, 2, distractor_prob=1.0)
    assert dm.val_set.tensors[2].tolist() == [candidates(s.context, s.answer) for s in val]
    assert {1, 2} <= set(dm.val_set.tensors[2].tolist())
    input_ids, token_type, cands = next(iter(dm.val_dataloader()))
    assert cands.tolist() == dm.val_set.tensors[2][: len(cands)].tolist()
    assert len(next(iter(dm.train_dataloader()))) == 2  # training batches: ids and token types only


def test_ddp_fit_shares_each_epoch_between_the_ranks(tmp_path):
    # Lightning cannot put its DistributedSampler into a custom batch sampler: DDP stopped with a TypeError.
    offline_tokenizer()  # in the session cache before two processes look for it
    root, export = tmp_path / "run", tmp_path / "export"
    ddp = [sys.executable, str(ROOT / "organism.py"), "fit", "-c", str(organism_config("sender")), *TINY]
    ddp += "--data.num_train_samples 256 --trainer.max_steps 8 --trainer.val_check_interval 4".split()
    ddp += "--trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu --trainer.logger false".split()
    ddp += ["--trainer.default_root_dir", str(root), "--export_dir", str(export)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(ddp, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 16 batches of 16 per epoch: 8 steps on each rank (which batches: tests/datamodules/test_organism_text.py).
    assert "`max_steps=8` reached" in proc.stderr and (export / "model.safetensors").is_file()
