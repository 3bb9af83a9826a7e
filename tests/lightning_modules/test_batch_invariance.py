"""A sample's record does not depend on the batch it was answered in: every condition of the paper, split and KV
protocols, evaluated in one batch of 8 prompts of unequal lengths (stacked runs) and one prompt at a time (one
``generate`` per run), gives the same predictions and the same diagnostics (norms, slot counts, prefix lengths, bytes
sent, donors) for every sample.

``test_batch_size_does_not_change_answers`` compares the paper protocol's predictions of four conditions over 4 new
tokens (one decoding phase); here every protocol and condition is compared, diagnostics included, over 12 new tokens,
so the stacked runs decode in phases that drop finished rows (``answering.DROP_FINISHED_EVERY``). fp32 throughout:
the greedy tokens must be equal and the float diagnostics equal to rounding (relative 1e-4; another padding amount
changes the states in the last bits).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import pytorch_lightning as pl
import torch
from lightning_helpers import quiet_trainer
from test_injection_eval import RECEIVER, SENDER, make_ckpt
from test_kv_translator import make_kv_ckpt
from test_translator_loading import make_functional_ckpt

from activation_transfer.injection.conditions import CONDITION_NAMES, FUNCTIONAL_VARIANTS
from activation_transfer.injection.protocols.kv import CONDITION_NAMES as KV_CONDITION_NAMES
from activation_transfer.injection.protocols.split import CONDITION_NAMES as SPLIT_CONDITION_NAMES
from activation_transfer.models.generation import GenerationSettings, generate_ids
from activation_transfer.task.prompts import tokenize_left_padded
from datamodules.multihop_qa import MultiHopQADataModule
from lightning_modules.injection_eval import InjectionEvalModule

N = 8
GENERATION = GenerationSettings(max_new_tokens=12, relay_max_new_tokens=6)
CONDITIONS = {
    "paper": [*CONDITION_NAMES, *FUNCTIONAL_VARIANTS],
    "split": list(SPLIT_CONDITION_NAMES),
    "kv": list(KV_CONDITION_NAMES),
}


class EndsAnswers(pl.Callback):
    """Gives the receiver's EOS the output row of the token it writes most often, so answers end at different
    lengths and the stacked phases drop finished rows: the random tiny receiver almost never writes EOS."""

    def on_test_start(self, trainer, pl_module) -> None:
        receiver = pl_module.receiver
        tok = tokenize_left_padded(receiver.tokenizer, ["Q: What country?\nA:"])
        ids = generate_ids(receiver.model, receiver.tokenizer, tok["input_ids"], tok["attention_mask"], GENERATION)
        common = Counter(ids[0].tolist()).most_common(1)[0][0]
        head = receiver.model.get_output_embeddings().weight
        with torch.no_grad():
            head[receiver.tokenizer.eos_token_id] = head[common]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    return {
        "aligned": make_ckpt(folder / "aligned.ckpt", seed=0),
        "functional": make_functional_ckpt(folder / "functional.ckpt", seed=5),
        "kv": make_kv_ckpt(folder / "kv.ckpt", seed=3),
    }


def _records(tmp_path, ckpts, protocol: str, batch_size: int, stack_runs: bool) -> dict:
    module = InjectionEvalModule(
        SENDER,
        RECEIVER,
        translator_ckpt=None if protocol == "kv" else ckpts["aligned"],
        functional_translator_ckpt=ckpts["kv" if protocol == "kv" else "functional"],
        conditions=CONDITIONS[protocol],
        seeds=[42],
        generation=GENERATION,
        protocol=protocol,
        stack_runs=stack_runs,
        report=False,
    )
    dm = MultiHopQADataModule(source="synthetic", num_samples=N, batch_size=batch_size)
    quiet_trainer(tmp_path / f"bs{batch_size}", callbacks=[EndsAnswers()]).test(module, datamodule=dm, verbose=False)
    return {(key, r["sample_id"]): r for key, recs in module.results.items() for r in recs}


def _differences(a: dict, b: dict) -> list[str]:
    """Fields of two records of one sample that differ: the prediction, or a diagnostic beyond fp32 rounding."""
    out = [] if a["prediction"] == b["prediction"] else [f"prediction {a['prediction']!r} != {b['prediction']!r}"]
    for field in sorted(set(a["diagnostics"]) | set(b["diagnostics"])):
        x, y = a["diagnostics"].get(field), b["diagnostics"].get(field)
        if isinstance(x, float) and isinstance(y, float):
            same = math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6)
        else:
            same = x == y
        if not same:
            out.append(f"{field} {x!r} != {y!r}")
    return out


@pytest.mark.parametrize("protocol", sorted(CONDITIONS))
def test_a_samples_record_does_not_depend_on_its_batch(tmp_path, ckpts, protocol):
    one_batch = _records(tmp_path, ckpts, protocol, batch_size=N, stack_runs=True)
    alone = _records(tmp_path, ckpts, protocol, batch_size=1, stack_runs=False)
    assert set(one_batch) == set(alone)
    wrong = {key: d for key in one_batch if (d := _differences(one_batch[key], alone[key]))}
    assert not wrong, wrong
    # The comparison means something: the prompts of the batch of 8 are padded to unequal lengths, and the answers
    # differ between samples and between conditions.
    lengths = {
        r["diagnostics"]["prompt_len"]
        for (key, _), r in one_batch.items()
        if key.startswith(("no_inject", "receiver_alone"))
    }
    assert len(lengths) > 1
    assert len({r["prediction"] for r in one_batch.values()}) > N
    assert sum(r["prediction"] == "" for r in one_batch.values()) < len(one_batch) / 2  # EOS ends some answers
