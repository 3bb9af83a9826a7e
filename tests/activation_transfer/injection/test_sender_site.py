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
