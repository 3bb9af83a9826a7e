"""Issue 20 items 8 and 12: slot options that do not fit the receiver (a token id outside its vocabulary, more slots
than its positions) are refused in one line naming the option, in evaluation and in functional training alike."""

from __future__ import annotations

import pytest

from activation_transfer.errors import UsageError
from activation_transfer.injection.slots import SlotSpec, check_slots_fit
from activation_transfer.models.frozen_lm import ModelRef, load_ref

RECEIVER = ModelRef("tiny-neox-large", layer=0.67)


@pytest.fixture(scope="module")
def receiver():
    return load_ref(RECEIVER)


@pytest.mark.parametrize("token_id", [99999, -1])
def test_a_slot_token_outside_the_vocabulary_is_refused(receiver, token_id):
    vocab = receiver.model.get_input_embeddings().num_embeddings
    with pytest.raises(UsageError) as err:
        check_slots_fit(SlotSpec(token_id=token_id), receiver)
    message = str(err.value)
    assert f"--model.slots.token_id {token_id}" in message and f"0..{vocab - 1}" in message and "\n" not in message
    check_slots_fit(SlotSpec(token_id=vocab - 1), receiver)  # the last id is a token


@pytest.mark.parametrize(
    "spec, option",
    [
        (SlotSpec("all", max_context_tokens=2000), "--model.slots.max_context_tokens 2000"),
        (SlotSpec("pooled", k=5000), "--model.slots.k 5000"),
        (SlotSpec("last", k=5000, max_context_tokens=600), "--model.slots.max_context_tokens 600"),
    ],
)
def test_more_slots_than_the_receivers_positions_are_refused(receiver, spec, option):
    limit = receiver.model.config.max_position_embeddings
    with pytest.raises(UsageError, match=f"{option} gives up to .* slots .*has {limit} positions"):
        check_slots_fit(spec, receiver)
    check_slots_fit(SlotSpec("last", k=5000, max_context_tokens=224), receiver)  # at most 224: fits


def test_the_training_option_is_checked_too():
    from lightning_modules.functional_translator import FunctionalTranslatorModule

    with pytest.raises(UsageError, match=r"--model.slots.token_id 99999 is not a token"):
        FunctionalTranslatorModule(ModelRef("tiny-neox"), RECEIVER, slots={"token_id": 99999})
    with pytest.raises(UsageError, match=r"--model.slots.k 5000 gives up to 5000 slots"):
        FunctionalTranslatorModule(ModelRef("tiny-neox"), RECEIVER, slots={"scheme": "pooled", "k": 5000})


def test_the_evaluation_refuses_before_running(tmp_path):
    from test_injection_eval import make_ckpt, run_eval

    ckpt = make_ckpt(tmp_path / "t.ckpt")
    with pytest.raises(UsageError, match="--model.slots.k 5000"):
        run_eval(
            tmp_path,
            ckpt,
            conditions=["receiver_alone", "slots_zero"],
            protocol="split",
            slots={"scheme": "pooled", "k": 5000},
        )
