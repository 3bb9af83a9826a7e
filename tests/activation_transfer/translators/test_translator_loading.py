"""The one translator loader (``activation_transfer/translators/loading.py``): every source gives the same type with
the same training spec, and the evaluation refuses a functional translator evaluated with other slots than it was
trained with (checkpoint and exported folder alike) or given in the other kind's option."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from lightning_helpers import save_weights
from test_injection_eval import RECEIVER, SENDER, make_ckpt, run_eval

from activation_transfer.injection.slots import SlotSpec
from activation_transfer.models.frozen_lm import load_ref
from activation_transfer.translators.export import PretrainedTranslator, export_from_checkpoint
from activation_transfer.translators.loading import load_translator, load_translator_for
from activation_transfer.translators.optim import OPTIMIZER_ARGS_DOC, OptimizerArgs
from lightning_modules.functional_translator import FunctionalTranslatorModule
from lightning_modules.translator import TranslatorModule


def make_functional_ckpt(path, slots: dict | None = None, like: str | None = None, seed: int = 0) -> str:
    """A FunctionalTranslatorModule checkpoint for the tiny evaluation models (untrained: a random linear map drawn
    with ``seed``, or the weights of the aligned checkpoint ``like``), trained "with" ``slots``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = FunctionalTranslatorModule(SENDER, RECEIVER, slots=slots)
    if like is not None:
        module.translator.load_state_dict(load_translator(like).translator.state_dict())
    return save_weights(module, path)


@pytest.fixture(scope="module")
def translators(tmp_path_factory):
    """An aligned checkpoint, a functional one trained with slots ``all`` (same weights), and their exports."""
    folder = tmp_path_factory.mktemp("translators")
    aligned = make_ckpt(folder / "aligned.ckpt")
    functional = make_functional_ckpt(folder / "functional.ckpt", like=aligned)
    return {
        "aligned": aligned,
        "aligned_folder": str(export_from_checkpoint(aligned, folder / "aligned")),
        "functional": functional,
        "functional_folder": str(export_from_checkpoint(functional, folder / "functional")),
    }


@pytest.fixture(scope="module")
def identities():
    return load_ref(SENDER).identity(), load_ref(RECEIVER).identity()


def test_every_source_loads_as_one_type_with_its_kind_training_spec_and_hash(translators):
    x = torch.randn(3, 32)
    loaded = {name: load_translator(ref) for name, ref in translators.items()}
    assert all(type(t) is PretrainedTranslator and not t.training for t in loaded.values())
    assert {name: t.kind for name, t in loaded.items()} == {
        "aligned": "aligned",
        "aligned_folder": "aligned",
        "functional": "functional",
        "functional_folder": "functional",
    }
    for name in ("functional", "functional_folder"):
        spec = loaded[name].training_spec
        assert (spec["objective"], spec["slots"], spec["loss"]) == (
            "answer_ce",
            SlotSpec().to_dict(),
            "functional:answer_ce",
        )
    assert loaded["aligned"].training_spec == {"kind": "aligned", "loss": "cosine"}
    assert loaded["functional_folder"].receiver["name"] == "tiny-neox-large" and loaded["aligned"].normalize
    # The functional checkpoint holds the aligned one's weights: the same translation from all four.
    expected = loaded["aligned"].translate(x)
    assert all(torch.equal(t.translate(x), expected) for t in loaded.values())
    # sha256: the weights' digest (issue 20 item 9), not the file's: the four hold the same weights.
    assert len({t.sha256 for t in loaded.values()}) == 1 and all(len(t.sha256) == 64 for t in loaded.values())
    assert loaded["aligned"].path == translators["aligned"]


@pytest.mark.parametrize("source", ["functional", "functional_folder"])
def test_a_functional_translator_is_refused_under_other_slots(translators, identities, source):
    last8 = SlotSpec("last", k=8).to_dict()
    with pytest.raises(ValueError, match=r"slots: trained with \{'scheme': 'all'.*evaluated with \{'scheme': 'last'"):
        load_translator_for(translators[source], *identities, slots=last8, kind="functional")
    load_translator_for(translators[source], *identities, slots=SlotSpec().to_dict(), kind="functional")
    # allow_mismatch accepts it (a warning), as for other model names or layers.
    load_translator_for(translators[source], *identities, allow_mismatch=True, slots=last8, kind="functional")


@pytest.mark.parametrize("source", ["functional", "functional_folder"])
def test_the_evaluation_refuses_other_slots_in_one_line(tmp_path, translators, source):
    with pytest.raises(ValueError) as err:
        run_eval(
            tmp_path,
            translators["aligned"],
            conditions=["receiver_alone", "slots_functional"],
            seeds=[42],
            protocol="split",
            functional_translator_ckpt=translators[source],
            slots={"scheme": "last", "k": 8},
        )
    message = str(err.value)
    assert "\n" not in message and translators[source] in message and "--model.allow_mismatch" in message
    assert "slots: trained with" in message and "'k': 8" in message


def test_the_cli_refuses_other_slots(tmp_path, translators, monkeypatch, capsys):
    import wandb
    from test_evaluate_cli import small

    from cli.lightning_cli import eval_main

    monkeypatch.setattr(sys, "argv", ["evaluate.py"])
    args = small(
        tmp_path,
        translators["aligned"],
        "--model.protocol",
        "split",
        "--model.seeds",
        "[42]",
        "--model.conditions",
        "[receiver_alone, slots_functional]",
        "--model.slots.scheme",
        "last",
        "--model.slots.k",
        "8",
        "--model.functional_translator_ckpt",
        translators["functional_folder"],
    )
    try:
        with pytest.raises(SystemExit) as exit_:
            eval_main(args)
    finally:
        if wandb.run is not None:
            wandb.finish()
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after Lightning's own lines (seed, devices)
    assert exit_.value.code == 2 and line.startswith("evaluate.py: error: ") and "Traceback" not in err
    assert re.search("slots: trained with .*'scheme': 'all'.*evaluated with .*'k': 8", line)


@pytest.mark.parametrize(
    "option, given, match",
    [
        ("translator_ckpt", "functional", "trained as functional, but --model.translator_ckpt takes aligned"),
        ("translator_ckpt", "functional_folder", "pass it as --model.functional_translator_ckpt"),
        ("functional_translator_ckpt", "aligned", "trained as aligned, but --model.functional_translator_ckpt"),
        ("functional_translator_ckpt", "aligned_folder", "pass it as --model.translator_ckpt"),
    ],
)
def test_a_translator_of_the_other_kind_is_refused(tmp_path, translators, option, given, match):
    conditions = ["no_inject", "replace" if option == "translator_ckpt" else "replace_functional"]
    kwargs = {"functional_translator_ckpt": translators["functional"], option: translators[given]}
    ckpt = kwargs.pop("translator_ckpt", translators["aligned"])
    with pytest.raises(ValueError, match=match) as err:
        run_eval(tmp_path, ckpt, conditions=conditions, seeds=[42], **kwargs)
    assert "\n" not in str(err.value) and translators[given] in str(err.value)


def test_the_right_kinds_evaluate_and_the_same_weights_answer_alike(tmp_path, translators):
    module = run_eval(
        tmp_path,
        translators["aligned"],
        conditions=["replace", "replace_functional"],
        seeds=[42],
        functional_translator_ckpt=translators["functional_folder"],
    )
    answers = {k: [r["prediction"] for r in v] for k, v in module.results.items()}
    assert answers["replace__seed42"] == answers["replace_functional__seed42"]  # the same weights in both roles
    assert module.functional_info[0]["sha256"] == load_translator(translators["functional_folder"]).sha256


def test_an_exported_folder_naming_a_class_from_before_the_move_loads(translators, tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    src = Path(translators["aligned_folder"])
    config = json.loads((src / "config.json").read_text())
    config["translator"]["class_path"] = "activation_transfer.translators.architectures.LinearTranslator"
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(src / "model.safetensors", folder / "model.safetensors")
    x = torch.randn(2, 32)
    assert torch.equal(load_translator(folder).translate(x), load_translator(src).translate(x))


def test_a_folder_that_is_not_an_exported_translator_is_named_as_such(translators, tmp_path):
    # An existing folder used to be reported as "does not exist", which sends the user looking for a typo.
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(Path(translators["aligned_folder"]) / "config.json", folder / "config.json")
    with pytest.raises(
        ValueError, match=r"run is a folder but not an exported translator: it lacks model\.safet"
    ) as exc:
        load_translator(folder)
    assert str(folder) in str(exc.value) and "config.json and model.safetensors" in str(exc.value)
    assert not isinstance(exc.value, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is a folder but not an exported translator: it lacks config.json and"):
        load_translator(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ optimizer arguments


def test_optimizer_arguments_are_documented_defaulted_and_checked_once():
    for cls in (TranslatorModule, FunctionalTranslatorModule):
        assert OPTIMIZER_ARGS_DOC in cls.__doc__ and "<optimizer args>" not in cls.__doc__
    assert TranslatorModule(3, 3).optimizer_args == OptimizerArgs()  # the dataclass' defaults are the aligned ones
    with pytest.raises(ValueError, match="model.decay must be 'linear' or 'constant'"):
        TranslatorModule(3, 3, decay="cosine")
    with pytest.raises(ValueError, match="model.warmup_steps must be >= 0"):
        TranslatorModule(3, 3, warmup_steps=-1)
    with pytest.raises(ValueError, match=r"model.betas must be two numbers in \[0, 1\)"):
        FunctionalTranslatorModule(SENDER, RECEIVER, betas=(0.9, 1.5))


def test_flat_optimizer_options_reach_the_optimizer_through_the_cli(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(FunctionalTranslatorModule, "model")
    help_text = " ".join(parser.format_help().split())  # the terminal's width wraps lines anywhere
    assert "--model.lr LR" in help_text and "Peak learning rate of AdamW. (type: float, default: 0.001)" in help_text
    cfg = parser.parse_args(
        [
            "--model.sender_model.name",
            "tiny-neox",
            "--model.receiver_model.name",
            "tiny-neox",
            "--model.lr",
            "0.02",
            "--model.decay",
            "constant",
        ]
    )
    assert (cfg.model.lr, cfg.model.decay, cfg.model.warmup_steps) == (0.02, "constant", 50)
    module = TranslatorModule(3, 3, lr=0.02, decay="constant", warmup_steps=0)
    opt = module.configure_optimizers()
    assert opt["optimizer"].param_groups[0]["lr"] == 0.02 and module.hparams["lr"] == 0.02
