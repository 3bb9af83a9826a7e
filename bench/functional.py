r"""Benchmark functional translator training (backpropagation through the frozen receiver): samples/s before and after
the training speed-ups, side by side in one run, and peak memory.

    python bench/functional.py                                               # tiny presets, CPU
    python bench/functional.py --sender organism:sender --receiver organism:receiver --receiver-layer 0 \
        --batch-size 16                                                      # make demo's functional translator
    python bench/functional.py --sender organism:sender --receiver organism:receiver --kv --batch-size 16  # its KV one
    python bench/functional.py --sender pythia-160m-shape --receiver pythia-410m-shape --sender-layer 8 \
        --receiver-layer 16 --device cuda --bf16 --only after                 # the paper's shapes (random weights)

Each variant trains a translator from the same initial weights on the same batches: ``--epochs`` passes over
``--samples`` generated QA samples (the demo: 6000 samples, 3 epochs), after one untimed warmup step. ``before`` is the
per-batch path (the sender runs on every batch, the receiver on the whole padded batch, every batch tokenized);
``after`` fills the sender's context cache first (timed) and groups rows by length (``sender_cache_mb``,
``group_by_length``). The translators' largest weight difference at the end says whether both trained the same.
Peak memory: the resident set's high-water mark (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA). Quote a figure
with the printed device and thread count; the Pythia-shaped presets have random weights (speed only).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from cli.organisms import ensure_organisms
from datamodules.qa_training import QATrainingDataModule
from lightning_modules.functional_translator import FunctionalTranslatorModule
from lightning_modules.kv_translator import KVTranslatorModule

# What each variant sets; ``before`` is the per-batch path the trainers ran before the speed-ups.
VARIANTS = {
    "before": {"sender_cache_mb": 0.0, "group_by_length": False},
    "after": {"sender_cache_mb": 1024.0, "group_by_length": True},
}


def rss_mb() -> float:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(args, options: dict, device: torch.device):
    """A trainer module (the same initial translator for every variant) and its optimizer."""

    def layer(v: float) -> int | float:
        return int(v) if v >= 1 else v

    torch.manual_seed(0)
    refs = {"name": args.sender, "layer": layer(args.sender_layer)}, {"name": args.receiver, "layer": 0}
    if args.kv:
        options = {k: v for k, v in options.items() if k != "group_by_length"}  # the KV student is one short pass
        module = KVTranslatorModule(*refs, objective=args.objective, **options)
    else:
        refs[1]["layer"] = layer(args.receiver_layer)
        module = FunctionalTranslatorModule(*refs, objective=args.objective, mse_weight=args.mse_weight, **options)
    module = module.to(device)
    return module, module.configure_optimizers()["optimizer"]


def train(args, name: str, batches: list, samples: list, device: torch.device) -> dict:
    """One variant's run: returns samples/s over the timed epochs (cache fill included), peak memory, weights."""
    module, opt = build(args, VARIANTS[name], device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def step(batch) -> None:
        if name == "before":
            module.token_memo.clear()  # the per-batch path tokenized every batch
        with autocast:
            loss = module.losses(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(batches[0])  # warmup (not timed, cache empty)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = peak = rss_mb()
    t0 = time.perf_counter()
    module.fill_context_cache(samples)
    fill = time.perf_counter() - t0
    n = 0
    for _ in range(args.epochs):
        for batch in batches:
            step(batch)
            n += len(batch)
            peak = max(peak, rss_mb())
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    weights = torch.cat([p.detach().flatten().float().cpu() for p in module.translator.parameters()])
    return {"rate": n / elapsed, "fill": fill, "elapsed": elapsed, "peak": peak, "growth": peak - base, "w": weights}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sender", default="tiny-neox")
    p.add_argument("--receiver", default="tiny-neox-large")
    p.add_argument("--sender-layer", type=float, default=0.67, help="block index (>= 1) or relative depth")
    p.add_argument("--receiver-layer", type=float, default=0.67, help="block index (>= 1) or relative depth")
    p.add_argument("--kv", action="store_true", help="the KV projector's trainer (KVTranslatorModule)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    p.add_argument("--samples", type=int, default=320, help="training samples of an epoch")
    p.add_argument("--epochs", type=int, default=3, help="timed passes over them (the demo trains 3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--only", choices=sorted(VARIANTS), default=None, help="run one variant")
    p.add_argument("--objective", default="answer_ce", choices=["answer_ce", "distill"])
    p.add_argument("--mse-weight", type=float, default=0.0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    ensure_organisms([args.sender, args.receiver])  # organism:<role> names: trained once and cached, then resolved
    data = QATrainingDataModule(num_train_samples=args.samples, num_val_samples=1, batch_size=args.batch_size)
    data.setup()
    batches = list(data.train_dataloader())
    samples = list(data.train_set.samples)
    names = [args.only] if args.only else list(VARIANTS)
    results = {name: train(args, name, batches, samples, device) for name in names}

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, {precision}")
    trainer = "KV projector" if args.kv else "slot translator"
    print(
        f"{trainer}: {args.sender} -> {args.receiver}, objective {args.objective}, batch {args.batch_size}, "
        f"{len(samples)} samples x {args.epochs} epochs"
    )
    for key, r in results.items():
        print(
            f"  {key:<6} {r['rate']:7.1f} samples/s ({r['elapsed']:.1f} s, sender cache fill {r['fill']:.1f} s), "
            f"peak RSS {r['peak']:.0f} MiB (+{r['growth']:.0f})"
        )
        if device.type == "cuda":
            print(f"CUDA max_memory_allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    if len(results) == 2:
        before, after = results["before"], results["after"]
        diff = float((before["w"] - after["w"]).abs().max())
        print(
            f"  speed-up x{after['rate'] / before['rate']:.2f}; largest translator weight difference at the end "
            f"{diff:.3g} ({'bit-identical' if diff == 0 else 'float reassociation'})"
        )


if __name__ == "__main__":
    main()
