"""BufferedCache: the same logits as DynamicCache at every step, through row dropping and buffer growth."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from activation_transfer.models.frozen_lm import load_model, load_tokenizer
from activation_transfer.models.generation import cache_argument
from activation_transfer.models.kv_cache import BufferedCache, BufferedLayer
from activation_transfer.task.prompts import tokenize_left_padded

PROMPTS = [
    "Context: Bob works in Lima.\nQ: Where?\nA:",
    "Context: Alice lives in Tokyo. Tokyo is located in Japan.\nQ: What country does Alice live in?\nA:",
    "Hello there",
]


@torch.no_grad()
def _steps(model, ids, mask, cache, steps: int = 6, drop_at: int = 3) -> list[torch.Tensor]:
    """Greedy steps by hand (prefill, then one token at a time), dropping row 1 after ``drop_at`` steps; the logits
    of every step."""
    out, logits = [], None
    for step in range(steps):
        if step == drop_at:
            keep = torch.tensor([0, 2])
            cache.batch_select_indices(keep)
            ids, mask, logits = ids[keep], mask[keep], logits[keep]
        if step:
            nxt = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        new = ids if step == 0 else ids[:, -1:]
        position = (mask.cumsum(1) - 1).clamp(min=0)[:, -new.shape[1] :]
        kwargs = {cache_argument(model): cache}
        logits = model(input_ids=new, attention_mask=mask, position_ids=position, use_cache=True, **kwargs).logits
        logits = logits[:, -1]
        out.append(logits)
    return out


@pytest.mark.parametrize("spare", [8, 0])  # room for every step, or none: the buffers grow during decoding
def test_buffered_cache_gives_dynamic_cache_logits(tmp_path, spare):
    model = load_model("tiny-neox")
    tok = tokenize_left_padded(load_tokenizer("tiny-neox", cache_dir=str(tmp_path)), PROMPTS)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    buffered = BufferedCache(model.config, capacity=ids.shape[1] + spare)
    want = _steps(model, ids, mask, DynamicCache(config=model.config))
    got = _steps(model, ids, mask, buffered)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    layer = buffered.layers[0]
    assert isinstance(layer, BufferedLayer) and layer.keys.shape[0] == 2 and layer.length == ids.shape[1] + 5
    assert (layer._keys.shape[2] > ids.shape[1] + spare) == (spare == 0)  # grew only when it had no room


def test_models_with_sliding_windows_keep_the_dynamic_cache():
    from transformers import GPTNeoXConfig, MistralConfig

    from activation_transfer.models.kv_cache import phase_cache

    small = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}
    sliding = MistralConfig(sliding_window=16, num_key_value_heads=2, **small)
    with pytest.raises(ValueError, match="plain attention layers only"):
        BufferedCache(sliding, 8)
    assert type(phase_cache(sliding, 8)) is DynamicCache
    assert type(phase_cache(GPTNeoXConfig(**small), 8)) is BufferedCache
