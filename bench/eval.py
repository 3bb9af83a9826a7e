"""Benchmark: batched generation (this project) against one prompt at a time (the paper's loop), same models/prompts.

    python bench/eval.py --pair tiny --dtype float32 --num-prompts 16 --batch-size 16 --device cpu
    python bench/eval.py --pair pythia-shape --num-prompts 4 --max-new-tokens 16

Both paths run the receiver with the paper's decoding settings and an additive prefill injection hook (so the hook
cost is included), on prompts from the built-in generator. Prints samples/s of each path, the ratio, and how many
answers differ between the two (0 expected on fp32; bf16 may differ).
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_modules.components.frozen_lm import ModelRef, load_ref
from lightning_modules.components.generation import GenerationSettings, decode, generate_ids
from lightning_modules.components.injection import PrefillInjection, prefill_injection
from lightning_modules.components.prompts import format_prompt, tokenize_left_padded
from lightning_modules.components.synthetic_multihop import EVAL_SEED, generate_samples

PAIRS = {"tiny": "tiny-neox-large", "pythia-shape": "pythia-410m-shape"}


def run(receiver, prompts, settings, batch_size, device):
    answers = []
    for start in range(0, len(prompts), batch_size):
        tok = tokenize_left_padded(receiver.tokenizer, prompts[start : start + batch_size])
        ids, mask = tok["input_ids"], tok["attention_mask"]
        # One vector per prompt (seeded by its index), so batching does not change what is injected.
        hidden = receiver.model.config.hidden_size
        vec = torch.stack(
            [torch.randn(hidden, generator=torch.Generator().manual_seed(i)) for i in range(start, start + len(ids))]
        ).to(device)
        inj = PrefillInjection(
            mask, mode="additive", source=vec.to(next(receiver.model.parameters()).dtype), scale=0.01
        )
        with prefill_injection(receiver.model, receiver.layer.path, inj):
            answers += decode(receiver.tokenizer, generate_ids(receiver.model, receiver.tokenizer, ids, mask, settings))
    return answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=sorted(PAIRS), default="tiny")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    receiver = load_ref(ModelRef(PAIRS[args.pair], layer=0.67, dtype=args.dtype))
    receiver.model.to(args.device)
    samples = generate_samples(args.num_prompts, EVAL_SEED)
    prompts = [format_prompt(s.context, s.question) for s in samples]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    run(receiver, prompts[:1], settings, 1, args.device)  # warm-up

    def timed(bs):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = run(receiver, prompts, settings, bs, args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    single, t_single = timed(1)
    batched, t_batched = timed(args.batch_size)
    differ = sum(a != b for a, b in zip(single, batched))
    n = len(prompts)
    print(f"pair={args.pair} dtype={args.dtype} device={args.device} prompts={n} batch_size={args.batch_size} "
          f"max_new_tokens={args.max_new_tokens} threads={torch.get_num_threads()}")  # fmt: skip
    print(f"one-at-a-time: {n / t_single:.2f} samples/s ({t_single:.2f} s)")
    print(f"batched:       {n / t_batched:.2f} samples/s ({t_batched:.2f} s)")
    print(f"speed-up: {t_single / t_batched:.2f}x; answers differing between the two: {differ}/{n}")


if __name__ == "__main__":
    main()
