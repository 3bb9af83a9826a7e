"""Issue 20 item 5: NaN weights after the injection block (receiver) or in the sender's head used to give empty answers
scored as wrong (``nl_relay`` relayed ""); every generation step's logits are checked, the error names the model and
the condition."""

from __future__ import annotations

import pytest
import torch

from activation_transfer.injection.answering import request_injected, request_relay, resolve
from activation_transfer.injection.conditions import build_conditions
from activation_transfer.models.frozen_lm import ModelRef, load_ref
from activation_transfer.models.generation import GenerationSettings, NonFiniteLogits
from activation_transfer.task.prompts import tokenize_left_padded

SETTINGS = GenerationSettings(max_new_tokens=2, relay_max_new_tokens=2)


def _break_head(lm) -> None:
    with torch.no_grad():
        lm.model.get_output_embeddings().weight.fill_(float("nan"))


def test_nan_in_the_receiver_after_the_injection_block_names_receiver_and_condition():
    receiver = load_ref(ModelRef("tiny-neox-large", layer=0.67))
    _break_head(receiver)  # after the block: its output (checked before) stays finite
    tok = tokenize_left_padded(receiver.tokenizer, ["Alice lives in Paris. Where does Alice live?"], 32)
    (spec,) = build_conditions(["no_inject"])
    with pytest.raises(NonFiniteLogits, match="condition no_inject: the logits of the receiver tiny-neox-large"):
        run = request_injected(tok["input_ids"], tok["attention_mask"], spec, ["s0"], None)
        resolve(receiver, [run], SETTINGS)


def test_nan_in_the_senders_head_stops_the_relay():
    sender, receiver = load_ref(ModelRef("tiny-neox", layer=0.67)), load_ref(ModelRef("tiny-neox-large", layer=0.67))
    _break_head(sender)
    with pytest.raises(NonFiniteLogits, match=r"condition nl_relay \(the relay\): the logits of the sender tiny-neox "):
        run = request_relay(sender, receiver, ["s0"], ["Alice lives in Paris."], ["Where does Alice live?"], SETTINGS)
        resolve(receiver, [run], SETTINGS)
