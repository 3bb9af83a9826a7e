"""Evaluation with an exported translator folder or a ``wandb:`` reference instead of a ``.ckpt``, through the
evaluation's ``setup`` (the loader in ``activation_transfer/translators/loading.py``, ``callbacks.local_translator``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from lightning_helpers import quiet_trainer
from test_evaluate_cli import _FakeWandbLogger, ckpt, small  # noqa: F401 (ckpt: the module-scoped fixture)

from activation_transfer.models.frozen_lm import ModelRef
from activation_transfer.models.generation import GenerationSettings
from activation_transfer.translators.export import export_from_checkpoint
from cli.lightning_cli import eval_main

TWO = ("--model.conditions", "[no_inject, replace]", "--model.seeds", "[42]")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])


def test_an_exported_folder_evaluates_as_its_checkpoint(tmp_path, ckpt):  # noqa: F811
    folder = export_from_checkpoint(ckpt, tmp_path / "exported")
    a = eval_main(small(tmp_path / "a", ckpt, *TWO)).model
    b = eval_main(small(tmp_path / "b", str(folder), *TWO)).model
    assert "replace__seed42" in a.results
    assert {k: [r["prediction"] for r in v] for k, v in a.results.items()} == {
        k: [r["prediction"] for r in v] for k, v in b.results.items()
    }
    assert b.translator_info[0]["path"] == str(folder) and len(b.translator_info[0]["sha256"]) == 64


def test_a_wandb_reference_is_used_downloaded_and_recorded(tmp_path, ckpt):  # noqa: F811
    from datamodules.multihop_qa import MultiHopQADataModule
    from lightning_modules.injection_eval import InjectionEvalModule

    class Artifact:
        def download(self, root):
            Path(root).mkdir(parents=True, exist_ok=True)
            shutil.copy(ckpt, Path(root) / "best-00-9.ckpt")
            return root

    fake, used = _FakeWandbLogger(), []
    fake.run.use_artifact = lambda name: used.append(name) or Artifact()
    ref = "wandb:me/proj/translator-abc:best"
    module = InjectionEvalModule(
        ModelRef("tiny-neox"),
        ModelRef("tiny-neox-large"),
        translator_ckpt=ref,
        conditions=["no_inject", "additive"],
        seeds=[42],
        generation=GenerationSettings(max_new_tokens=3),
        report_resamples=50,
    )
    trainer = quiet_trainer(tmp_path, logger=fake)
    trainer.test(module, datamodule=MultiHopQADataModule(num_samples=4, batch_size=4), verbose=False)
    assert used == ["me/proj/translator-abc:best"]
    info = module.translator_info[0]
    assert info["ref"] == ref and Path(info["path"]).is_relative_to(tmp_path / "artifacts")


def test_a_wandb_reference_without_an_online_run_says_how_to_proceed(tmp_path, ckpt, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as exit_:
        eval_main(small(tmp_path, "wandb:me/proj/translator-abc:best", *TWO))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and line.startswith("evaluate.py: error: ")
    assert "only an online W&B run can download" in line


def test_a_functional_wandb_reference_is_refused_under_other_slots(tmp_path, ckpt):  # noqa: F811
    # Issue 20 item 1: the slot check runs for wandb: references as for a .ckpt and an exported folder.
    from test_translator_loading import make_functional_ckpt

    from activation_transfer.errors import UsageError
    from datamodules.multihop_qa import MultiHopQADataModule
    from lightning_modules.injection_eval import InjectionEvalModule

    functional = make_functional_ckpt(tmp_path / "functional.ckpt")

    class Artifact:
        def download(self, root):
            Path(root).mkdir(parents=True, exist_ok=True)
            shutil.copy(functional, Path(root) / "best-00-9.ckpt")
            return root

    fake = _FakeWandbLogger()
    fake.run.use_artifact = lambda name: Artifact()
    module = InjectionEvalModule(
        ModelRef("tiny-neox", layer=0.67),
        ModelRef("tiny-neox-large", layer=0.67),
        functional_translator_ckpt="wandb:me/proj/functional:best",
        conditions=["receiver_alone", "slots_functional"],
        seeds=[42],
        protocol="split",
        slots={"scheme": "last", "k": 8},
        generation=GenerationSettings(max_new_tokens=3),
        report_resamples=50,
    )
    trainer = quiet_trainer(tmp_path, logger=fake)
    with pytest.raises(UsageError, match=r"slots: trained with \{'scheme': 'all'.*evaluated with \{'scheme': 'last'"):
        trainer.test(module, datamodule=MultiHopQADataModule(num_samples=4, batch_size=4), verbose=False)
