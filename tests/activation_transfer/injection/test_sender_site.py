"""The sender site of the split controls: ``embeddings`` reads hidden_states[0], the input of block 0."""

from __future__ import annotations

import pytest
import torch

from activation_transfer.injection.sources import capture_block, capture_site, position_ids
from activation_transfer.models.frozen_lm import ModelRef, load_ref


@pytest.mark.parametrize("name", ["tiny-neox", "tiny-gpt2"])
def test_the_embeddings_site_is_hidden_states_0(name) -> None:
    lm = load_ref(ModelRef(name, layer=1))
    ids = torch.tensor([[0, 0, 5, 9, 17, 4], [3, 8, 2, 6, 11, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    got = capture_site(lm.model, lm.layer.path, ids, mask, "embeddings")
    with torch.no_grad():
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_hidden_states=True)
    torch.testing.assert_close(got, out.hidden_states[0], rtol=0, atol=0)
    if name == "tiny-neox":  # no position embeddings: exactly the token embedding table's rows
        torch.testing.assert_close(got, lm.model.get_input_embeddings()(ids), rtol=0, atol=0)
    # The block site is unchanged, and differs from the embeddings.
    block = capture_site(lm.model, lm.layer.path, ids, mask, "block")
    torch.testing.assert_close(block, capture_block(lm.model, lm.layer.path, ids, mask), rtol=0, atol=0)
    assert not torch.equal(block, got)
    with pytest.raises(ValueError, match="sender site must be one of block, embeddings"):
        capture_site(lm.model, lm.layer.path, ids, mask, "logits")


class _Affine(torch.nn.Module):
    """A translator stand-in: ``translate`` is an affine map (seeded)."""

    def __init__(self, seed: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.map = torch.nn.Linear(d_in, d_out)
        with torch.no_grad():
            self.map.weight.copy_(torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed)))

    def translate(self, h: torch.Tensor) -> torch.Tensor:
        return self.map(h)


def test_translators_share_one_sender_pass_per_batch() -> None:
    from activation_transfer.injection.sources import translate_prompts

    lm = load_ref(ModelRef("tiny-neox", layer=1))
    prompts = ["Alice lives in Tokyo.", "Bob", "Carol works in Lima with Dan.", "Eve"]
    ids = [f"s{i}" for i in range(len(prompts))]
    d = lm.model.config.hidden_size
    translators = [_Affine(seed, d, 8) for seed in (1, 2)]
    calls = []
    handle = lm.model.get_submodule(lm.layer.path).register_forward_hook(lambda *_: calls.append(1))
    try:
        both = translate_prompts(lm, translators, ids, prompts, 3, 64, torch.float32)
    finally:
        handle.remove()
    assert len(calls) == 2  # two batches of prompts, one sender pass each for both translators
    for translator, rows in zip(translators, both):
        (alone,) = translate_prompts(lm, [translator], ids, prompts, 3, 64, torch.float32)
        assert rows.keys() == alone.keys() and all(torch.equal(rows[k], alone[k]) for k in ids)
    assert not torch.equal(both[0]["s0"], both[1]["s0"]) and both[0]["s1"].shape[0] < both[0]["s0"].shape[0]
