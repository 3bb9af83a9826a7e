"""The split-context protocol's slot layout (activation_transfer/injection/slots.py)."""

from __future__ import annotations

import pytest
import torch

from activation_transfer.injection.slots import SlotSpec, receiver_batch, sender_batch, slot_grid
from activation_transfer.task.prompts import format_prompt, split_prompt


def test_split_prompt_concatenates_to_the_papers_prompt():
    ctx, q = "Bob lives in Tokyo. Q: not this one.", "Where does Bob live?"
    prefix, question = split_prompt(ctx, q)
    assert (prefix, question) == (f"Context: {ctx}\n", f"Q: {q}\nA:")
    assert prefix + question == format_prompt(ctx, q)


def test_slot_spec_schemes():
    states = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(SlotSpec("all").pick(states), states) and SlotSpec("all").count(4) == 4
    assert torch.equal(SlotSpec("last", k=2).pick(states), states[2:]) and SlotSpec("last", k=9).count(4) == 4
    pooled = SlotSpec("pooled", k=3).pick(states)
    assert pooled.shape == (3, 3) and torch.equal(pooled[1], states.mean(0))
    with pytest.raises(ValueError, match="slots.scheme"):
        SlotSpec("first")


def test_batches_put_context_and_slots_where_they_belong():
    snd = sender_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert snd["input_ids"].tolist() == [[5, 6, 7, 1, 2], [0, 8, 3, 4, 9]]
    assert [snd["input_ids"][i, s].tolist() for i, s in enumerate(snd["context_slices"])] == [[5, 6, 7], [8]]
    rcv = receiver_batch([[1, 2], [3, 4, 9]], [3, 1], slot_id=0, pad_id=0)
    assert rcv["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert rcv["slot_mask"].tolist() == [[1, 1, 1, 0, 0], [0, 1, 0, 0, 0]]
    vecs = [torch.ones(3, 2, requires_grad=True), 2 * torch.ones(1, 2)]
    grid = slot_grid(vecs, rcv["slot_mask"])
    assert grid[0, :3].eq(1).all() and grid[0, 3:].eq(0).all() and grid[1, 1].eq(2).all() and grid[1, 0].eq(0).all()
    grid.sum().backward()  # differentiable in the slot vectors (functional training)
    assert vecs[0].grad.eq(1).all()
    with pytest.raises(ValueError, match="2 slots but 3 slot vectors"):
        slot_grid([torch.ones(3, 2), torch.ones(1, 2)], receiver_batch([[1], [2]], [2, 1], 0, 0)["slot_mask"])
