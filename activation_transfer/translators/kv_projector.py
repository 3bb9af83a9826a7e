"""The KV projector: one sender layer's states at the context tokens -> a key and a value per head at each chosen
receiver layer, the attention prefix of the KV protocol (``injection/kv_prefix.py``).

Like C2C's projector it writes into the receiver's attention cache, but the receiver here has no context of its own
to fuse with (split context), so the projection is the prefix; its optional gate (a learned sigmoid per layer, as
C2C's per-layer gate) scales each layer's values. Keys come out unrotated: the receiver's rotary embedding of the
context positions is applied where the prefix is assembled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from activation_transfer.errors import UsageError


class KVProjector(nn.Module):
    """Per receiver layer in ``layers`` a linear map of the layer-normalized sender state to every head's key and
    value (one ``Linear(d_s, S * 2 * d_r)``: each output head is its own linear function of the input).

    Args:
        in_dim: Sender hidden size d_s.
        out_dim: Receiver hidden size d_r (= heads x head_dim).
        num_heads: Receiver attention heads.
        layers: The receiver layers written, in order (S of them).
        gate: Scale layer l's values by ``sigmoid(g_l)``, ``g_l`` learned (starts at 0: half).
        bias: Bias of the linear map.
    """

    def __init__(
        self, in_dim: int, out_dim: int, num_heads: int, layers: Sequence[int], gate: bool = False, bias: bool = True
    ):
        super().__init__()
        if out_dim % num_heads:
            raise UsageError(f"receiver hidden size {out_dim} is not a multiple of {num_heads} heads")
        self.in_dim, self.out_dim, self.num_heads = int(in_dim), int(out_dim), int(num_heads)
        self.layers = [int(i) for i in layers]
        self.proj = nn.Linear(in_dim, len(self.layers) * 2 * out_dim, bias=bias)
        self.gate = nn.Parameter(torch.zeros(len(self.layers))) if gate else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sender states ``(B, P, d_s)`` -> keys and values ``(S, B, H, P, head_dim)`` (keys unrotated)."""
        b, p, _ = x.shape
        h = F.layer_norm(x.to(self.proj.weight.dtype), (self.in_dim,))  # Pythia states have a few huge dimensions
        y = self.proj(h).view(b, p, len(self.layers), 2, self.num_heads, self.out_dim // self.num_heads)
        keys, values = y.permute(3, 2, 0, 4, 1, 5).unbind(0)
        if self.gate is not None:
            values = values * torch.sigmoid(self.gate).view(-1, 1, 1, 1, 1).to(values.dtype)
        return keys, values


__all__ = ["KVProjector"]
