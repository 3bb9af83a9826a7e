"""Issue 22 item 1: ``answering.resolve`` stacks runs of one prompt width into one ``generate``, each row block with
its own prefill write; rows that end (EOS) early or late give the texts and norms of their own ``generate``."""

from __future__ import annotations

import pytest
import torch

import activation_transfer.injection.answering as answering
from activation_transfer.injection.answering import PendingAnswers, request_injected, resolve
from activation_transfer.injection.conditions import paper_conditions, random_vectors
from activation_transfer.injection.sources import left_grid
from activation_transfer.models.frozen_lm import ModelRef, load_ref
from activation_transfer.models.generation import GenerationSettings, generate_texts
from activation_transfer.task.prompts import tokenize_left_padded

PROMPTS = [
    "Context: Alice lives in Tokyo. Tokyo is located in Japan.\nQ: What country does Alice live in?\nA:",
    "Context: Bob works in Lima.\nQ: Where?\nA:",
    "Context: Omar moved to Oslo. Oslo is part of Norway. Norway lies in Europe.\nQ: What continent?\nA:",
    "Context: Mia studies in Rome.\nQ: Where does Mia study?\nA:",
]
OTHER = ["Q: Where?\nA:", "Q: What country does Alice live in?\nA:"]  # another width (the relay's prompts)
SETTINGS = GenerationSettings(max_new_tokens=10)


# GPT-2 blocks take the KV cache by position, GPT-NeoX blocks by keyword: the shared prefill must serve both.
# (tiny-gpt2 has 2 blocks: its write goes after block 0, so that a block runs above it.)
@pytest.fixture(scope="module", params=[("tiny-neox-large", 0.67), ("tiny-gpt2", 0)], ids=lambda p: p[0])
def receiver(request):
    """A tiny receiver with EOS scored like its most frequent answer token, so rows end after different lengths."""
    name, layer = request.param
    r = load_ref(ModelRef(name, layer=layer))
    texts = generate_texts(r.model, r.tokenizer, PROMPTS, SETTINGS)
    ids = [t for text in texts for t in r.tokenizer(text)["input_ids"]]
    frequent = max(set(ids), key=ids.count)
    head = r.model.get_output_embeddings().weight
    with torch.no_grad():
        head[r.tokenizer.eos_token_id] = head[frequent] + 1e-3 * head[frequent].abs()
    return r


def _runs(receiver) -> list[PendingAnswers]:
    specs = paper_conditions(scale=0.5, alpha=0.3)
    tok = tokenize_left_padded(receiver.tokenizer, PROMPTS)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    hidden = receiver.model.config.hidden_size
    sids = [f"s{i}" for i in range(len(PROMPTS))]

    def draw(seed):
        rows = [random_vectors(seed, sid, int(n), hidden) for sid, n in zip(sids, mask.sum(1).tolist())]
        return rows, left_grid(rows, ids.shape[1], hidden, torch.float32, "cpu")

    (r1, g1), (r2, g2) = draw(1), draw(2)
    other = tokenize_left_padded(receiver.tokenizer, OTHER)
    return [
        request_injected(ids, mask, specs["no_inject"], sids, None),
        request_injected(ids, mask, specs["additive"], sids, torch.stack([r[-1] for r in r1]), r1),
        request_injected(ids, mask, specs["replace"], sids, g1, r1),
        request_injected(ids, mask, specs["scale_corrected"], sids, g2, r2, donor_ids=sids[::-1]),
        request_injected(ids, mask, specs["best_alpha"], sids, g1, r1),
        request_injected(other["input_ids"], other["attention_mask"], specs["no_inject"], ["o0", "o1"], None),
        request_injected(ids[:1], mask[:1], specs["zero_replacement"], sids[:1], torch.zeros_like(g1[:1])),
        PendingAnswers.answered((["known"], [{"prompt_len": 1}])),
    ]


def test_stacked_answers_equal_per_run_answers_with_rows_ending_apart(receiver, monkeypatch):
    calls: list[int] = []
    real = answering.generate_ids
    monkeypatch.setattr(answering, "generate_ids", lambda *a, **k: calls.append(a[2].shape[0]) or real(*a, **k))
    per_run = resolve(receiver, _runs(receiver), SETTINGS)
    assert calls == [4, 4, 4, 4, 4, 2, 1]
    calls.clear()
    stacked = resolve(receiver, _runs(receiver), SETTINGS, max_rows=100)
    assert calls == [21, 2]  # one generate per prompt width
    calls.clear()
    capped = resolve(receiver, _runs(receiver), SETTINGS, max_rows=9)
    assert calls == [8, 8, 5, 2]  # runs kept whole, in order
    assert stacked == per_run and capped == per_run
    lengths = {len(receiver.tokenizer(p)["input_ids"]) for preds, _ in per_run[:5] for p in preds}
    assert min(lengths) < 5 and max(lengths) >= 8  # some rows ended early, some ran (nearly) to the end
    # The writes differ between runs, so a row given another run's write would show.
    assert len({tuple(preds) for preds, _ in per_run[:5]}) > 2
    assert per_run[-1] == (["known"], [{"prompt_len": 1}])


def test_a_run_stacked_with_others_is_refused_when_its_rows_do_not_fit(receiver):
    (run,) = _runs(receiver)[:1]
    stacked = answering.StackedInjection([(run.injection, slice(0, 4))])
    with pytest.raises(RuntimeError, match="has 5 rows, the stacked runs 4"):
        stacked(torch.zeros(5, 3, receiver.model.config.hidden_size))


def test_shared_prefill_runs_the_blocks_below_the_write_once_per_distinct_prompt(receiver):
    """The blocks up to the injection block see each distinct prompt row once over two ``generate`` calls (the
    rows above it every row), and the answers equal a plain ``generate``'s."""
    from activation_transfer.injection.prefill_hook import SharedPrefill
    from activation_transfer.models.generation import decode, generate_ids
    from activation_transfer.models.hooks import get_module

    tok = tokenize_left_padded(receiver.tokenizer, PROMPTS[:2] * 3)  # six rows, two distinct
    ids, mask = tok["input_ids"], tok["attention_mask"]
    parent, _, index = receiver.layer.path.rpartition(".")
    blocks = list(get_module(receiver.model, parent))
    below, above = blocks[int(index)], blocks[int(index) + 1]
    seen = {"below": [], "above": []}
    hooks = [
        below.mlp.register_forward_hook(lambda m, i, o: seen["below"].append(i[0].shape[:2])),
        above.mlp.register_forward_hook(lambda m, i, o: seen["above"].append(i[0].shape[:2])),
    ]
    shared = SharedPrefill()
    try:
        got = []
        for _ in range(2):
            with shared.reusing(receiver.model, receiver.layer.path, ids, mask):
                got.append(
                    decode(receiver.tokenizer, generate_ids(receiver.model, receiver.tokenizer, ids, mask, SETTINGS))
                )
    finally:
        for h in hooks:
            h.remove()
    width = ids.shape[1]
    assert [s for s in seen["below"] if s[1] == width] == [(2, width)]  # once, two rows, over both calls
    assert [s for s in seen["above"] if s[1] == width] == [(6, width)] * 2
    plain = decode(receiver.tokenizer, generate_ids(receiver.model, receiver.tokenizer, ids, mask, SETTINGS))
    assert got == [plain, plain]
    assert "forward" not in below.__dict__  # the blocks are back to their own forward
