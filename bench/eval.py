r"""Benchmark: batched generation (this project) against one prompt at a time (the paper's loop), same models/prompts.

    python bench/eval.py --pair tiny --dtype float32 --num-prompts 16 --batch-size 16 --device cpu
    python bench/eval.py --pair pythia-shape --num-prompts 4 --max-new-tokens 16
    python bench/eval.py --pair pythia-shape --data ../shared/data/multihop/clean_eval.jsonl --num-prompts 396 \
        --batch-size 64 --device cuda --dtype float32 bfloat16 --single-time-limit 200
    python bench/eval.py --matrix --pair tiny organisms --num-prompts 100 --batch-size 64 --threads 1
    python bench/eval.py --matrix --pair organisms --baseline /tmp/main  # + main's stacked command (git archive)
    python bench/eval.py --matrix --pair organisms --repeat 3  # medians (ranges) of 3 rounds on a noisy machine

Both paths run the receiver with the paper's decoding settings and an additive prefill injection hook (hook cost
included). Prints samples/s of each path, the ratio, and how many answers differ (0 expected on fp32; bf16 may
differ); with ``--single-time-limit`` the one-at-a-time rate is over the prompts it finished in that time.
``--matrix``: the whole paper matrix (11 conditions x 3 seeds, one translator per seed) as three commands, each a
process of its own (bench/matrix.py): ``evaluate.py test`` stacked and per run, and the paper's runner.
"""

from __future__ import annotations

import argparse
import time

import torch

from activation_transfer.injection.prefill_hook import PrefillInjection, prefill_injection
from activation_transfer.models.frozen_lm import ModelRef, load_ref
from activation_transfer.models.generation import GenerationSettings, decode, generate_ids
from activation_transfer.task.generator import EVAL_SEED, generate_samples
from activation_transfer.task.prompts import format_prompt, tokenize_left_padded
from datamodules.qa_sources import read_jsonl

PAIRS = {"tiny": "tiny-neox-large", "pythia-shape": "pythia-410m-shape"}


def run(receiver, prompts, settings, batch_size, device, deadline=None):
    answers = []
    for start in range(0, len(prompts), batch_size):
        if deadline is not None and time.perf_counter() > deadline:
            break
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


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def bench_dtype(args, dtype: str, prompts: list[str]) -> None:
    receiver = load_ref(ModelRef(PAIRS[args.pair], layer=0.67, dtype=dtype))
    receiver.model.to(args.device)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    run(receiver, prompts[:1], settings, 1, args.device)  # warm-up

    def timed(bs, limit=None):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = run(receiver, prompts, settings, bs, args.device, None if limit is None else t0 + limit)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    batched, t_batched = timed(args.batch_size)
    single, t_single = timed(1, args.single_time_limit)
    differ = sum(a != b for a, b in zip(single, batched))
    n, n1 = len(prompts), len(single)
    print(
        f"pair={args.pair} ({PAIRS[args.pair]}) dtype={dtype} device={device_name(args.device)} prompts={n} "
        f"batch_size={args.batch_size} max_new_tokens={args.max_new_tokens} torch={torch.__version__}"
    )
    cut = "" if n1 == n else f" (stopped by --single-time-limit after {n1}/{n} prompts)"
    print(f"one-at-a-time: {n1 / t_single:.2f} samples/s ({t_single:.2f} s){cut}")
    print(f"batched:       {n / t_batched:.2f} samples/s ({t_batched:.2f} s)")
    print(
        f"speed-up (samples/s ratio): {(n / t_batched) / (n1 / t_single):.2f}x; "
        f"answers differing between the two: {differ}/{n1}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", nargs="+", default=["tiny"], help=f"{', '.join(PAIRS)}; --matrix: tiny, organisms")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], nargs="+", default=["float32"])
    p.add_argument("--data", help="JSONL file in the paper's format (default: the built-in generator)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--single-time-limit", type=float, help="seconds after which the one-at-a-time loop stops")
    p.add_argument("--matrix", action="store_true", help="the paper matrix: project (stacked, per run) vs paper runner")
    p.add_argument("--threads", type=int, default=1, help="--matrix: OMP/MKL threads of each process")
    p.add_argument("--repeat", type=int, default=1, help="--matrix: rounds of every command; medians and ranges")
    p.add_argument("--baseline", help="--matrix: also time the stacked command of this checkout (e.g. main's tree)")
    args, rest = p.parse_known_args()
    if args.matrix:
        from matrix import main as matrix_main  # bench/ is the script's folder

        matrix_main(args, rest)
        return
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")

    if args.data:
        samples = read_jsonl(args.data)[: args.num_prompts]
    else:
        samples = generate_samples(args.num_prompts, EVAL_SEED)
    prompts = [format_prompt(s.context, s.question) for s in samples]
    if len(args.pair) != 1 or args.pair[0] not in PAIRS:
        p.error(f"--pair takes one of {', '.join(PAIRS)} (without --matrix)")
    (args.pair,) = args.pair
    for dtype in args.dtype:
        bench_dtype(args, dtype, prompts)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the previous dtype's receiver is gone with bench_dtype's frame


if __name__ == "__main__":
    main()
