"""Exported translators (``translators/export.py``): bit-identical to the checkpoint, self-describing config,
offline round trip, refusal of foreign code and of incomplete folders."""

from __future__ import annotations

import json

import pytest
import torch
from lightning_helpers import save_weights

from activation_transfer.translators import export as te
from activation_transfer.translators.loading import check_translator_matches, load_translator
from lightning_modules.translator import TranslatorModule

SENDER = {"name": "tiny-neox", "layer": "gpt_neox.layers.1", "hidden_size": 12, "revision": None}
RECEIVER = {"name": "tiny-neox-large", "layer": "gpt_neox.layers.2", "hidden_size": 16, "revision": None}
MLP = {"class_path": "activation_transfer.translators.architectures.MLPTranslator", "init_args": {"hidden_dim": 8}}


def _checkpoint(tmp_path, **kwargs) -> str:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = TranslatorModule(12, 16, sender=SENDER, receiver=RECEIVER, **kwargs)
        for p in module.translator.parameters():  # non-trivial weights, not the init's
            p.data.normal_()
    return save_weights(module, tmp_path / "translator.ckpt")


@pytest.mark.parametrize("kwargs", [{}, {"normalize": False, "translator": MLP, "loss": "mse"}], ids=["linear", "mlp"])
def test_exported_translator_translates_exactly_as_the_checkpoint(tmp_path, kwargs):
    ckpt = _checkpoint(tmp_path, **kwargs)
    folder = te.export_from_checkpoint(ckpt, tmp_path / "export", metrics={"val/cos_norm": 0.5, "bad": float("nan")})
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = te.from_pretrained(folder)
    x = torch.randn(2, 5, 12) * 7
    assert torch.equal(loaded.translate(x), load_translator(ckpt).translate(x))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # The mixin's own loader (what a Hub user would call) reads the same folder into the same translator.
    assert torch.equal(te.PretrainedTranslator.from_pretrained(str(folder)).translate(x), loaded.translate(x))


def test_from_pretrained_puts_the_weights_on_map_location(tmp_path):
    # load_model copies into the module's parameters, which stay where they were built (CPU) unless moved.
    folder = te.export_from_checkpoint(_checkpoint(tmp_path), tmp_path / "export")
    loaded = te.from_pretrained(folder, map_location="meta")
    assert {p.device.type for p in loaded.parameters()} == {"meta"}


def test_config_holds_dims_identities_and_metrics(tmp_path):
    metrics = {"val/cos_norm": 0.5, "bad": float("nan")}
    folder = te.export_from_checkpoint(_checkpoint(tmp_path), tmp_path / "export", metrics=metrics)
    config = json.loads((folder / "config.json").read_text())
    assert (config["sender_dim"], config["receiver_dim"], config["normalize"]) == (12, 16, True)
    assert config["sender"] == SENDER and config["receiver"] == RECEIVER
    assert config["translator"]["class_path"].endswith("LinearTranslator")
    assert config["metrics"] == {"val/cos_norm": 0.5, "bad": None}  # NaN is not JSON
    assert config["source"]["checkpoint"] == "translator.ckpt" and len(config["source"]["checkpoint_sha256"]) == 64
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: activation-transfer") and "`tiny-neox` layer" in card
    # The evaluation's identity check runs on the exported translator as on the checkpoint.
    loaded = te.from_pretrained(folder)
    check_translator_matches(loaded, SENDER, RECEIVER)
    with pytest.raises(ValueError, match="receiver layer"):
        check_translator_matches(loaded, SENDER, {**RECEIVER, "layer": "gpt_neox.layers.3"})


def test_save_pretrained_of_a_live_module_and_hashes(tmp_path):
    module = TranslatorModule(12, 16, sender=SENDER, receiver=RECEIVER)
    folder = te.save_pretrained(tmp_path / "a", module.translator, te.config_from_hparams(module.hparams))
    x = torch.randn(3, 12)
    assert torch.equal(te.from_pretrained(folder).translate(x), module.translate(x))
    assert te.translator_sha256(folder) == te.translator_sha256(
        te.save_pretrained(tmp_path / "b", module.translator, te.config_from_hparams(module.hparams))
    )
    with torch.no_grad():
        module.translator.linear.bias += 1
    te.save_pretrained(folder, module.translator, te.config_from_hparams(module.hparams))  # overwrite in place
    assert torch.equal(te.from_pretrained(folder).translate(x), module.translate(x))
    assert te.translator_sha256(folder) != te.translator_sha256(tmp_path / "b")


def test_hub_ids_go_through_the_download_cache(tmp_path, monkeypatch):
    import huggingface_hub

    folder = te.export_from_checkpoint(_checkpoint(tmp_path), tmp_path / "export")
    calls = []

    def fake_snapshot(repo_id, allow_patterns, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    loaded = te.from_pretrained("someone/translator", revision="abc")
    assert calls == [("someone/translator", {"revision": "abc"})] and loaded.hparams["receiver_dim"] == 16


def test_refuses_foreign_code_and_incomplete_folders(tmp_path):
    folder = te.export_from_checkpoint(_checkpoint(tmp_path), tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "translator": {"class_path": "os.system"}}))
    with pytest.raises(ValueError, match="trust_class_path"):
        te.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="not an exported translator folder"):
        te.from_pretrained(folder)
    with pytest.raises(ValueError, match="not a translator checkpoint"):
        torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "other.ckpt")
        te.checkpoint_translator(tmp_path / "other.ckpt")
