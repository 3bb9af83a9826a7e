"""The KV protocol's attention prefix: one key and one value per context entry at each receiver layer.

The receiver reads only the question part, continuing after a prefix in its attention cache (a transformers
``DynamicCache``): its own context pass (``kv_self``), projected sender states, random or zero entries. The prefix
occupies positions ``0..n-1`` and the question continues at ``n`` as in the full prompt; keys carry the receiver's
rotary embedding of their position. Layers outside the chosen subset hold zero keys and values, so one attention mask
serves every layer (docs/conditions.md, "KV protocol").
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from activation_transfer.errors import UsageError
from activation_transfer.injection.slots import left_padded
from activation_transfer.injection.sources import capture_site, left_grid, position_ids
from activation_transfer.models.generation import GenerationSettings, MaskedRepetitionPenalty, generation_config


def geometry(model) -> tuple[int, int, int]:
    """``(layers, heads, head_dim)`` of a receiver's attention."""
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    return int(cfg.num_hidden_layers), heads, int(cfg.hidden_size) // heads


def resolve_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """The receiver layers that get a prefix (None: all), sorted; negative indices count from the end.

    Raises:
        ValueError: An index out of range or repeated (one line naming ``layers``).
    """
    if layers is None:
        return list(range(num_layers))
    out = [int(i) + num_layers if int(i) < 0 else int(i) for i in layers]
    if not out or any(not 0 <= i < num_layers for i in out) or len(set(out)) != len(out):
        raise UsageError(f"kv layers must be distinct indices in [-{num_layers}, {num_layers}), got {list(layers)}")
    return sorted(out)


def rotate_keys(model, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keys ``(..., B, H, P, hd)`` with the receiver's rotary embedding of their positions (left-padded ``mask``
    ``(B, P)``: the first real entry is position 0), exactly as its attention rotates the keys it caches."""
    base = model.base_model
    apply_rotary = sys.modules[type(base).__module__].apply_rotary_pos_emb
    pos = position_ids(mask).to(keys.device)
    cos, sin = base.rotary_emb(keys, position_ids=pos)
    flat = keys.reshape(-1, *keys.shape[-4:]) if keys.dim() > 4 else keys.unsqueeze(0)
    rotated = torch.stack([apply_rotary(k, k, cos, sin)[1] for k in flat])
    return rotated.reshape(keys.shape)


@dataclass
class KVPrefix:
    """A batch's attention prefix: per receiver layer keys and values ``(B, H, P, hd)`` (keys rotated), left padded.

    Attributes:
        keys: One tensor per receiver layer.
        values: One tensor per receiver layer.
        mask: ``(B, P)``, 1 on real entries.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor

    def cache(self):
        """A fresh ``DynamicCache`` holding the prefix (generation appends to its cache; the prefix stays)."""
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=list(zip(self.keys, self.values, strict=True)))

    def continued(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask ``(B, P + T)`` of the prefix followed by a left-padded batch of mask ``(B, T)``, and the
        new tokens' position ids ``(B, T)``: they continue from each row's prefix length, as in the full prompt."""
        full = torch.cat([self.mask.to(mask.device), mask], dim=1)
        return full, position_ids(full)[:, self.mask.shape[1] :]

    def norms(self, layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row the mean fp32 norm of its real key and value vectors over ``layers`` and heads (diagnostics)."""
        m = self.mask.to(self.keys[0].device).float()[:, None, :]
        n = (m.sum(-1) * len(layers)).clamp(min=1).squeeze(1)

        def mean(t: list[torch.Tensor]) -> torch.Tensor:
            total = sum((t[i].float().norm(dim=-1) * m).sum(dim=(1, 2)) for i in layers)
            return (total / self.keys[0].shape[1] / n).cpu()

        return mean(self.keys), mean(self.values)


def context_states(model, path: str, layout: dict, site: str = "block") -> tuple[torch.Tensor, torch.Tensor]:
    """A frozen sender's states at each row's context tokens of a ``sender_batch`` layout (at ``site``: the output of
    the block at ``path`` or the token embeddings, :func:`capture_site`), left padded into ``(B, P, d_s)`` on the
    model's device, and the prefix mask ``(B, P)`` (one entry per context token)."""
    device = next(model.parameters()).device
    h = capture_site(model, path, layout["input_ids"].to(device), layout["attention_mask"].to(device), site)
    rows = [h[i, sl] for i, sl in enumerate(layout["context_slices"])]
    grid = left_grid(rows, max(len(r) for r in rows), h.shape[-1], h.dtype, h.device)
    return grid, left_padded([[0] * len(r) for r in rows], 0)[1]


def assemble(model, layers: Sequence[int], keys, values, mask: torch.Tensor, rotate: bool) -> KVPrefix:
    """A prefix whose ``layers`` hold ``keys``/``values`` ``(S, B, H, P, hd)`` (S = len(layers)) and every other
    layer zeros; ``rotate``: the keys are unrotated (projected or random) and get the rotary embedding here."""
    num_layers, _, _ = geometry(model)
    if rotate:
        keys = rotate_keys(model, keys, mask)
    zero = torch.zeros_like(keys[0])
    slot = {layer: i for i, layer in enumerate(layers)}
    pick = lambda t, layer: t[slot[layer]] if layer in slot else zero  # noqa: E731
    return KVPrefix(
        [pick(keys, layer) for layer in range(num_layers)],
        [pick(values, layer) for layer in range(num_layers)],
        mask,
    )


@torch.no_grad()
def own_prefix(model, rows: Sequence[Sequence[int]], pad_id: int, layers: Sequence[int]) -> KVPrefix:
    """The receiver's own keys and values of the token ``rows`` (its context parts), read in one left-padded pass
    with the position ids ``generate`` uses; layers outside ``layers`` zeroed."""
    device = next(model.parameters()).device
    ids, mask = left_padded(rows, pad_id)
    pos = position_ids(mask).to(device)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos, use_cache=True)
    cache = out.cache
    keys = torch.stack([cache.layers[i].keys for i in layers])
    values = torch.stack([cache.layers[i].values for i in layers])
    return assemble(model, layers, keys, values, mask, rotate=False)


def zero_prefix(model, lengths: Sequence[int], layers: Sequence[int]) -> KVPrefix:
    """A prefix of zero keys and values, ``lengths[i]`` entries per row (they take attention mass, add nothing)."""
    _, heads, head_dim = geometry(model)
    param = next(model.parameters())
    mask = left_padded([[0] * int(n) for n in lengths], 0)[1]
    zeros = torch.zeros((len(layers), len(lengths), heads, mask.shape[1], head_dim), dtype=param.dtype)
    return assemble(model, layers, zeros.to(param.device), zeros.to(param.device), mask, rotate=False)


def prefixed_forward(model, prefix: KVPrefix, ids: torch.Tensor, mask: torch.Tensor, **kwargs):
    """The receiver's forward over a left-padded batch ``ids`` after ``prefix`` (differentiable in the prefix)."""
    device = next(model.parameters()).device
    full, pos = prefix.continued(mask.to(device))
    return model(input_ids=ids.to(device), attention_mask=full, position_ids=pos, cache=prefix.cache(), **kwargs)


@torch.no_grad()
def generate_after_prefix(
    model, tokenizer, prefix: KVPrefix, ids: torch.Tensor, mask: torch.Tensor, settings: GenerationSettings
) -> torch.Tensor:
    """Greedy answers (new ids, EOS padded) of a left-padded question batch read after ``prefix``.

    The repetition penalty and ``no_repeat_ngram_size`` count only what the receiver reads as text (the question and
    its answer), never the prefix, for every KV condition alike: ``generate`` sees the prefix as pad (EOS) columns,
    which the masked penalty skips and which can only complete an n-gram in a finished row.
    """
    from transformers import LogitsProcessorList

    if bool((mask[:, -1] == 0).any()):
        raise ValueError("the question batch is not left-padded: some row's last column is padding")
    device = next(model.parameters()).device
    width = prefix.mask.shape[1]
    pads = torch.full((ids.shape[0], width), tokenizer.eos_token_id, dtype=ids.dtype)
    full_ids = torch.cat([pads, ids], dim=1).to(device)
    full, _ = prefix.continued(mask.to(device))
    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        text_mask = torch.cat([torch.zeros_like(prefix.mask), mask], dim=1).to(device)
        processors.append(MaskedRepetitionPenalty(settings.repetition_penalty, text_mask))
    out = model.generate(
        input_ids=full_ids,
        attention_mask=full,
        cache=prefix.cache(),
        generation_config=generation_config(tokenizer, settings, settings.max_new_tokens),
        logits_processor=processors,
    )
    return out[:, full_ids.shape[1] :].cpu()


def bytes_sent(entries: int, layers: int, hidden: int, dtype: torch.dtype) -> int:
    """What a prefix costs to send: entries x layers x 2 (key and value) x hidden x bytes per element."""
    return int(entries) * int(layers) * 2 * int(hidden) * torch.empty((), dtype=dtype).element_size()
