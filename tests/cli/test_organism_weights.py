"""Organism weights shipped as package data: pinned by SHA-256 to their recipe, installed instead of training."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from activation_transfer.errors import UsageError
from activation_transfer.models.frozen_lm import load_model
from cli import organisms
from cli.organisms import (
    MARKER,
    ensure_organism,
    organism_config,
    ship_organism,
)

# A reduced sender: seconds to train (the same reduction as test_organisms.TINY).
TINY = [
    *("--model.hidden_size", "32", "--model.num_layers", "1", "--model.num_heads", "2"),
    *("--model.intermediate_size", "64", "--data.num_train_samples", "512", "--data.num_val_samples", "32"),
    *("--data.batch_size", "16", "--trainer.max_steps", "24", "--trainer.val_check_interval", "12"),
]


@pytest.fixture(scope="module")
def shipped_tiny(cache_dir, tmp_path_factory):
    """A reduced sender trained and shipped into a temporary package-data folder."""
    shipped = tmp_path_factory.mktemp("shipped")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACTIVATION_TRANSFER_CACHE", str(cache_dir))
        entry = ship_organism(str(organism_config("sender")), str(cache_dir), TINY, shipped_dir=shipped)
    return shipped, entry


def _fresh_cache(tmp_path, cache_dir):
    shutil.copytree(cache_dir / "tokenizers", tmp_path / "tokenizers")
    return str(tmp_path)


def test_install_reproduces_the_trained_organism(shipped_tiny, tmp_path, cache_dir, monkeypatch):
    shipped, entry = shipped_tiny
    trained = ensure_organism(str(organism_config("sender")), str(cache_dir), TINY)
    monkeypatch.setattr(organisms, "_train", lambda *a, **k: pytest.fail("trained instead of installing"))
    installed = ensure_organism(
        str(organism_config("sender")), _fresh_cache(tmp_path, cache_dir), TINY, shipped_dir=shipped
    )
    assert installed.name == trained.name and installed != trained
    info = json.loads((installed / MARKER).read_text())
    assert info["source"] == "package:sender.safetensors" and info["global_step"] == 24
    trained_info = json.loads((trained / MARKER).read_text())
    assert info["name"] == installed.name
    assert organisms.config_hash(info["config"]) == organisms.config_hash(trained_info["config"])
    ids = torch.tensor([[5, 17, 40, 3, 99, 12]])
    with torch.no_grad():
        a, b = load_model(str(trained))(ids).logits, load_model(str(installed))(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_install_refuses_weights_whose_sha256_differs(shipped_tiny, tmp_path, cache_dir):
    shipped, entry = shipped_tiny
    tampered = tmp_path / "tampered"
    shutil.copytree(shipped, tampered)
    data = bytearray((tampered / entry["file"]).read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    (tampered / entry["file"]).write_bytes(bytes(data))
    with pytest.raises(UsageError, match="SHA-256"):
        ensure_organism(str(organism_config("sender")), _fresh_cache(tmp_path, cache_dir), TINY, shipped_dir=tampered)


def test_retrain_ignores_the_shipped_weights(shipped_tiny, tmp_path, cache_dir, monkeypatch):
    shipped, _ = shipped_tiny
    cache = _fresh_cache(tmp_path, cache_dir)
    installed = ensure_organism(str(organism_config("sender")), cache, TINY, shipped_dir=shipped)
    assert "source" in json.loads((installed / MARKER).read_text())
    monkeypatch.setenv(organisms.RETRAIN_ENV, "1")
    retrained = ensure_organism(str(organism_config("sender")), cache, TINY, shipped_dir=shipped)
    assert retrained == installed and "source" not in json.loads((retrained / MARKER).read_text())
    # A recipe the manifest does not pin trains too (the shipped weights belong to one exact hash).
    other = ensure_organism(
        str(organism_config("sender")), cache, [*TINY, "--trainer.max_steps", "2"], shipped_dir=shipped, retrain=False
    )
    assert "source" not in json.loads((other / MARKER).read_text())
