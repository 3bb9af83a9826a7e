"""The KV protocol's attention prefix on a tiny offline receiver: positions and rotary embedding as in the full
prompt, layer subsets, the projector's shapes and gate, and the cost of a prefix."""

from __future__ import annotations

import pytest
import torch

from activation_transfer.injection.kv_prefix import (
    assemble,
    bytes_sent,
    generate_after_prefix,
    geometry,
    own_prefix,
    prefixed_forward,
    resolve_layers,
    rotate_keys,
    zero_prefix,
)
from activation_transfer.injection.slots import left_padded
from activation_transfer.injection.sources import position_ids
from activation_transfer.models.frozen_lm import ModelRef, load_ref
from activation_transfer.models.generation import GenerationSettings, generate_ids
from activation_transfer.translators.kv_projector import KVProjector

CONTEXTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]  # unequal: the prefix is left padded
QUESTIONS = [[20, 21, 22], [23, 24, 25, 26, 27], [28]]


@pytest.fixture(scope="module")
def receiver():
    return load_ref(ModelRef("tiny-neox-large", layer=0.67)).model


def _full(model, rows):
    ids, mask = left_padded(rows, 0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits


def test_question_logits_after_the_own_prefix_equal_the_full_prompts(receiver):
    layers = list(range(geometry(receiver)[0]))
    prefix = own_prefix(receiver, CONTEXTS, 0, layers)
    assert prefix.mask.sum(1).tolist() == [len(c) for c in CONTEXTS]
    ids, mask = left_padded(QUESTIONS, 0)
    with torch.no_grad():
        got = prefixed_forward(receiver, prefix, ids, mask).logits
    full = _full(receiver, [c + q for c, q in zip(CONTEXTS, QUESTIONS)])
    for i, q in enumerate(QUESTIONS):
        torch.testing.assert_close(got[i, -len(q) :], full[i, -len(q) :], rtol=1e-5, atol=1e-5)
    # Without the positions continuing after the context the logits differ: the check can fail.
    with torch.no_grad():
        wrong = receiver(input_ids=ids, attention_mask=prefix.continued(mask)[0], cache=prefix.cache()).logits
    assert not torch.allclose(wrong[0, -3:], full[0, -3:], atol=1e-3)


def test_greedy_answers_after_the_own_prefix_equal_the_full_prompts_without_penalties(receiver):
    settings = GenerationSettings(max_new_tokens=6, repetition_penalty=1.0, no_repeat_ngram_size=0)
    prefix = own_prefix(receiver, CONTEXTS, 0, list(range(geometry(receiver)[0])))
    ids, mask = left_padded(QUESTIONS, 0)
    tok = type("Tok", (), {"eos_token_id": 0})()
    got = generate_after_prefix(receiver, tok, prefix, ids, mask, settings)
    fids, fmask = left_padded([c + q for c, q in zip(CONTEXTS, QUESTIONS)], 0)
    assert torch.equal(got, generate_ids(receiver, tok, fids, fmask, settings))


def _unrotated_keys(model, rows):
    """Each layer's keys before the rotary embedding: the query_key_value output of a pass over ``rows``."""
    _, heads, hd = geometry(model)
    seen = []
    hooks = [
        layer.attention.query_key_value.register_forward_hook(lambda m, i, o: seen.append(o))
        for layer in model.gpt_neox.layers
    ]
    ids, mask = left_padded(rows, 0)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    finally:
        for h in hooks:
            h.remove()
    keys = [o.view(*o.shape[:2], heads, 3 * hd).transpose(1, 2).chunk(3, dim=-1)[1] for o in seen]
    return torch.stack(keys), mask


def test_rotating_unrotated_keys_gives_the_keys_the_receiver_caches(receiver):
    # What a projector outputs (unrotated keys) is rotated at the context positions exactly as attention does.
    layers = list(range(geometry(receiver)[0]))
    keys, mask = _unrotated_keys(receiver, CONTEXTS)
    own = own_prefix(receiver, CONTEXTS, 0, layers)
    rotated = rotate_keys(receiver, keys, mask)
    real = mask.bool()
    for layer in layers:
        torch.testing.assert_close(
            rotated[layer].permute(0, 2, 1, 3)[real], own.keys[layer].permute(0, 2, 1, 3)[real], rtol=1e-5, atol=1e-5
        )
    assert not torch.allclose(keys[1].permute(0, 2, 1, 3)[real], rotated[1].permute(0, 2, 1, 3)[real])


def test_layers_outside_the_subset_hold_zeros_and_bad_subsets_fail(receiver):
    n = geometry(receiver)[0]
    assert resolve_layers(None, n) == list(range(n)) and resolve_layers([-1, 0], n) == [0, n - 1]
    for bad in ([n], [0, 0], []):
        with pytest.raises(ValueError, match="kv layers must be distinct indices"):
            resolve_layers(bad, n)
    full = own_prefix(receiver, CONTEXTS, 0, list(range(n)))
    part = own_prefix(receiver, CONTEXTS, 0, [1])
    assert torch.equal(part.keys[1], full.keys[1]) and torch.equal(part.values[1], full.values[1])
    assert all(not part.keys[i].any() and not part.values[i].any() for i in range(n) if i != 1)
    zeros = zero_prefix(receiver, [4, 2], [0, 2])
    assert zeros.mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]] and not any(k.any() for k in zeros.keys)


def test_assemble_rotates_only_when_asked(receiver):
    n, heads, hd = geometry(receiver)
    keys = torch.randn(2, 1, heads, 3, hd)
    mask = torch.ones(1, 3, dtype=torch.long)
    kept = assemble(receiver, [0, 2], keys, keys, mask, rotate=False)
    turned = assemble(receiver, [0, 2], keys, keys, mask, rotate=True)
    assert torch.equal(kept.keys[2], keys[1]) and not torch.equal(turned.keys[2], keys[1])
    assert torch.equal(turned.values[2], keys[1])  # values never rotate
    # Position 0 is not rotated (cos 1, sin 0); the rotary embedding keeps every vector's norm.
    torch.testing.assert_close(turned.keys[0][..., 0, :], keys[0][..., 0, :])
    torch.testing.assert_close(turned.keys[0].norm(dim=-1), keys[0].norm(dim=-1))


def test_projector_shapes_and_gate():
    torch.manual_seed(0)
    plain = KVProjector(8, 12, num_heads=3, layers=[0, 2])
    gated = KVProjector(8, 12, num_heads=3, layers=[0, 2], gate=True)
    gated.load_state_dict({**plain.state_dict(), "gate": torch.tensor([0.0, 100.0])})
    x = torch.randn(2, 5, 8)
    keys, values = plain(x)
    assert keys.shape == values.shape == (2, 2, 3, 5, 4)
    g_keys, g_values = gated(x)
    assert torch.equal(g_keys, keys)
    torch.testing.assert_close(g_values[0], values[0] / 2)  # sigmoid(0)
    torch.testing.assert_close(g_values[1], values[1])  # sigmoid(100) = 1
    # One position's keys depend on that position's sender state only.
    x2 = x.clone()
    x2[:, 1] += 1.0
    changed = (plain(x2)[0] != keys).any(dim=(0, 2, 4))
    assert changed.tolist() == [[False, True, False, False, False]] * 2
    with pytest.raises(ValueError, match="not a multiple of 5 heads"):
        KVProjector(8, 12, num_heads=5, layers=[0])


def test_bytes_sent_counts_entries_layers_keys_values_and_dtype():
    assert bytes_sent(10, 4, 48, torch.float32) == 10 * 4 * 2 * 48 * 4
    assert bytes_sent(10, 4, 48, torch.bfloat16) == 10 * 4 * 2 * 48 * 2
