"""Issue 22 item 2: rows per stacked ``generate`` (``model.max_generate_rows``): as given, or ``auto``."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from activation_transfer.injection.batch_size import CPU_ROWS_PER_BATCH, generate_rows, probe_rows, with_headroom
from activation_transfer.models.generation import GenerationSettings

SETTINGS = GenerationSettings(max_new_tokens=8, max_prompt_tokens=24)


class _Model(torch.nn.Module):
    """Runs out of CUDA memory above ``fits`` rows; records the shapes it was given."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.fits, self.seen = fits, []

    def forward(self, input_ids, use_cache, logits_to_keep):
        self.seen.append(tuple(input_ids.shape))
        if input_ids.shape[0] > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return SimpleNamespace(logits=None)


def _receiver(fits: int = 10**9):
    return SimpleNamespace(model=_Model(fits), tokenizer=SimpleNamespace(eos_token_id=0))


def test_rows_as_given_or_a_multiple_of_the_batch_on_cpu():
    assert generate_rows(7, 64, _receiver(), SETTINGS) == 7
    assert generate_rows("auto", 64, _receiver(), SETTINGS) == CPU_ROWS_PER_BATCH * 64


def test_the_probe_halves_until_a_prompt_and_its_whole_answer_fit():
    receiver = _receiver(fits=300)
    assert probe_rows(receiver, SETTINGS, ceiling=1024) == 256
    assert receiver.model.seen == [(1024, 32), (512, 32), (256, 32)]  # width = max_prompt_tokens + max_new_tokens
    assert probe_rows(_receiver(fits=0), SETTINGS, ceiling=8) == 1


def test_auto_on_cuda_leaves_half_the_probed_rows_to_what_the_probe_does_not_see():
    # An H200 fitted 1024 fp32 rows in the probe and then ran out of memory on the split protocol (gpu_check).
    assert with_headroom(1024) == 512
    assert with_headroom(2) == with_headroom(1) == 1
