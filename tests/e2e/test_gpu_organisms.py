"""bench/gpu_organisms.py, dry run: each variant is trained by the shipping path, and what it writes ships.

The script runs for real only on a GPU (issue 19, item 3); this keeps it from rotting between the sessions that have
one. The weights it writes must install for the recipe with the variant's overrides, as ``cli/organism_weights``."""

from __future__ import annotations

import json

import pytest
import torch

from activation_transfer.io import sha256_file
from activation_transfer.models.frozen_lm import load_model
from cli import organisms


def test_dry_run_writes_weights_that_install_for_the_variant_recipe(tmp_path, cache_dir, monkeypatch, bench_script):
    script = bench_script("gpu_organisms")
    out = tmp_path / "run"
    argv = [
        "--dry-run",
        "--out",
        str(out),
        "--variants",
        "sender-4x96-b1024",
        "--parallel",
        "1",
        "--max-seconds",
        "600",
    ]
    assert script.main(argv) == 0
    result = json.loads((out / "gpu_organisms.json").read_text())["results"][0]
    assert result["global_step"] == result["max_steps"] == 6
    weights = out / "sender-4x96-b1024" / "sender.safetensors"
    assert sha256_file(weights) == result["sha256"]
    assert result["validation"]["seed"] == script.VALIDATION_SEED and result["validation"]["n"] == 24
    assert "| sender-4x96-b1024 | 6/6 |" in (out / "gpu_organisms.md").read_text()
    # Shipping: the same recipe and overrides in a fresh cache install these weights instead of training.
    role, overrides = script.overrides_of("sender-4x96-b1024", dry_run=True)
    monkeypatch.setattr(organisms, "_train", lambda *a, **k: pytest.fail("trained instead of installing"))
    fresh = tmp_path / "fresh"
    installed = organisms.ensure_organism(
        str(organisms.organism_config(role)), str(fresh), overrides, shipped_dir=out / "sender-4x96-b1024"
    )
    # The time guard (--max-seconds) did not stop the schedule, so the recipe to ship leaves it out, and the manifest
    # is keyed by that recipe, not by the overrides it trained under.
    assert result["recipe_overrides"] == overrides
    assert installed.name == f"sender-{result['config_hash']}"
    _, guarded = script.overrides_of("sender-4x96-b1024", dry_run=True, max_seconds=600)
    trained = organisms.organism_dir(str(organisms.organism_config(role)), str(out / "cache"), guarded)
    assert trained.exists() and trained.name != installed.name
    ids = torch.tensor([[5, 17, 40, 3, 99, 12]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(installed))(ids).logits, load_model(str(trained))(ids).logits)


def test_a_used_folder_is_refused(tmp_path, bench_script):
    (tmp_path / "old").mkdir()
    with pytest.raises(SystemExit) as err:
        bench_script("gpu_organisms").main(["--dry-run", "--out", str(tmp_path)])
    assert err.value.code == 2


def _last(overrides: list[str], key: str) -> str:
    return [o.split("=", 1)[1] for o in overrides if o.startswith(f"--{key}=")][-1]


def test_a_variant_s_schedule_and_the_dry_run_s_in_the_order_that_makes_each_win(bench_script):
    script = bench_script("gpu_organisms")
    role, real = script.overrides_of("receiver-4x128-b1024", dry_run=False, max_seconds=245)
    assert role == "receiver" and "--trainer.max_time=00:00:04:05" in real
    assert (_last(real, "data.batch_size"), _last(real, "trainer.max_steps"), _last(real, "model.lr")) == (
        "1024",
        "6000",
        "0.004",
    )
    _, dry = script.overrides_of("receiver-4x128-b1024", dry_run=True)
    assert (_last(dry, "data.batch_size"), _last(dry, "trainer.max_steps"), _last(dry, "trainer.accelerator")) == (
        "8",
        "6",
        "cpu",
    )
    assert not any(o.startswith("--trainer.max_time") for o in dry)
