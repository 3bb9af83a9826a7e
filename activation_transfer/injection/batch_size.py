"""How many rows one stacked ``generate`` of the evaluation takes (``model.max_generate_rows``).

``auto`` on CUDA finds, once, the largest power of two of rows whose worst case fits in memory, and takes half of
it (:data:`CUDA_HEADROOM`). On CPU the work is compute-bound: larger stacks only added memory traffic (measured on
the organisms, before finished rows left the decoding), so ``auto`` is a small fixed multiple of the data batch size.
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
# auto on CUDA takes 1/CUDA_HEADROOM of the rows the probe fits. The probe sees an empty card, but a stacked
# ``generate`` runs beside the shared prefill store (every distinct prompt's cache up to the injection block, for each
# prompt width of a sub-batch) and the injection's recomputed block. Measured on an H200 (bench/gpu_check.py,
# Pythia-shaped presets, fp32): 1024 probed rows peaked at 132.6 of 139.8 GiB on the paper protocol and ran out of
# memory on the split protocol.
CUDA_HEADROOM = 2


def checked_rows(option: int | str) -> int | str:
    """``model.max_generate_rows`` checked: ``auto`` or a count >= 1 (else one clear error)."""
    if option != "auto" and (isinstance(option, bool) or not isinstance(option, int) or option < 1):
        raise UsageError(f"model.max_generate_rows must be >= 1 or auto, got {option}")
    return option


def generate_rows(option: int | str, batch_size: int, receiver: LoadedModel, settings: GenerationSettings) -> int:
    """Rows per stacked ``generate``: ``option`` itself, or for ``auto`` :func:`with_headroom` of :func:`probe_rows`
    on CUDA and ``CPU_ROWS_PER_BATCH x batch_size`` elsewhere."""
    if option != "auto":
        return int(option)
    device = next(receiver.model.parameters()).device
    if device.type != "cuda":
        return CPU_ROWS_PER_BATCH * int(batch_size)
    fit = probe_rows(receiver, settings)
    rows = with_headroom(fit)
    log.info("max_generate_rows auto: %d rows (%d fit alone) on %s", rows, fit, torch.cuda.get_device_name(device))
    return rows


def with_headroom(fit: int) -> int:
    """The rows ``auto`` takes on CUDA when ``fit`` rows fit the probe: room is left for what it does not see."""
    return max(1, fit // CUDA_HEADROOM)


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
