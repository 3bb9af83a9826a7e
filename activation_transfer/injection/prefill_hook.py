"""A block hook that rewrites the receiver's hidden states on the prompt prefill pass only (as the paper injects).

It fires on the first call of ``generate`` (the whole prompt) and passes every later token through; a first call not
shaped like the prompt grid is an error (a cache hit, a chunked prefill, the wrong batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from activation_transfer.injection.conditions import apply_injection, masked_norm_mean
from activation_transfer.models.hooks import block_hook


class PrefillInjection:
    """The state of one prefill-only injection: what to write and what was seen.

    After the prefill call, per row (CPU tensors of shape (B,), ``None`` where they do not apply):

    * ``receiver_norm_mean``: mean norm of the receiver's own block output over real positions, before injection.
    * ``source_norm``: norm of the source vectors: for ``additive`` the one (last-token) vector per row, which is
      what the paper records as the translated norm of additive; otherwise the mean over real positions.
    * ``injected_norm_mean``: norm of what is injected, as the paper records it (see
      ``conditions.apply_injection``): ``scale * ||source||`` for additive, the new state for replace and rescaled
      (for best_alpha the blended state).

    Args:
        mask: Attention mask (B, T) of the prompt batch, 1 on real tokens; pads are never written.
        mode: ``none`` (record only), ``additive``, ``replace`` or ``rescaled`` (see ``conditions.apply_injection``).
        source: The vectors to write, or a callable ``h -> source`` for sources that depend on ``h``.
        alpha: Blend weight of ``rescaled``.
        scale: Multiplier of ``additive``.
    """

    def __init__(
        self,
        mask: torch.Tensor,
        mode: str = "none",
        source: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
        alpha: float = 1.0,
        scale: float = 1.0,
    ) -> None:
        self.mask = mask
        self.mode = mode
        self.source = source
        self.alpha = alpha
        self.scale = scale
        self.calls = 0
        self.receiver_norm_mean: torch.Tensor | None = None
        self.source_norm: torch.Tensor | None = None
        self.injected_norm_mean: torch.Tensor | None = None

    @property
    def fired(self) -> bool:
        return self.calls > 0

    def __call__(self, h: torch.Tensor) -> torch.Tensor | None:
        self.calls += 1
        if self.calls > 1:  # a decoding step: leave it alone
            return None
        if h.shape[:2] != self.mask.shape:
            raise RuntimeError(
                f"the prefill pass reached the injection block with shape {tuple(h.shape[:2])}, but the prompt batch "
                f"is {tuple(self.mask.shape)}; injection expects one full-prompt prefill pass"
            )
        mask = self.mask.to(h.device)
        self.receiver_norm_mean = masked_norm_mean(h, mask).cpu()
        source = self.source(h) if callable(self.source) else self.source
        new, injected = apply_injection(self.mode, h, mask, source, alpha=self.alpha, scale=self.scale)
        self.injected_norm_mean = None if injected is None else injected.cpu()
        if self.mode != "none":  # apply_injection has checked the source's shape
            norm = source.float().norm(dim=-1) if self.mode == "additive" else masked_norm_mean(source, mask)
            self.source_norm = norm.cpu()
        return None if self.mode == "none" else new


@contextmanager
def prefill_injection(model: nn.Module, path: str, injection: PrefillInjection) -> Iterator[PrefillInjection]:
    """Register ``injection`` on the block at ``path`` for the duration of the block; checks that it fired."""
    with block_hook(model, path, injection):
        yield injection
    if not injection.fired:
        raise RuntimeError(f"the injection hook on {path!r} never fired: the block was not run")
