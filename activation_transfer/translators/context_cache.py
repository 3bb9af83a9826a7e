"""Functional training's frozen sender states at the context tokens, computed once per distinct context.

The sender is frozen and causal: its states at a context's tokens depend on those tokens only, not on the question
after them nor on the other rows of a batch, yet training ran it on every batch of every epoch. The cache holds them
per context (keyed by its token ids); :meth:`ContextStateCache.fill` computes a whole data set's contexts in chunks
of similar length (little padding), in an order fixed by the contexts alone, so a resumed run reads the same values.
The values equal the per-batch ones up to float reassociation (another padded width); a bound on the bytes keeps
large senders (Pythia on a GPU) on the per-batch path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from activation_transfer.injection.slots import left_padded

log = logging.getLogger(__name__)
# Rows per sender pass of fill(): contexts sorted by length, so a chunk pads little.
FILL_ROWS = 64


class ContextStateCache:
    """Sender states ``(n_i, d)`` per context token row, filled by ``compute``.

    Args:
        compute: ``compute(input_ids, attention_mask) -> (B, T, d)``: the sender's states of a left-padded batch.
        bytes_per_token: Bytes one token's state takes (hidden size x element size).
        limit_bytes: Most bytes held; a data set over it is not cached (0: never cache).
        pad_id: Padding id of the left-padded passes.
    """

    def __init__(
        self,
        compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        bytes_per_token: int,
        limit_bytes: float,
        pad_id: int,
    ) -> None:
        self.compute, self.bytes_per_token, self.limit, self.pad_id = compute, int(bytes_per_token), limit_bytes, pad_id
        self.states: dict[tuple[int, ...], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.states)

    def fill(self, rows: Sequence[Sequence[int]]) -> bool:
        """Compute the states of every distinct non-empty row not held yet; False (nothing computed) when they would
        pass the byte bound."""
        new = sorted({tuple(r) for r in rows if len(r)} - self.states.keys(), key=lambda r: (len(r), r))
        held = sum(len(k) for k in self.states) * self.bytes_per_token
        need = sum(len(r) for r in new) * self.bytes_per_token
        if held + need > self.limit:
            if self.limit:
                log.info(
                    "sender states of %d contexts take %.0f MiB, over the cache bound of %.0f MiB: the sender runs on "
                    "every batch",
                    len(new),
                    need / 2**20,
                    self.limit / 2**20,
                )
            return False
        for start in range(0, len(new), FILL_ROWS):
            chunk = new[start : start + FILL_ROWS]
            ids, mask = left_padded(chunk, self.pad_id)
            states = self.compute(ids, mask)
            width = states.shape[1]
            for row, h in zip(chunk, states, strict=True):
                self.states[row] = h[width - len(row) :].clone()
        return True

    def get(self, rows: Sequence[Sequence[int]]) -> list[torch.Tensor] | None:
        """The held states of every row, or None when one is missing."""
        out = [self.states.get(tuple(r)) for r in rows]
        return None if any(h is None for h in out) else out


def context_rows(layout: dict) -> list[list[int]]:
    """Each row's context token ids of a ``sender_batch`` layout (its ``context_slices``)."""
    ids = layout["input_ids"]
    return [ids[i, sl].tolist() for i, sl in enumerate(layout["context_slices"])]


__all__ = ["ContextStateCache", "context_rows"]
