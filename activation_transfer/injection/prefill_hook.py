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
from activation_transfer.models.hooks import block_hook, get_module


class PrefillOnly:
    """Counts the hook's calls: the first is the prompt prefill, every later one a decoding step to leave alone."""

    calls = 0

    @property
    def fired(self) -> bool:
        return self.calls > 0

    def decoding(self) -> bool:
        """Count this call; True for a decoding step (any call after the prefill)."""
        self.calls += 1
        return self.calls > 1


class PrefillInjection(PrefillOnly):
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
        self.receiver_norm_mean: torch.Tensor | None = None
        self.source_norm: torch.Tensor | None = None
        self.injected_norm_mean: torch.Tensor | None = None

    def __call__(self, h: torch.Tensor) -> torch.Tensor | None:
        if self.decoding():
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


class _CacheRecorder:
    """Stands in for the KV cache while a block runs on some rows: keeps what the block would cache."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((keys, values, args, kwargs))
        return keys, values  # a fresh cache's first update returns what it stores


class SharedPrefill:
    """The prefill states of prompt rows up to and including the injection block, kept across ``generate`` calls
    (:meth:`reusing`): every stacked run of a sub-batch asks the same prompts, and nothing differs between runs
    before the write at the injection block's output, so those blocks run once per distinct prompt row.

    A row's states do not depend on the other rows of its batch (the property stacking rests on), so a row's stored
    states equal what it would compute in any batch of the same width; decoding steps run every block as usual.
    """

    def __init__(self) -> None:
        self.states: dict[tuple, tuple[torch.Tensor, list[tuple]]] = {}  # (block, row) -> output, cache entries

    @contextmanager
    def reusing(self, model: nn.Module, path: str, ids: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
        """During one ``generate`` of the prompt batch ``ids``/``mask``: the blocks up to ``path`` compute on their
        prefill pass only the rows not stored yet, and take the others' output and KV entries from the store."""
        from transformers.cache_utils import Cache

        parent, _, index = path.rpartition(".")
        rows = [(tuple(i), tuple(m)) for i, m in zip(ids.tolist(), mask.tolist())]
        device = next(model.parameters()).device

        def shared(number: int, original: Callable) -> Callable:
            calls = [0]

            def forward(hidden: torch.Tensor, *args, **kwargs):
                calls[0] += 1
                if calls[0] > 1:  # a decoding step
                    return original(hidden, *args, **kwargs)
                if hidden.shape[0] != len(rows):
                    raise RuntimeError(f"shared prefill: block input {tuple(hidden.shape)} is not the prompt batch")
                todo_at, seen = [], set()
                for i, row in enumerate(rows):  # the first copy of each row not stored yet
                    if (number, row) not in self.states and row not in seen:
                        seen.add(row)
                        todo_at.append(i)
                if todo_at:
                    self._compute(number, original, hidden, args, kwargs, [rows[i] for i in todo_at], todo_at, device)
                stored = [self.states[(number, r)] for r in rows]
                # Blocks take the cache by keyword (GPT-NeoX, Llama) or by position (GPT-2).
                for cache in (v for v in (*args, *kwargs.values()) if isinstance(v, Cache)):
                    for k, (_, _, a, kw) in enumerate(stored[0][1]):
                        cache.update(*(torch.stack([s[1][k][j] for s in stored]) for j in (0, 1)), *a, **kw)
                return torch.stack([s[0] for s in stored])

            return forward

        blocks = list(get_module(model, parent))[: int(index) + 1]
        own = [block.__dict__.get("forward") for block in blocks]
        for number, block in enumerate(blocks):
            block.forward = shared(number, block.forward)
        try:
            yield
        finally:
            for block, forward in zip(blocks, own):
                del block.forward
                if forward is not None:  # an instance-level forward (e.g. an accelerate hook) comes back
                    block.forward = forward

    def _compute(self, number, original, hidden, args, kwargs, keys, at, device) -> None:
        """Run block ``number`` on the rows ``at`` of the batch and store each row's output and cache entries."""
        from transformers.cache_utils import Cache

        sel, batch = torch.tensor(at, device=device), hidden.shape[0]

        def pick(x):
            if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch:
                return x[sel]
            return tuple(pick(y) for y in x) if isinstance(x, tuple) else x

        recorder = _CacheRecorder()
        kwargs = {k: recorder if isinstance(v, Cache) else pick(v) for k, v in kwargs.items()}
        args = [recorder if isinstance(a, Cache) else pick(a) for a in args]
        out = original(hidden[sel], *args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise RuntimeError("shared prefill needs blocks that return a tensor (transformers >= 5)")
        for j, key in enumerate(keys):
            entries = [(k[j], v[j], a, kw) for k, v, a, kw in recorder.calls]
            self.states[(number, key)] = (out[j], entries)
