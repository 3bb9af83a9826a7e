"""Plain PyTorch forward hooks on decoder blocks: capture a block's output, or rewrite it.

Block outputs are a plain tensor ``(batch, seq, hidden)`` in transformers 5 and a tuple whose first element is that
tensor in 4.x; every function here handles both (taking ``output[0]`` of a tensor would silently take the first
batch element).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from activation_transfer.errors import UsageError


def hidden_of(output) -> torch.Tensor:
    """The hidden-state tensor of a block's output (tensor or tuple)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def with_hidden(output, hidden: torch.Tensor):
    """``output`` with its hidden-state tensor replaced, keeping the structure the block returned."""
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise UsageError(f"module path {path!r} does not exist in {type(model).__name__}") from err


@contextmanager
def block_hook(model: nn.Module, path: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Register ``fn(hidden) -> new hidden or None`` on the block at ``path``; removed on exit, even on error."""

    def hook(_module, _inputs, output):
        new = fn(hidden_of(output))
        return None if new is None else with_hidden(output, new)

    handle = get_module(model, path).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised inside a capture hook to skip the blocks after the captured one."""


@torch.no_grad()
def capture_hidden(
    model: nn.Module,
    path: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    stop_early: bool = True,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``model`` on a batch and return the output of the block at ``path``, shape ``(batch, seq, hidden)``.

    Args:
        model: A causal LM.
        path: Module path of the block (``gpt_neox.layers.8``).
        input_ids: Token ids ``(batch, seq)``.
        attention_mask: 1 for real tokens, 0 for padding.
        stop_early: Abort the forward pass right after the block: the later blocks and the LM head cost time
            and change nothing captured.
        position_ids: Explicit position ids (e.g. those ``generate`` uses for a left-padded batch).
    """
    captured: list[torch.Tensor] = []

    def fn(hidden: torch.Tensor) -> None:
        captured.append(hidden.detach())
        if stop_early:
            raise _StopForward

    device = next(model.parameters()).device
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    inputs = {k: v.to(device) for k, v in inputs.items() if v is not None}
    with block_hook(model, path, fn):
        try:
            model(**inputs, use_cache=False)
        except _StopForward:
            pass
    if not captured:
        raise RuntimeError(f"the hook on {path!r} never fired during the forward pass")
    return captured[0]


# cuDNN's SDPA backend builds an execution plan per new tensor shape. Generation (the key/value length grows every
# step, and every batch has its own padded length) and QA training (a new padded length every batch) almost never
# repeat a shape, so on Hopper GPUs, where PyTorch prefers cuDNN for bf16, those plans dominate: measured on an H200
# (torch 2.11), bf16 functional training ran at 29 samples/s against 278 in fp32, 45% of its CPU time in
# _cudnn_attention_forward. The memory-efficient and flash kernels need no plan.
_NO_CUDNN_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def avoid_cudnn_attention(model: nn.Module) -> None:
    """Run every forward pass of ``model`` with SDPA's cuDNN backend excluded (see ``_NO_CUDNN_BACKENDS``).

    The choice holds for the forward pass and for the backward pass of what it computed; outside the model's forward
    calls the global SDPA settings are untouched (restored even when the forward raises, e.g. an early stop).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [getattr(SDPBackend, name) for name in _NO_CUDNN_BACKENDS]
    active: list = []

    def enter(_module, _args):
        ctx = sdpa_kernel(backends)
        ctx.__enter__()
        active.append(ctx)

    def leave(_module, _args, _output):
        active.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)
