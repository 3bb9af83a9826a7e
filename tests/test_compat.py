"""What users already have keeps working after the restructuring: checkpoints written before it, class paths."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_modules.components.frozen_lm import ModelRef, load_ref
from lightning_modules.translator import load_translator, load_translator_for

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Written by the tree at commit 250179a (before the components/ layering): a tiny-neox -> tiny-neox-large linear
# translator (seed 0) and its translation of a fixed input.
OLD_CKPT = FIXTURES / "translator_pre_move.ckpt"
EXPECTED = FIXTURES / "translator_pre_move_expected.pt"


def test_checkpoint_written_before_the_move_loads_and_translates_the_same():
    module = load_translator(OLD_CKPT)
    assert module.hparams["translator"]["class_path"] == "lightning_modules.components.translators.LinearTranslator"
    expected = torch.load(EXPECTED, weights_only=True)
    assert torch.equal(module.translate(expected["x"]), expected["y"])


def test_checkpoint_written_before_the_move_matches_todays_models():
    # The evaluation's identity check accepts it for the models it was trained on.
    sender, receiver = load_ref(ModelRef("tiny-neox", layer=0.67)), load_ref(ModelRef("tiny-neox-large", layer=0.67))
    module = load_translator_for(str(OLD_CKPT), sender.identity(), receiver.identity(), allow_mismatch=False)
    assert (module.hparams["sender_dim"], module.hparams["receiver_dim"]) == (32, 48)
