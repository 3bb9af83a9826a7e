"""The functional trainers' speed-ups compute what the per-batch path computes: the sender's context states cached once
per context, the receiver run in groups of similar length, the token rows memoized."""

from __future__ import annotations

import itertools

import pytest
import torch
from lightning_helpers import quiet_trainer

from activation_transfer.translators.context_cache import ContextStateCache, context_rows
from activation_transfer.translators.functional_loss import build_batch, length_groups
from datamodules.qa_sources import generated_samples
from datamodules.qa_training import QATrainingDataModule
from lightning_modules.functional_translator import FunctionalTranslatorModule
from lightning_modules.kv_translator import KVTranslatorModule

SENDER = {"name": "tiny-neox", "layer": 1}
RECEIVER = {"name": "tiny-neox-large", "layer": 2}


def _padded_cost(groups, lengths, pass_cost):
    return sum(len(g) * max(lengths[i] for i in g) + pass_cost for g in groups)


@pytest.mark.parametrize("lengths", [[5, 3, 9, 9, 2, 7, 3], [4], [6, 6, 6], [30, 2, 3, 31, 29, 4]])
def test_length_groups_partition_the_rows_at_the_least_padded_cost(lengths) -> None:
    for pass_cost in (0, 4, 20, 1000):
        groups = length_groups(lengths, pass_cost)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        # Brute force over every cut of the rows sorted by length: none costs less.
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        best = min(
            _padded_cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, pass_cost)
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
        )
        assert _padded_cost(groups, lengths, pass_cost) == best
    assert len(length_groups(lengths, 0)) == len(set(lengths))  # free passes: no padding at all
    assert len(length_groups(lengths, 10**6)) == 1


def test_the_cache_computes_each_context_once_and_in_an_order_fixed_by_the_contexts() -> None:
    calls = []

    def compute(ids, mask):
        calls.append(ids.shape)
        return torch.stack([ids, ids * 2], -1).float() * mask[..., None]  # a token's state: (t, 2t)

    rows = [[3, 4, 5], [7], [3, 4, 5], [9, 9], [7]]
    cache = ContextStateCache(compute, bytes_per_token=8, limit_bytes=1024, pad_id=0)
    assert cache.get(rows) is None
    assert cache.fill(rows) and len(cache) == 3 and calls == [torch.Size([3, 3])]
    got = cache.get(rows)
    for row, h in zip(rows, got):
        assert torch.equal(h, torch.tensor([[t, 2 * t] for t in row], dtype=torch.float))
    assert cache.fill(list(reversed(rows))) and len(calls) == 1  # nothing new: no pass
    other = ContextStateCache(compute, bytes_per_token=8, limit_bytes=1024, pad_id=0)
    other.fill(list(reversed(rows)))
    assert all(torch.equal(a, b) for a, b in zip(other.get(rows), got))
    small = ContextStateCache(compute, bytes_per_token=8, limit_bytes=8 * 5, pad_id=0)  # 6 tokens do not fit
    assert not small.fill(rows) and len(small) == 0 and small.get(rows) is None
    assert not ContextStateCache(compute, 8, 0, 0).fill(rows)


@pytest.mark.parametrize("site", ["block", "embeddings"])
def test_cached_and_grouped_training_computes_the_per_batch_losses_and_gradients(site) -> None:
    samples, _ = generated_samples(7, seed=5)
    modules = {}
    for name, options in (("per_batch", dict(sender_cache_mb=0, group_by_length=False)), ("fast", {})):
        torch.manual_seed(0)
        modules[name] = FunctionalTranslatorModule(SENDER, RECEIVER, sender_site=site, **options)
    fast, slow = modules["fast"], modules["per_batch"]
    fast.fill_context_cache(samples)
    assert len(fast.context_cache) == len({s.context for s in samples})
    out = {}
    for name, module in modules.items():
        losses = module.losses(samples)
        losses["loss"].backward()
        out[name] = (losses, [p.grad.clone() for p in module.translator.parameters()])
    for key in out["fast"][0]:
        torch.testing.assert_close(out["fast"][0][key], out["per_batch"][0][key])
    torch.testing.assert_close(out["fast"][1], out["per_batch"][1])
    # The rows went through the receiver in more than one group, and the cache was read (the sender not run).
    layout = build_batch(samples, fast.sender_lm.tokenizer, fast.receiver_lm.tokenizer, fast.slot_spec, 64, 16)
    assert len(length_groups(layout["student"]["attention_mask"].sum(1).tolist())) > 1
    assert fast.context_cache.get(context_rows(layout["sender"])) is not None
    fast.sender.forward = None  # a sender pass would now fail
    fast.losses(samples)
    assert slow.__dict__.get("context_cache") is None


def test_the_token_memo_gives_the_same_batch_without_tokenizing_again() -> None:
    module = FunctionalTranslatorModule(SENDER, RECEIVER)
    samples, _ = generated_samples(5, seed=3)
    tok_s, tok_r = module.sender_lm.tokenizer, module.receiver_lm.tokenizer
    plain = build_batch(samples, tok_s, tok_r, module.slot_spec, 64, 16)
    memo = {}
    build_batch(samples[:3], tok_s, tok_r, module.slot_spec, 64, 16, memo=memo)
    assert len(memo) == 3

    class Refusing:
        def __init__(self, tok):
            self.eos_token_id = tok.eos_token_id

        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenized again")

    build_batch(samples, tok_s, tok_r, module.slot_spec, 64, 16, memo=memo)  # the last two are new
    again = build_batch(samples, Refusing(tok_s), Refusing(tok_r), module.slot_spec, 64, 16, memo=memo)
    for side in ("sender", "student", "teacher"):
        for key, value in plain[side].items():
            assert torch.equal(value, again[side][key]) if torch.is_tensor(value) else value == again[side][key], key


@pytest.mark.parametrize("cls", [FunctionalTranslatorModule, KVTranslatorModule])
def test_fit_fills_the_cache_with_every_training_and_validation_context(tmp_path, cls) -> None:
    module = cls(SENDER, RECEIVER)
    data = QATrainingDataModule(num_train_samples=12, num_val_samples=4, batch_size=4)
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=data)
    contexts = {s.context for part in (data.train_set, data.val_set) for s in part.samples}
    assert len(module.context_cache) == len(contexts)
    with pytest.raises(ValueError, match="sender_cache_mb must be >= 0"):
        cls(SENDER, RECEIVER, sender_cache_mb=-1)
