"""A KV cache that writes each step into buffers allocated once, for the phased decoding of ``generate_ids``.

Hugging Face's ``DynamicCache`` appends a step by ``torch.cat``, copying every layer's whole cache at every token;
on the small organisms that copy was about a tenth of the stacked evaluation's work. Here each layer holds buffers
as long as the prompt and its answer, writes the new positions in place and hands attention views of the filled
part: the same values in the same order, so the attention computes the same numbers (tests compare the ids and the
logits with ``DynamicCache``'s). Dropping rows (``batch_select_indices``) keeps working, which ``DynamicCache``'s
fixed-shape sibling ``StaticCache`` does not offer, and attention never reads the empty tail, which a static cache
masks but still computes. Imported only where a phased ``generate`` starts (it imports transformers).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class BufferedLayer(DynamicLayer):
    """One layer's keys and values in buffers of ``capacity`` positions (grown by doubling if a step needs more);
    ``keys``/``values`` are views of the ``length`` positions written so far."""

    is_croppable = False

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._keys = key_states.new_empty((*key_states.shape[:2], self.capacity, key_states.shape[-1]))
        self._values = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[-1]))
        self.length = 0
        self._views()
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:  # more positions than planned: grow (copies once, as a cat would every step)
            grown = max(end, 2 * self._keys.shape[-2])
            self._keys, self._values = (self._grown(b, grown) for b in (self._keys, self._values))
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def _grown(self, buffer: torch.Tensor, positions: int) -> torch.Tensor:
        new = buffer.new_empty((*buffer.shape[:2], positions, buffer.shape[-1]))
        new[:, :, : self.length] = buffer[:, :, : self.length]
        return new

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._views()

    def reset(self) -> None:
        super().reset()
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BufferedLayer does not crop (assisted decoding is not used here)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("BufferedLayer does not repeat rows (beam search is not used here)")


class BufferedCache(DynamicCache):
    """A ``DynamicCache`` whose layers are :class:`BufferedLayer` of ``capacity`` positions (the prompt width plus
    the new tokens); models with sliding-window or other special layers are refused (:func:`phase_cache` gives them
    a ``DynamicCache``).

    Args:
        config: The model's config (the number and kinds of layers).
        capacity: Positions each layer allocates (more still work, at the price of one copy).
    """

    def __init__(self, config, capacity: int) -> None:
        super().__init__(config=config)
        if any(type(layer) is not DynamicLayer for layer in self.layers):
            kinds = sorted({type(layer).__name__ for layer in self.layers})
            raise ValueError(f"BufferedCache supports plain attention layers only, this model has {kinds}")
        self.layers = [BufferedLayer(capacity) for _ in self.layers]


def phase_cache(config, capacity: int) -> DynamicCache:
    """The cache of a phased ``generate``: a :class:`BufferedCache`, or a ``DynamicCache`` for a model whose layers
    are not all plain attention (sliding windows, linear attention), which it does not support."""
    try:
        return BufferedCache(config, capacity)
    except ValueError:
        return DynamicCache(config=config)
