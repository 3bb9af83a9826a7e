"""What users already have keeps working after the restructuring: checkpoints written before it, class paths.

The fixture's stored translation was computed on another machine. fp32 matmuls sum in an order that depends on the
CPU's SIMD kernel and the thread count, so a translation computed here may differ from it by a few ulps (5.96e-08 was
seen on an Intel Xeon): these tests compare with a stated tolerance, and check the weights in float64, where the
summation order no longer shows.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from activation_transfer.models.frozen_lm import ModelRef, load_ref
from activation_transfer.translators.architectures import LinearTranslator
from activation_transfer.translators.export import apply_translator
from activation_transfer.translators.loading import load_translator, load_translator_for

pytestmark = pytest.mark.cross_machine

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# Written by the tree at commit 250179a (before the components/ layering): a tiny-neox -> tiny-neox-large linear
# translator (seed 0) and its translation of a fixed input.
OLD_CKPT = FIXTURES / "translator_pre_move.ckpt"
EXPECTED = FIXTURES / "translator_pre_move_expected.pt"


def fp32_tolerance(y: torch.Tensor, terms: int) -> float:
    """A bound on the difference two fp32 sums of ``terms`` products may show when summed in different orders:
    ``terms`` roundings of at most half an ulp of the largest partial sum (generous: |y| bounds the partial sums only
    loosely, so the bound uses 4x the output's largest magnitude)."""
    return terms * torch.finfo(torch.float32).eps * 4 * float(y.abs().max())


def test_checkpoint_written_before_the_move_loads_and_translates_the_same():
    module = load_translator(OLD_CKPT)
    # The checkpoint names the class where it lived then; it resolves to the class where it lives now.
    old_path = "lightning_modules.components.translators.LinearTranslator"  # its path before the move
    assert module.hparams["translator"]["class_path"] == old_path
    assert type(module.translator) is LinearTranslator
    expected = torch.load(EXPECTED, weights_only=True)
    x, y = expected["x"], expected["y"]
    got = module.translate(x)
    assert got.dtype == torch.float32 and got.shape == y.shape == (2, 5, 48)
    # The same weights give the same translation up to summation order (d_s = 32 products per output, plus a bias).
    tol = fp32_tolerance(y, terms=x.shape[-1] + 1)
    assert tol < 1e-4  # the tolerance is far below any real change of a weight
    torch.testing.assert_close(got, y, rtol=0, atol=tol)


def test_checkpoint_weights_reproduce_the_stored_translation_in_float64():
    # float64 removes the CPU's summation order from the picture: the stored fp32 output must be the float64
    # translation rounded, up to the fp32 kernel's own error on the machine that wrote it.
    module = load_translator(OLD_CKPT)
    expected = torch.load(EXPECTED, weights_only=True)
    translator64 = copy.deepcopy(module.translator).double()
    y64 = apply_translator(translator64, expected["x"].double(), module.normalize)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, expected["y"].double(), rtol=0, atol=fp32_tolerance(expected["y"], terms=33))


def test_a_changed_weight_is_far_outside_the_tolerance():
    # The tolerance can fail: one weight moved by 1e-3 (a tiny real change) moves the translation well past it.
    module = load_translator(OLD_CKPT)
    expected = torch.load(EXPECTED, weights_only=True)
    with torch.no_grad():
        next(module.translator.parameters()).view(-1)[0] += 1e-3
    diff = (module.translate(expected["x"]) - expected["y"]).abs().max().item()
    assert diff > 10 * fp32_tolerance(expected["y"], terms=33)


def test_checkpoint_written_before_the_move_matches_todays_models():
    # The evaluation's identity check accepts it for the models it was trained on.
    sender, receiver = load_ref(ModelRef("tiny-neox", layer=0.67)), load_ref(ModelRef("tiny-neox-large", layer=0.67))
    module = load_translator_for(str(OLD_CKPT), sender.identity(), receiver.identity(), allow_mismatch=False)
    assert (module.hparams["sender_dim"], module.hparams["receiver_dim"]) == (32, 48)
