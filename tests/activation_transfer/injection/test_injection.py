"""Prefill-only injection on the tiny offline receiver: where it writes, what it leaves alone, batched generation."""

from __future__ import annotations

import pytest
import torch

from activation_transfer.injection.conditions import random_vectors
from activation_transfer.injection.prefill_hook import PrefillInjection, prefill_injection
from activation_transfer.injection.sources import capture_block, left_grid
from activation_transfer.models.frozen_lm import ModelRef, load_ref
from activation_transfer.models.generation import GenerationSettings, decode, generate_ids
from activation_transfer.models.hooks import block_hook, capture_hidden
from activation_transfer.task.prompts import tokenize_left_padded

PROMPTS = [
    "Context: Alice lives in Tokyo. Tokyo is located in Japan.\nQ: What country does Alice live in?\nA:",
    "Context: Bob works in Lima.\nQ: Where?\nA:",
    "Context: Omar moved to Oslo. Oslo is part of Norway. Norway lies in Europe.\nQ: What continent?\nA:",
]
SETTINGS = GenerationSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def receiver():
    return load_ref(ModelRef("tiny-neox-large", layer=0.67))


@pytest.fixture(scope="module")
def batch(receiver):
    return tokenize_left_padded(receiver.tokenizer, PROMPTS)


class Recorder:
    """Wraps an injection and keeps the prefill block output before and after it."""

    def __init__(self, inj: PrefillInjection) -> None:
        self.inj = inj
        self.before: torch.Tensor | None = None
        self.after: torch.Tensor | None = None

    def __call__(self, h: torch.Tensor) -> torch.Tensor | None:
        new = self.inj(h)
        if self.before is None:
            self.before, self.after = h.detach().clone(), (h if new is None else new).detach().clone()
        return new


def _generate(receiver, ids, mask, inj=None):
    if inj is None:
        return decode(receiver.tokenizer, generate_ids(receiver.model, receiver.tokenizer, ids, mask, SETTINGS))
    if isinstance(inj, Recorder):
        with block_hook(receiver.model, receiver.layer.path, inj):
            out = generate_ids(receiver.model, receiver.tokenizer, ids, mask, SETTINGS)
    else:
        with prefill_injection(receiver.model, receiver.layer.path, inj):
            out = generate_ids(receiver.model, receiver.tokenizer, ids, mask, SETTINGS)
    return decode(receiver.tokenizer, out)


def _alone(model, path, ids, mask) -> list[torch.Tensor]:
    """Each row's block output when its prompt runs alone, unpadded: positions 0..L-1 without any doubt."""
    return [capture_hidden(model, path, i[m.bool()][None])[0] for i, m in zip(ids, mask)]


def _mean_norm(rows) -> torch.Tensor:
    """Per row, the mean L2 norm of its vectors (the paper's norm diagnostics), written out by hand."""
    return torch.tensor([sum(float(torch.sqrt((v.double() ** 2).sum())) for v in r) / len(r) for r in rows])


# A learned-position model (GPT-2) and a rotary one (GPT-NeoX). Rotary attention depends on position differences
# only, so wrong absolute position ids for a left-padded row shift its states by ~1e-8; with learned positions they
# shift them by ~0.1 (norms ~0.2), so only the GPT-2 case can catch a capture that ignores the padding.
@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-neox-large"])
def any_receiver(request):
    return load_ref(ModelRef(request.param, layer=0.67))


def test_capture_of_a_left_padded_batch_equals_each_prompt_alone(any_receiver):
    r = any_receiver
    tok = tokenize_left_padded(r.tokenizer, PROMPTS)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    assert len(set(mask.sum(1).tolist())) == 3  # three lengths: every row but the longest is padded
    got = capture_block(r.model, r.layer.path, ids, mask)
    for i, want in enumerate(_alone(r.model, r.layer.path, ids, mask)):
        torch.testing.assert_close(got[i, mask[i].bool()], want, atol=1e-5, rtol=1e-4)


def test_prefill_under_generate_sees_each_prompt_alone_and_records_its_norm(any_receiver):
    # The hook's view of the prefill (what every condition rewrites) and the receiver norm it records, against the
    # unpadded one-prompt-at-a-time states: the left padding must change neither.
    r = any_receiver
    tok = tokenize_left_padded(r.tokenizer, PROMPTS)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    rec = Recorder(PrefillInjection(mask))
    with block_hook(r.model, r.layer.path, rec):
        generate_ids(r.model, r.tokenizer, ids, mask, SETTINGS)
    alone = _alone(r.model, r.layer.path, ids, mask)
    for i, want in enumerate(alone):
        torch.testing.assert_close(rec.before[i, mask[i].bool()], want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rec.inj.receiver_norm_mean, _mean_norm(alone).float(), atol=1e-5, rtol=1e-4)


def test_batch_is_left_padded(batch):
    mask = batch["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask == 0).any()  # real padding exists in this batch


def test_hook_fires_once_on_prefill_only(receiver, batch):
    shapes = []
    with block_hook(receiver.model, receiver.layer.path, lambda h: shapes.append(tuple(h.shape))):
        generate_ids(receiver.model, receiver.tokenizer, batch["input_ids"], batch["attention_mask"], SETTINGS)
    assert shapes[0] == (*batch["input_ids"].shape, 48) and all(s[1] == 1 for s in shapes[1:])
    vec = torch.randn(batch["input_ids"].shape[0], 48, generator=torch.Generator().manual_seed(0))
    rec = Recorder(PrefillInjection(batch["attention_mask"], mode="additive", source=vec, scale=1e-3))
    _generate(receiver, batch["input_ids"], batch["attention_mask"], rec)
    assert rec.inj.calls > 1 and rec.after.shape[1] == batch["input_ids"].shape[1]  # wrote on the prefill call only


def test_batched_equals_one_at_a_time_fp32(receiver, batch):
    batched = _generate(receiver, batch["input_ids"], batch["attention_mask"])
    single = []
    for p in PROMPTS:
        t = tokenize_left_padded(receiver.tokenizer, [p])
        single += _generate(receiver, t["input_ids"], t["attention_mask"])
    assert batched == single
    assert any(batched)  # non-empty continuations: the comparison is not vacuous


@pytest.mark.parametrize("kind", ["zeros", "random"])
def test_replacement_changes_every_real_position_and_only_there(receiver, batch, kind):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B, T = ids.shape
    if kind == "zeros":
        inj = PrefillInjection(mask, mode="replace", source=torch.zeros(B, T, 48))
    else:
        rows = [random_vectors(42, f"s{i}", int(n), 48) for i, n in enumerate(mask.sum(1))]
        inj = PrefillInjection(mask, mode="rescaled", source=left_grid(rows, T, 48, torch.float32, "cpu"))
    rec = Recorder(inj)
    _generate(receiver, ids, mask, rec)
    real = mask.bool()
    changed = (rec.after != rec.before).any(dim=-1)
    assert changed[real].all() and not changed[~real].any()
    if kind == "random":  # same norm as the receiver's own state, per position
        assert torch.allclose(rec.after[real].norm(dim=-1), rec.before[real].norm(dim=-1), rtol=1e-4)
    else:
        assert torch.count_nonzero(rec.after[real]) == 0


def test_self_inject_equals_no_inject(receiver, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    own = capture_block(receiver.model, receiver.layer.path, ids, mask)
    rec = Recorder(PrefillInjection(mask, mode="replace", source=own))
    assert _generate(receiver, ids, mask, rec) == _generate(receiver, ids, mask)
    # the captured states are the prefill's own states (same position ids as generate)
    assert torch.allclose(rec.before[mask.bool()], own[mask.bool()], atol=1e-5)


def test_additive_injected_norm_is_scale_times_translated_norm(receiver, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    g = torch.Generator().manual_seed(1)
    vec = torch.randn(ids.shape[0], 48, generator=g)  # non-constant: a constant shift would vanish in LayerNorm
    inj = PrefillInjection(mask, mode="additive", source=vec, scale=0.01)
    rec = Recorder(inj)
    out = _generate(receiver, ids, mask, rec)
    assert torch.allclose(inj.injected_norm_mean, 0.01 * vec.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(inj.source_norm, vec.norm(dim=-1), rtol=1e-6)  # the paper's additive translated norm
    real = mask.bool()
    delta = rec.after - rec.before
    assert torch.allclose(delta[real].norm(dim=-1), (0.01 * vec.norm(dim=-1))[:, None].expand_as(mask)[real], rtol=1e-3)
    assert torch.count_nonzero(delta[~real]) == 0
    big = PrefillInjection(mask, mode="additive", source=vec * 1000, scale=1.0)
    assert _generate(receiver, ids, mask, big) != _generate(receiver, ids, mask)  # steering does reach the output
    assert len(out) == 3
    real = [b[m.bool()] for b, m in zip(rec.before, mask)]
    assert torch.allclose(inj.receiver_norm_mean, _mean_norm(real).float(), rtol=1e-5)


def test_best_alpha_records_the_blended_norm(receiver, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = [random_vectors(7, f"s{i}", int(n), 48) for i, n in enumerate(mask.sum(1))]
    source = left_grid(rows, ids.shape[1], 48, torch.float32, "cpu")
    inj = PrefillInjection(mask, mode="rescaled", source=source, alpha=0.3)
    rec = Recorder(inj)
    _generate(receiver, ids, mask, rec)
    real = mask.bool()
    after, src = [a[m] for a, m in zip(rec.after, real)], [s[m] for s, m in zip(source, real)]
    assert torch.allclose(inj.injected_norm_mean, _mean_norm(after).float(), rtol=1e-5)
    assert (inj.injected_norm_mean < inj.receiver_norm_mean).all()  # blending two directions shortens the state
    assert torch.allclose(inj.source_norm, _mean_norm(src).float(), rtol=1e-6)
    none = PrefillInjection(mask)
    _generate(receiver, ids, mask, none)
    assert none.source_norm is None and none.injected_norm_mean is None and none.receiver_norm_mean is not None


def test_prefill_shape_mismatch_is_an_error(receiver, batch):
    inj = PrefillInjection(batch["attention_mask"][:, 1:], mode="none")
    with pytest.raises(RuntimeError, match="prefill pass reached the injection block with shape"):
        _generate(receiver, batch["input_ids"], batch["attention_mask"], inj)


def test_right_padded_batch_is_refused(receiver, batch):
    with pytest.raises(ValueError, match="not left-padded"):
        generate_ids(
            receiver.model, receiver.tokenizer, batch["input_ids"].flip(1), batch["attention_mask"].flip(1), SETTINGS
        )


def test_frozen_models_run_without_cudnn_attention_and_restore_it(receiver, batch):
    """cuDNN's SDPA plans per shape (slow for generation); it is off inside the model's forward, and the global
    setting is back afterwards, also when the forward is cut short by an exception (the early stop of extraction)."""
    seen = []
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with block_hook(
        receiver.model, receiver.layer.path, lambda h: seen.append(torch.backends.cuda.cudnn_sdp_enabled())
    ):
        generate_ids(receiver.model, receiver.tokenizer, batch["input_ids"], batch["attention_mask"], SETTINGS)
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    capture_block(receiver.model, receiver.layer.path, batch["input_ids"], batch["attention_mask"])  # stops early
    assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
