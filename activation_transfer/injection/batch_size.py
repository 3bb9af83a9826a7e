"""How many rows one stacked ``generate`` of the evaluation takes (``model.max_generate_rows``).

``auto`` on CUDA finds, once, the largest power of two of rows whose worst case fits in memory. On CPU the work is
compute-bound: larger stacks only added memory traffic (measured on the organisms, before finished rows left the
decoding), so ``auto`` is a small fixed multiple of the data batch size.
"""

from __future__ import annotations

import logging

import torch

from activation_transfer.errors import UsageError
from activation_transfer.models.frozen_lm import LoadedModel
from activation_transfer.models.generation import GenerationSettings

log = logging.getLogger(__name__)

CPU_ROWS_PER_BATCH = (
    2  # auto on CPU: rows per generate = this x data.batch_size (measured: more only adds memory traffic)
)
PROBE_CEILING = 8192  # auto on CUDA: the most rows tried


def checked_rows(option: int | str) -> int | str:
    """``model.max_generate_rows`` checked: ``auto`` or a count >= 1 (else one clear error)."""
    if option != "auto" and (isinstance(option, bool) or not isinstance(option, int) or option < 1):
        raise UsageError(f"model.max_generate_rows must be >= 1 or auto, got {option}")
    return option


def generate_rows(option: int | str, batch_size: int, receiver: LoadedModel, settings: GenerationSettings) -> int:
    """Rows per stacked ``generate``: ``option`` itself, or for ``auto`` :func:`probe_rows` on CUDA and
    ``CPU_ROWS_PER_BATCH x batch_size`` elsewhere."""
    if option != "auto":
        return int(option)
    device = next(receiver.model.parameters()).device
    if device.type != "cuda":
        return CPU_ROWS_PER_BATCH * int(batch_size)
    rows = probe_rows(receiver, settings)
    log.info("max_generate_rows auto: %d rows fit on %s", rows, torch.cuda.get_device_name(device))
    return rows


@torch.no_grad()
def probe_rows(receiver: LoadedModel, settings: GenerationSettings, ceiling: int = PROBE_CEILING) -> int:
    """The largest power of two of rows (<= ``ceiling``) for which one forward pass over prompts as long as a
    prompt and its whole answer can be (``max_prompt_tokens + max_new_tokens``), with the cache kept, fits: the
    cache a ``generate`` ends with plus more activations than any of its steps."""
    model = receiver.model
    device = next(model.parameters()).device
    width = settings.max_prompt_tokens + settings.max_new_tokens
    rows = ceiling
    while rows > 1:
        try:
            ids = torch.full((rows, width), int(receiver.tokenizer.eos_token_id), device=device)
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            del out, ids
            break
        except torch.cuda.OutOfMemoryError:
            rows //= 2
        finally:
            torch.cuda.empty_cache()
    return rows
