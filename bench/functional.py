r"""Benchmark functional translator training (backpropagation through the frozen receiver): samples/s and peak memory.

    python bench/functional.py                                               # tiny presets, CPU
    python bench/functional.py --sender organism:sender --receiver organism:receiver --receiver-layer 0 \
        --batch-size 16                                                      # make demo's functional translator
    python bench/functional.py --sender pythia-160m-shape --receiver pythia-410m-shape --sender-layer 8 \
        --receiver-layer 16 --device cuda --bf16                              # the paper's shapes (random weights)

A step is ``FunctionalTranslatorModule.training_step`` plus the AdamW step on generated QA samples, after one untimed
warmup step. Peak memory: the resident set's high-water mark (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA).
Quote a figure with the printed device and thread count; the Pythia-shaped presets have random weights (speed only).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from cli.organisms import ensure_organisms
from datamodules.qa_training import QATrainingDataModule
from lightning_modules.functional_translator import FunctionalTranslatorModule


def rss_mb() -> float:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sender", default="tiny-neox")
    p.add_argument("--receiver", default="tiny-neox-large")
    p.add_argument("--sender-layer", type=float, default=0.67, help="block index (>= 1) or relative depth")
    p.add_argument("--receiver-layer", type=float, default=0.67, help="block index (>= 1) or relative depth")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after one warmup step)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--objective", default="answer_ce", choices=["answer_ce", "distill"])
    p.add_argument("--mse-weight", type=float, default=0.0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    args = p.parse_args()

    def layer(v: float) -> int | float:
        return int(v) if v >= 1 else v

    device = torch.device(args.device)
    ensure_organisms([args.sender, args.receiver])  # organism:<role> names: trained once and cached, then resolved
    module = FunctionalTranslatorModule(
        {"name": args.sender, "layer": layer(args.sender_layer)},
        {"name": args.receiver, "layer": layer(args.receiver_layer)},
        objective=args.objective,
        mse_weight=args.mse_weight,
    ).to(device)
    opt = module.configure_optimizers()["optimizer"]
    data = QATrainingDataModule(
        num_train_samples=args.batch_size * (args.steps + 1), num_val_samples=1, batch_size=args.batch_size
    )
    data.setup()
    batches = list(data.train_dataloader())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    base = rss_mb()
    peak = base
    n, t0 = 0, None
    for i, batch in enumerate(batches[: args.steps + 1]):
        if i == 1:  # after the warmup step
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        with autocast:
            loss = module.losses(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(batch) if i else 0
        peak = max(peak, rss_mb())
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    h = module.hparams
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, {precision}")
    print(
        f"{args.sender} {h.sender['layer']} (d={h.sender_dim}) -> {args.receiver} {h.receiver['layer']} "
        f"(d={h.receiver_dim}), objective {h.loss}, batch {args.batch_size}, {args.steps} timed steps"
    )
    print(f"{n / elapsed:.1f} samples/s ({elapsed / args.steps * 1000:.0f} ms/step)")
    print(f"peak RSS {peak:.0f} MiB (growth during training {peak - base:.0f} MiB)")
    if device.type == "cuda":
        print(f"CUDA max_memory_allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
