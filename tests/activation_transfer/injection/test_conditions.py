"""Pure condition math: masks, modes, derangement, seeded random vectors, the condition registry."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from activation_transfer.injection.conditions import (
    CONDITION_NAMES,
    apply_injection,
    bucketed_derangement,
    build_conditions,
    masked_norm_mean,
    random_vectors,
    sequential_random_vectors,
)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 8, generator=g) * 10
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    src = torch.randn(3, 5, 8, generator=g)
    return h, mask, src


def _mean_real_norm(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The paper's per-row diagnostic, by hand: mean L2 norm over the row's real (mask 1) positions."""
    out = []
    for row, m in zip(x, mask):
        norms = [float(torch.sqrt((v.double() ** 2).sum())) for v, keep in zip(row, m) if keep]
        out.append(sum(norms) / len(norms))
    return torch.tensor(out)


def test_masked_norm_mean_by_hand():
    # Row 0 is left padded: the pad's (100, 0) must not count; its real vectors have norms 5 and 10 -> 7.5.
    # Row 1 has no padding: norms 0, 1, 2 -> 1.0.
    x = torch.tensor([[[100.0, 0.0], [3.0, 4.0], [6.0, 8.0]], [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert masked_norm_mean(x, mask).tolist() == [7.5, 1.0]


def test_masked_norm_mean_matches_the_hand_definition_on_a_padded_batch(batch):
    h, mask, _ = batch
    assert torch.allclose(masked_norm_mean(h, mask), _mean_real_norm(h, mask), rtol=1e-6)


def test_registry_has_the_eleven_paper_conditions():
    specs = build_conditions(CONDITION_NAMES)
    assert [s.name for s in specs] == list(CONDITION_NAMES) and len(specs) == 11
    det = {s.name for s in specs if s.deterministic}
    assert det == {"no_inject", "nl_relay", "b_to_b_self_inject", "zero_replacement"}
    by = {s.name: s for s in specs}
    assert by["additive"].scale == 0.01 and by["best_alpha"].alpha == 0.3 and by["scale_corrected"].alpha == 1.0
    assert by["same_norm_random"].seeded and not by["same_norm_random"].uses_translator
    assert by["shuffled_translation_strict_matched"].strict and by["shuffled_translation"].seeded
    assert by["replace"].needs_same_tokens and not by["additive"].needs_same_tokens


def test_unknown_or_repeated_condition_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown condition 'replce'.*known: no_inject"):
        build_conditions(["no_inject", "replce"])
    with pytest.raises(ValueError, match="listed twice"):
        build_conditions(["additive", "additive"])


@pytest.mark.parametrize("mode", ["additive", "replace", "rescaled"])
def test_injection_changes_real_positions_only(batch, mode):
    h, mask, src = batch
    source = src[:, -1] if mode == "additive" else src
    new, injected = apply_injection(mode, h, mask, source, alpha=0.3, scale=0.5)
    pad = ~mask.bool()
    assert torch.equal(new[pad], h[pad])  # pads bit-identical
    assert (new[mask.bool()] != h[mask.bool()]).any(dim=-1).all()  # every real position changed
    assert injected.shape == (3,)


def test_additive_broadcasts_scaled_vector(batch):
    h, mask, src = batch
    v = src[:, -1]
    new, injected = apply_injection("additive", h, mask, v, scale=0.01)
    diff = new - h
    for b in range(3):
        real = mask[b].bool()
        assert torch.allclose(diff[b, real], (0.01 * v[b]).expand(int(real.sum()), -1), atol=1e-5)
    assert torch.allclose(injected, 0.01 * v.norm(dim=-1), rtol=1e-6)


def test_additive_warns_when_the_receivers_dtype_rounds_the_write_away(batch):
    # States of norm ~72 (the paper's receivers at block 16) and the paper's 0.01 of a unit-scale vector: bfloat16
    # rounds the change to 0 or an ulp per element (about 0.8 of its norm wrong), float32 keeps it. The records
    # keep the intended norm either way.
    g = torch.Generator().manual_seed(1)
    h, v = torch.randn(3, 5, 64, generator=g) * 9, torch.randn(3, 64, generator=g)
    mask = batch[1]
    with pytest.warns(RuntimeWarning, match="in bfloat16 rounding distorts the added vector by more than half"):
        new, injected = apply_injection("additive", h.bfloat16(), mask, v, scale=0.01)
    assert torch.allclose(injected, 0.01 * v.norm(dim=-1), rtol=1e-6) and new.dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_injection("additive", h, mask, v, scale=0.01)
        apply_injection("additive", h.bfloat16(), mask, v, scale=10.0)  # a write bfloat16 can carry


def test_rescaled_alpha_one_has_receiver_norm_and_source_direction(batch):
    h, mask, src = batch
    new, injected = apply_injection("rescaled", h, mask, src, alpha=1.0)
    m = mask.bool()
    assert torch.allclose(new[m].norm(dim=-1), h[m].norm(dim=-1), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(new[m], src[m], dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    assert torch.allclose(injected, _mean_real_norm(h, mask), rtol=1e-5)


def test_rescaled_alpha_blends_and_reports_the_blended_norm(batch):
    h, mask, src = batch
    full, _ = apply_injection("rescaled", h, mask, src, alpha=1.0)
    blend, injected = apply_injection("rescaled", h, mask, src, alpha=0.3)
    m = mask.bool()
    assert torch.allclose(blend[m], 0.3 * full[m] + 0.7 * h[m], atol=1e-5)
    # The paper records the norm of the blended state it injects, which is below ||h|| (the rescaled c's norm).
    assert torch.allclose(injected, _mean_real_norm(blend, mask), rtol=1e-5)
    assert (injected < _mean_real_norm(h, mask) * 0.999).all()


def test_replace_and_zero(batch):
    h, mask, src = batch
    new, injected = apply_injection("replace", h, mask, src)
    m = mask.bool()
    assert torch.equal(new[m], src[m])
    zero, zinj = apply_injection("replace", h, mask, torch.zeros_like(h))
    assert torch.count_nonzero(zero[m]) == 0 and torch.count_nonzero(zero[~m]) == (~m).sum() * 8
    assert zinj.tolist() == [0.0, 0.0, 0.0]


def _paper_operation(name: str, h: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """The new state at one real position (h, T: vectors of size H), as PAPER.md's condition table writes it."""

    def rescaled(alpha):  # c = normalize(T) * ||h||; h <- alpha * c + (1 - alpha) * h
        return alpha * (src / src.norm() * h.norm()) + (1 - alpha) * h

    return {
        "replace": lambda: src,  # h <- T
        "scale_corrected": lambda: rescaled(1.0),
        "best_alpha": lambda: rescaled(0.3),
        "b_to_b_self_inject": lambda: src,  # T is the receiver's own state here
        "same_norm_random": lambda: rescaled(1.0),  # T is Gaussian here
        "shuffled_translation": lambda: rescaled(1.0),  # T is the donor's translation here
        "shuffled_translation_strict_matched": lambda: rescaled(1.0),
        "zero_replacement": lambda: torch.zeros_like(h),
    }[name]()


@pytest.mark.parametrize(
    "name",
    [
        "replace",
        "scale_corrected",
        "best_alpha",
        "b_to_b_self_inject",
        "same_norm_random",
        "shuffled_translation",
        "shuffled_translation_strict_matched",
        "zero_replacement",
    ],
)
def test_each_condition_writes_what_the_paper_defines(batch, name):
    h, mask, src = batch
    (spec,) = build_conditions([name])
    source = {"zero_replacement": torch.zeros_like(h), "b_to_b_self_inject": h.clone()}.get(name, src)
    new, injected = apply_injection(spec.mode, h, mask, source, alpha=spec.alpha, scale=spec.scale)
    for b in range(3):
        for t in range(5):
            want = _paper_operation(name, h[b, t], source[b, t]) if mask[b, t] else h[b, t]
            assert torch.allclose(new[b, t], want, rtol=1e-5, atol=1e-5), (name, b, t)
    # What the record calls the injected norm: the mean over real positions of the new state's norm.
    assert torch.allclose(injected, _mean_real_norm(new, mask), rtol=1e-5, atol=1e-6)
    if name in ("scale_corrected", "same_norm_random", "shuffled_translation"):  # "same norm": ||h|| per position
        assert torch.allclose(injected, _mean_real_norm(h, mask), rtol=1e-5)


def test_additive_is_the_papers_last_token_shift(batch):
    h, mask, src = batch
    (spec,) = build_conditions(["additive"])
    v = src[:, -1]  # T[last]
    new, injected = apply_injection(spec.mode, h, mask, v, alpha=spec.alpha, scale=spec.scale)
    for b in range(3):
        for t in range(5):
            want = h[b, t] + 0.01 * v[b] if mask[b, t] else h[b, t]  # h <- h + 0.01 * T[last]
            assert torch.allclose(new[b, t], want, atol=1e-6)
    assert torch.allclose(injected, torch.tensor([0.01 * float(torch.sqrt((r.double() ** 2).sum())) for r in v]))


def test_shape_errors(batch):
    h, mask, src = batch
    with pytest.raises(ValueError, match="do not line up"):
        apply_injection("replace", h, mask[:, 1:], src)
    with pytest.raises(ValueError, match="one vector per row"):
        apply_injection("additive", h, mask, src)


def test_derangement_same_length_no_self_matches_and_fallback():
    ids = [f"s{i}" for i in range(9)]
    lengths = [5, 5, 5, 7, 7, 9, 5, 11, 7]
    d = bucketed_derangement(ids, lengths, seed=42)
    length_of = dict(zip(ids, lengths))
    assert set(d.donors) == set(ids)
    assert all(length_of[d.donors[s]] == length_of[s] for s in ids)
    assert d.self_fallback == ("s5", "s7")
    assert all(d.donors[s] != s for s in d.strict_ids()) and len(d.strict_ids()) == 7
    # a permutation within each bucket
    assert sorted(d.donors.values()) == sorted(ids)
    many = [f"x{i}" for i in range(40)]
    maps = {seed: bucketed_derangement(many, [3] * 40, seed).donors for seed in (42, 123)}
    assert maps[42] != maps[123]


def _paper_donor_map(pairs, seed, strict):
    """A literal transcription of the paper runner's shuffle (arXiv 2606.03280, section 4.2), on indices."""
    buckets = {}
    for idx, (_, length) in enumerate(pairs):
        buckets.setdefault(length, []).append(idx)
    rng = random.Random(seed)
    donor_idx = {}
    for _, bucket in buckets.items():
        bucket_copy = list(bucket)
        rng.shuffle(bucket_copy)
        n = len(bucket_copy)
        if n == 1:
            if not strict:
                donor_idx[bucket_copy[0]] = bucket_copy[0]
            continue
        for i in range(n):
            donor_idx[bucket_copy[i]] = bucket_copy[(i + 1) % n]
    return {pairs[i][0]: pairs[j][0] for i, j in donor_idx.items()}


# Lengths whose first appearances are not sorted (12 before 5 before 9), with two singleton buckets.
PAIRS = [
    ("q7", 12),
    ("q2", 5),
    ("q9", 12),
    ("q0", 9),
    ("q4", 5),
    ("q1", 12),
    ("q8", 30),
    ("q3", 9),
    ("q5", 5),
    ("q6", 12),
    ("q10", 7),
    ("q11", 5),
]


@pytest.mark.parametrize("seed", [42, 123, 456])
def test_derangement_is_the_papers_algorithm(seed):
    d = bucketed_derangement([i for i, _ in PAIRS], [n for _, n in PAIRS], seed)
    assert d.donors == _paper_donor_map(PAIRS, seed, strict=False)
    assert d.self_fallback == ("q10", "q8")
    strict = _paper_donor_map(PAIRS, seed, strict=True)
    assert set(d.strict_ids()) == set(strict)
    assert {s: d.donors[s] for s in d.strict_ids()} == strict


def test_derangement_depends_on_dataset_order():
    # The paper's map is a function of the evaluation set in its order: bucket visiting order drives the rng.
    fwd = bucketed_derangement([i for i, _ in PAIRS], [n for _, n in PAIRS], 42)
    rev = bucketed_derangement([i for i, _ in PAIRS[::-1]], [n for _, n in PAIRS[::-1]], 42)
    assert rev.donors == _paper_donor_map(PAIRS[::-1], 42, strict=False) and rev.donors != fwd.donors


def test_derangement_rejects_duplicates():
    with pytest.raises(ValueError, match="unique"):
        bucketed_derangement(["a", "a"], [1, 1], 0)


def test_sequential_random_vectors_are_the_papers_stream():
    lengths = [("a", 3), ("b", 1), ("c", 5), ("d", 2), ("e", 4), ("f", 3), ("g", 2), ("h", 6), ("i", 1), ("j", 2)]
    got = sequential_random_vectors(123, lengths, 8)
    g = torch.Generator(device="cpu").manual_seed(123)
    # The paper's loop: one randn of the block output's shape per sample, in dataset order.
    expected = {sid: torch.randn((1, n, 8), generator=g, dtype=torch.float32)[0] for sid, n in lengths}
    assert list(got) == list(expected)
    assert all(got[sid].shape == (n, 8) and torch.equal(got[sid], expected[sid]) for sid, n in lengths)
    # Sub-batches of any size, in any order, pick the same vectors: nothing is drawn per batch.
    for size in (1, 3, 8):
        chunks = [lengths[i : i + size] for i in range(0, len(lengths), size)]
        for chunk in reversed(chunks):
            assert all(torch.equal(got[sid], expected[sid]) for sid, _ in chunk)
    # Whereas a fresh generator per batch of 3 (the trap) would repeat the first batch's stream.
    g = torch.Generator(device="cpu").manual_seed(123)
    per_batch = [torch.randn((1, n, 8), generator=g)[0] for _, n in lengths[3:6]]
    assert not torch.equal(per_batch[0], got["d"])
    assert not torch.equal(sequential_random_vectors(42, lengths, 8)["a"], got["a"])
    with pytest.raises(ValueError, match="unique"):
        sequential_random_vectors(0, [("a", 1), ("a", 2)], 4)


def test_random_vectors_depend_on_seed_and_sample_only():
    a = random_vectors(42, "s1", 4, 8)
    assert torch.equal(a, random_vectors(42, "s1", 4, 8))
    assert not torch.equal(a, random_vectors(123, "s1", 4, 8))
    assert not torch.equal(a, random_vectors(42, "s2", 4, 8))
    state = torch.random.get_rng_state()
    random_vectors(1, "s", 2, 2)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
