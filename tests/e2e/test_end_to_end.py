"""The whole experiment on a reduced organism pair: organisms -> activations -> translator -> conditions.

Sanity of the results (issue 6): self-injection is an exact no-op, destructive controls score far below the
receiver's own answers, the receiver answers well above chance, and the translator's validation cosine is reported.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from unittest import mock

import pytest

from activation_transfer.task.generator import EVAL_SEED, generate_samples
from activation_transfer.task.organism_eval import chance_rate
from cli.organisms import ensure_organism, organism_config

ROOT = Path(__file__).resolve().parents[2]
# Reduced recipes of the organism configs: smaller, fewer steps; the receiver still learns to copy answers.
REDUCED = {
    "receiver": "--model.hidden_size 96 --model.num_layers 3 --model.num_heads 4 --model.intermediate_size 256"
    " --data.num_train_samples 12000 --data.num_val_samples 64"
    " --trainer.max_steps 350 --trainer.val_check_interval 350",
    "sender": "--model.hidden_size 64 --model.num_layers 2 --model.num_heads 4 --model.intermediate_size 128"
    " --data.num_train_samples 4000 --data.num_val_samples 32 --trainer.max_steps 60 --trainer.val_check_interval 60",
}
NUM_EVAL = 48
CONDITIONS = ["no_inject", "b_to_b_self_inject", "zero_replacement", "same_norm_random", "additive"]


def _records(run_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for path in sorted((run_dir / "records").glob("*.jsonl")):
        out[path.stem] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def _acc(records: list[dict]) -> float:
    return sum(r["metrics"]["word_boundary_contains"] for r in records) / len(records)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, cache_dir):
    from cli.lightning_cli import eval_main, train_main

    out = tmp_path_factory.mktemp("e2e")
    # A module-scoped fixture runs before conftest's function-scoped isolation: set what it would, here.
    # LightningCLI warns (an error here) when sys.argv holds pytest's own arguments besides `args`.
    env = {"WANDB_MODE": "disabled", "WANDB_DIR": str(out), "ACTIVATION_TRANSFER_CACHE": str(cache_dir)}
    with mock.patch.object(sys, "argv", ["e2e"]), mock.patch.dict(os.environ, env):
        return _run(out, cache_dir, train_main, eval_main)


def _run(out: Path, cache_dir: Path, train_main, eval_main) -> dict:
    paths = {
        role: ensure_organism(str(organism_config(role)), cache_dir=str(cache_dir), overrides=args.split())
        for role, args in REDUCED.items()
    }
    train = train_main(
        ["fit", "-c", str(ROOT / "configs/train/demo.yaml"), "--trainer.default_root_dir", str(out / "train")]
        + ["--data.sender_model.name", str(paths["sender"]), "--data.receiver_model.name", str(paths["receiver"])]
        + "--data.corpus.builtin_samples 400 --trainer.max_epochs 2 --model.warmup_steps 10".split()
    )
    ckpt = train.trainer.checkpoint_callback.best_model_path
    val = {k: float(v) for k, v in train.trainer.callback_metrics.items() if k.startswith("val/")}
    ev = eval_main(
        ["test", "-c", str(ROOT / "configs/eval/demo.yaml"), "--trainer.default_root_dir", str(out / "eval")]
        + ["--model.translator_ckpt", ckpt, "--model.conditions", json.dumps(CONDITIONS)]
        + ["--model.sender.name", str(paths["sender"]), "--model.receiver.name", str(paths["receiver"])]
        + "--model.seeds [42] --model.generation.max_new_tokens 8 --model.report_resamples 200".split()
        + ["--data.num_samples", str(NUM_EVAL)]
    )
    return {"val": val, "records": _records(ev.model.run_dir), "run_dir": ev.model.run_dir}


def test_translator_validation_cosine_is_reported(experiment):
    cos = experiment["val"]["val/cos_norm"]
    assert math.isfinite(cos) and 0.0 < cos <= 1.0
    assert "val/r2_norm" in experiment["val"]


def test_self_injection_equals_no_injection_on_every_sample(experiment):
    base = {r["sample_id"]: r["prediction"] for r in experiment["records"]["no_inject__deterministic"]}
    selfi = {r["sample_id"]: r["prediction"] for r in experiment["records"]["b_to_b_self_inject__deterministic"]}
    assert len(base) == NUM_EVAL and selfi == base


def test_receiver_answers_well_above_chance_and_controls_destroy_it(experiment):
    recs = experiment["records"]
    chance = chance_rate(generate_samples(NUM_EVAL, EVAL_SEED), mode="type_pool")
    no_inject = _acc(recs["no_inject__deterministic"])
    assert no_inject >= chance + 0.2, (no_inject, chance)
    for key in ("zero_replacement__deterministic", "same_norm_random__seed42"):
        assert _acc(recs[key]) <= no_inject - 0.2, (key, _acc(recs[key]), no_inject)
    # The report was written from the same records.
    assert (experiment["run_dir"] / "report" / "summary.json").exists()
