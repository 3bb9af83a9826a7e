"""Issue 20: a translator's identity is its weights (items 9, 10), and a damaged export folder or a file that is no
checkpoint is refused in one line naming the path (items 13, 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_injection_eval import make_ckpt

from activation_transfer.errors import UsageError
from activation_transfer.translators.export import export_from_checkpoint, from_pretrained
from activation_transfer.translators.loading import load_translator


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_ckpt(tmp_path_factory.mktemp("integrity") / "aligned.ckpt")


def _export(ckpt: str, folder: Path) -> Path:
    return export_from_checkpoint(ckpt, folder)


def _one_line(err: pytest.ExceptionInfo, path) -> str:
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_a_checkpoint_and_its_export_are_one_translator(ckpt, tmp_path):
    # Item 9: the same weights as .ckpt and as exported folder are one translator (one run identity).
    folder = _export(ckpt, tmp_path / "export")
    assert load_translator(ckpt).sha256 == load_translator(folder).sha256
    other = make_ckpt(tmp_path / "other.ckpt", seed=1)
    assert load_translator(other).sha256 != load_translator(ckpt).sha256


def test_the_export_records_a_digest_and_a_flipped_bit_is_refused(ckpt, tmp_path):
    # Item 10: config.json records the weights' digest; a changed weight byte no longer loads silently.
    folder = _export(ckpt, tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    assert config["translator_sha256"] == load_translator(ckpt).sha256
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(UsageError) as err:
        from_pretrained(folder)
    assert "do not match the digest translator_sha256" in _one_line(err, folder)


@pytest.mark.parametrize("damage", ["receiver_dim", "truncated", "unknown_key"])
def test_a_tampered_export_folder_is_one_line_naming_the_path(ckpt, tmp_path, damage):
    # Item 13: no raw safetensors/torch/TypeError message without the path.
    folder = _export(ckpt, tmp_path / "export")
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    config = json.loads(config_path.read_text())
    if damage == "receiver_dim":
        config_path.write_text(json.dumps({**config, "receiver_dim": config["receiver_dim"] + 1}))
        expected = "does not load with its config.json"
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
        expected = "does not load with its config.json"
    else:
        config_path.write_text(json.dumps({**config, "surprise": 1}))
        expected = "unknown key(s) surprise"
    with pytest.raises(UsageError) as err:
        load_translator(folder)
    assert expected in _one_line(err, folder)


def test_a_file_that_is_no_checkpoint_is_refused_in_one_line(tmp_path):
    # Item 14: torch's message advises weights_only=False (running the file's code); the project's names the fix.
    readme = tmp_path / "README.md"
    readme.write_text("# not a checkpoint\n")
    with pytest.raises(UsageError) as err:
        load_translator(readme)
    message = _one_line(err, readme)
    assert "is not a translator checkpoint" in message and "weights_only" not in message


def test_weights_digest_covers_every_tensor(ckpt):
    translator = load_translator(ckpt)
    before = translator.weights_sha256()
    with torch.no_grad():
        next(iter(translator.translator.parameters())).view(-1)[0] += 1e-6
    assert translator.weights_sha256() != before
