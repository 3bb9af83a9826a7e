"""Organism weights shipped as package data: pinned by SHA-256 to their recipe, installed instead of training; an
installed cache entry is replaced whole when retrained, whenever the replacing process is killed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from activation_transfer.errors import UsageError
from activation_transfer.models.frozen_lm import load_model
from cli import organisms
from cli.organisms import (
    MARKER,
    ensure_organism,
    organism_config,
    organism_dir,
    resolve_organism,
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


class _Killed(BaseException):
    """A kill: no ``except Exception`` handler sees it."""


def _kill(*args, **kwargs):
    raise _Killed


def _installed(shipped, tmp_path, cache_dir, monkeypatch) -> tuple[str, Path]:
    """A fresh cache holding the shipped sender, installed; ``_train`` then "trains" by copying it (no sentinel)."""
    cache = _fresh_cache(tmp_path, cache_dir)
    installed = ensure_organism(str(organism_config("sender")), cache, TINY, shipped_dir=shipped)
    (installed / "sentinel").write_text("the installed organism")

    def train(config_path, overrides, out, name):  # training itself is tested in test_organisms
        shutil.copytree(installed, out, ignore=shutil.ignore_patterns(MARKER, "sentinel"))
        return {"name": name}

    monkeypatch.setattr(organisms, "_train", train)
    return cache, installed


def _assert_complete(folder: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER):
        assert (folder / name).is_file(), name
    load_model(str(folder))


def _assert_no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.") and p.is_dir()]


def _forbid_building(monkeypatch) -> None:
    monkeypatch.setattr(organisms, "_train", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(organisms, "_install_shipped", lambda *a, **k: pytest.fail("installed again"))


def test_a_retrain_killed_while_training_keeps_the_installed_organism(shipped_tiny, tmp_path, cache_dir, monkeypatch):
    cache, installed = _installed(shipped_tiny[0], tmp_path, cache_dir, monkeypatch)
    monkeypatch.setattr(organisms, "_train", _kill)
    with pytest.raises(_Killed):
        ensure_organism(str(organism_config("sender")), cache, TINY, retrain=True)
    _assert_complete(installed)
    assert (installed / "sentinel").exists()


def test_a_retrain_killed_while_removing_the_old_entry_leaves_a_complete_one(
    shipped_tiny, tmp_path, cache_dir, monkeypatch
):
    cache, installed = _installed(shipped_tiny[0], tmp_path, cache_dir, monkeypatch)
    rmtree = shutil.rmtree

    def killed_rmtree(path, *args, **kwargs):  # the first removal is killed after its first file
        monkeypatch.setattr(shutil, "rmtree", rmtree)
        (Path(path) / "model.safetensors").unlink(missing_ok=True)
        raise _Killed

    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(_Killed):
        ensure_organism(str(organism_config("sender")), cache, TINY, retrain=True)
    _assert_complete(installed)  # the new organism: the rename made it the entry before the old one was removed
    assert "source" not in json.loads((installed / MARKER).read_text())
    _forbid_building(monkeypatch)
    assert ensure_organism(str(organism_config("sender")), cache, TINY) == installed
    _assert_no_leftovers(installed)  # the half-removed old organism is gone


def test_a_retrain_killed_between_its_renames_is_undone_by_the_next_call(
    shipped_tiny, tmp_path, cache_dir, monkeypatch
):
    cache, installed = _installed(shipped_tiny[0], tmp_path, cache_dir, monkeypatch)
    rename = os.rename

    def killed_rename(src, dst):  # the old entry was moved aside, the new one is not moved in yet
        if ".tmp-" in Path(src).name:
            raise _Killed
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_rename)
    with pytest.raises(_Killed):
        ensure_organism(str(organism_config("sender")), cache, TINY, retrain=True)
    monkeypatch.setattr(os, "rename", rename)
    _forbid_building(monkeypatch)
    assert ensure_organism(str(organism_config("sender")), cache, TINY) == installed
    _assert_complete(installed)
    assert (installed / "sentinel").exists()  # the old organism, back in place
    _assert_no_leftovers(installed)


def test_leftovers_of_a_killed_replacement_are_restored_and_removed(shipped_tiny, tmp_path, cache_dir, monkeypatch):
    cache, installed = _installed(shipped_tiny[0], tmp_path, cache_dir, monkeypatch)
    # What a process killed between the two renames leaves (a real kill runs no cleanup): the old organism moved
    # aside and the new one complete or not, in temporary folders named after the dead process.
    os.rename(installed, installed.parent / f".{installed.name}.old-999999")
    half = installed.parent / f".{installed.name}.tmp-999999-0123abcd"
    half.mkdir()
    (half / "config.json").write_text("{}")
    _forbid_building(monkeypatch)
    assert ensure_organism(str(organism_config("sender")), cache, TINY, shipped_dir=shipped_tiny[0]) == installed
    _assert_complete(installed)
    assert (installed / "sentinel").exists()
    _assert_no_leftovers(installed)


def test_an_incomplete_entry_is_named_in_one_line_and_rebuilt(shipped_tiny, tmp_path, cache_dir, monkeypatch):
    cache, installed = _installed(shipped_tiny[0], tmp_path, cache_dir, monkeypatch)
    # organism.json left without the weights, as removing an entry file by file could leave it.
    broken = organism_dir(str(organism_config("sender")), cache)  # the full recipe's entry, which the name resolves
    shutil.copytree(installed, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(UsageError, match=r"organism:sender is incomplete \(organism.json but no model.safetensors\)"):
        resolve_organism("sender", cache)
    assert ensure_organism(str(organism_config("sender")), cache) == broken
    _assert_complete(broken)
    assert resolve_organism("sender", cache) == str(broken)
