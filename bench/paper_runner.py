r"""The paper's evaluation loop, for timing: one prompt at a time, one run (condition x seed) after another.

    python bench/paper_runner.py --sender S --receiver R --translators T42 T123 T456 --seeds 42 123 456 \
        --num-prompts 100 --out answers.json

As the paper's runner (arXiv 2606.03280, section 4.2) every seed runs all eleven conditions (the deterministic ones
too) with its own translator, every prompt alone: a sender pass (translated and shuffled conditions), a receiver
pass (``b_to_b_self_inject``), the relay and the answer each a batch-1 ``generate``. Imports no Lightning. Writes
the answers (``condition|seed|sample_id`` -> text) and the seconds of the loop (models loaded) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from activation_transfer.injection.conditions import bucketed_derangement, paper_conditions
from activation_transfer.injection.prefill_hook import PrefillInjection, prefill_injection
from activation_transfer.injection.sources import capture_block
from activation_transfer.models.frozen_lm import ModelRef, load_ref
from activation_transfer.models.generation import GenerationSettings, decode, generate_ids
from activation_transfer.task.generator import EVAL_SEED, generate_samples
from activation_transfer.task.prompts import (
    format_prompt,
    format_relay_receiver_prompt,
    format_relay_sender_prompt,
    tokenize_left_padded,
)
from activation_transfer.translators.loading import load_translator


def _answer(lm, prompt_tok, settings, spec=None, source=None, max_new_tokens=None) -> str:
    ids, mask = prompt_tok["input_ids"], prompt_tok["attention_mask"]
    if spec is None:
        new = generate_ids(lm.model, lm.tokenizer, ids, mask, settings, max_new_tokens)
    else:
        inj = PrefillInjection(mask, spec.mode, source, alpha=spec.alpha, scale=spec.scale)
        with prefill_injection(lm.model, lm.layer.path, inj):
            new = generate_ids(lm.model, lm.tokenizer, ids, mask, settings)
    return decode(lm.tokenizer, new)[0].strip()


@torch.no_grad()
def run(sender, receiver, translators, seeds, samples, settings: GenerationSettings) -> dict[str, str]:
    """Every condition x seed, prompt after prompt; ``condition|seed|sample_id`` -> answer."""
    specs = paper_conditions()
    tok = lambda lm, text: tokenize_left_padded(lm.tokenizer, [text], settings.max_prompt_tokens)  # noqa: E731
    prompts = {s.sample_id: format_prompt(s.context, s.question) for s in samples}
    lengths = {sid: int(tok(receiver, p)["attention_mask"].sum()) for sid, p in prompts.items()}
    hidden = receiver.model.config.hidden_size
    answers: dict[str, str] = {}
    for seed, translator in zip(seeds, translators):

        def translated(sid: str, translator=translator) -> torch.Tensor:
            t = tok(sender, prompts[sid])
            return translator.translate(
                capture_block(sender.model, sender.layer.path, t["input_ids"], t["attention_mask"])
            )

        donors = bucketed_derangement(list(prompts), [lengths[sid] for sid in prompts], seed)
        for name, spec in specs.items():
            if name.endswith("_functional"):
                continue
            gen = torch.Generator().manual_seed(seed)  # the sequential draw, one generator per run
            for s in samples:
                sid, t = s.sample_id, tok(receiver, prompts[s.sample_id])
                if name == "shuffled_translation_strict_matched" and sid in donors.self_fallback:
                    continue
                if name == "nl_relay":
                    relay_prompt = tok(sender, format_relay_sender_prompt(s.context))
                    relay = _answer(sender, relay_prompt, settings, max_new_tokens=settings.relay_max_new_tokens)
                    text = _answer(receiver, tok(receiver, format_relay_receiver_prompt(relay, s.question)), settings)
                elif name == "no_inject":
                    text = _answer(receiver, t, settings, spec)
                else:
                    if spec.source == "translated":
                        source = translated(sid)
                        source = source[:, -1] if spec.mode == "additive" else source
                    elif spec.source == "shuffled":
                        source = translated(donors.donors[sid])
                    elif spec.source == "random":
                        source = torch.randn((1, lengths[sid], hidden), generator=gen)
                    elif spec.source == "receiver":
                        source = capture_block(receiver.model, receiver.layer.path, t["input_ids"], t["attention_mask"])
                    else:
                        source = torch.zeros((1, lengths[sid], hidden))
                    text = _answer(receiver, t, settings, spec, source)
                answers[f"{name}|{seed}|{sid}"] = text
    return answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sender", required=True)
    p.add_argument("--receiver", required=True)
    p.add_argument("--translators", nargs="+", required=True, help="one checkpoint per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 123, 456])
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--relay-max-new-tokens", type=int, default=128)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    sender, receiver = load_ref(ModelRef(args.sender, layer=0.67)), load_ref(ModelRef(args.receiver, layer=0.67))
    translators = [load_translator(t) for t in args.translators]
    samples = generate_samples(args.num_prompts, EVAL_SEED)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, relay_max_new_tokens=args.relay_max_new_tokens)
    t0 = time.perf_counter()
    answers = run(sender, receiver, translators, args.seeds, samples, settings)
    seconds = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump({"work_seconds": seconds, "answers": answers}, f)


if __name__ == "__main__":
    main()
